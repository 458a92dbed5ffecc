"""Time to quality: FD-MNIST / FD-ARS against training examples for fixed noise samplers and InfoNoise.

The InfoNoise paper (Table 1a) reports how many training examples each noise sampler needs to reach the best fixed
one's quality: the target m* is the lowest FD any fixed baseline reaches, and the speed-up is the baseline's
kEx to m* divided by the recipe's. This script makes that comparison on CPU-sized data:

- MNIST-5k at 16x16 with the EDM objective (`train.py --preset=demo-mnist16`): log-normal (EDM), log-uniform and
  InfoNoise; the two fixed noise samplers are the baselines;
- binarized MNIST-5k at 16x16 with w ≡ 1 (`--preset=demo-bmnist16`): log-uniform, InfoNoise, and EDM's recipe
  transferred (`--sampler=lognormal --weight=edm`); log-uniform and the EDM transfer are the baselines.
  A sensitivity study, InfoNoise with the gate's pivot fixed at σ = 0.05, 0.1, 0.2 or 0.4 instead of calibrated
  (`bmnist-infonoise-pivot0.05`, ...), runs only when --recipes names it (`--recipes=sensitivity` names all four);
- real yeast DNA, 128 nt (`--preset=demo-ars128`, 20,000 sequences of the ARS1 library's training split, w ≡ 1):
  log-uniform, InfoNoise and the EDM transfer as for binarized MNIST, scored by FD-ARS (the Fréchet distance of the
  ARS detector's features, `metrics/dna_detector.py`) against the training sequences, and at every evaluation by
  exact statistics (`metrics/sequence_metrics.py`): per-position base-frequency error, k-mer spectrum
  Jensen–Shannon divergence for k = 3..6, and the fraction of samples identical to a training sequence.

InfoNoise runs also report the pivot of every refresh (from their log): its range after 20 kEx, which shows whether
the pivot settles (docs/pivot-rules.md).

Every run is a real `train.py` subprocess with the preset's network, optimizer and batch (only the noise sampler and the
loss weight differ), snapshotting every --eval-every kimg. Each snapshot's EMA network is evaluated post hoc with the
same seeds (0..N-1), EDM's ρ=7 σ-grid and Heun's solver at --steps (2·steps−1 NFE); samples of binarized data are
thresholded as `generate.py --binarize` does, and sequences decoded to their nearest one-hot sequence. FD-MNIST is taken
against all 5,000 digits of the training set, FD-ARS against all training sequences (statistics cached in the output
directory). Work already done in --outdir is reused: finished runs and evaluations are skipped, an interrupted run
resumes from its newest training state, and a longer --kimg extends shorter runs.

Budget, measured on 2 CPU cores: one 80-kimg MNIST run spends about 6 minutes in train.py (≈225 images/s) and
one evaluation (1,000 samples at 17 NFE, then FD-MNIST) about 25 s; the defaults, 9 recipes × 2 seeds × (80 kimg +
8 evaluations), take about 3 hours. --quick (1 kimg per run, 1 seed, 64 samples at 7 NFE, InfoNoise's warm-up
and refresh shortened so that it refreshes) checks the machinery in about 2 minutes; its numbers mean nothing. On a
GPU scale up with e.g. --device=cuda --kimg=2000 --eval-every=100 --seeds=4.

    python -m bench.time_to_quality --outdir=bench-out/ttq
"""

import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import click
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import dnnlib
from bench.common import (
    DATASET_SOURCES,
    DEFAULT_BDATA,
    DEFAULT_DATA,
    DEFAULT_DNA,
    REPO_ROOT,
    FrechetScore,
    apply_quick,
    ars_held_out,
    ensure_dataset,
    fd_ars_score,
    fd_mnist_score,
    fmt,
    generate_uint8,
    markdown_table,
    read_json,
    run_record,
    write_json,
)
from dnnlib.cli import pick_device
from infonoise.grids import edm_grid, nfe
from metrics.sequence_metrics import sequence_stats
from training import run_dir as run_files
from training import sequences
from training.checkpoint import load_network


