"""A diffusers client: DDPMScheduler and UNet2DModel on scikit-learn's 8x8 digits, timesteps drawn by InfoNoise.

diffusers' `DDPMScheduler` (linear β from 1e-4 to 0.02, 1,000 timesteps, ε-prediction) adds the noise and the loss
is the plain ε-MSE; only the draw of t changes. `infonoise.DiscreteTimesteps(scheduler.alphas_cumprod, ...)` builds
InfoNoise on the scheduler's own table and draws each timestep with the mass InfoNoise gives its σ-interval;
`--schedule=uniform` is DDPM's usual `torch.randint`. Samples come from diffusers' `DDIMScheduler`, built from the
training scheduler's config with trailing spacing, so that the first step is t = 999 at any step count.

Each schedule is scored on one fixed held-out set of (x₀, t, ε) with t uniform, i.e. DDPM's L_simple, and by a
sample-quality proxy: the Fréchet distance in pixel space (64 dimensions) between 256 DDIM samples and the held-out
digits. Needs `pip install -r requirements-extras.txt`.

    python examples/diffusers_ddpm.py --steps=1500 --out=diffusers-{schedule}.png
"""

import copy
import os
import sys

import click
import numpy as np
import sklearn.datasets
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from anywhere in the repo.
from examples.common import update_ema, with_options  # noqa: E402
from infonoise import DiscreteTimesteps  # noqa: E402
from metrics.frechet import frechet_distance  # noqa: E402
from training.sampling import save_image_grid  # noqa: E402

SCHEDULES = ('infonoise', 'uniform')
HELD_OUT = 297  # The last 297 of the 1,797 digits; the first 1,500 train.


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as float [N, 1, 8, 8] in [-1, 1] (pixel values 0..16): training and held-out."""
    images = torch.from_numpy(sklearn.datasets.load_digits().images).to(torch.float32)[:, None] / 8 - 1
    return images[:-HELD_OUT], images[-HELD_OUT:]


def make_unet() -> UNet2DModel:
    """A 0.16 M-parameter UNet2DModel for 8x8 images: two levels, no attention."""
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=('DownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'UpBlock2D'), norm_num_groups=8,
    )  # fmt: skip


def train(images: torch.Tensor, schedule: str, steps: int, batch: int = 64, seed: int = 0, lr: float = 2e-3,
          **infonoise_kwargs) -> tuple[UNet2DModel, DDPMScheduler, DiscreteTimesteps | None]:  # fmt: skip
    """Train the UNet with ε-MSE for `steps` steps; returns its EMA, the scheduler and the timestep adapter (None for
    uniform). `infonoise_kwargs` go to InfoNoise (warmup_steps, refresh_steps, min_count, ...)."""
    torch.manual_seed(seed)
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule='linear',
                         prediction_type='epsilon')  # fmt: skip
    T = ddpm.config.num_train_timesteps
    timesteps = None
    if schedule == 'infonoise':
        # data_variance caps the x₀ error (σ² × the ε-error) by what any denoiser achieves: docs/library.md.
        kwargs = dict(data_variance=float(images.var(0).mean()), **infonoise_kwargs)
        timesteps = DiscreteTimesteps(ddpm.alphas_cumprod, prediction='epsilon', **kwargs)
    elif schedule != 'uniform':
        raise ValueError(f'Unknown schedule "{schedule}"; choose from {", ".join(SCHEDULES)}')
    unet = make_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    for _ in range(steps):
        x0 = images[torch.randint(len(images), (batch,))]
        t = timesteps.sample(batch) if timesteps is not None else torch.randint(T, (batch,))  # [N] int64
        eps = torch.randn_like(x0)
        eps_mse = (unet(ddpm.add_noise(x0, eps, t), t).sample - eps).square().flatten(1).mean(1)  # [N], unweighted
        opt.zero_grad(set_to_none=True)
        eps_mse.mean().backward()  # The plain DDPM loss, whichever law drew t.
        opt.step()
        if timesteps is not None:
            timesteps.observe(t, eps_mse.detach())  # The adapter hands InfoNoise σ_t and σ_t²·eps_mse.
        update_ema(ema, unet, batch, half_life_kimg=2.0)
    return ema, ddpm, timesteps


def held_out_triples(images: torch.Tensor, n: int = 1024, seed: int = 1, T: int = 1000) -> tuple[torch.Tensor, ...]:
    """A fixed evaluation set (x₀, t, ε) of n triples, t uniform over the T timesteps, from its own generator."""
    g = torch.Generator().manual_seed(seed)
    x0 = images[torch.randint(len(images), (n,), generator=g)]
    return x0, torch.randint(T, (n,), generator=g), torch.randn(x0.shape, generator=g)


@torch.no_grad()
def eps_mse(unet: UNet2DModel, ddpm: DDPMScheduler, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> float:
    """Mean ε-MSE over the triples: DDPM's L_simple under uniform t."""
    return float((unet(ddpm.add_noise(x0, eps, t), t).sample - eps).square().mean())


