"""Rectified flow with InfoNoise: does the information-guided noise sampler help a flow-matching trainer?

`examples/rectified_flow.py` trains the same velocity network (EDM's DDPM++, 0.75 M parameters) on MNIST-5k 16x16 with
the same optimiser, batches and seeds under three noise samplers in t (`--schedules`): InfoNoise through the
flow-matching adapter (weight = the plain velocity loss's x₀-space weight, warm-up under logit-normal),
logit-normal(0, 1) (SD3's default) and uniform t. Every `--eval-every` kimg the EMA network draws `--samples` images by
Euler on a uniform t grid (`--steps`), scored by FD-MNIST against all training images. Each run's scores are cached in
OUT/runs.json, so an interrupted benchmark resumes; the table goes to OUT/flow_matching.md and the plot (FD by kEx, and
InfoNoise's learned density of t against the two fixed ones) to OUT/flow_matching.png.

    python -m bench.flow_matching --out=bench-out/flow-matching           # 3 x 2 seeds x 60 kimg, ~1 h
    python -m bench.flow_matching --quick --out=/tmp/fm                   # a smoke run
"""

import os
import time

import click
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.common import (
    DATASET_SOURCES,
    DEFAULT_DATA,
    apply_quick,
    ensure_dataset,
    fd_mnist_score,
    fmt,
    markdown_table,
    read_json,
    run_record,
    write_json,
)
from dnnlib.cli import pick_device
from examples import rectified_flow as rf
from infonoise import flow_sigma_from_t

QUICK = dict(kimg=0.768, eval_every=0.384, samples=64, steps=4, seeds='0')


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float NCHW images in [-1, 1] to uint8 NCHW, the rounding of EDM's images_to_uint8 (x·127.5 + 128, truncated)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def t_densities(noise, t: np.ndarray) -> dict[str, np.ndarray]:
    """Densities of t: InfoNoise's learned one (its CDF in σ, differentiated in t), logit-normal(0, 1), uniform."""
    edges = np.concatenate([[t[0] - (t[1] - t[0]) / 2], (t[1:] + t[:-1]) / 2, [t[-1] + (t[-1] - t[-2]) / 2]])
    edges = np.clip(edges, 1e-6, 1 - 1e-6)
    out = {}
    if noise is not None:
        cdf = noise.cdf(flow_sigma_from_t(torch.from_numpy(edges))).numpy()
        out['infonoise'] = np.diff(cdf) / np.diff(edges)
    logit = np.log(t / (1 - t))
    out['logit-normal'] = np.exp(-0.5 * logit**2) / np.sqrt(2 * np.pi) / (t * (1 - t))
    out['uniform'] = np.ones_like(t)
    return out


