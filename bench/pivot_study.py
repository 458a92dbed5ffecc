"""Why the pivot rules' constants are what they are: the rules of `infonoise/pivot.py` on synthetic profiles whose
answer is known (InfoNoise paper, Sec. 4 and App. B.4; docs/pivot-rules.md).

Discrete endpoints. A synthetic log-rate (`synthetic_log_rate`) has the shape the learned binarized-MNIST profiles
show: a low-noise power law whose slope drifts slowly, a break at a known σ = c into a mid-noise bump (the slope
jumps up by 1.5-4) or a flatter shoulder (up by 1-1.5), and a turn into the σ⁻³ high-noise tail 0.5-1.5 decades
later; a third kind first steepens by 0.7-1.5 half a decade to a decade below its bump (a steepening is not the
break). Each profile gets 3 % multiplicative noise per bin, i.i.d. The tables report how often the calibrated pivot
lies within one grid interval of c:

1. for the chosen constants (window W = 0.5 decades, minimum slope change 0.5) across the grids the rules must be
   invariant to (K = 32/64/128 bins, σ_min = 0.002/0.005/0.01, σ_max = 80/200);
2. for other windows and thresholds, beside how often a power law with no break at all, flattening by 0.75 per
   decade, is wrongly broken: the trade-off that sets the two constants;
3. against the drift per decade and the noise level (what the rule tolerates);
4. after debouncing (median of the last refreshes) on a sequence of noisy refreshes of one profile.

Continuous endpoints. Gaussian sources, whose mmse is exact: the onset pivot with σ_ref = 0.004·σ_data across
grids, and under a rescaling of the data (mmse_k(σ) = k²·mmse_1(σ/k), σ_data -> k·σ_data); beside it the paper's
max-normalised rule, which moves with σ_min.

Nothing here is fitted to a benchmark: no learned profile and no FD enters the constants. A last table applies
the rules to the learned profiles committed under tests/data/ (from the CPU benchmarks), resampled onto every grid,
as a check. About a minute on 2 cores.

    python -m bench.pivot_study --outdir=bench-out/pivot-study
"""

import json
import math
import os
import time

import click
import numpy as np
import torch

from bench.common import markdown_table, run_record, write_json
from infonoise import pivot
from infonoise.oracles import gaussian_mmse
from infonoise.profile import LogGrid, entropy_rate

LN10 = math.log(10)
# Learned profiles of the CPU benchmarks, committed as test fixtures.
LEARNED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests', 'data')
# Grids the rules must be invariant to: (K, σ_min, σ_max); the first is EDM's default with InfoNoise's K = 64.
GRIDS = [(64, 0.002, 80.0), (32, 0.002, 80.0), (128, 0.002, 80.0), (64, 0.005, 80.0), (64, 0.01, 80.0), (64, 0.002, 200.0)]  # fmt: skip


def synthetic_log_rate(
    sigma: np.ndarray,
    c: float,
    slope: float = -1.5,
    drift: float = 0.0,
    jump: float = 2.0,
    width: float = 0.05,
    top: float | None = None,
    top_width: float = 0.3,
    tail: float = -3.0,
    sigma_lo: float = 0.002,
    steepen: float | None = None,
    steepen_by: float = 0.0,
) -> np.ndarray:
    """log r at σ: slope `slope` at σ_lo, drifting by `drift` per decade of σ up to c and constant after; at c the
    slope changes by `jump` (a softplus bend `width` wide in ln σ, whose asymptotes meet at c); at `top` (None:
    never) it turns to `tail` over `top_width`. jump = 0 and top = None give a drifting power law with no break.
    `steepen` (None: never) adds a change of the slope by `steepen_by` (< 0) there, a bend as wide as the break's."""
    x, xc, x0 = np.log(sigma), math.log(c), math.log(sigma_lo)
    kappa = drift / LN10  # Slope change per unit ln σ.
    low = np.minimum(x, xc) - x0
    y = slope * (x - x0) + kappa * (0.5 * low**2 + (xc - x0) * np.maximum(x - xc, 0))
    y = y + jump * width * np.logaddexp(0, (x - xc) / width)
    if steepen is not None:
        y = y + steepen_by * width * np.logaddexp(0, (x - math.log(steepen)) / width)
    if top is not None:
        before = slope + kappa * (xc - x0) + jump + steepen_by  # Slope between the break and the top.
        y = y + (tail - before) * top_width * np.logaddexp(0, (x - math.log(top)) / top_width)
    return y


