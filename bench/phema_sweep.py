"""Post-hoc EMA sweep: FD-MNIST against the EMA width σ_rel, every width reconstructed after training from one run's
stored power-function EMA profiles (Karras et al. 2024, Sec. 3; training/phema.py), next to the run's classic EMA
snapshot at the same time.

The run is an MNIST-5k training with --ema-profiles, e.g.

    python train.py --outdir=runs --data=datasets/mnist5k-16x16.zip --preset=demo-mnist16 \\
        --ema-profiles=0.05,0.1 --ema-profile-every=10
    python -m bench.phema_sweep --run=runs/00000-mnist5k-16x16-... --outdir=bench-out/phema

--run may be given several times (runs with different schedules, say): each is swept the same way and drawn as one
line of the plot. Each width's snapshot draws the same seeds with EDM's deterministic Heun solver on EDM's ρ=7 grid and is scored
against all 5,000 digits. Budget (2 CPU cores, demo network): about a minute per width at the default 2,000 samples
and 18 steps. --quick trains a 1-kimg run first when --run is not given, and scores 64 samples of 3 widths at 5
steps (under a minute); its numbers mean nothing.
"""

import os
import subprocess
import sys
import time

import click
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

import dnnlib
from bench.common import (
    DATASET_SOURCES,
    DEFAULT_DATA,
    REPO_ROOT,
    apply_quick,
    ensure_dataset,
    fd_mnist_score,
    fmt,
    generate_uint8,
    markdown_table,
    run_record,
    write_json,
)  # fmt: skip
from dnnlib.cli import pick_device
from infonoise.grids import edm_grid
from training import checkpoint, phema
from training import run_dir as run_files

QUICK = dict(sigma_rel='0.05,0.1,0.2', eval_images=64, steps=5)
QUICK_TRAIN = ['--preset=demo-mnist16', '--cbase=16', '--duration=0.001', '--tick=1', '--snap=1', '--dump=1',
               '--ema-profiles=0.05,0.1', '--ema-profile-every=1', '--seed=0', '--nosubdir']  # fmt: skip


def quick_run(outdir: str, data: str) -> str:
    """A 1-kimg demo run with profiles in OUTDIR/run (reused if there)."""
    run = os.path.join(outdir, 'run')
    if not run_files.find(run, 'phema'):
        click.echo('Training a 1-kimg run with --ema-profiles for --quick...')
        cmd = [sys.executable, 'train.py', f'--outdir={run}', f'--data={data}', '--device=cpu', *QUICK_TRAIN]
        result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise click.ClickException(f'train.py failed: {(result.stderr.strip() or "no output").splitlines()[-1]}')
    return run


