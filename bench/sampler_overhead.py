"""Training-step time with InfoNoise divided by log-normal, same network, same run (not a timed test).

Runs blocks of real training steps (σ draw, loss, backward, Adam step, observe) alternating between the two
noise samplers, so that slow drifts of the machine hit both alike, and prints the median step times and their ratio.
InfoNoise runs with its refresh cadence scaled to the benchmark so that refreshes are part of the measurement.
`bench.overhead` reuses these functions for all three noise samplers.

    python -m bench.sampler_overhead                      # the demo network at 16x16 on the CPU
    python -m bench.sampler_overhead --device=cuda --res=32 --cbase=128 --cres=2,2,2 --blocks=4 --batch=128
"""

import statistics
import time

import click
import torch

import dnnlib
from bench.common import sync
from infonoise.info_noise import InfoNoise
from infonoise.samplers import LogNormal, LogUniform
from training.loss import DenoisingLoss
from training.networks import EDMPrecond


def demo_network(device, res=16, cbase=32, cres=(1, 2), blocks=1, attn=(8,)) -> EDMPrecond:
    """The demo preset's DDPM++ (EDMPrecond/SongUNet, one channel), freshly initialised with seed 0."""
    torch.manual_seed(0)
    return EDMPrecond(
        img_resolution=res,
        img_channels=1,
        model_type='SongUNet',
        model_channels=cbase,
        channel_mult=list(cres),
        num_blocks=blocks,
        attn_resolutions=list(attn),
        dropout=0,
    ).to(device)


def make_samplers(names, batch: int, refresh_steps: int) -> dict:
    """Noise samplers by name; InfoNoise (EDM weight, 32 bins as the demo preset) refreshes every `refresh_steps`
    steps."""
    makers = {
        'lognormal': LogNormal,
        'loguniform': LogUniform,
        'infonoise': lambda: InfoNoise(
            weight='edm', num_bins=32, refresh_kimg=refresh_steps * batch / 1000, warmup_kimg=0, min_count=1, floor=0.05
        ),
    }
    return {name: makers[name]() for name in names}


def time_training(net, samplers: dict, batch: int, steps: int, rounds: int, device) -> dict[str, list[float]]:
    """Seconds per training step, one value per block of `steps` steps, blocks alternating between the noise
    samplers after one warm-up block each (allocations, first refreshes); each round starts with the next one, so
    that none always runs first."""
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn = DenoisingLoss('edm')
    images = torch.rand(batch, 1, net.img_resolution, net.img_resolution, device=device) * 2 - 1

    def run_block(sampler) -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            sigma = sampler.sample(batch, device)
            loss, mse = loss_fn(net, images, sigma)
            sampler.observe(sigma, mse.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimizer.step()
        sync(device)
        return (time.perf_counter() - start) / steps

    for sampler in samplers.values():
        run_block(sampler)
    names = list(samplers)
    times = {name: [] for name in names}
    for round_idx in range(rounds):
        shift = round_idx % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(run_block(samplers[name]))
    return times


def time_sampler_work(samplers: dict, batch: int, num_steps: int, device) -> dict[str, float]:
    """Seconds per step of each noise sampler's own work (draw + observe, with whatever refreshes fall due)."""
    mse = torch.rand(batch, device=device)
    seconds = {}
    for name, sampler in samplers.items():
        sync(device)
        start = time.perf_counter()
        for _ in range(num_steps):
            sampler.observe(sampler.sample(batch, device), mse)
        sync(device)
        seconds[name] = (time.perf_counter() - start) / num_steps
    return seconds


@click.command()
@click.option('--device', type=click.Choice(['cpu', 'cuda']), default='cpu', show_default=True)
@click.option('--res', help='Image resolution', type=int, default=16, show_default=True)
@click.option('--cbase', type=int, default=32, show_default=True)
@click.option('--cres', type=dnnlib.util.parse_int_list, default='1,2', show_default=True)
@click.option('--blocks', type=int, default=1, show_default=True)
@click.option('--attn', type=dnnlib.util.parse_int_list, default='8', show_default=True)
@click.option('--batch', type=int, default=64, show_default=True)
@click.option('--steps', help='Steps per block', type=int, default=10, show_default=True)
@click.option(
    '--blocks-per-sampler', 'rounds', help='Timed blocks per noise sampler', type=int, default=12, show_default=True
)
@click.option('--refresh-steps', help='InfoNoise refresh period in steps', type=int, default=10, show_default=True)
def main(device, res, cbase, cres, blocks, attn, batch, steps, rounds, refresh_steps):
    device = torch.device(device)
    net = demo_network(device, res, cbase, cres, blocks, attn)
    samplers = make_samplers(['lognormal', 'infonoise'], batch, refresh_steps)
    times = time_training(net, samplers, batch, steps, rounds, device)
    overhead = time_sampler_work(samplers, batch, rounds * steps, device)

    params = sum(p.numel() for p in net.parameters())
    print(f'network: EDMPrecond/SongUNet, {params:,} parameters, {res}x{res}, batch {batch}, device {device}')
    print(f'InfoNoise refreshes during the run: {samplers["infonoise"].refreshes}')
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in med.items():
        print(f'{name:>10s}: {t * 1e3:8.2f} ms/step (median of {rounds} blocks of {steps} steps)')
    for name, t in overhead.items():
        print(
            f'{name:>10s}: sample + observe alone {t * 1e3:.3f} ms/step = {t / med["lognormal"]:.2%} of a log-normal step'
        )
    print(f'ratio infonoise / lognormal (whole steps): {med["infonoise"] / med["lognormal"]:.4f}')
    print(
        f'ratio from the sampler work alone: {(med["lognormal"] - overhead["lognormal"] + overhead["infonoise"]) / med["lognormal"]:.4f}'
    )


if __name__ == '__main__':
    main()