def draw_profile(kind: str, rng: np.random.Generator) -> dict:
    """Random parameters of one synthetic profile: 'bump', 'shoulder', 'steepen' (a bump whose power law first
    steepens by 0.7-1.5 half a decade to a decade below it) or 'drift' (a power law with no break)."""
    params = dict(slope=rng.uniform(-1.6, -1.0), drift=rng.uniform(-0.5, 0.5), width=rng.uniform(0.02, 0.1))
    if kind == 'drift':
        return dict(params, c=1.0, jump=0.0, top=None)
    c = math.exp(rng.uniform(math.log(0.05), math.log(1.0)))
    jump = rng.uniform(1.0, 1.5) if kind == 'shoulder' else rng.uniform(1.5, 4.0)
    params = dict(params, c=c, jump=jump, top=c * 10 ** rng.uniform(0.5, 1.5))
    if kind == 'steepen':
        params.update(steepen=c / 10 ** rng.uniform(0.5, 1.0), steepen_by=-rng.uniform(0.7, 1.5))
    return params


def resample(sigma: np.ndarray, rate: np.ndarray, at: np.ndarray) -> np.ndarray:
    """A tabulated rate at other σ: linear in log-log between the points, and beyond them along the end segments."""
    x, y, xs = np.log(sigma), np.log(rate), np.log(at)
    inside = np.interp(xs, x, y)
    low = y[0] + (xs - x[0]) * (y[1] - y[0]) / (x[1] - x[0])
    high = y[-1] + (xs - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2])
    return np.exp(np.where(xs < x[0], low, np.where(xs > x[-1], high, inside)))


def learned_profiles(directory: str = LEARNED) -> dict[str, dict]:
    """The learned profiles committed as test fixtures (`tests/data/profile-*.json`), by file name."""
    profiles = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith('profile-') and name.endswith('.json'):
            with open(os.path.join(directory, name), encoding='utf-8') as f:
                profiles[name] = json.load(f)
    return profiles


def learned_table() -> str:
    """The rules on the learned fixture profiles, resampled (log-log) onto every grid: a check, not a fit."""
    rows = []
    for name, profile in learned_profiles().items():
        sigma, rate = np.array(profile['sigma']), np.array(profile['rate'])
        rel = np.array([math.nan if v is None else v for v in profile['stderr']]) / np.array(profile['mse'])
        endpoint = 'continuous' if name.startswith('profile-mnist') else 'discrete'
        rules = ['ours'] + (['max r̂ (paper)'] if endpoint == 'continuous' else [])
        for label in rules:
            cells = []
            for grid in GRIDS:
                s = LogGrid.make(*grid).centers
                r = torch.from_numpy(resample(sigma, rate, s.numpy()))
                # Losses per bin scale with the bin's width in ln σ, so standard errors with its inverse root.
                widths = math.log(sigma[1] / sigma[0]) / (math.log(grid[2] / grid[1]) / grid[0])
                e = torch.from_numpy(np.interp(np.log(s.numpy()), np.log(sigma), rel) * math.sqrt(widths))
                if label != 'ours':
                    cells.append(f'{pivot.onset_pivot(s, r):.3g}')
                else:
                    result = pivot.calibrate(s, r, endpoint, e, sigma_data=0.5)
                    cells.append(f'{result.value:.3g}' + (' (onset)' if result.rule.startswith('onset,') else ''))
            rows.append([name.removeprefix('profile-').removesuffix('.json'), f'{endpoint}, {label}', *cells])
    headers = ['learned profile', 'rule', *[f'K={k} [{lo}, {hi:g}]' for k, lo, hi in GRIDS]]
    return markdown_table(headers, rows)


