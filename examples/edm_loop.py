"""A minimal EDM-style training loop with InfoNoise, on MNIST-5k 16x16, then samples on InfoGrid.

EDM's preconditioned denoiser D(x; σ) and loss λ(σ)·‖D(x₀ + σε; σ) − x₀‖² with λ = EDM's weight; σ comes from
InfoNoise, which is told the loss weight (so that π ∝ ρ/λ) and is handed the per-sample unweighted MSE after every
step. Durations are in steps here. After training, the learned profile gives the inference grid (InfoGrid).

    python examples/edm_loop.py --data=datasets/mnist5k-16x16.zip --steps=1500 --out=edm-samples.png
"""

import copy
import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from anywhere in the repo.
from examples.common import UNET_KWARGS, load_images, update_ema, with_options  # noqa: E402
from infonoise import InfoNoise, edm_grid, edm_weight, infogrid  # noqa: E402
from infonoise.grids import nfe  # noqa: E402
from training.networks import EDMPrecond  # noqa: E402
from training.sampling import edm_sampler, save_image_grid  # noqa: E402


@click.command(context_settings={'show_default': True})
@with_options('data', 'steps', 'batch', 'warmup_steps', 'refresh_steps', 'bins', 'min_count')
@click.option(
    '--nfe-steps',
    help='Heun steps of the solver (2n-1 evaluations)',
    type=click.IntRange(min=2),
    default=9,
)
@click.option('--out', help='PNG of 64 samples', default='edm-samples.png')
def main(data, steps, batch, warmup_steps, refresh_steps, bins, min_count, nfe_steps, out):
    """Train EDM with InfoNoise for a few thousand steps and sample on InfoGrid."""
    torch.manual_seed(0)
    images = load_images(data)  # [N, C, H, W] in [-1, 1]
    net = EDMPrecond(
        img_resolution=images.shape[-1], img_channels=images.shape[1], model_type='SongUNet', **UNET_KWARGS
    )
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    noise = InfoNoise(
        weight='edm', num_bins=bins, min_count=min_count, warmup_steps=warmup_steps, refresh_steps=refresh_steps
    )
    noise.callback = print  # One line per refresh check: refreshed (pivot, peak of ρ) or skipped (why).
    for line in noise.schedule_report(steps * batch, batch):
        print(line)

    for _ in range(steps):
        x0 = images[torch.randint(len(images), (batch,))]
        sigma = noise.sample(batch)  # [N] VE noise levels
        x = x0 + sigma[:, None, None, None] * torch.randn_like(x0)
        mse = (net(x, sigma) - x0).square().flatten(1).mean(1)  # [N] unweighted x₀-space MSE
        loss = (edm_weight(sigma) * mse).mean()  # EDM's λ(σ), the weight InfoNoise divides out
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        noise.observe(sigma, mse)  # Every step, on every rank, before the next sample()
        update_ema(ema, net, batch)

    profile = noise.profile()  # None if InfoNoise never refreshed: fall back to EDM's grid.
    grid = edm_grid(nfe_steps) if profile is None else infogrid(nfe_steps, profile)
    with torch.no_grad():
        x = edm_sampler(ema, torch.randn(64, *images.shape[1:], generator=torch.Generator().manual_seed(0)), grid)
    save_image_grid(x.float(), out)
    how = f'{"EDM" if profile is None else "InfoGrid"} ({nfe_steps} Heun steps, {nfe(nfe_steps, "heun")} NFE)'
    print(f'Wrote {out}: 64 samples on {how}')


if __name__ == '__main__':
    main()