@dataclasses.dataclass(frozen=True)
class Recipe:
    dataset: str  # 'mnist' or 'bmnist'
    label: str
    args: tuple[str, ...]  # train.py flags on top of the dataset's preset
    baseline: bool  # a fixed noise sampler, candidate for m*
    extra: bool = False  # a sensitivity-study variant, run only when --recipes names it (not part of 'all')


# Per data set: the preset, whether samples are thresholded, the score and what it is taken against.
DATASETS = {
    'mnist': dict(
        preset='demo-mnist16',
        binarize=False,
        title='MNIST-5k 16x16, EDM objective',
        metric='FD-MNIST',
        reference='digits',
    ),  # fmt: skip
    'bmnist': dict(
        preset='demo-bmnist16',
        binarize=True,
        title='binarized MNIST-5k 16x16, w = 1',
        metric='FD-MNIST',
        reference='digits',
    ),  # fmt: skip
    'dna': dict(
        preset='demo-ars128',
        binarize=False,
        title='ARS yeast DNA 128 nt, w = 1',
        metric='FD-ARS',
        reference='training sequences',
    ),  # fmt: skip
}
RECIPES = {
    'mnist-lognormal': Recipe('mnist', 'EDM log-normal', ('--sampler=lognormal', '--weight=edm'), True),
    'mnist-loguniform': Recipe('mnist', 'log-uniform', ('--sampler=loguniform', '--weight=edm'), True),
    'mnist-infonoise': Recipe('mnist', 'InfoNoise', ('--sampler=infonoise', '--weight=edm'), False),
    'bmnist-loguniform': Recipe('bmnist', 'log-uniform', ('--sampler=loguniform', '--weight=uniform'), True),
    'bmnist-infonoise': Recipe('bmnist', 'InfoNoise', ('--sampler=infonoise', '--weight=uniform'), False),
    'bmnist-edm-transfer': Recipe('bmnist', 'EDM transfer', ('--sampler=lognormal', '--weight=edm'), True),
    'dna-loguniform': Recipe('dna', 'log-uniform', ('--sampler=loguniform', '--weight=uniform'), True),
    'dna-infonoise': Recipe('dna', 'InfoNoise', ('--sampler=infonoise', '--weight=uniform'), False),
    'dna-edm-transfer': Recipe('dna', 'EDM transfer', ('--sampler=lognormal', '--weight=edm'), True),
}
# Sensitivity study: the low-noise gate's pivot fixed instead of calibrated from the profile.
SENSITIVITY_PIVOTS = ('0.05', '0.1', '0.2', '0.4')
for _pivot in SENSITIVITY_PIVOTS:
    RECIPES[f'bmnist-infonoise-pivot{_pivot}'] = Recipe(
        'bmnist', f'InfoNoise, pivot fixed at {_pivot}', ('--sampler=infonoise', '--weight=uniform', f'--info-pivot={_pivot}'), False, True
    )  # fmt: skip
# The pivot's stability is judged after this many kEx (the pivot settles during the first refreshes).
PIVOT_SETTLED_KIMG = 20
QUICK = dict(kimg=1, eval_every=1, seeds='1', eval_images=64, steps=4)
# In --quick runs InfoNoise must refresh within 1 kimg: 8 intervals, warm-up 0.5 kimg, a refresh every 0.25 kimg.
QUICK_INFONOISE = ('--info-bins=8', '--info-warmup=0.5', '--info-refresh=0.25', '--info-nmin=1')


def run_dir(outdir: str, recipe: str, seed: int) -> str:
    return os.path.join(outdir, 'runs', f'{recipe}-seed{seed}')


# ----------------------------------------------------------------------------------------------------------------------
# Report logic (pure functions).