def grid_centers(num_bins: int, sigma_min: float, sigma_max: float) -> tuple[np.ndarray, float]:
    """The centres of InfoNoise's log-grid and its interval in ln σ."""
    return LogGrid.make(num_bins, sigma_min, sigma_max).centers.numpy(), math.log(sigma_max / sigma_min) / num_bins


def discrete_c(sigma: np.ndarray, log_rate: np.ndarray, noise: float | None = None, **kwargs) -> float | None:
    """The power-law break (None: no break) of a profile given as log r whose bins have a relative standard error
    `noise` (known, as InfoNoise measures it; None: unknown, the floor alone)."""
    rel_err = None if noise is None else torch.full((sigma.size,), noise, dtype=torch.float64)
    return pivot.powerlaw_break(torch.from_numpy(sigma), torch.from_numpy(np.exp(log_rate)), rel_err, **kwargs)


def hit_rate(kind: str, grid: tuple, draws: int, seed: int, noise: float = 0.03, **kwargs) -> float:
    """Fraction of noisy profiles whose break is found within one grid interval of the true c."""
    rng = np.random.default_rng(seed)
    sigma, step = grid_centers(*grid)
    hits = 0
    for _ in range(draws):
        params = draw_profile(kind, rng)
        log_rate = synthetic_log_rate(sigma, **params) + noise * rng.standard_normal(sigma.size)
        c = discrete_c(sigma, log_rate, noise, **kwargs)
        hits += c is not None and abs(math.log(c / params['c'])) <= step
    return hits / draws


def no_break_rate(drift: float, draws: int, seed: int, noise: float = 0.03, **kwargs) -> float:
    """Fraction of noisy power laws whose slope rises by `drift` per decade over EDM's whole grid (flattening, the
    direction a break goes) where no break is found."""
    rng = np.random.default_rng(seed)
    sigma, _ = grid_centers(*GRIDS[0])
    clean = 0
    for _ in range(draws):
        params = dict(draw_profile('drift', rng), drift=drift)
        log_rate = synthetic_log_rate(sigma, **params) + noise * rng.standard_normal(sigma.size)
        clean += discrete_c(sigma, log_rate, noise, **kwargs) is None
    return clean / draws


def invariance(draws: int, seed: int) -> tuple[float, float]:
    """Noise-free bump and shoulder profiles on every grid of GRIDS and rescaled by k = 1/2, 2: the fraction whose
    break stays within one interval (of the coarser grid) of the default grid's, for grids and for scales."""
    rng = np.random.default_rng(seed)
    grid_ok = scale_ok = total = 0
    for i in range(draws):
        params = draw_profile('bump' if i % 2 else 'shoulder', rng)
        sigma0, step0 = grid_centers(*GRIDS[0])
        c0 = discrete_c(sigma0, synthetic_log_rate(sigma0, **params))
        if c0 is None:
            continue
        total += 1
        grid_ok += all(
            (c := discrete_c(s, synthetic_log_rate(s, **params))) is not None and abs(math.log(c / c0)) <= max(step, step0)
            for s, step in (grid_centers(*g) for g in GRIDS[1:])
        )  # fmt: skip
        # Data scaled by k: r_k(σ) = r_1(σ/k)/k, so every σ of the profile (c, top, σ_lo) scales by k.
        scaled = []
        for k in (0.5, 2.0):
            p = dict(params, c=params['c'] * k, top=params['top'] * k, sigma_lo=0.002 * k)
            c = discrete_c(sigma0, synthetic_log_rate(sigma0, **p) - math.log(k))
            scaled.append(c is not None and abs(math.log(c / (k * c0))) <= step0)
        scale_ok += all(scaled)
    return grid_ok / max(total, 1), scale_ok / max(total, 1)


