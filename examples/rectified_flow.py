"""Rectified flow on MNIST-5k 16x16 with InfoNoise through the flow-matching adapter.

x_t = (1 − t)·x₀ + t·ε; the network predicts the velocity v = ε − x₀ and the loss is the plain velocity MSE. In VE
terms x_t/(1 − t) = x₀ + σε with σ = t/(1 − t), the x₀-space error is t²·(velocity MSE) and the loss weighs x₀ errors
by w(σ) = 1/t² (`infonoise.flow_velocity_loss_weight`), which InfoNoise divides out. `FlowMatching` does the
mapping and builds InfoNoise.
`--schedule` also offers the usual noise samplers in t, logit-normal(0, 1) (SD3's default) and uniform t, for
comparison.

    python dataset_tool.py --source=mnist5k --dest=datasets/mnist5k-16x16.zip --resolution=16x16
    python examples/rectified_flow.py --data=datasets/mnist5k-16x16.zip --kimg=60 --out=rf-samples.png
"""

import copy
import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from anywhere in the repo.
from examples.common import UNET_KWARGS, load_images, update_ema, with_options  # noqa: E402
from infonoise import FlowMatching  # noqa: E402
from training.networks import SongUNet  # noqa: E402
from training.sampling import save_image_grid  # noqa: E402

SCHEDULES = ('infonoise', 'logit-normal', 'uniform')
T_MIN, T_MAX = 1e-4, 1 - 1e-4  # Network inputs see t in this range (the solver starts at t = 1).


def make_schedule(name: str, kimg: float, bins: int = 32, min_count: int = 8, refresh_kimg: float = 2.0):
    """A function (n, device) -> t [n], an `observe(t, velocity_mse)` hook and the InfoNoise noise sampler (None, None
    for the fixed ones)."""
    if name == 'infonoise':
        # The adapter builds InfoNoise: the velocity loss's weight, t over [0.001, 0.999], warm-up under
        # logit-normal(0, 1) t (= log-normal σ).
        fm = FlowMatching(num_bins=bins, min_count=min_count, warmup_kimg=min(10.0, kimg / 6),
                          refresh_kimg=refresh_kimg, callback=print)  # fmt: skip
        return fm.sample_t, fm.observe, fm.sampler
    if name == 'logit-normal':  # t = sigmoid(z), z ~ N(0, 1); in σ = t/(1-t) this is ln σ ~ N(0, 1).
        return (lambda n, device: torch.sigmoid(torch.randn(n, device=device))), None, None
    if name == 'uniform':
        return (lambda n, device: torch.rand(n, device=device)), None, None
    raise ValueError(f'Unknown schedule "{name}"; choose from {", ".join(SCHEDULES)}')


class VelocityNet(torch.nn.Module):
    """v̂(x_t, t) from EDM's DDPM++ U-Net, conditioned on logit(t)/4 = ln(σ)/4 (EDM's c_noise in σ)."""

    def __init__(self, resolution: int = 16, channels: int = 1):
        super().__init__()
        self.shape = (channels, resolution, resolution)
        self.unet = SongUNet(img_resolution=resolution, in_channels=channels, out_channels=channels, **UNET_KWARGS)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.clamp(T_MIN, T_MAX)
        return self.unet(x, torch.logit(t) / 4, None)


@torch.no_grad()
def sample(net: VelocityNet, num: int, steps: int = 32, seed: int = 0) -> torch.Tensor:
    """Euler on the flow ODE dx/dt = v from t = 1 (x = ε) to t = 0 on a uniform t grid; float images in [-1, 1]."""
    device = next(net.parameters()).device
    x = torch.randn([num, *net.shape], generator=torch.Generator().manual_seed(seed)).to(device)
    ts = torch.linspace(1, 0, steps + 1, device=device)
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * net(x, t.expand(num))
    return x.clamp(-1, 1)


def train(data: str, schedule: str, kimg: float, batch: int = 64, lr: float = 1e-3, seed: int = 0, on_kimg=None,
          eval_kimg: float = 10.0, device: str | torch.device = 'cpu', **schedule_kwargs):  # fmt: skip
    """Train a velocity net for `kimg` thousand examples; returns the EMA net and the InfoNoise sampler (or None).
    `on_kimg(kimg_done, ema)` is called every `eval_kimg` thousand examples (the benchmark's evaluations)."""
    torch.manual_seed(seed)
    images = load_images(data).to(device)
    draw_t, observe, noise = make_schedule(schedule, kimg, **schedule_kwargs)
    net = VelocityNet(images.shape[-1], images.shape[1]).to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    nimg, total, every = 0, int(kimg * 1000), int(eval_kimg * 1000)
    while nimg < total:
        x0 = images[torch.randint(len(images), (batch,)).to(device)]
        t = draw_t(batch, device)  # [N] in (0, 1)
        eps = torch.randn_like(x0)
        x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        velocity_mse = (net(x_t, t) - (eps - x0)).square().flatten(1).mean(1)  # [N], unweighted
        opt.zero_grad(set_to_none=True)
        velocity_mse.mean().backward()
        for g in opt.param_groups:
            g['lr'] = lr * min(1.0, (nimg + batch) / 2000)  # 2 kimg learning-rate ramp-up.
        opt.step()
        if observe is not None:
            observe(t, velocity_mse)  # The adapter hands InfoNoise σ = t/(1-t) and t²·velocity_mse.
        nimg += batch
        update_ema(ema, net, batch)
        if on_kimg is not None and nimg // every > (nimg - batch) // every:
            on_kimg(nimg / 1000, ema)
    return ema, noise


@click.command(context_settings={'show_default': True})
@with_options('data', 'batch', 'bins', 'min_count')
@click.option(
    '--schedule',
    help='Training distribution of t',
    type=click.Choice(SCHEDULES),
    default='infonoise',
)
@click.option(
    '--kimg',
    help='Training examples, thousands',
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
)
@click.option('--seed', help='Random seed', type=click.IntRange(min=0), default=0)
@click.option(
    '--refresh-kimg',
    help='InfoNoise: refresh period',
    type=click.FloatRange(min=0, min_open=True),
    default=2.0,
)
@click.option('--steps', help='Euler steps of the solver', type=click.IntRange(min=1), default=32)
@click.option('--out', help='PNG of 64 samples', default='rf-samples.png')
def main(data, schedule, kimg, batch, seed, bins, min_count, refresh_kimg, steps, out):
    """Train a rectified flow with the chosen noise sampler in t and save 64 samples."""
    kwargs = dict(bins=bins, min_count=min_count, refresh_kimg=refresh_kimg)
    ema, noise = train(data, schedule, kimg, batch=batch, seed=seed, **kwargs)
    if noise is not None:
        print(f'InfoNoise: {noise.refreshes} refreshes; last check: {noise.last_check}')
    save_image_grid(sample(ema, 64, steps), out)
    print(f'Wrote {out}: 64 samples, {steps} Euler steps')


if __name__ == '__main__':
    main()