def curve_summary(curves: list[dict[int, float]]) -> dict[str, list]:
    """Mean, min and max over seeds of FD-vs-kimg curves, at the kimg that every seed has."""
    common = sorted(set.intersection(*(set(curve) for curve in curves))) if curves else []
    if not common:
        return dict(kimg=[], mean=[], min=[], max=[])
    values = np.array([[curve[k] for k in common] for curve in curves])
    return dict(kimg=common, mean=values.mean(0).tolist(), min=values.min(0).tolist(), max=values.max(0).tolist())


def first_reach(kimg: list[int], values: list[float], target: float) -> int | None:
    """The first kimg at which a curve is at or below `target`, or None if it never gets there."""
    return next((k for k, v in zip(kimg, values) if v <= target), None)


def time_to_target(summaries: dict[str, dict], baselines: list[str]) -> dict:
    """The paper's time-to-quality report: m* = the lowest mean-curve FD of any fixed baseline, the kimg at which
    that baseline first reaches it, and per recipe the first kimg at which its mean curve reaches m* and the speed-up
    (baseline kimg / recipe kimg). Without a baseline curve there is no target."""
    candidates = [(min(summaries[name]['mean']), name) for name in baselines if summaries[name]['mean']]
    if not candidates:
        recipes = {name: dict(kimg_to_target=None, speedup=None) for name in summaries}
        return dict(m_star=None, best_baseline=None, baseline_kimg=None, recipes=recipes)
    m_star, best = min(candidates)
    baseline_kimg = first_reach(summaries[best]['kimg'], summaries[best]['mean'], m_star)
    recipes = {}
    for name, summary in summaries.items():
        kimg = first_reach(summary['kimg'], summary['mean'], m_star)
        recipes[name] = dict(kimg_to_target=kimg, speedup=baseline_kimg / kimg if kimg else None)
    return dict(m_star=m_star, best_baseline=best, baseline_kimg=baseline_kimg, recipes=recipes)


# ----------------------------------------------------------------------------------------------------------------------
# Training and evaluation.