def debounce_ranges(draws: int, seed: int, noise: float, windows=(1, 3, 5, 9), refreshes: int = 30) -> dict:
    """Median (over profiles) of max/min of the pivot over refreshes 10..30 of a sequence of independently noisy
    copies of one profile, with the median of the last `window` calibrations as the pivot."""
    rng = np.random.default_rng(seed)
    sigma, _ = grid_centers(32, 0.002, 80.0)
    ratios = {w: [] for w in windows}
    for i in range(draws):
        params = draw_profile('bump' if i % 2 else 'shoulder', rng)
        raw = []
        for _ in range(refreshes):
            log_rate = synthetic_log_rate(sigma, **params) + noise * rng.standard_normal(sigma.size)
            rate, rel_err = torch.from_numpy(np.exp(log_rate)), torch.full((sigma.size,), noise, dtype=torch.float64)
            raw.append(pivot.calibrate(torch.from_numpy(sigma), rate, 'discrete', rel_err).value)
        for w in windows:
            used = [float(np.exp(np.median(np.log(raw[max(0, j - w + 1) : j + 1])))) for j in range(9, refreshes)]
            ratios[w].append(max(used) / min(used))
    return {w: float(np.median(r)) for w, r in ratios.items()}


def gaussian_onset(lam: torch.Tensor, grid: tuple, sigma_data: float, normalise: str) -> tuple[float, float]:
    """Onset pivot of the exact Gaussian-source profile on a grid, and the grid's interval in ln σ."""
    sigma = LogGrid.make(*grid).centers
    rate = entropy_rate(gaussian_mmse(sigma, lam, mean=True), sigma)
    ref = pivot.SIGMA_REF_PER_SIGMA_DATA * sigma_data if normalise == 'sigma_ref' else None
    return pivot.onset_pivot(sigma, rate, 0.002, ref), math.log(grid[2] / grid[1]) / grid[0]


def onset_table() -> str:
    """c of the onset rule for two Gaussian spectra on every grid, with σ_ref and with the paper's max."""
    spectra = {
        'power law λ_i ∝ 1/i (3072 dims, var 0.25)': 0.25
        * 3072
        / torch.arange(1, 3073, dtype=torch.float64)
        / sum(1 / i for i in range(1, 3073)),  # fmt: skip
        'log-uniform λ in [1e-4, 1] (784 dims)': torch.logspace(-4, 0, 784, dtype=torch.float64),
    }
    rows = []
    for name, lam in spectra.items():
        for normalise in ('sigma_ref', 'max'):
            cells = [f'{gaussian_onset(lam, g, 0.5, normalise)[0]:.3g}' for g in GRIDS]
            for k in (0.5, 2.0):
                cells.append(f'{gaussian_onset(lam * k * k, GRIDS[0], 0.5 * k, normalise)[0] / k:.3g}')
            rows.append([name, 'σ_ref = 0.004·σ_data' if normalise == 'sigma_ref' else 'max r̂ (paper)', *cells])
    headers = ['spectrum', 'normalised by', *[f'K={k} [{lo}, {hi:g}]' for k, lo, hi in GRIDS], 'data ×½: c/k', 'data ×2: c/k']  # fmt: skip
    return markdown_table(headers, rows)


