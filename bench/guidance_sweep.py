"""Autoguidance sweep: FD-MNIST of a trained network guided by an early snapshot of its own run, against the
guidance weight w (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", §3 and Fig. 1).

The guided denoiser is D_w = D_early + w (D_final - D_early) (`training.sampling.GuidedDenoiser`); w = 1 is the final
network alone, bit for bit. Every w draws the same seeds on the same σ-grid with EDM's Heun solver, so the rows
differ only by guidance; the FD of as many real images is printed as the floor. Writes OUTDIR/results.json (the
table and the run record) and OUTDIR/guidance.png (FD-MNIST against w).

    python -m bench.guidance_sweep --final=runs/.../network-snapshot-000180.pt \\
        --early=runs/.../network-snapshot-000030.pt --outdir=bench-out/guidance
"""

import os
import time

import click
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
    generate_uint8,
    markdown_table,
    run_record,
    write_json,
)
from infonoise.grids import edm_grid, nfe
from training.checkpoint import load_network
from training.sampling import guided_denoiser

QUICK = dict(weights=[1.0, 2.0], num=64, steps=4)


def parse_weights(ctx, param, value: str) -> list[float]:
    try:
        weights = [float(v) for v in value.split(',') if v.strip()]
    except ValueError:
        raise click.BadParameter(f'expected comma-separated numbers, got "{value}"') from None
    if not weights:
        raise click.BadParameter('need at least one guidance weight')
    return weights


def plot(path: str, weights: list[float], scores: list[float], floor: float, label: str) -> None:
    fig = Figure(figsize=(5, 3.5), layout='constrained')
    ax = fig.add_subplot()
    ax.plot(weights, scores, 'o-', label=label)
    ax.axhline(floor, color='gray', linestyle='--', label='real images (floor)')
    ax.set(xlabel='guidance weight w', ylabel='FD-MNIST', title='Autoguidance by an early snapshot')
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc='lower right')
    FigureCanvasAgg(fig).print_png(path)


@click.command()
@click.option('--final', help="Network to guide (the run's final snapshot)", metavar='PT|PKL', required=True)
@click.option('--early', help='Guide (an early snapshot of the same run)', metavar='PT|PKL', required=True)
@click.option(
    '--data',
    help='The training images (MNIST-5k 16x16 built there if missing)',
    metavar='ZIP',
    default=DEFAULT_DATA,
    show_default=True,
)
@click.option(
    '--outdir',
    help='Where to write results.json and .png',
    metavar='DIR',
    default=os.path.join('bench-out', 'guidance'),
    show_default=True,
)
@click.option(
    '--weights',
    help='Guidance weights w',
    metavar='LIST',
    callback=parse_weights,
    default='1,1.2,1.5,2,3',
    show_default=True,
)
@click.option(
    '--num', help='Images per weight', metavar='INT', type=click.IntRange(min=2), default=5000, show_default=True
)
@click.option(
    '--steps',
    help='Heun steps on the EDM grid',
    metavar='INT',
    type=click.IntRange(min=2),
    default=18,
    show_default=True,
)
@click.option('--device', help='Device', type=click.Choice(['cpu', 'cuda']), default='cpu', show_default=True)
@click.option('--quick', help=f'Smoke test: {QUICK}', is_flag=True)
def main(**opts):
    """FD-MNIST against the autoguidance weight w, the early snapshot guiding the final one."""
    start_time, device = time.time(), torch.device(opts['device'])
    if opts['quick']:
        apply_quick(click.get_current_context(), opts, QUICK)
    ensure_dataset(opts['data'], DATASET_SOURCES['mnist'])  # MNIST-5k at 16x16, unless the file exists.
    try:
        final, early = (load_network(opts[name], device).net for name in ('final', 'early'))
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if final.img_shape != early.img_shape or final.label_dim or early.label_dim:
        raise click.ClickException('--final and --early must be unconditional networks of the same image shape')
    os.makedirs(opts['outdir'], exist_ok=True)
    score = fd_mnist_score(opts['data'], os.path.join(opts['outdir'], 'reference-stats.npz'), device)
    floor = score.real_floor(opts['num'])
    sigma_min, sigma_max = max(0.002, float(final.sigma_min)), min(80.0, float(final.sigma_max))
    sigmas, seeds = edm_grid(opts['steps'], sigma_min, sigma_max), list(range(opts['num']))

    rows = []
    for w in opts['weights']:
        tic = time.time()
        images = generate_uint8(guided_denoiser(final, w, early), seeds, sigmas, 'heun', False, device)
        rows.append(dict(guidance=w, fd=score(images), seconds=time.time() - tic))
        click.echo(f'w = {w:g}: FD-MNIST {rows[-1]["fd"]:.3f} ({rows[-1]["seconds"]:.1f} s)')

    evaluations = nfe(opts['steps'], 'heun')
    table = markdown_table(
        ['w', 'FD-MNIST', 'network evaluations per image'],
        [[f'{r["guidance"]:g}', fmt(r['fd']), evaluations * (1 if r['guidance'] == 1 else 2)] for r in rows]
        + [[f'{opts["num"]} real images', fmt(floor), '—']],
    )
    click.echo(table)
    png = os.path.join(opts['outdir'], 'guidance.png')
    plot(
        png,
        [r['guidance'] for r in rows],
        [r['fd'] for r in rows],
        floor,
        f'{os.path.basename(opts["final"])} guided by {os.path.basename(opts["early"])}',
    )
    settings = {k: opts[k] for k in ('final', 'early', 'data', 'weights', 'num', 'steps')}
    write_json(os.path.join(opts['outdir'], 'results.json'), dict(
        settings=settings, rows=rows, real_floor=floor, table=table, plot=png,
        run=run_record('bench.guidance_sweep', start_time, device),
    ))  # fmt: skip
    click.echo(f'Wrote {png} and results.json')


if __name__ == '__main__':
    main()