def make_ddim(ddpm: DDPMScheduler, num_steps: int) -> DDIMScheduler:
    """diffusers' DDIM on the training scheduler's table with `num_steps` timesteps. 'trailing' spacing starts at
    t = T − 1 for any step count (the default 'leading' starts at 980 for 50 steps, 852 for 7)."""
    ddim = DDIMScheduler.from_config(ddpm.config, timestep_spacing='trailing')
    ddim.set_timesteps(num_steps)
    return ddim


@torch.no_grad()
def ddim_sample(unet: UNet2DModel, ddpm: DDPMScheduler, num: int, num_steps: int, seed: int = 0) -> torch.Tensor:
    """DDIM (η = 0) through diffusers in `num_steps` steps from t = 999; [num, 1, 8, 8] images in [-1, 1]."""
    ddim = make_ddim(ddpm, num_steps)
    x = torch.randn(num, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    for t in ddim.timesteps:
        x = ddim.step(unet(x, t).sample, t, x).prev_sample
    return x


def pixel_fd(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the flattened pixels of two image sets (lower is closer)."""
    a, b = (v.flatten(1).double().numpy() for v in (samples, reference))
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


@click.command(context_settings={'show_default': True})
@with_options('steps', 'batch', 'warmup_steps', 'refresh_steps', 'min_count')
@click.option('--schedule', help='Timestep draw; repeat to compare', type=click.Choice(SCHEDULES), multiple=True,
              default=SCHEDULES)  # fmt: skip
@click.option('--ddim-steps', help='DDIM steps at generation', type=click.IntRange(min=1), default=50)
@click.option('--seed', help='Random seed of training', type=click.IntRange(min=0), default=0)
@click.option('--out', help='PNG of 64 samples per schedule ({schedule}: its name)', default='diffusers-{schedule}.png')
def main(steps, batch, warmup_steps, refresh_steps, min_count, schedule, ddim_steps, seed, out):
    """Train diffusers' DDPM with InfoNoise and with uniform timesteps; compare held-out ε-MSE and samples."""
    images, held_out = load_digits()
    triples = held_out_triples(held_out)
    kwargs = dict(warmup_steps=warmup_steps, refresh_steps=refresh_steps, min_count=min_count)
    for name in dict.fromkeys(schedule):
        ema, ddpm, timesteps = train(images, name, steps, batch, seed, **(kwargs if name == 'infonoise' else {}))
        x = ddim_sample(ema, ddpm, 256, ddim_steps)
        path = out.format(schedule=name)
        save_image_grid(x[:64], path)
        info = f', InfoNoise refreshed {timesteps.sampler.refreshes} times' if timesteps is not None else ''
        print(f'{name:9s} held-out ε-MSE {eps_mse(ema, ddpm, *triples):.4f}, pixel FD of 256 samples (DDIM '
              f'{ddim_steps} steps) {pixel_fd(x, held_out):.3f}{info}; wrote {path}')  # fmt: skip


if __name__ == '__main__':
    main()