# fmt: off
@click.command(context_settings={'show_default': True})
@click.option('--outdir', help='Where results.json goes', metavar='DIR', default=os.path.join('bench-out', 'pivot-study'))
@click.option('--draws',  help='Random profiles per table cell', metavar='N', type=click.IntRange(min=1), default=200)
@click.option('--seed',   help='Seed of the random profiles', type=int, default=0)
@click.option('--quick',  help='20 profiles per cell (a smoke test; the rates are coarse)', is_flag=True)
# fmt: on
def main(outdir: str, draws: int, seed: int, quick: bool):
    """Pivot rules on synthetic profiles with known answers: hit rates, the constants' trade-off, invariance."""
    start = time.time()
    draws = 20 if quick else draws
    results, out = {}, []

    kinds = ('bump', 'shoulder', 'steepen')
    rows = [[kind, *[f'{hit_rate(kind, g, draws, seed):.1%}' for g in GRIDS]] for kind in kinds]
    results['hit_rate'] = rows
    headers = ['break into', *[f'K={k} [{lo}, {hi:g}]' for k, lo, hi in GRIDS]]
    out.append(f'**Break found within one grid interval** (W = {pivot.BREAK_WINDOW} decades, |D| >= '
               f'{pivot.BREAK_MIN_CHANGE}; 3 % noise; {draws} profiles per cell)\n\n' + markdown_table(headers, rows))

    rows = []
    for window in (0.25, 0.5, 1.0):
        for change in (0.25, 0.5, 1.0):
            kw = dict(window=window, min_change=change)
            hits = np.mean([hit_rate(kind, GRIDS[0], draws, seed, **kw) for kind in kinds])
            rows.append([window, change, f'{hits:.1%}', f'{no_break_rate(0.75, draws, seed, **kw):.1%}'])
    results['constants'] = rows
    out.append(f'**Window and threshold** (K = 64 on [0.002, 80], 3 % noise, {draws} profiles per kind): breaks found '
               'within one interval (the three kinds pooled), and power laws flattening by 0.75 per decade left '
               'unbroken\n\n' + markdown_table(['W (decades)', 'min |D|', 'breaks found', 'drift left unbroken'], rows))

    drifts = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
    noises = (0.01, 0.03, 0.05, 0.1)
    drift_row = [f'{no_break_rate(d, draws, seed):.1%}' for d in drifts]
    noise_rows = [[kind, *[f'{hit_rate(kind, GRIDS[0], draws, seed, noise=n):.1%}' for n in noises]] for kind in kinds]
    results['drift'], results['noise'] = drift_row, noise_rows
    out.append('**Drift tolerance**: power laws whose slope rises by this much per decade over the whole grid, no '
               'break found (a steepening is never a break)\n\n' + markdown_table([f'{d}/decade' for d in drifts], [drift_row]))
    out.append('**Noise tolerance** (K = 64): breaks found within one interval at this multiplicative noise per bin\n\n'
               + markdown_table(['break into', *[f'{n:.0%}' for n in noises]], noise_rows))

    grid_ok, scale_ok = invariance(draws, seed)
    results['invariance'] = dict(grids=grid_ok, scales=scale_ok)
    out.append(f'**Invariance** (noise-free bump and shoulder profiles): break within one interval of the default '
               f'grid\'s on all {len(GRIDS) - 1} other grids: {grid_ok:.1%}; with the data scaled by ½ and 2, within '
               f'one interval of k·c: {scale_ok:.1%}')

    ranges = debounce_ranges(max(draws // 4, 5), seed, 0.05)
    results['debounce'] = ranges
    out.append('**Debouncing** (K = 32, 5 % noise per refresh, refreshes 10-30): median max/min ratio of the pivot '
               'with the median of the last N calibrations\n\n'
               + markdown_table([f'N = {w}' for w in ranges], [[f'{r:.3f}' for r in ranges.values()]]))

    out.append('**Onset rule on exact Gaussian sources** (c; the last two columns divide by the data scale k)\n\n'
               + onset_table())
    out.append('**Learned profiles** (`tests/data/`, K = 32 on [0.002, 80], resampled in log-log onto each grid; a '
               'check of the rules, not an input to them; "(onset)": no break, the onset fallback)\n\n' + learned_table())
    results['run'] = run_record('bench.pivot_study', start, torch.device('cpu'))
    os.makedirs(outdir, exist_ok=True)
    write_json(os.path.join(outdir, 'results.json'), results)
    click.echo('\n\n'.join(out))
    click.echo(f'\nWrote {outdir}/results.json ({time.time() - start:.0f} s)')


if __name__ == '__main__':
    main()
