"""The benchmark scripts of bench/ (issue 7): the time-to-quality report logic on handcrafted curves, and one run of
every script's --quick mode from scratch, so that none of them can rot."""

import json
import math
import os
import subprocess
import sys

import click
import numpy as np
import pytest

from bench.time_to_quality import (
    RECIPES,
    curve_summary,
    first_reach,
    parse_recipes,
    parse_seeds,
    pivot_history,
    pivot_stability,
    time_to_target,
)
from training import sequences

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_curve_summary_keeps_common_kimg():
    summary = curve_summary([{10: 4.0, 20: 2.0, 30: 1.0}, {10: 6.0, 20: 3.0}])
    assert summary == dict(kimg=[10, 20], mean=[5.0, 2.5], min=[4.0, 2.0], max=[6.0, 3.0])
    assert curve_summary([]) == dict(kimg=[], mean=[], min=[], max=[])


def test_first_reach():
    assert first_reach([10, 20, 30], [5.0, 3.0, 1.0], 3.0) == 20  # At the target counts.
    assert first_reach([10, 20, 30], [5.0, 3.0, 1.0], 0.5) is None
    assert first_reach([10, 20, 30], [2.0, 3.0, 1.0], 2.5) == 10  # The first crossing, not the last.


def test_parse_recipes():
    extras = [name for name, recipe in RECIPES.items() if recipe.extra]
    assert extras and parse_recipes('all') == [name for name in RECIPES if name not in extras]
    assert parse_recipes(f'{extras[0]}, mnist-lognormal') == ['mnist-lognormal', extras[0]]  # Table order.
    assert (
        parse_recipes('sensitivity') == extras == [f'bmnist-infonoise-pivot{c}' for c in ('0.05', '0.1', '0.2', '0.4')]
    )
    assert parse_recipes('all,sensitivity') == list(RECIPES)
    with pytest.raises(click.ClickException, match='unknown "nope"'):
        parse_recipes('mnist-lognormal,nope')


def test_time_to_target_handcrafted():
    kimg = [10, 20, 30, 40]
    summaries = {
        'slow': dict(kimg=kimg, mean=[9.0, 6.0, 5.0, 4.0]),  # baseline, best FD 4.0 at 40
        'worse': dict(kimg=kimg, mean=[9.0, 8.0, 7.0, 6.5]),  # baseline that never gets there
        'fast': dict(kimg=kimg, mean=[8.0, 3.9, 3.0, 2.5]),  # reaches 4.0 at 20: 2x
        'never': dict(kimg=kimg, mean=[8.0, 7.0, 6.0, 5.0]),
    }
    report = time_to_target(summaries, ['slow', 'worse'])
    assert report['m_star'] == 4.0 and report['best_baseline'] == 'slow' and report['baseline_kimg'] == 40
    assert report['recipes']['fast'] == dict(kimg_to_target=20, speedup=2.0)
    assert report['recipes']['slow'] == dict(kimg_to_target=40, speedup=1.0)
    assert report['recipes']['worse'] == dict(kimg_to_target=None, speedup=None)
    assert report['recipes']['never'] == dict(kimg_to_target=None, speedup=None)
    # A baseline whose best point is not its last one: m* is reached at 20, InfoNoise's 10 is a 2x speed-up.
    report = time_to_target(
        {'b': dict(kimg=[10, 20, 30], mean=[5.0, 2.0, 3.0]), 'i': dict(kimg=[10], mean=[1.0])}, ['b']
    )
    assert (report['m_star'], report['baseline_kimg'], report['recipes']['i']['speedup']) == (2.0, 20, 2.0)
    # No baseline, no target.
    assert time_to_target({'i': dict(kimg=[10], mean=[1.0])}, [])['recipes']['i'] == dict(
        kimg_to_target=None, speedup=None
    )


