"""Sampling: EDM's deterministic/stochastic sampler, per-seed noise, and image output.

`edm_sampler` is Algorithm 2 of EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"): Heun's method (or Euler's) on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma,
with optional "churn" that adds noise before each step. It runs on whatever sigma-grid it is given (see
`infonoise.grids`); it never builds one. `StackedRandomGenerator` gives every sample its own seeded generator,
so an image depends only on its seed, not on the batch it was drawn in.
"""

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import PIL.Image
import torch


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

    `latents` are unit-variance noise [B, C, H, W]; the sampler scales them by sigmas[0]. With S_churn > 0,
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


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images in [-1, 1] (NCHW) to uint8 NHWC with EDM's conversion: x*127.5 + 128, clipped, truncated."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f'Expected images of shape [N, 1 or 3, H, W], got {tuple(images.shape)}')
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def tile_images(images: np.ndarray, grid_w: int | None = None) -> np.ndarray:
    """Tile uint8 NHWC images row by row into one HWC image, grid_w columns (default: a near-square grid).

    Cells left over in the last row are black.
    """
    num, height, width, channels = images.shape
    if num == 0:
        raise ValueError('Cannot tile an empty batch of images')
    grid_w = grid_w or math.ceil(math.sqrt(num))
    if grid_w < 1:
        raise ValueError(f'grid_w must be at least 1, got {grid_w}')
    grid_h = math.ceil(num / grid_w)
    padded = np.zeros([grid_h * grid_w, height, width, channels], dtype=np.uint8)
    padded[:num] = images
    grid = padded.reshape(grid_h, grid_w, height, width, channels).transpose(0, 2, 1, 3, 4)
    return grid.reshape(grid_h * height, grid_w * width, channels)


def save_image(image: np.ndarray, path: str | os.PathLike) -> None:
    """Save one uint8 HWC image as PNG: mode 'L' for 1 channel, 'RGB' for 3."""
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f'Expected an image of shape [H, W, 1 or 3], got {tuple(image.shape)}')
    if image.shape[2] == 1:
        PIL.Image.fromarray(image[:, :, 0], 'L').save(path)
    else:
        PIL.Image.fromarray(image, 'RGB').save(path)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, grid_w: int | None = None) -> None:
    """Save a batch of float images in [-1, 1] (NCHW) as one PNG tile grid."""
    save_image(tile_images(images_to_uint8(images), grid_w), path)
