"""Generation: EDM's Heun/Euler solver (deterministic or stochastic), per-seed noise, and image output.

`edm_sampler` is Algorithm 2 of EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"): Heun's method (or Euler's) on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma,
with optional "churn" that adds noise before each step. `ablation_sampler` is EDM's generalization used for its
ablations (EDM Table 1, Algorithm 1): the same ODE integrated in a time t with noise level function sigma(t) and signal
scaling s(t), and Heun's correction evaluated at t + alpha h. Both run on whatever sigma-grid they are given (see
`infonoise.grids`); they never build one. `StackedRandomGenerator` gives every sample its own seeded generator,
so an image depends only on its seed, not on the batch it was drawn in; `generate_images` splits seeds across
ranks in batches as EDM's generate.py does. `GuidedDenoiser` is the guided denoiser of autoguidance and
classifier-free guidance (Karras et al. 2024), which the solvers run in place of the network.
"""

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
import tqdm

from dnnlib.util import atomic_write
from infonoise.grids import edm_grid, vp_coefficients, vp_sigma, vp_t
from torch_utils import distributed as dist


class StackedRandomGenerator:
    """One torch.Generator per seed (seed mod 2^32, as EDM); draws stack one sample per generator."""

    def __init__(self, device: torch.device | str, seeds: Sequence[int]):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def _check_batch(self, size: Sequence[int]) -> None:
        if size[0] != len(self.generators):
            raise ValueError(f'Batch size {size[0]} does not match the number of seeds {len(self.generators)}')

    def randn(self, size: Sequence[int], **kwargs) -> torch.Tensor:
        self._check_batch(size)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input: torch.Tensor) -> torch.Tensor:
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, high: int, size: Sequence[int], **kwargs) -> torch.Tensor:
        self._check_batch(size)
        return torch.stack([torch.randint(high, size=size[1:], generator=gen, **kwargs) for gen in self.generators])


def _check_grid(sigmas: torch.Tensor) -> None:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f'A sigma-grid must be 1-D with at least 2 values, got shape {tuple(sigmas.shape)}')
    if sigmas[-1] != 0 or not (sigmas[:-1] > 0).all() or not (sigmas[1:] <= sigmas[:-1]).all():
        raise ValueError('A sigma-grid must be descending, positive, and end in 0')


@torch.no_grad()
def edm_sampler(
    net,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    solver: str = 'heun',
    S_churn: float = 0,
    S_min: float = 0,
    S_max: float = float('inf'),
    S_noise: float = 1,
) -> torch.Tensor:
    """EDM Algorithm 2 on the grid `sigmas` (N+1 descending values ending in 0); returns float64 images.

    `latents` are unit-variance noise [B, C, H, W]; the solver scales them by sigmas[0]. With S_churn > 0,
    each step whose sigma lies in [S_min, S_max] first raises the noise level by gamma = min(S_churn/N, sqrt(2)-1).
    """
    if solver not in ('heun', 'euler'):
        raise ValueError(f'Unknown solver "{solver}"; expected "heun" or "euler"')
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    _check_grid(sigmas)
    num_steps = len(sigmas) - 1

    # Snap the grid to levels the network supports; the final 0 stays.
    sigmas = sigmas.to(latents.device)
    t_steps = torch.cat([net.round_sigma(sigmas[:-1]), sigmas[-1:]])
    t_host = t_steps.tolist()

    x_next = latents.to(torch.float64) * t_steps[0]
    for i in range(num_steps):
        x_cur, t_cur, t_next = x_next, t_steps[i], t_steps[i + 1]

        # Increase noise temporarily; draw noise even when gamma = 0 so seeds reproduce EDM exactly.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_host[i] <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat**2 - t_cur**2).clip(min=0).sqrt() * S_noise * randn_like(x_cur)

        # Euler step.
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Apply the 2nd order correction, except on the last step (t_next = 0).
        if solver == 'heun' and i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)

    return x_next