def test_pivot_history_from_the_log(tmp_path):
    # Refresh lines as InfoNoise logs them; a refresh logged twice (resumed from an older state) counts once.
    lines = [
        'tick 3     kimg 20.0   loss 0.1  refreshes 4',
        'InfoNoise check at 10.048 kimg skipped: interval 1 of 32 (σ 0.002-0.0028) holds 5 of N_min = 8 losses',
        'InfoNoise refresh 1 at 12.032 kimg: pivot c = 0.3 (break; this refresh 0.3), ρ peaks at σ = 1, ln σ ...',
        'InfoNoise refresh 2 at 14.016 kimg: pivot c = 0.25 (break; this refresh 0.2), ρ peaks at σ = 1, ...',
        'InfoNoise refresh 2 at 14.016 kimg: pivot c = 0.26 (break; this refresh 0.21), ρ peaks at σ = 1, ...',
        'InfoNoise refresh 3 at 22.016 kimg: pivot c = 0.2 (onset, no break; this refresh 0.1), ρ peaks ...',
        'InfoNoise refresh 4 at 24 kimg (step 375): pivot c = 0.24 (break; this refresh 0.24), ρ peaks ...',
    ]
    (tmp_path / 'log.txt').write_text('\n'.join(lines) + '\n')
    history = pivot_history(str(tmp_path))
    assert [h['kimg'] for h in history] == [12.032, 14.016, 22.016, 24.0]
    assert history[1] == dict(kimg=14.016, pivot=0.26, raw_pivot=0.21, rule='break')
    assert history[2]['rule'] == 'onset, no break'
    assert pivot_stability(history) == dict(after_kimg=20, min=0.2, max=0.24, ratio=pytest.approx(1.2))
    assert pivot_stability(history, after_kimg=30) is None and pivot_history(str(tmp_path / 'none')) == []
    # Runs record every check in stats.jsonl (the log has them only with --verbose); a resumed run's refresh 4
    # there replaces the log's, and refresh 5 exists only there.
    event = dict(refreshed=True, refreshes=4, nimg=24000, pivot=0.3, raw_pivot=0.31, pivot_rule='onset')
    skipped = dict(refreshed=False, refreshes=4, nimg=25000, reason='interval 1 holds 3 of N_min = 8 losses')
    records = [{'Noise/events': [event, skipped]}, {}, {'Noise/events': [dict(event, refreshes=5, nimg=26000)]}]
    (tmp_path / 'stats.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    history = pivot_history(str(tmp_path))
    assert [h['kimg'] for h in history] == [12.032, 14.016, 22.016, 24.0, 26.0]
    assert history[3] == dict(kimg=24.0, pivot=0.3, raw_pivot=0.31, rule='onset')


def test_parse_seeds():
    assert parse_seeds('3') == [0, 1, 2]
    assert parse_seeds('4,1') == [1, 4]
    assert parse_seeds('3-5') == [3, 4, 5]
    with pytest.raises(click.ClickException, match='--seeds'):
        parse_seeds('a')


def run_module(module: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, '-m', module, '--quick', '--device=cpu', *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def load_results(outdir) -> dict:
    with open(outdir / 'results.json', encoding='utf-8') as f:
        results = json.load(f, parse_constant=lambda name: pytest.fail(f'non-strict JSON constant {name}'))
    run = results['run']
    assert run['wall_seconds'] > 0 and run['date'] and run['command'].startswith('python -m bench.')
    return results


def all_finite(values) -> bool:
    return all(isinstance(v, float | int) and math.isfinite(v) for v in values)


@pytest.mark.slow
@pytest.mark.timeout(900)  # About 2.5 min on an idle 2-core machine; the suite's 300 s leaves too little margin.
def test_quick_modes(tmp_path):
    """time_to_quality, grids (on time_to_quality's networks) and overhead, each --quick, from scratch."""
    data, bdata, dnadata = tmp_path / 'mnist.zip', tmp_path / 'bmnist.zip', tmp_path / 'ars.npz'
    ttq_dir, grids_dir, overhead_dir = tmp_path / 'ttq', tmp_path / 'grids', tmp_path / 'overhead'

    ttq_args = f'--outdir={ttq_dir}', f'--data={data}', f'--bdata={bdata}', f'--dnadata={dnadata}'
    out = run_module('bench.time_to_quality', *ttq_args)
    assert '| recipe |' in out and data.is_file() and bdata.is_file() and dnadata.is_file()
    results = load_results(ttq_dir)
    assert results['settings']['kimg'] == 1 and results['settings']['seeds'] == [0]
    assert sorted(results['datasets']) == ['bmnist', 'dna', 'mnist']
    # Sequences: FD-ARS and their exact statistics at every evaluation, and those of held-out real sequences.
    dna = results['datasets']['dna']
    assert dna['metric'] == 'FD-ARS' and '| 64 held-out real sequences |' in out
    assert dna['real_floor_stats']['memorised'] < 0.5 and dna['real_floor_stats']['base_freq_error'] < 0.05
    for recipe in dna['recipes'].values():
        final = recipe['final_stats']
        assert final['kimg'] == 1 and all(0 < final[f'kmer_js_{k}'] <= 1 for k in (3, 4, 5, 6))
        assert 0 <= final['memorised'] <= 1 and 0 < final['base_freq_error'] <= 0.5
    for dataset, info in results['datasets'].items():
        assert os.path.isfile(info['plot']) and info['real_floor'] > 0
        names = [name for name, recipe in RECIPES.items() if recipe.dataset == dataset and not recipe.extra]
        assert sorted(info['recipes']) == sorted(names)
        assert info['best_baseline'] in names and RECIPES[info['best_baseline']].baseline
        baselines = [r['best_mean'] for name, r in info['recipes'].items() if RECIPES[name].baseline]
        assert info['m_star'] == min(baselines)
        for recipe in info['recipes'].values():
            assert recipe['kimg'] == [1] and recipe['min'] == recipe['max'] == recipe['mean']  # One seed.
            assert all_finite(recipe['mean']) and recipe['curves'] == {'0': {'1': recipe['mean'][0]}}
            assert (recipe['speedup'] == 1.0) == (recipe['mean'][0] <= info['m_star'])

    # A second run finds everything done: the same curves, no training, no evaluation.
    out = run_module('bench.time_to_quality', *ttq_args)
    assert out.count('0 new evaluation(s)') == len(parse_recipes('all'))
    again = load_results(ttq_dir)
    for dataset, info in results['datasets'].items():
        for name, recipe in info['recipes'].items():
            assert again['datasets'][dataset]['recipes'][name]['curves'] == recipe['curves']

    # A longer run resumes from the training state and evaluates the new snapshot (no baseline: no target).
    out = run_module('bench.time_to_quality', *ttq_args, '--kimg=2', '--recipes=mnist-infonoise')
    results = load_results(ttq_dir)
    assert list(results['datasets']) == ['mnist'] and results['datasets']['mnist']['m_star'] is None
    recipe = results['datasets']['mnist']['recipes']['mnist-infonoise']
    assert recipe['kimg'] == [1, 2] and all_finite(recipe['mean']) and recipe['speedup'] is None
    rdir = ttq_dir / 'runs' / 'mnist-infonoise-seed0'
    assert 'Loading training state' in (rdir / 'log.txt').read_text()
    assert [p.name for p in rdir.glob('training-state-*.pt')] == ['training-state-000002.pt']

    out = run_module('bench.grids', f'--outdir={grids_dir}', f'--from={ttq_dir}', f'--data={data}')
    results = load_results(grids_dir)
    assert results['nfe'] == [5, 7] and results['solvers'] == ['heun', 'euler']
    assert results['models']['infonoise']['learned_profile']  # The quick InfoNoise run refreshed.
    for solver in ('heun', 'euler'):
        rows = results['fd'][solver]
        assert sorted(rows) == sorted(
            [f'infonoise / {g}' for g in ('edm', 'infogrid-learned', 'infogrid-offline', 'loguniform')]
            + [f'lognormal / {g}' for g in ('edm', 'infogrid-offline', 'loguniform')]
        )
        assert all(len(v) == 2 and all_finite(v) for v in rows.values())
        for table in results['gaussian_kl'][solver].values():
            assert sorted(table) == ['edm(rho=7)', 'infogrid', 'loguniform']
            assert all(len(v) == 2 and all_finite(v) and min(v) > 0 for v in table.values())
    assert os.path.isfile(results['plot']) and '| network | grid | NFE 5 | NFE 7 |' in out

    out = run_module('bench.overhead', f'--outdir={overhead_dir}')
    results = load_results(overhead_dir)
    ratio = results['train_step']['ratio']
    assert sorted(ratio) == ['infonoise', 'lognormal', 'loguniform'] and ratio['lognormal'] == 1.0
    assert all_finite(ratio.values()) and min(ratio.values()) > 0
    micro = results['sampler_only']
    assert micro['batch_sizes'] == [64, 256, 1024, 4096] and min(micro['refresh_seconds'].values()) > 0
    assert sorted(micro['refresh_seconds']) == ['continuous', 'discrete']
    assert all(len(v) == 4 and all_finite(v) for v in micro['seconds_per_step'].values())
    assert results['generation']['images_per_sec'] > 0 and results['generation']['nfe'] == 35
    assert results['frechet']['relative_difference'] < 1e-6
    assert os.path.isfile(results['plot']) and '| sampler | ms/step | ratio to log-normal |' in out


@pytest.mark.slow
def test_flow_matching_quick(tmp_path):
    """bench.flow_matching --quick: every t-schedule trains, is scored at each evaluation, and a rerun resumes."""
    out_dir, data = tmp_path / 'fm', tmp_path / 'mnist.zip'
    out = run_module('bench.flow_matching', '--quick', f'--out={out_dir}', f'--data={data}')
    assert '| t-schedule |' in out and (out_dir / 'flow_matching.png').is_file()
    runs = json.loads((out_dir / 'runs.json').read_text())
    assert sorted(runs) == ['config', 'infonoise/0', 'logit-normal/0', 'uniform/0']
    for name in ('infonoise/0', 'logit-normal/0', 'uniform/0'):
        assert sorted(runs[name]['fd']) == ['0.384', '0.768'] and all_finite(list(runs[name]['fd'].values()))
    assert len(runs['infonoise/0']['density']) == 200
    again = run_module('bench.flow_matching', '--quick', f'--out={out_dir}', f'--data={data}')
    assert 'FD-MNIST' not in again.split('| t-schedule |')[0]  # Nothing retrained or re-evaluated.


@pytest.mark.slow
def test_threads_quick(tmp_path):
    """bench.threads --quick: every setting trains on the quiet and the busy machine and gets its row."""
    data = tmp_path / 'mnist.zip'
    result = subprocess.run([sys.executable, '-m', 'bench.threads', '--quick', f'--outdir={tmp_path / "out"}',
                             f'--data={data}'], cwd=REPO_ROOT, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [
        line.split(' | ')
        for line in result.stdout.splitlines()
        if line.startswith('| quiet') or line.startswith('| busy')
    ]
    assert [row[1] for row in rows] == ['torch default', 'train.py (free CPUs)', 'one thread'] * 2
    saved = json.load(open(tmp_path / 'out' / 'results.json'))
    assert saved['kimg'] == 1 and all(saved[f'{c}/one thread']['img_per_sec'] > 0 for c in ('quiet', 'busy'))
    assert saved['busy/one thread']['threads'].startswith('1 (OMP_NUM_THREADS)')


def test_objectives_schedules():
    """bench.objectives.make_schedule: every noise sampler of every objective draws what its objective needs, the
    adaptive ones through InfoNoise, the oracle from a fixed law that is not observed; ddpm has no uniform."""
    import torch

    from bench import objectives as ob

    assert not ob.available('ddpm', 'uniform') and ob.available('rf', 'uniform') and ob.available('ddpm', 'oracle')
    assert ob.available('ddpm', 'bounded') and not ob.available('edm', 'bounded')
    for objective in ob.OBJECTIVES:
        sigma = ob.make_schedule(objective, 'infonoise', ob.Context(60)).noise.grid.centers
        gaussian = (0.25 * sigma**2 / (0.25 + sigma**2)).tolist()  # A Gaussian's mmse.
        mmse = dict(sigma=sigma.tolist(), mse=gaussian, held_out=gaussian)
        for name in (name for name in ob.SCHEDULES if ob.available(objective, name)):
            schedule = ob.make_schedule(objective, name, ob.Context(60, mmse=mmse, data_variance=0.25))
            draw = schedule.sample(256, 'cpu')
            if objective == 'ddpm':
                assert draw.dtype == torch.int64 and 0 <= int(draw.min()) and int(draw.max()) < ob.ddpm.T
            else:
                assert bool((draw > 0).all()) and (objective == 'edm' or bool((draw < 1).all()))
            assert (schedule.noise is None) == (name in ('default', 'uniform'))
            assert (schedule.observe is None) == (name in ('default', 'uniform', 'oracle'))
            if schedule.noise is not None:
                density = ob.learned_density(objective, schedule)
                assert len(density) == len(ob.DENSITY_GRID[objective]) and all_finite(density)
                assert min(density) >= 0


def test_objectives_report():
    """bench.objectives.report on handcrafted cells: means, ratios to the default and kEx to its final mean."""
    from bench.objectives import report

    def cells(*curves):
        return [dict(fd={'4': a, '8': b, '12': c}) for a, b, c in curves]

    runs = dict(default=cells((40, 20, 10), (40, 20, 10)), fast=cells((20, 10, 5), (20, 10, 5)),
                slow=cells((80, 60, 40), (80, 60, 40)))  # fmt: skip
    rows = {line.split(' | ')[0][2:]: line.split(' | ') for line in report(runs, 'rf').splitlines()[4:]}
    assert rows['default'][1:4] == ['10.00 [10.00, 10.00]', '1.000 [1.000, 1.000]', '12.00 [12.00, 12.00]']
    assert rows['fast'][1:4] == ['5.00 [5.00, 5.00]', '0.500 [0.500, 0.500]', '8.00 [8.00, 8.00]']
    assert rows['slow'][3] == '—' and rows['slow'][4] == '2' and rows['slow'][5] == '— |'  # No infonoise row here.
    runs['infonoise'] = cells((40, 20, 10), (40, 20, 10))
    rows = {line.split(' | ')[0][2:]: line.split(' | ') for line in report(runs, 'rf').splitlines()[4:]}
    assert rows['fast'][5] == '0.500 [0.500, 0.500] |' and rows['infonoise'][5] == '1.000 [1.000, 1.000] |'


@pytest.mark.slow
def test_objectives_quick(tmp_path):
    """bench.objectives --quick in two processes: each objective trains two noise samplers, every cell is scored at
    every third of its horizon, InfoNoise refreshes and its learned law is recorded, and a rerun on a subset of the
    objectives trains nothing."""
    out_dir, data = tmp_path / 'objectives', tmp_path / 'mnist.zip'
    out = run_module('bench.objectives', f'--out={out_dir}', f'--data={data}', '--jobs=2')
    assert out.count('| schedule |') == 3 and (out_dir / 'objectives.png').is_file()
    runs = json.loads((out_dir / 'runs.json').read_text())['runs']
    assert sorted(runs) == [f'{o}/{n}/0' for o in ('ddpm', 'edm', 'rf') for n in ('default', 'infonoise')]
    for record in runs.values():
        assert len(record['fd']) == 3 and all_finite(list(record['fd'].values()))
    for objective in ('rf', 'ddpm', 'edm'):
        infonoise = runs[f'{objective}/infonoise/0']
        assert infonoise['refreshes'] > 0 and len(infonoise['density']) == 200 and all_finite(infonoise['density'])
    again = run_module('bench.objectives', f'--out={out_dir}', f'--data={data}', '--objectives=edm')
    assert 'FD-MNIST' not in again.split('### ')[0]  # A subset of the objectives: nothing retrained.
    assert again.count('| schedule |') == 1 and '### edm' in again


def small_domains(data_dir) -> None:
    """Tiny stand-ins for the arena's data sets where bench.arena looks for them: 300 MNIST digits (plain and
    binarized, by dataset_tool.py) and random 32-nt DNA for both DNA domains (no ARS parse, no download)."""
    from bench.arena import DATA

    for name, extra in (('mnist', ()), ('bmnist', ('--binarize=threshold',))):
        path = data_dir / DATA[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, 'dataset_tool.py', '--source=mnist5k', '--resolution=16x16', '--max-images=300',
                        *extra, f'--dest={path}'], cwd=REPO_ROOT, check=True, capture_output=True)  # fmt: skip
    rng = np.random.default_rng(0)
    for name in ('ars', 'ecoli'):
        sequences.save_npz(str(data_dir / DATA[name]), rng.integers(0, 4, (400, 32)).astype(np.uint8))


@pytest.mark.slow
def test_arena_quick(tmp_path):
    """bench.arena --quick on all five domains in two processes: every applicable schedule trains and is scored at
    every third of its horizon, the report ranks them with a verdict, the drawn densities are recorded, and a rerun
    trains nothing."""
    small_domains(tmp_path)
    out_dir = tmp_path / 'arena'
    args = f'--out={out_dir}', f'--data-dir={tmp_path}', '--schedules=loguniform,kingma-gao,learned,infonoise'
    out = run_module('bench.arena', *args, '--jobs=2')
    assert out.count('| rank |') == 5 and (out_dir / 'arena.png').is_file() and 'no verdict' in out
    runs = json.loads((out_dir / 'runs.json').read_text())['runs']
    keys = [json.loads(k) for k in runs]
    assert sorted((k['domain'], k['schedule']) for k in keys) == sorted(
        [
            (d, n)
            for d in ('mnist', 'bmnist', 'ars', 'ecoli')
            for n in ('loguniform', 'kingma-gao', 'learned', 'infonoise')
        ]
        + [('rf', 'kingma-gao'), ('rf', 'infonoise')]
    )
    for record in runs.values():
        assert len(record['score']) == 3 and all_finite(record['score'].values()) and min(record['score'].values()) > 0
        assert all_finite(record['density']) and min(record['density']) >= 0 and max(record['density']) > 0
    again = run_module('bench.arena', *args)
    assert '18 cells, 18 cached, 0 to train' in again and again.count('| rank |') == 5
    assert again.count('References at the same sample size: ') == 5 and 'Markov chain, order 5' in again


@pytest.mark.slow
def test_guidance_sweep_quick(tmp_path):
    """bench.guidance_sweep --quick on two tiny random 16x16 networks (about 10 s): a row per w, w = 1 first."""
    from test_guidance import tiny_snapshot

    final, early = tiny_snapshot(tmp_path / 'final.pt', resolution=16), tiny_snapshot(tmp_path / 'early.pt', 16, seed=1)
    out = run_module('bench.guidance_sweep', f'--final={final}', f'--early={early}', f'--data={tmp_path / "mnist.zip"}',
                     f'--outdir={tmp_path / "out"}')  # fmt: skip
    results = load_results(tmp_path / 'out')
    assert [row['guidance'] for row in results['rows']] == [1, 2] and all_finite(r['fd'] for r in results['rows'])
    assert results['real_floor'] < min(row['fd'] for row in results['rows']) and os.path.isfile(results['plot'])
    assert '| 2 |' in out and '| 64 real images |' in out


@pytest.mark.slow
def test_phema_sweep_quick(tmp_path):
    """bench.phema_sweep --quick: a 1-kimg run with two profiles, three widths reconstructed and scored, the tracked
    ones exactly (kernel residual 0), next to the classic EMA snapshot (about 20 s)."""
    out = run_module('bench.phema_sweep', f'--outdir={tmp_path / "out"}', f'--data={tmp_path / "mnist.zip"}')
    assert '| σ_rel | γ | kernel residual | FD-MNIST |' in out and '| 0.05 (tracked) |' in out
    (run,) = load_results(tmp_path / 'out')['runs']
    assert [r['sigma_rel'] for r in run['rows']] == [0.05, 0.1, 0.2] and run['kimg'] == 1
    assert [r['tracked'] for r in run['rows']] == [True, True, False]
    assert run['rows'][0]['residual'] < 1e-6 and 0 < run['rows'][2]['residual'] < 1
    assert all_finite([r['fd'] for r in run['rows']] + [run['classic_ema']])
    assert os.path.isfile(load_results(tmp_path / 'out')['plot'])
