"""DDPM ε-prediction with 1,000 discrete timesteps and InfoNoise through the `alphas_cumprod` adapter.

The usual DDPM loop (Ho et al. 2020): linear β from 1e-4 to 0.02, x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε, loss = plain
ε-MSE. Only the draw of t changes: `DiscreteTimesteps` gives each timestep the probability InfoNoise assigns its
σ-interval (σ_t = √((1−ᾱ_t)/ᾱ_t)), and `observe` converts ε-MSE to x₀-space error (× σ²). InfoNoise divides out
the x₀-space weight of the plain ε-loss, 1/σ². Samples come from DDIM (η = 0) on evenly spaced timesteps.

    python examples/ddpm_epsilon.py --data=datasets/mnist5k-16x16.zip --steps=1500 --out=ddpm-samples.png
"""

import copy
import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from anywhere in the repo.
from examples.common import UNET_KWARGS, load_images, update_ema, with_options  # noqa: E402
from infonoise import DiscreteTimesteps  # noqa: E402
from training.networks import SongUNet  # noqa: E402
from training.sampling import save_image_grid  # noqa: E402

T = 1000
ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)  # As diffusers' DDPM.


@torch.no_grad()
def ddim(net: torch.nn.Module, x: torch.Tensor, num_steps: int) -> torch.Tensor:
    """DDIM with η = 0 from t = T−1 down to 0 on `num_steps` evenly spaced timesteps."""
    ts = torch.linspace(T - 1, 0, num_steps).round().long()
    for i, t in enumerate(ts):
        a = ALPHAS_CUMPROD[t].float()
        eps = net(x, t.float().expand(len(x)), None)
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        a_next = ALPHAS_CUMPROD[ts[i + 1]].float() if i + 1 < num_steps else torch.tensor(1.0)
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


@click.command(context_settings={'show_default': True})
@with_options('data', 'steps', 'batch', 'warmup_steps', 'refresh_steps', 'bins', 'min_count')
@click.option(
    '--ddim-steps', help='DDIM steps at generation', type=click.IntRange(min=1), default=50, show_default=True
)
@click.option('--out', help='PNG of 64 samples', default='ddpm-samples.png')
def main(data, steps, batch, warmup_steps, refresh_steps, bins, min_count, ddim_steps, out):
    """Train a DDPM ε-predictor with InfoNoise-drawn timesteps and sample with DDIM."""
    torch.manual_seed(0)
    images = load_images(data)  # [N, C, H, W] in [-1, 1]
    net = SongUNet(
        img_resolution=images.shape[-1], in_channels=images.shape[1], out_channels=images.shape[1], **UNET_KWARGS
    )
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    # The adapter builds InfoNoise for this table: the ε-loss's weight 1/σ², σ over the table (0.01 to 157), `bins`
    # intervals (refused if one held no timestep), warm-up under uniform timesteps. data_variance caps the x₀ error
    # (σ² × the ε-error) by what any denoiser achieves (docs/library.md).
    timesteps = DiscreteTimesteps(
        ALPHAS_CUMPROD, prediction='epsilon', num_bins=bins, min_count=min_count, warmup_steps=warmup_steps,
        refresh_steps=refresh_steps, callback=print, data_variance=float(images.var(0).mean()),
    )  # fmt: skip
    noise = timesteps.sampler

    for _ in range(steps):
        x0 = images[torch.randint(len(images), (batch,))]
        t = timesteps.sample(batch)  # [N] int64 in [0, T)
        a = ALPHAS_CUMPROD[t].float()[:, None, None, None]
        eps = torch.randn_like(x0)
        eps_mse = (net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t.float(), None) - eps).square().flatten(1).mean(1)
        opt.zero_grad(set_to_none=True)
        eps_mse.mean().backward()  # The plain DDPM loss.
        opt.step()
        timesteps.observe(t, eps_mse)  # → InfoNoise.observe(σ_t, σ_t²·eps_mse)
        update_ema(ema, net, batch)

    x = ddim(ema, torch.randn(64, *images.shape[1:], generator=torch.Generator().manual_seed(0)), ddim_steps)
    save_image_grid(x, out)
    print(f'Wrote {out}: 64 samples, DDIM {ddim_steps} steps; InfoNoise refreshed {noise.refreshes} times')


if __name__ == '__main__':
    main()