@dataclasses.dataclass(frozen=True)
class _TimeCoordinates:
    """Noise level function sigma(t) with its derivative and inverse, and signal scaling s(t) (EDM Table 1)."""

    sigma: Callable[[torch.Tensor], torch.Tensor]
    sigma_deriv: Callable[[torch.Tensor], torch.Tensor]
    sigma_inv: Callable[[torch.Tensor], torch.Tensor]
    vp_scaling: bool  # s(t) = 1 / sqrt(1 + sigma(t)^2) if set, else s(t) = 1.

    def s(self, t: torch.Tensor) -> torch.Tensor | float:
        return 1 / (1 + self.sigma(t) ** 2).sqrt() if self.vp_scaling else 1

    def velocity(self, x: torch.Tensor, t: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        """dx/dt = (sigma'/sigma + s'/s) x - sigma' s / sigma D(x/s; sigma) (EDM Eq. 4), as sigma' (x - s D) / sigma
        + (s'/s) x, where s'/s = -sigma sigma' s^2 for the VP scaling and 0 without scaling."""
        sigma, sigma_deriv = self.sigma(t), self.sigma_deriv(t)
        if not self.vp_scaling:
            return sigma_deriv * (x - denoised) / sigma
        s = self.s(t)
        return sigma_deriv * (x - s * denoised) / sigma - sigma * sigma_deriv * s**2 * x


def _vp_schedule(beta_d: float, beta_min: float) -> tuple[Callable, Callable, Callable]:
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM Table 1, VP), its derivative and its inverse."""

    def sigma(t):
        return vp_sigma(t, beta_d, beta_min)

    def sigma_deriv(t):
        sigma_t = sigma(t)
        return 0.5 * (beta_min + beta_d * t) * (sigma_t + 1 / sigma_t)

    def sigma_inv(sigma):
        return vp_t(sigma, beta_d, beta_min)

    return sigma, sigma_deriv, sigma_inv


# sigma(t) = sqrt(t) (VE) and sigma(t) = t (EDM's own), each with its derivative and inverse.
_FIXED_SCHEDULES = {
    've': (torch.sqrt, lambda t: 0.5 / t.sqrt(), lambda sigma: sigma**2),
    'linear': (lambda t: t, lambda t: 1, lambda sigma: sigma),
}


def _schedule(name: str, sigma_min: float, sigma_max: float, epsilon_s: float) -> tuple[Callable, Callable, Callable]:
    if name in _FIXED_SCHEDULES:
        return _FIXED_SCHEDULES[name]
    if name != 'vp':
        raise ValueError(f'Unknown schedule "{name}"; expected "vp", "ve" or "linear"')
    if not 0 < epsilon_s < 1:
        raise ValueError(f'epsilon_s must lie in (0, 1), got {epsilon_s}')
    # Refit the betas so that sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max, as EDM does.
    beta_d, beta_min = vp_coefficients(sigma_min, sigma_max, epsilon_s)
    if not beta_d > 0:
        raise ValueError(
            f'schedule="vp" needs ln(1 + sigma_min^2) < epsilon_s ln(1 + sigma_max^2) for an increasing sigma(t); '
            f'got sigma_min={sigma_min:g}, sigma_max={sigma_max:g}, epsilon_s={epsilon_s:g}'
        )
    return _vp_schedule(beta_d, beta_min)


@torch.no_grad()
def ablation_sampler(
    net,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    solver: str = 'heun',
    schedule: str = 'linear',
    scaling: str = 'none',
    alpha: float = 1,
    epsilon_s: float = 1e-3,
    S_churn: float = 0,
    S_min: float = 0,
    S_max: float = float('inf'),
    S_noise: float = 1,
) -> torch.Tensor:
    """EDM's ablation solver on the σ-grid `sigmas` (N+1 descending values ending in 0); returns float64 images.

    The grid fixes the noise levels; `schedule` ("vp", "ve", "linear") and `scaling` ("vp", "none") choose the
    time t in which the ODE is integrated (t_i = sigma^-1(sigma_i), t_N = 0). VP's sigma(t) is refitted to
    sigma(epsilon_s) = sigma_{N-1} and sigma(1) = sigma_0. Heun's correction is evaluated at t_hat + alpha h,
    alpha in (0, 1]. Churn as `edm_sampler`; with schedule "linear", scaling "none" and alpha 1 the two agree
    bit for bit.
    """
    if solver not in ('heun', 'euler'):
        raise ValueError(f'Unknown solver "{solver}"; expected "heun" or "euler"')
    if scaling not in ('vp', 'none'):
        raise ValueError(f'Unknown scaling "{scaling}"; expected "vp" or "none"')
    if not 0 < alpha <= 1:
        raise ValueError(f'alpha must lie in (0, 1], got {alpha}')
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    _check_grid(sigmas)
    num_steps = len(sigmas) - 1
    ode = _TimeCoordinates(*_schedule(schedule, sigmas[-2].item(), sigmas[0].item(), epsilon_s), scaling == 'vp')

    # Snap the grid to levels the network supports and map it to times; t_N = 0.
    sigmas = sigmas.to(latents.device)
    t_steps = torch.cat([ode.sigma_inv(net.round_sigma(sigmas[:-1])), sigmas[-1:]])
    sigma_steps = ode.sigma(t_steps)
    sigma_host = sigma_steps.tolist()

    x_next = latents.to(torch.float64) * (sigma_steps[0] * ode.s(t_steps[0]))
    for i in range(num_steps):
        x_cur, t_cur, t_next, sigma_cur = x_next, t_steps[i], t_steps[i + 1], sigma_steps[i]

        # Increase noise temporarily; draw noise even when gamma = 0 so seeds reproduce EDM exactly.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= sigma_host[i] <= S_max else 0
        t_hat = ode.sigma_inv(net.round_sigma(sigma_cur + gamma * sigma_cur))
        sigma_hat, s_hat = ode.sigma(t_hat), ode.s(t_hat)
        noise = (sigma_hat**2 - sigma_cur**2).clip(min=0).sqrt() * s_hat * S_noise * randn_like(x_cur)
        x_hat = s_hat / ode.s(t_cur) * x_cur + noise

        # Euler step.
        h = t_next - t_hat
        denoised = net(x_hat / s_hat, sigma_hat, class_labels).to(torch.float64)
        d_cur = ode.velocity(x_hat, t_hat, denoised)
        if solver == 'euler' or i == num_steps - 1:
            x_next = x_hat + h * d_cur
            continue

        # Apply the 2nd order correction from t_hat + alpha h (which is t_next itself when alpha = 1).
        t_prime = t_next if alpha == 1 else t_hat + alpha * h
        x_prime = x_hat + alpha * h * d_cur
        denoised = net(x_prime / ode.s(t_prime), ode.sigma(t_prime), class_labels).to(torch.float64)
        d_prime = ode.velocity(x_prime, t_prime, denoised)
        x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)

    return x_next


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images in [-1, 1] (NCHW) to uint8 NHWC with EDM's conversion: x*127.5 + 128, clipped, truncated."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f'Expected images of shape [N, 1 or 3, H, W], got {tuple(images.shape)}')
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def tile_images(images: np.ndarray, grid_w: int | None = None, scale: int = 1, pad: int = 0) -> np.ndarray:
    """Tile uint8 NHWC images row by row into one HWC image, grid_w columns (default: a near-square grid).

    Each image is enlarged `scale` times by repeating its pixels (nearest neighbour, so pixels stay exact), and
    `pad` pixels of white (255) separate the cells and frame the grid: a white gap reads as a gap on dark images
    (MNIST) and on photographs alike. Cells left over in the last row are black.
    """
    num, height, width, channels = images.shape
    if num == 0:
        raise ValueError('Cannot tile an empty batch of images')
    grid_w = grid_w or math.ceil(math.sqrt(num))
    if grid_w < 1:
        raise ValueError(f'grid_w must be at least 1, got {grid_w}')
    if scale < 1:
        raise ValueError(f'scale must be at least 1, got {scale}')
    if pad < 0:
        raise ValueError(f'pad must be non-negative, got {pad}')
    grid_h = math.ceil(num / grid_w)
    cells = np.zeros([grid_h * grid_w, height, width, channels], dtype=np.uint8)
    cells[:num] = images
    cells = cells.repeat(scale, axis=1).repeat(scale, axis=2)
    # A gap above and left of every cell, then one more below and right of the grid, gives pad everywhere.
    cells = np.pad(cells, [(0, 0), (pad, 0), (pad, 0), (0, 0)], constant_values=255)
    cell_h, cell_w = cells.shape[1:3]
    grid = cells.reshape(grid_h, grid_w, cell_h, cell_w, channels).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(grid_h * cell_h, grid_w * cell_w, channels)
    return np.pad(grid, [(0, pad), (0, pad), (0, 0)], constant_values=255)


def side_by_side(
    images: Sequence[np.ndarray], titles: Sequence[str], pad: int = 8, font_path: str | None = None
) -> np.ndarray:
    """uint8 HWC images (e.g. sample grids) in one row on white, each centred under its title (a TrueType font file,
    default Pillow's own font), `pad` pixels apart; the images are pasted unchanged, and a row of grayscale images
    stays grayscale."""
    if not images or len(images) != len(titles):
        raise ValueError(f'Need one title per image, got {len(images)} images and {len(titles)} titles')
    size = max(12, min(image.shape[1] for image in images) // 24)
    font = PIL.ImageFont.truetype(font_path, size) if font_path else PIL.ImageFont.load_default(size=size)
    text_w = [math.ceil(font.getlength(title)) for title in titles]
    text_h = max(font.getbbox(title)[3] for title in titles) + pad
    cell_w = [max(image.shape[1], w) for image, w in zip(images, text_w)]
    channels = 1 if all(image.shape[2] == 1 for image in images) else 3
    canvas = PIL.Image.new('L' if channels == 1 else 'RGB', (pad + sum(w + pad for w in cell_w),
                           2 * pad + text_h + max(image.shape[0] for image in images)), 'white')  # fmt: skip
    draw, x = PIL.ImageDraw.Draw(canvas), pad
    for image, title, width, w in zip(images, titles, text_w, cell_w):
        draw.text((x + (w - width) // 2, pad), title, fill='black', font=font)
        pixels = image[:, :, 0] if channels == 1 else image.repeat(3 // image.shape[2], 2)
        canvas.paste(PIL.Image.fromarray(pixels), (x + (w - image.shape[1]) // 2, pad + text_h))
        x += w + pad
    return np.asarray(canvas).reshape(canvas.height, canvas.width, channels)


def save_image(image: np.ndarray, path: str | os.PathLike | BinaryIO) -> None:
    """Save one uint8 HWC image as PNG (to a path or a binary file): mode 'L' for 1 channel, 'RGB' for 3."""
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f'Expected an image of shape [H, W, 1 or 3], got {tuple(image.shape)}')
    if image.shape[2] == 1:
        PIL.Image.fromarray(image[:, :, 0], 'L').save(path, format='PNG')
    else:
        PIL.Image.fromarray(image, 'RGB').save(path, format='PNG')


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, grid_w: int | None = None) -> None:
    """Save a batch of float images in [-1, 1] (NCHW) as one PNG tile grid."""
    save_image(tile_images(images_to_uint8(images), grid_w), path)


class GuidedDenoiser:
    """D_w(x; σ, c) = D_guide(x; σ, c') + w (D_main(x; σ, c) - D_guide(x; σ, c')) (Karras et al. 2024, "Guiding a
    Diffusion Model with a Bad Version of Itself", Eq. 1 and §3), in float64. Autoguidance: the guide is a weaker
    network of the same data and c' = c. Classifier-free guidance (`null_label`): the guide is the main network itself
    and c' the all-zero label vector, the label a network trained with label dropout sees for "no class". Anything
    else (`round_sigma`, `img_shape`, `label_dim`, ...) is the main network's, so that the solvers take it as a net.
    """

    def __init__(self, net, guide, guidance: float, null_label: bool = False):
        self.net, self.guide, self.guidance, self.null_label = net, guide, float(guidance), null_label

    def __getattr__(self, name: str):  # Only for names the instance lacks.
        if 'net' not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__['net'], name)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        D_main = self.net(x, sigma, class_labels).to(torch.float64)
        guide_labels = torch.zeros_like(class_labels) if self.null_label and class_labels is not None else class_labels
        D_guide = self.guide(x, sigma, guide_labels).to(torch.float64)
        return D_guide + self.guidance * (D_main - D_guide)


def guided_denoiser(net, guidance: float = 1, guide=None):
    """The denoiser the solvers run: `net` itself at guidance 1 (the guide is neither called nor needed, so the
    samples are the unguided ones bit for bit), else `GuidedDenoiser` with `guide` (autoguidance) or, without one,
    with `net` under the null label (classifier-free guidance, which needs a class-conditional `net`)."""
    if guidance == 1:
        return net
    if guide is not None:
        return GuidedDenoiser(net, guide, guidance)
    if not net.label_dim:
        raise ValueError('Classifier-free guidance needs a class-conditional network; this one is unconditional')
    return GuidedDenoiser(net, net, guidance, null_label=True)


@torch.no_grad()
def sample_seeds(
    net,
    seeds: Sequence[int],
    sigmas: torch.Tensor,
    device: torch.device | str,
    class_idx: int | None = None,
    sampler: Callable = edm_sampler,
    binarize: bool = False,
    guidance: float = 1,
    guide=None,
    **sampler_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples of `seeds` from the solver `sampler` (EDM's name) on the σ-grid `sigmas`, each from its own seed's
    generator, and their class indices (None for an unconditional network). Labels are drawn even with `class_idx`,
    so that the noise that follows matches EDM's. `binarize` thresholds at 0 (x >= 0 is pixel >= 128 under EDM's
    x*127.5 + 128, the rule dataset_tool.py --binarize=threshold applies to the data). `guidance` and `guide` choose
    the denoiser (`guided_denoiser`); the random draws are the same whatever they are."""
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), *net.img_shape], device=device)
    labels = class_labels = None
    if net.label_dim:
        labels = rnd.randint(net.label_dim, size=[len(seeds)], device=device)
        if class_idx is not None:
            labels[:] = class_idx
        class_labels = torch.eye(net.label_dim, device=device)[labels]
    denoiser = guided_denoiser(net, guidance, guide)
    images = sampler(denoiser, latents, sigmas, class_labels, randn_like=rnd.randn_like, **sampler_kwargs)
    return (torch.where(images >= 0, 1.0, -1.0) if binarize else images), labels