def read_json_lines(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


REFRESH_LINE = re.compile(
    r'InfoNoise refresh (\d+) at ([\d.]+) kimg(?: \(step \d+\))?: pivot c = ([^ ]+) \(([^;]+); this refresh ([^)]+)\)'
)


def pivot_history(rdir: str) -> list[dict]:
    """Every refresh of an InfoNoise run: kimg, the pivot in use, this refresh's own calibration and the rule, from
    the checks stats.jsonl records ("Noise/events"), and from log.txt for runs made before it recorded them; a
    refresh reported twice (a run resumed from an older state) counts once, the last."""
    refreshes = {}
    path = os.path.join(rdir, run_files.LOG)
    for line in open(path, encoding='utf-8') if os.path.isfile(path) else []:
        if match := REFRESH_LINE.match(line):
            number, kimg, pivot, rule, raw = match.groups()
            refreshes[int(number)] = dict(kimg=float(kimg), pivot=float(pivot), raw_pivot=float(raw), rule=rule)
    for record in read_json_lines(os.path.join(rdir, run_files.STATS)):
        for e in record.get('Noise/events', []):
            if isinstance(e, dict) and e.get('refreshed'):
                refreshes[e['refreshes']] = dict(kimg=e['nimg'] / 1e3, pivot=e['pivot'], raw_pivot=e['raw_pivot'],
                                                 rule=e['pivot_rule'])  # fmt: skip
    return [refreshes[k] for k in sorted(refreshes)]


def pivot_stability(history: list[dict], after_kimg: float = PIVOT_SETTLED_KIMG) -> dict | None:
    """Range of the pivot in use after `after_kimg` kEx: min, max and their ratio (None without refreshes then)."""
    pivots = [entry['pivot'] for entry in history if entry['kimg'] > after_kimg]
    if not pivots:
        return None
    return dict(after_kimg=after_kimg, min=min(pivots), max=max(pivots), ratio=max(pivots) / min(pivots))


def median_img_per_sec(rdir: str) -> float | None:
    """Median training throughput over the run's ticks (tick 0, a single step, left out)."""
    rates = [
        record['Timing/img_per_sec']['mean']
        for record in read_json_lines(os.path.join(rdir, run_files.STATS))
        if record.get('Progress/tick', {}).get('mean', 0) > 0
    ]
    return statistics.median(rates) if rates else None


def train(name: str, seed: int, opts: dnnlib.EasyDict, data: str, device) -> dict:
    """Train (or finish) one run with train.py; returns its record: wall seconds spent in train.py, kimg."""
    rdir = run_dir(opts.outdir, name, seed)
    record_path = os.path.join(rdir, 'bench-train.json')
    if opts.kimg in run_files.find(rdir, 'network-snapshot'):
        return read_json(record_path, dict(seconds=None))
    states = list(run_files.find(rdir, 'training-state').values())
    if states and max(run_files.find(rdir, 'training-state')) >= opts.kimg:
        raise click.ClickException(
            f'{rdir} was trained past {opts.kimg} kimg with another --eval-every; use another --outdir'
        )
    if not states and os.path.isdir(rdir):
        shutil.rmtree(rdir)  # An attempt that left nothing to resume from: start over.
    os.makedirs(rdir, exist_ok=True)
    recipe = RECIPES[name]
    duration = opts.kimg / 1000
    if int(duration * 1000) < opts.kimg:
        duration = math.nextafter(duration, math.inf)  # train.py takes int(duration * 1000) kimg.
    command = [sys.executable, 'train.py', f'--preset={DATASETS[recipe.dataset]["preset"]}', f'--data={data}']
    command += [
        f'--outdir={rdir}',
        '--nosubdir',
        f'--seed={seed}',
        f'--duration={duration!r}',
        f'--device={device.type}',
    ]
    command += [f'--tick={opts.eval_every}', '--snap=1', '--dump=1', '--snap-grid=0', *recipe.args]  # Train only.
    if opts.quick and '--sampler=infonoise' in recipe.args:
        command += QUICK_INFONOISE
    if states:
        command.append(f'--resume={states[-1]}')
    start = time.time()
    with open(os.path.join(rdir, 'train-console.txt'), 'a', encoding='utf-8') as console:
        result = subprocess.run(command, cwd=REPO_ROOT, stdout=console, stderr=subprocess.STDOUT)
    if result.returncode != 0 or opts.kimg not in run_files.find(rdir, 'network-snapshot'):
        raise click.ClickException(f'train.py failed for {name} seed {seed}; see {rdir}/train-console.txt')
    record = read_json(record_path, dict(seconds=0.0))
    record.update(seconds=(record['seconds'] or 0.0) + time.time() - start, kimg=opts.kimg, command=command[1:])
    write_json(record_path, record)
    for state in states[:-1] if (states := list(run_files.find(rdir, 'training-state').values())) else []:
        os.remove(state)  # Keep the newest state only: what a longer run resumes from.
    return record


def evaluate(
    rdir: str, opts: dnnlib.EasyDict, score: FrechetScore, dataset: str, device, tokens: np.ndarray | None = None
) -> tuple[dict, dict, list]:
    """The score at each evaluation point (the snapshot nearest to every multiple of --eval-every), cached per run;
    for sequences also their exact statistics against the training sequences `tokens`. Returns the score curve,
    the statistics curve (empty for images) and the seconds of the evaluations done now."""
    info = DATASETS[dataset]
    cache_path = os.path.join(rdir, f'{info["metric"].lower()}-heun{opts.steps}-n{opts.eval_images}.json')
    cache = read_json(cache_path, {})
    found = {k: path for k, path in run_files.find(rdir, 'network-snapshot').items() if k > 0}
    sigmas, seeds = edm_grid(opts.steps), list(range(opts.eval_images))
    curve, stats, seconds = {}, {}, []
    for point in range(opts.eval_every, opts.kimg + 1, opts.eval_every):
        # Ticks end at the first step past each multiple, so a snapshot's kimg can run a little ahead of it.
        kimg = min(found, key=lambda k: abs(k - point), default=None)
        if kimg is None or abs(kimg - point) > opts.eval_every / 2:
            continue
        mtime = os.stat(found[kimg]).st_mtime_ns
        entry = cache.get(str(kimg))
        if entry is None or entry['mtime_ns'] != mtime:
            start = time.time()
            net = load_network(found[kimg], device=device).net
            samples = generate_uint8(net, seeds, sigmas, 'heun', info['binarize'], device)
            entry = dict(fd=score(samples), mtime_ns=mtime)
            if tokens is not None:
                entry['stats'] = sequence_stats(sequences.to_tokens(samples.numpy()), tokens, training=tokens)
            entry['seconds'] = time.time() - start
            cache[str(kimg)] = entry
            write_json(cache_path, cache)
            seconds.append(entry['seconds'])
        curve[point] = entry['fd']
        if 'stats' in entry:
            stats[point] = entry['stats']
    return curve, stats, seconds


def plot(title: str, metric: str, summaries: dict[str, dict], m_star: float | None, path: str) -> None:
    """FD against kEx, mean over seeds with the min-max band, log y."""
    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, summary in summaries.items():
        (line,) = ax.plot(summary['kimg'], summary['mean'], marker='o', markersize=3, label=RECIPES[name].label)
        ax.fill_between(summary['kimg'], summary['min'], summary['max'], color=line.get_color(), alpha=0.2)
    if m_star is not None:
        ax.axhline(m_star, color='gray', linestyle='--', linewidth=1, label=f'm* = {m_star:.3g}')
    ax.set(yscale='log', xlabel='training examples (kEx)', ylabel=metric, title=title)
    ax.grid(alpha=0.3, which='both')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_seeds(value: str) -> list[int]:
    """A count N (seeds 0..N-1) or a list such as 0,1 or 3-5."""
    try:
        seeds = list(range(int(value))) if value.strip().isdigit() else dnnlib.util.parse_int_list(value)
    except ValueError as e:
        raise click.ClickException(f'--seeds: {e}') from None
    if not seeds:
        raise click.ClickException('--seeds: need at least one seed')
    return sorted(set(seeds))


def parse_recipes(value: str) -> list[str]:
    """A comma-separated list of recipe names; 'all' is every recipe but the sensitivity study's, 'sensitivity' those."""
    names = []
    for name in (name.strip() for name in value.split(',') if name.strip()):
        if name == 'all':
            names += [name for name, recipe in RECIPES.items() if not recipe.extra]
        elif name == 'sensitivity':
            names += [name for name, recipe in RECIPES.items() if recipe.extra]
        else:
            names.append(name)
    unknown = [name for name in names if name not in RECIPES]
    if unknown or not names:
        raise click.ClickException(
            f'--recipes: unknown "{",".join(unknown)}"; choose from all, sensitivity, {", ".join(RECIPES)}'
        )
    return [name for name in RECIPES if name in names]


# ----------------------------------------------------------------------------------------------------------------------
# Command line.


def timing_summary(datasets: dict) -> dict:
    """Median wall seconds of one train.py run (as recorded when it ran) and of one evaluation done now."""
    recipes = [recipe for info in datasets.values() for recipe in info['recipes'].values()]
    runs = [s for recipe in recipes for s in recipe['train_seconds'].values() if s is not None]
    evals = [s for recipe in recipes for s in recipe['eval_seconds']]
    return dict(
        train_seconds_per_run=statistics.median(runs) if runs else None,
        seconds_per_evaluation=statistics.median(evals) if evals else None,
    )


def dataset_table(dataset: str, report: dict, recipes: dict, floors: dict, opts, num_seeds: int) -> str:
    """One dataset's Markdown table, headed by m*, the real-data floor and the evaluation settings; for sequences
    a second table of their statistics at the last evaluation."""
    info, best = DATASETS[dataset], report['best_baseline']
    target = f'm* = {fmt(report["m_star"])}' + (
        f' ({recipes[best]["label"]} at {report["baseline_kimg"]} kEx)' if best else ' (no baseline)'
    )
    real = info['reference'].removeprefix('training ')
    head = (
        f'**{info["title"]}**: {target}; {num_seeds} seed(s) per recipe, {info["metric"]} of {opts.eval_images} '
        f'samples (Heun, {opts.steps} steps = {2 * opts.steps - 1} NFE, EDM ρ=7 grid) vs all {floors["count"]:,} '
        f'{info["reference"]}; {opts.eval_images} real {real} score {fmt(floors["fd"])}'
    )
    rows = []
    for recipe in recipes.values():
        final = f'{fmt(recipe["final_mean"])} ({fmt(recipe["final_min"])}–{fmt(recipe["final_max"])})'
        kimg = recipe['kimg_to_target']
        label = recipe['label'] + (' (baseline)' if recipe['baseline'] else '')
        speedup = '—' if recipe['speedup'] is None else f'{recipe["speedup"]:.2f}×'
        rows.append([label, final, fmt(recipe['best_mean']), 'not reached' if kimg is None else kimg, speedup])
    final_kimg = max((recipe['kimg'][-1] for recipe in recipes.values() if recipe['kimg']), default='—')
    headers = ['recipe', f'final FD at {final_kimg} kEx: mean (min–max)', 'best mean FD', 'kEx to m*', 'speed-up']
    notes = []
    for recipe in recipes.values():
        ranges = [
            f'seed {seed}: {fmt(r["min"])}–{fmt(r["max"])} (×{r["ratio"]:.2f})'
            for seed, r in recipe['pivot_stability'].items()
            if r is not None and '--info-pivot' not in ' '.join(recipe['train_args'])
        ]
        if ranges:
            notes.append(f'{recipe["label"]}: pivot in use after {PIVOT_SETTLED_KIMG} kEx, {"; ".join(ranges)}')
    table = head + '\n\n' + markdown_table(headers, rows) + ''.join(f'\n\n{note}' for note in notes)
    if 'stats' in floors:
        table += '\n\n' + stats_table(recipes, floors['stats'], opts)
    return table


STATS_COLUMNS = {
    'base_freq_error': 'base-frequency error',
    **{f'kmer_js_{k}': f'{k}-mer JS (bits)' for k in (3, 4, 5, 6)},
    'memorised': 'memorised',
}


def final_stats(recipe: dict) -> dict | None:
    """Mean over seeds of the sequence statistics at the last evaluation that every seed has."""
    common = sorted(set.intersection(*(set(s) for s in recipe['stats'].values()))) if recipe['stats'] else []
    if not common:
        return None
    last = [seed_stats[common[-1]] for seed_stats in recipe['stats'].values()]
    return dict(kimg=common[-1], **{key: statistics.mean(s[key] for s in last) for key in STATS_COLUMNS})


def stats_table(recipes: dict, floor: dict, opts) -> str:
    """Exact statistics of the samples at the last evaluation (mean over seeds) beside those of real sequences."""
    rows = [[f'{opts.eval_images} held-out real sequences', *(fmt(floor[key]) for key in STATS_COLUMNS)]]
    for recipe in recipes.values():
        final = recipe['final_stats']
        if final is not None:
            rows.append([f'{recipe["label"]} at {final["kimg"]} kEx', *(fmt(final[key]) for key in STATS_COLUMNS)])
    note = (
        'Sequence statistics against the training sequences (metrics/sequence_metrics.py), mean over seeds: mean '
        '|per-position base frequency difference|, Jensen–Shannon divergence of the k-mer spectra, and the fraction '
        'of samples identical to a training sequence; the first row scores real sequences of the test split, which '
        'no network trains on'
    )
    return note + '\n\n' + markdown_table(['samples', *STATS_COLUMNS.values()], rows)


def run_recipe(name: str, seeds: list[int], opts, data: str, score: FrechetScore, device, tokens=None) -> dict:
    """Train and evaluate every seed of one recipe; its curves, their summary over seeds, and the timings."""
    curves, stats, train_seconds, eval_seconds, rates, pivots = {}, {}, {}, [], {}, {}
    for seed in seeds:
        rdir = run_dir(opts.outdir, name, seed)
        click.echo(f'{name} seed {seed}: training {opts.kimg} kimg in {rdir}...', nl=False)
        train_seconds[seed] = train(name, seed, opts, data, device).get('seconds')
        rates[seed] = median_img_per_sec(rdir)
        click.echo(f' {fmt(train_seconds[seed])} s in train.py; evaluating...', nl=False)
        curves[seed], stats[seed], seconds = evaluate(rdir, opts, score, RECIPES[name].dataset, device, tokens)
        eval_seconds += seconds
        final = fmt(curves[seed].get(opts.kimg))
        click.echo(f' {len(seconds)} new evaluation(s), {sum(seconds):.0f} s; final score {final}')
        if '--sampler=infonoise' in RECIPES[name].args:
            pivots[seed] = pivot_history(rdir)
    recipe = RECIPES[name]
    stats = {seed: curve for seed, curve in stats.items() if curve}
    return dict(
        stats=stats,
        pivots=pivots,
        pivot_stability={seed: pivot_stability(history) for seed, history in pivots.items()},
        label=recipe.label,
        train_args=list(recipe.args),
        baseline=recipe.baseline,
        curves=curves,
        train_seconds=train_seconds,
        img_per_sec=rates,
        eval_seconds=eval_seconds,
        **curve_summary(list(curves.values())),
    )


def run_dataset(dataset: str, names: list[str], seeds: list[int], opts, data: str, device) -> tuple[dict, str]:
    """All recipes of one dataset: their records with the time-to-target report, the PNG and the Markdown table."""
    info = DATASETS[dataset]
    ensure_dataset(data, DATASET_SOURCES[dataset])
    stem = os.path.splitext(os.path.basename(data))[0]
    make_score = fd_ars_score if dataset == 'dna' else fd_mnist_score
    score = make_score(data, os.path.join(opts.outdir, f'ref-{stem}.npz'), device)
    tokens = sequences.load_npz(data)[0] if dataset == 'dna' else None  # The training sequences.
    recipes = {name: run_recipe(name, seeds, opts, data, score, device, tokens) for name in names}
    report = time_to_target(recipes, [name for name in recipes if RECIPES[name].baseline])
    png = os.path.join(opts.outdir, f'fd-{dataset}.png')
    plot(info['title'], info['metric'], recipes, report['m_star'], png)
    for name, recipe in recipes.items():
        recipe.update(report['recipes'][name], best_mean=min(recipe['mean'], default=None))
        recipe.update({f'final_{key}': recipe[key][-1] if recipe[key] else None for key in ('mean', 'min', 'max')})
        recipe['final_stats'] = final_stats(recipe)
    floors = dict(count=len(score.reference), fd=score.real_floor(opts.eval_images))
    if dataset == 'dna':
        held_out = ars_held_out(tokens.shape[1], opts.eval_images)
        floors['stats'] = sequence_stats(held_out, tokens, training=tokens)
    record = dict(
        title=info['title'],
        metric=info['metric'],
        data=data,
        preset=info['preset'],
        real_floor=floors['fd'],
        real_floor_stats=floors.get('stats'),
        plot=png,
        m_star=report['m_star'],
        best_baseline=report['best_baseline'],
        baseline_kimg=report['baseline_kimg'],
        recipes=recipes,
    )
    return record, dataset_table(dataset, report, recipes, floors, opts, len(seeds))


# fmt: off
@click.command(context_settings={'show_default': True})
@click.option('--outdir',      help='Where runs, caches, results.json and the PNGs go', metavar='DIR', default=os.path.join('bench-out', 'ttq'))
@click.option('--quick',       help='Tiny run that checks the machinery (about 2 minutes); its numbers mean nothing', is_flag=True)
@click.option('--device',      help='Device  [default: cuda if available]', type=click.Choice(['cpu', 'cuda']))
@click.option('--kimg',        help='Training length of every run', metavar='KIMG', type=click.IntRange(min=1), default=80)
@click.option('--eval-every',  help='Snapshot and evaluate every this many kimg', metavar='KIMG', type=click.IntRange(min=1), default=10)
@click.option('--seeds',       help='Training seeds per recipe: a count N (0..N-1) or a list (0,1 or 3-5)', default='2')
@click.option('--recipes',     help=f'Comma-separated recipes, all (all but the sensitivity study), sensitivity: {", ".join(RECIPES)}', default='all')
@click.option('--eval-images', help='Samples per evaluation (seeds 0..N-1)', metavar='N', type=click.IntRange(min=2), default=1000)
@click.option('--steps',       help="Heun steps of the evaluation solver on EDM's ρ=7 σ-grid (2N-1 NFE)", metavar='N', type=click.IntRange(min=2), default=9)
@click.option('--data',        help='MNIST-5k 16x16 (built if missing)', metavar='ZIP', default=DEFAULT_DATA)
@click.option('--bdata',       help='Binarized MNIST-5k 16x16 (built if missing)', metavar='ZIP', default=DEFAULT_BDATA)
@click.option('--dnadata',     help='ARS yeast DNA, 128 nt (built if missing)', metavar='NPZ', default=DEFAULT_DNA)
# fmt: on
def main(**kwargs):
    """FD-MNIST and FD-ARS against training examples for fixed noise samplers and InfoNoise (paper, Table 1a).

    Defaults: about 3 hours on 2 CPU cores. --quick: about 2 minutes.
    """
    start_time = time.time()
    opts = dnnlib.EasyDict(kwargs)
    if opts.quick:
        apply_quick(click.get_current_context(), opts, QUICK)
    if opts.eval_every > opts.kimg:
        raise click.ClickException(f'--eval-every={opts.eval_every} exceeds --kimg={opts.kimg}')
    seeds, names = parse_seeds(opts.seeds), parse_recipes(opts.recipes)
    device = pick_device(opts.device)
    os.makedirs(opts.outdir, exist_ok=True)
    paths = {name: os.path.abspath(opts[key]) for name, key in (('mnist', 'data'), ('bmnist', 'bdata'), ('dna', 'dnadata'))}

    results = dict(benchmark='time_to_quality', datasets={})
    tables = []
    for dataset in DATASETS:
        dataset_names = [name for name in names if RECIPES[name].dataset == dataset]
        if dataset_names:
            record, table = run_dataset(dataset, dataset_names, seeds, opts, paths[dataset], device)
            results['datasets'][dataset] = record
            tables.append(table)
    results['settings'] = dict(
        kimg=opts.kimg, eval_every=opts.eval_every, seeds=seeds, recipes=names, eval_images=opts.eval_images,
        eval_seeds=f'0-{opts.eval_images - 1}', steps=opts.steps, nfe=nfe(opts.steps, 'heun'), grid='edm', rho=7,
        solver='heun', quick=opts.quick, infonoise_overrides=list(QUICK_INFONOISE) if opts.quick else [],
    )  # fmt: skip
    results['run'] = run_record('bench.time_to_quality', start_time, device)
    results['timing'] = timing = timing_summary(results['datasets'])
    write_json(os.path.join(opts.outdir, 'results.json'), results)
    click.echo('\n' + '\n\n'.join(tables))
    click.echo(
        f'\nMedian wall time of one train.py run: {fmt(timing["train_seconds_per_run"])} s; of one evaluation of '
        f'{opts.eval_images} samples: {fmt(timing["seconds_per_evaluation"])} s (evaluations done in this invocation)'
    )
    click.echo(f'Wrote {opts.outdir}/results.json and the PNGs ({results["run"]["wall_seconds"]:.0f} s)')


if __name__ == '__main__':
    main()
