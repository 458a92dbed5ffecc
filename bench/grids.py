"""σ-grids at a fixed budget: FD-MNIST against NFE for EDM's ρ=7 grid, InfoGrid and the log-uniform grid
(InfoNoise paper, Sec. 6.4), and the exact KL of the same grids on Gaussian sources (docs/results.md, "σ-grids at
fixed NFE").

Two trained networks are compared: one trained with InfoNoise and one with EDM's log-normal noise sampler (by default
the final snapshots of seed 0 of time_to_quality's continuous runs). InfoGrid (Eq. 19) needs an information profile:
the InfoNoise network has the one it learned in training, and both networks get an offline one, measured on the
frozen network by `diagnose.py` (per-σ denoising error over data images; written here as JSON that
`generate.py --grid=infogrid --profile=FILE` reads). Every grid spans [0.002, 80] and is sampled with EDM's
deterministic Heun and Euler solvers (Heun: N steps = 2N−1 NFE; Euler: N), the same seeds for every cell, and
scored by FD-MNIST against all 5,000 digits. The Gaussian table is `bench.gaussian.compare_grids` (exact
KL(source ‖ output) for the MNIST-5k PCA spectrum and a CIFAR-like power law), at the same NFE and solvers.

Budget (2 CPU cores): about 30 minutes with the defaults (7 network/grid pairs × 2 solvers × 75 NFE in all ×
1,000 samples, plus two offline profiles of about a minute each). --quick (64 samples, NFE 5 and 7, small
profiles; without snapshots it trains two 1-kimg networks first) takes about a minute.

    python -m bench.time_to_quality --outdir=bench-out/ttq     # the networks, if not trained yet
    python -m bench.grids --from=bench-out/ttq --outdir=bench-out/grids
"""

import os
import time

import click
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

import diagnose
import dnnlib
from bench import gaussian
from bench import time_to_quality as ttq
from bench.common import (
    DATASET_SOURCES,
    DEFAULT_DATA,
    FrechetScore,
    apply_quick,
    ensure_dataset,
    fd_mnist_score,
    fmt,
    generate_uint8,
    markdown_table,
    parse_nfe,
    read_json,
    run_record,
    write_json,
)
from dnnlib.cli import pick_device
from infonoise.grids import edm_grid, infogrid, loguniform_grid, num_steps_for
from infonoise.profile import LogGrid
from training import run_dir as run_files
from training.checkpoint import load_network

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
MODELS = {'infonoise': 'mnist-infonoise', 'lognormal': 'mnist-lognormal'}  # Model -> time_to_quality recipe.
GRID_COLORS = {'edm': 'C0', 'infogrid-learned': 'C1', 'infogrid-offline': 'C2', 'loguniform': 'C3'}
QUICK = dict(nfe='5,7', eval_images=64, profile_points=16, profile_samples=32)


def find_snapshot(path: str | None, from_dir: str, model: str) -> str | None:
    """The given snapshot, or the newest one of seed 0 of the model's time_to_quality run."""
    if path is not None:
        if not os.path.isfile(path):
            raise click.ClickException(f'--{model}: no such file "{path}"')
        return path
    found = run_files.find(ttq.run_dir(from_dir, MODELS[model], 0), 'network-snapshot')
    return found[max(found)] if found and max(found) > 0 else None


def offline_profile(net, snapshot: str, data: str, points: int, samples: int, device, path: str) -> dict:
    """The frozen network's information profile (diagnose.py, EDM weight, onset pivot), cached in `path`."""
    source = dict(snapshot=os.path.abspath(snapshot), mtime_ns=os.stat(snapshot).st_mtime_ns, data=data)
    record = read_json(path, {})
    if record.get('source') == source and len(record.get('sigma', [])) == points and record['num_samples'] == samples:
        return record
    grid = LogGrid.make(points, SIGMA_MIN, SIGMA_MAX)
    dataset = diagnose.open_dataset(data)
    pixels, _ = diagnose.read_images(dataset, diagnose.draw_indices(len(dataset), samples, seed=0))
    start = time.time()
    mse, stderr = diagnose.denoising_mse(net, diagnose.to_float(pixels), grid.centers, device=str(device))
    profile = diagnose.build_profile(
        grid, mse, weight='edm', sigma_data=float(net.sigma_data), endpoint='continuous', stderr=stderr,
        count=torch.full_like(mse, float(samples)),
    )  # fmt: skip
    record = diagnose.profile_record(profile, grid, source=source, num_samples=samples, seconds=time.time() - start)
    write_json(path, record)
    return record


def grid_for(variant: str, num_steps: int, profiles: dict) -> torch.Tensor:
    if variant == 'edm':
        return edm_grid(num_steps, SIGMA_MIN, SIGMA_MAX, RHO)
    if variant == 'loguniform':
        return loguniform_grid(num_steps, SIGMA_MIN, SIGMA_MAX)
    profile = profiles[variant]  # 'infogrid-learned' or 'infogrid-offline'
    return infogrid(num_steps, profile['sigma'], profile['rate'], SIGMA_MIN, SIGMA_MAX)