def generate_images(
    net,
    seeds: list[int],
    sigmas: torch.Tensor,
    device: torch.device,
    max_batch_size: int = 64,
    progress: bool = True,
    **sample_kwargs,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """This rank's samples of `seeds` in batches of at most `max_batch_size` (EDM's split across ranks): yields
    (batch seeds, float samples in [-1, 1], class indices or None). `sample_kwargs` go to `sample_seeds` (class_idx,
    the solver `sampler`, binarize, guidance and guide, and the solver's options). Every rank must exhaust the
    iterator: each batch starts at a barrier, as in EDM."""
    for batch_seeds in tqdm.tqdm(
        dist.split_batches(seeds, max_batch_size), unit='batch', disable=(dist.get_rank() != 0 or not progress)
    ):
        dist.barrier()
        if batch_seeds:
            yield batch_seeds, *sample_seeds(net, batch_seeds, sigmas, device, **sample_kwargs)


def image_path(outdir: str, seed: int, subdirs: bool) -> str:
    """Where the image of `seed` goes: outdir/{seed:06d}.png, or one subdirectory per 1000 seeds."""
    image_dir = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(image_dir, f'{seed:06d}.png')


def write_images(outdir: str, seeds: list[int], images: torch.Tensor, subdirs: bool) -> None:
    """One PNG per seed, each written atomically (fid.py never reads a half-written image)."""
    for seed, image in zip(seeds, images_to_uint8(images)):
        path = image_path(outdir, seed, subdirs)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_write(path, 'wb') as f:
            save_image(image, f)


def read_images(outdir: str, seeds: list[int], subdirs: bool) -> np.ndarray:
    """The saved images of `seeds` as uint8 NHWC, read back from disk (so every rank's images are included)."""
    images = np.stack([np.array(PIL.Image.open(image_path(outdir, seed, subdirs))) for seed in seeds])
    return images.reshape(*images.shape[:3], -1)


def save_snapshot_grid(net, num: int, path: str, device: torch.device | str, scale: int = 1) -> None:
    """Save the sample grid `path` (RUN_DIR/samples-NNNNNN.png): the first `num` seeds as `generate.py
    --seeds=0-(num-1) --grid-png --grid-scale=SCALE --grid-pad=SCALE//2` draws them from the snapshot of `net`:
    EDM's grid (18 steps, rho 7, [0.002, 80] clamped to the network's range), Heun, random classes."""
    sigma_min, sigma_max = max(0.002, float(net.sigma_min)), min(80.0, float(net.sigma_max))
    images, _ = sample_seeds(net, list(range(num)), edm_grid(18, sigma_min, sigma_max, 7.0), device)
    with atomic_write(path, 'wb') as f:  # Never half-written.
        save_image(tile_images(images_to_uint8(images), scale=scale, pad=scale // 2), f)