@click.command()
@click.option('--data', help='MNIST-5k 16x16 (made if missing)', default=DEFAULT_DATA, show_default=True)
@click.option('--out', help='Output directory', required=True)
@click.option(
    '--schedules', help='Comma-separated noise samplers (t)', default=','.join(rf.SCHEDULES), show_default=True
)
@click.option('--seeds', help='Comma-separated seeds', default='0,1', show_default=True)
@click.option('--kimg', help='Training examples per run, thousands', type=float, default=60.0, show_default=True)
@click.option('--eval-every', help='kimg between evaluations', type=float, default=20.0, show_default=True)
@click.option('--samples', help='Samples per evaluation', type=click.IntRange(min=2), default=1000, show_default=True)
@click.option('--steps', help='Euler steps of the solver', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', type=click.Choice(['cuda', 'cpu']))
@click.option('--quick', help='Smoke run: tiny budgets', is_flag=True)
@click.pass_context
def main(ctx, **opts):
    """Rectified flow on MNIST-5k 16x16: InfoNoise vs logit-normal vs uniform t."""
    apply_quick(ctx, opts, QUICK if opts['quick'] else {})
    start = time.time()
    schedules = opts['schedules'].split(',')
    seeds = [int(s) for s in opts['seeds'].split(',')]
    for name in schedules:
        if name not in rf.SCHEDULES:
            raise click.ClickException(f'--schedules: unknown "{name}"; choose from {", ".join(rf.SCHEDULES)}')
    os.makedirs(opts['out'], exist_ok=True)
    ensure_dataset(opts['data'], DATASET_SOURCES['mnist'])
    device = pick_device(opts['device'])
    score = fd_mnist_score(opts['data'], os.path.join(opts['out'], 'fd-ref.npz'), device)
    floor = score.real_floor(opts['samples'])
    cache_path = os.path.join(opts['out'], 'runs.json')
    config = {k: opts[k] for k in ('kimg', 'eval_every', 'samples', 'steps', 'data')}
    runs = read_json(cache_path, {})
    if runs.get('config') != config:
        runs = dict(config=config)
    t_grid = np.linspace(0.0025, 0.9975, 200)
    for name in schedules:
        for seed in seeds:
            key = f'{name}/{seed}'
            evals = {}

            def evaluate(kimg_done, ema, evals=evals, key=key, seed=seed):
                x = rf.sample(ema, opts['samples'], opts['steps'], seed=1000 + seed)
                evals[f'{kimg_done:g}'] = score(to_uint8(x))
                click.echo(f'{key}: FD-MNIST {evals[f"{kimg_done:g}"]:.2f} at {kimg_done:g} kimg')

            if key in runs:
                continue
            t0 = time.time()
            ema, noise = rf.train(
                opts['data'],
                name,
                opts['kimg'],
                seed=seed,
                on_kimg=evaluate,
                eval_kimg=opts['eval_every'],
                device=device,
            )
            record = dict(fd=evals, seconds=time.time() - t0)
            if noise is not None:
                record.update(refreshes=noise.refreshes, pivot=noise.pivot, last_check=str(noise.last_check))
                record['density'] = t_densities(noise, t_grid)['infonoise'].tolist()
            runs[key] = record
            write_json(cache_path, runs)
    # Table: mean FD over seeds at each evaluation, and the final FD per seed.
    kimgs = sorted({float(k) for key, r in runs.items() if key != 'config' for k in r['fd']})
    rows = []
    for name in schedules:
        per_seed = [runs[f'{name}/{s}']['fd'] for s in seeds if f'{name}/{s}' in runs]
        means = [np.mean([fd[f'{k:g}'] for fd in per_seed]) for k in kimgs]
        finals = [fd[f'{kimgs[-1]:g}'] for fd in per_seed]
        rows.append([name, *[fmt(m) for m in means], ' / '.join(fmt(f) for f in finals)])
    headers = ['t-schedule', *[f'mean FD at {k:g} kEx' for k in kimgs], 'final FD per seed']
    table = markdown_table(headers, rows)
    notes = f'{len(seeds)} seeds; {opts["samples"]} samples, {opts["steps"]} Euler steps; {opts["samples"]} real digits score {floor:.3f}'
    with open(os.path.join(opts['out'], 'flow_matching.md'), 'w', encoding='utf-8') as f:
        f.write(table + '\n\n' + notes + '\n')
    click.echo(table + '\n' + notes)
    # Plot.
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2)
    for name in schedules:
        per_seed = [runs[f'{name}/{s}']['fd'] for s in seeds if f'{name}/{s}' in runs]
        ax.plot(kimgs, [np.mean([fd[f'{k:g}'] for fd in per_seed]) for k in kimgs], 'o-', label=name)
    ax.set(xlabel='kEx', ylabel='FD-MNIST (mean over seeds)', yscale='log', title='Rectified flow, MNIST-5k 16x16')
    ax.legend()
    densities = t_densities(None, t_grid)
    for s in seeds:
        if f'infonoise/{s}' in runs and runs[f'infonoise/{s}'].get('density'):
            bx.plot(t_grid, runs[f'infonoise/{s}']['density'], label=f'InfoNoise (seed {s}), learned')
    for name in ('logit-normal', 'uniform'):
        bx.plot(t_grid, densities[name], '--', label=name)
    bx.set(xlabel='t', ylabel='density of t', title='Training distribution of t')
    bx.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(opts['out'], 'flow_matching.png'), dpi=110)
    write_json(os.path.join(opts['out'], 'record.json'), run_record('bench.flow_matching', start, device))


if __name__ == '__main__':
    main()