def plot(fd: dict, nfe: list[int], path: str) -> None:
    """FD-MNIST against NFE, one panel per solver; colour: grid, solid: InfoNoise network, dashed: log-normal."""
    fig = Figure(figsize=(5.2 * len(fd), 4.4))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(fd), sharey=True))
    for ax, (solver, rows) in zip(axes, fd.items()):
        for name, values in rows.items():
            model, variant = name.split(' / ')
            style = '-' if model == 'infonoise' else '--'
            ax.plot(nfe, values, style, color=GRID_COLORS[variant], marker='o', markersize=3, label=name)
        ax.set(xscale='log', yscale='log', xlabel='NFE', title=solver.capitalize())
        ax.set_xticks(nfe, [str(n) for n in nfe])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(alpha=0.3, which='both')
    axes[0].set_ylabel('FD-MNIST')
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def resolve_snapshots(opts, data: str, device) -> dict[str, str]:
    """The two networks' snapshots; with --quick and none found, 1-kimg networks trained here."""
    paths = {model: find_snapshot(opts[model], opts.from_dir, model) for model in MODELS}
    for model, path in paths.items():
        if path is None and not opts.quick:
            raise click.ClickException(
                f'No {model} snapshot in {opts.from_dir}: run python -m bench.time_to_quality first, or pass --{model}'
            )
        if path is None:
            # InfoNoise with time_to_quality's quick settings, which refresh within 1 kimg.
            click.echo(f'Training a 1-kimg {model} network for --quick...')
            ttq.train(
                MODELS[model], 0, dnnlib.EasyDict(outdir=opts.outdir, kimg=1, eval_every=1, quick=True), data, device
            )
            paths[model] = find_snapshot(None, opts.outdir, model)
    return paths


def evaluate_model(model: str, path: str, opts, data: str, fd_mnist: FrechetScore, cache: dict, device) -> dict:
    """FD-MNIST of one network on every grid, solver and NFE (cached in `cache`, keyed by snapshot and settings);
    returns the network's record with its rows, one list over NFE per grid and solver."""
    loaded = load_network(path, device=device)
    profiles = {}
    if model == 'infonoise' and loaded.profile is not None:
        profiles['infogrid-learned'] = loaded.profile
    click.echo(f'{model}: {path}; offline profile ({opts.profile_points} σ × {opts.profile_samples} images)...')
    profile_path = os.path.join(opts.outdir, f'profile-{model}-offline.json')
    offline = offline_profile(loaded.net, path, data, opts.profile_points, opts.profile_samples, device, profile_path)
    profiles['infogrid-offline'] = offline
    snapshot_key = f'{os.path.abspath(path)}|{os.stat(path).st_mtime_ns}'
    rows = {solver: {} for solver in opts.solvers}
    for variant in ['edm', *sorted(profiles), 'loguniform']:
        for solver in opts.solvers:
            row = rows[solver][variant] = []
            for nfe in opts.nfe:
                key = f'{snapshot_key}|{variant}|{solver}|{nfe}|{opts.eval_images}'
                if variant == 'infogrid-offline':
                    key += f'|{opts.profile_points}|{opts.profile_samples}|{data}'
                if key not in cache:
                    sigmas = grid_for(variant, num_steps_for(nfe, solver), profiles)
                    seeds = list(range(opts.eval_images))
                    cache[key] = fd_mnist(generate_uint8(loaded.net, seeds, sigmas, solver, False, device))
                    write_json(os.path.join(opts.outdir, 'fd-cache.json'), cache)
                row.append(cache[key])
            click.echo(f'  {variant:<17s} {solver:<5s} FD-MNIST at NFE {opts.nfe}: {[fmt(v) for v in row]}')
    return dict(
        snapshot=os.path.abspath(path),
        learned_profile='infogrid-learned' in profiles,
        offline_profile=profile_path,
        offline_pivot=offline['pivot'],
        offline_seconds=offline['seconds'],
        rows=rows,
    )


def tables(fd: dict, kl: dict, opts, real_floor: float) -> list[str]:
    """FD-MNIST per solver, then the Gaussian KL per solver, as Markdown."""
    nfe_headers = [f'NFE {n}' for n in opts.nfe]
    out = []
    for solver, rows in fd.items():
        head = (
            f'**FD-MNIST, {solver.capitalize()}** ({opts.eval_images} samples, seeds 0-{opts.eval_images - 1}, '
            f'σ in [{SIGMA_MIN}, {SIGMA_MAX}], vs all 5,000 digits; {real_floor:.3g} for as many real digits)'
        )
        table = [[*name.split(' / '), *[fmt(v) for v in values]] for name, values in rows.items()]
        out.append(head + '\n\n' + markdown_table(['network', 'grid', *nfe_headers], table))
    for solver, spectra in kl.items():
        head = f'**Exact KL(source ‖ output) in nats, Gaussian sources, {solver.capitalize()}**'
        table = [
            [name, grid, *[fmt(v, 5) for v in values]] for name, t in spectra.items() for grid, values in t.items()
        ]
        out.append(head + '\n\n' + markdown_table(['spectrum', 'grid', *nfe_headers], table))
    return out