def plot(runs: list[dict], floor: float, path: str) -> None:
    """FD-MNIST against σ_rel, a line per run (tracked widths marked, its classic EMA snapshot dashed in the same
    colour), and the real-data floor."""
    fig = Figure(figsize=(5.6, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, run in enumerate(runs):
        rows, color = run['rows'], f'C{i}'
        ax.plot([r['sigma_rel'] for r in rows], [r['fd'] for r in rows], '-o', color=color, ms=4, label=run['label'])
        tracked = [r for r in rows if r['tracked']]
        ax.plot([r['sigma_rel'] for r in tracked], [r['fd'] for r in tracked], 's', color=color, ms=7, mfc='none')
        if run['classic_ema'] is not None:
            ax.axhline(run['classic_ema'], color=color, ls='--', lw=1, label=f'{run["label"]}: classic EMA snapshot')
    ax.axhline(floor, color='0.5', linestyle=':', label='real digits (floor)')
    ax.set(xscale='log', xlabel='σ_rel (open squares: tracked)', ylabel='FD-MNIST', title='Post-hoc EMA sweep')
    ax.set_ylim(bottom=0)
    ax.set_xticks(sorted({r['sigma_rel'] for run in runs for r in run['rows']}))
    ax.xaxis.set_major_formatter(ScalarFormatter())  # Plain numbers, no crowded minor labels.
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis='x', labelsize=7)
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# fmt: off
@click.command(context_settings={'show_default': True})
@click.option('--run',         help='Training run with phema-*.pt files; repeatable  [default: --quick trains one]', metavar='DIR', multiple=True)
@click.option('--outdir',      help='Where results.json and the PNG go', metavar='DIR', default=os.path.join('bench-out', 'phema'))
@click.option('--sigma-rel',   help='EMA widths to reconstruct', metavar='LIST', default='0.01,0.02,0.03,0.05,0.07,0.1,0.13,0.16,0.2,0.25')
@click.option('--at-kimg',     help='Training time  [default: the newest stored profiles]', metavar='KIMG', type=click.IntRange(min=0))
@click.option('--eval-images', help='Samples per width (seeds 0..N-1)', metavar='N', type=click.IntRange(min=2), default=2000)
@click.option('--steps',       help='Heun steps (2N-1 NFE)', metavar='N', type=click.IntRange(min=2), default=18)
@click.option('--data',        help='MNIST-5k 16x16 (built if missing)', metavar='ZIP', default=DEFAULT_DATA)
@click.option('--quick',       help='Tiny run that checks the machinery; its numbers mean nothing', is_flag=True)
@click.option('--device',      help='Device  [default: cuda if available]', type=click.Choice(['cpu', 'cuda']))
# fmt: on
def main(**kwargs):
    """FD-MNIST of post-hoc EMA reconstructions over a sweep of σ_rel, next to the classic EMA snapshot."""
    start_time = time.time()
    opts = dnnlib.EasyDict(kwargs)
    if opts.quick:
        apply_quick(click.get_current_context(), opts, QUICK)
    try:
        sigma_rels = phema.parse_sigma_rels(opts.sigma_rel)
    except ValueError as e:
        raise click.ClickException(f'--sigma-rel: {e}') from None
    device = pick_device(opts.device)
    os.makedirs(opts.outdir, exist_ok=True)
    data = os.path.abspath(opts.data)
    ensure_dataset(data, DATASET_SOURCES['mnist'])
    if not opts.run and not opts.quick:
        raise click.ClickException('--run: give a training run with --ema-profiles (or --quick to train a tiny one)')
    stem = os.path.splitext(os.path.basename(data))[0]
    fd_mnist = fd_mnist_score(data, os.path.join(opts.outdir, f'ref-{stem}.npz'), device)
    seeds, sigmas = list(range(opts.eval_images)), edm_grid(opts.steps)
    score = lambda net: float(fd_mnist(generate_uint8(net, seeds, sigmas, 'heun', False, device)))  # noqa: E731
    runs = [sweep(run, sigma_rels, opts.at_kimg, score, device) for run in (opts.run or [quick_run(opts.outdir, data)])]
    floor = fd_mnist.real_floor(opts.eval_images)

    png = os.path.join(opts.outdir, 'phema-sweep.png')
    plot(runs, floor, png)
    results = dict(benchmark='phema_sweep', runs=runs, real_floor=floor, plot=png)
    results['settings'] = dict(eval_images=opts.eval_images, steps=opts.steps, data=data, quick=opts.quick)
    results['run'] = run_record('bench.phema_sweep', start_time, device)
    write_json(os.path.join(opts.outdir, 'results.json'), results)
    for run in runs:
        table = [[f'{r["sigma_rel"]:g}' + (' (tracked)' if r['tracked'] else ''), f'{r["gamma"]:.2f}',
                  f'{r["residual"]:.2%}', fmt(r['fd'])] for r in run['rows']]  # fmt: skip
        table += [['classic EMA snapshot', '—', '—', fmt(run['classic_ema'])], ['real digits (floor)', '—', '—', fmt(floor)]]
        click.echo(f'\n**{run["label"]}: FD-MNIST at {run["kimg"]} kimg** ({opts.eval_images} samples, Heun {opts.steps} '
                   'steps, vs all digits)\n')  # fmt: skip
        click.echo(markdown_table(['σ_rel', 'γ', 'kernel residual', 'FD-MNIST'], table))
        click.echo(f'\nBest σ_rel {run["best"]["sigma_rel"]:g} (FD {fmt(run["best"]["fd"])})')
    click.echo(f'Wrote {opts.outdir}/results.json and {png}')


def sweep(run: str, sigma_rels: list[float], at_kimg: int | None, score, device) -> dict:
    """One run's widths reconstructed and scored, and its classic EMA snapshot of the same time if it wrote one."""
    try:
        snapshots = phema.reconstruct_run(run, sigma_rels, at_kimg)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e).splitlines()[0]) from None
    kimg = snapshots[0]['kimg']
    stored = checkpoint.load_phema(run_files.find(run, 'phema')[kimg], mmap=True)
    tracked = {float(p['sigma_rel']) for p in stored['profiles']}
    rows = []
    for snapshot in snapshots:
        net = checkpoint.build_network(snapshot['network_kwargs'], snapshot['ema'], device)
        info = snapshot['phema']
        rows.append(dict(sigma_rel=info['sigma_rel'], gamma=info['gamma'], residual=info['residual'],
                         tracked=info['sigma_rel'] in tracked, fd=score(net)))  # fmt: skip
        click.echo(f'{os.path.basename(run)}: σ_rel {info["sigma_rel"]:<6g} FD-MNIST {fmt(rows[-1]["fd"])}')
    classic_path = run_files.find(run, 'network-snapshot').get(kimg)
    classic = score(checkpoint.load_network(classic_path, device).net) if classic_path else None
    label = os.path.basename(os.path.normpath(run))
    return dict(label=label, run_dir=os.path.abspath(run), kimg=kimg, rows=rows, classic_ema=classic,
                best=min(rows, key=lambda r: r['fd']))  # fmt: skip

if __name__ == '__main__':
    main()