# fmt: off
@click.command(context_settings={'show_default': True})
@click.option('--outdir',          help='Where profiles, caches, results.json and the PNG go', metavar='DIR', default=os.path.join('bench-out', 'grids'))
@click.option('--quick',           help='Tiny run that checks the machinery (about a minute); its numbers mean nothing', is_flag=True)
@click.option('--device',          help='Device  [default: cuda if available]', type=click.Choice(['cpu', 'cuda']))
@click.option('--from', 'from_dir', help='time_to_quality output whose seed-0 continuous runs give the default networks', metavar='DIR', default=os.path.join('bench-out', 'ttq'))
@click.option('--infonoise',       help='Snapshot of a network trained with InfoNoise  [default: from --from]', metavar='PT')
@click.option('--lognormal',       help='Snapshot of a network trained with log-normal σ  [default: from --from]', metavar='PT')
@click.option('--nfe',             help='Network evaluations per sample (odd for Heun)', metavar='LIST', callback=parse_nfe, default='5,7,11,17,35')
@click.option('--solvers',         help='Solvers', type=click.Choice(['heun', 'euler', 'heun,euler']), default='heun,euler')
@click.option('--eval-images',     help='Samples per cell (seeds 0..N-1)', metavar='N', type=click.IntRange(min=2), default=1000)
@click.option('--profile-points',  help='σ points of the offline profiles', metavar='K', type=click.IntRange(min=2), default=128)
@click.option('--profile-samples', help='Noisy images per σ of the offline profiles', metavar='S', type=click.IntRange(min=2), default=256)
@click.option('--data',            help='MNIST-5k 16x16 (built if missing)', metavar='ZIP', default=DEFAULT_DATA)
# fmt: on
def main(**kwargs):
    """FD-MNIST against NFE for EDM's ρ=7 grid, InfoGrid and log-uniform (Heun and Euler), and the exact
    Gaussian-source KL of the same grids. Defaults: about 30 minutes on 2 CPU cores; --quick: about a minute."""
    start_time = time.time()
    opts = dnnlib.EasyDict(kwargs)
    if opts.quick:
        apply_quick(click.get_current_context(), opts, dict(QUICK, nfe=parse_nfe(None, None, QUICK['nfe'])))
    opts.solvers = opts.solvers.split(',')
    try:
        steps = {f'{solver}-{n}': num_steps_for(n, solver) for solver in opts.solvers for n in opts.nfe}
    except ValueError as e:
        raise click.ClickException(f'--nfe: {e}') from None
    device = pick_device(opts.device)
    os.makedirs(opts.outdir, exist_ok=True)
    data = os.path.abspath(opts.data)
    ensure_dataset(data, DATASET_SOURCES['mnist'])
    paths = resolve_snapshots(opts, data, device)

    stem = os.path.splitext(os.path.basename(data))[0]
    fd_mnist = fd_mnist_score(data, os.path.join(opts.outdir, f'ref-{stem}.npz'), device)
    cache = read_json(os.path.join(opts.outdir, 'fd-cache.json'), {})
    models = {model: evaluate_model(model, path, opts, data, fd_mnist, cache, device) for model, path in paths.items()}
    fd = {solver: {} for solver in opts.solvers}
    for model, record in models.items():
        for solver, rows in record.pop('rows').items():
            fd[solver].update({f'{model} / {variant}': row for variant, row in rows.items()})
    click.echo('Exact Gaussian-source KL...')
    spectra = [gaussian.mnist5k_spectrum(28), gaussian.cifar_like_spectrum()]
    kl = {solver: {s.name: gaussian.compare_grids(s.lam, opts.nfe, solver) for s in spectra} for solver in opts.solvers}

    png = os.path.join(opts.outdir, 'fd-vs-nfe.png')
    plot(fd, opts.nfe, png)
    settings = dict(
        eval_images=opts.eval_images, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, data=data, steps=steps,
        profile_points=opts.profile_points, profile_samples=opts.profile_samples, quick=opts.quick,
    )  # fmt: skip
    results = dict(benchmark='grids', models=models, nfe=opts.nfe, solvers=opts.solvers, fd=fd, gaussian_kl=kl)
    results.update(plot=png, settings=settings, run=run_record('bench.grids', start_time, device))
    write_json(os.path.join(opts.outdir, 'results.json'), results)
    click.echo('\n' + '\n\n'.join(tables(fd, kl, opts, fd_mnist.real_floor(opts.eval_images))))
    click.echo(f'\nWrote {opts.outdir}/results.json and {png} ({results["run"]["wall_seconds"]:.0f} s)')


if __name__ == '__main__':
    main()
