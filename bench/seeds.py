"""Runs over several training seeds: a resumable cache of finished runs, bootstrap confidence intervals over seeds,
and the training examples a curve needs to reach a threshold (issue 23).

A benchmark cell (one objective, noise sampler and seed) is expensive and independent of the others, so finished
cells go to a JSON cache that a rerun reads back; the cache is dropped when the benchmark's settings change. Over
seeds, a percentile bootstrap of the mean (Efron & Tibshirani 1993, Sec. 13.3) gives the interval of a mean score,
and resampling two groups independently that of the ratio of their means.
"""

import math
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

import numpy as np
import torch

from bench.common import read_json, write_json


class RunCache:
    """Finished records by key in a JSON file {"config": ..., "runs": {key: record}}; a file written under another
    `config` is discarded, so only runs made with the current settings are reused."""

    def __init__(self, path: str, config: dict):
        self.path, self.config = path, config
        saved = read_json(path, {})
        self.runs = saved.get('runs', {}) if saved.get('config') == config else {}

    def get(self, key: str) -> dict | None:
        return self.runs.get(key)

    def put(self, key: str, record: dict) -> None:
        """Store `record` and rewrite the file atomically: an interrupted write leaves the previous file intact."""
        self.runs[key] = record
        tmp = f'{self.path}.tmp{os.getpid()}'
        write_json(tmp, dict(config=self.config, runs=self.runs))
        os.replace(tmp, self.path)


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def run_cells(fn: Callable, cells: Iterable[tuple], jobs: int, done: Callable[[tuple, dict], None]) -> None:
    """fn(*cell) for every cell, handing each result to done(cell, result) as it finishes: in this process when
    jobs == 1, else in `jobs` spawned processes with the cores shared out between them (torch's default of one thread
    per core in every process oversubscribes the machine, which on 2 cores made two cells run about 10x slower)."""
    cells = list(cells)
    if jobs == 1:
        for cell in cells:
            done(cell, fn(*cell))
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(
        jobs, mp_context=get_context('spawn'), initializer=_set_threads, initargs=(threads,)
    ) as pool:
        futures = {pool.submit(fn, *cell): cell for cell in cells}
        for future in as_completed(futures):
            done(futures[future], future.result())


def _bounds(stats: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _resampled_means(values: np.ndarray, num: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `num` bootstrap resamples (with replacement, same size) of `values`."""
    return values[rng.integers(len(values), size=(num, len(values)))].mean(1)


def bootstrap_ci(values, level: float = 0.95, num: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of `values` and the percentile-bootstrap interval of it at `level`."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f'Need a non-empty 1-D sequence of values, got shape {values.shape}')
    means = _resampled_means(values, num, np.random.default_rng(seed))
    return (float(values.mean()), *_bounds(means, level))


def ratio_ci(a, b, level: float = 0.95, num: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """(mean(a)/mean(b), lo, hi): the ratio of means and its percentile-bootstrap interval, the two groups (e.g. the
    seeds of two noise samplers) resampled independently."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1 or not len(a) or not len(b):
        raise ValueError('Need two non-empty 1-D sequences of values')
    rng = np.random.default_rng(seed)
    ratios = _resampled_means(a, num, rng) / _resampled_means(b, num, rng)
    return (float(a.mean() / b.mean()), *_bounds(ratios, level))


def examples_to_threshold(kimg, values, threshold: float) -> float | None:
    """The first kimg at which the curve (kimg ascending, positive values such as FD) is at or below `threshold`,
    interpolated linearly in log value between the evaluation before and the one that gets there; None if it
    never does. A curve already there at its first evaluation reaches it at that kimg."""
    for i, (k, v) in enumerate(zip(kimg, values)):
        if v <= threshold:
            if i == 0:
                return float(k)
            k0, v0 = kimg[i - 1], values[i - 1]
            return float(k0 + (k - k0) * math.log(v0 / threshold) / math.log(v0 / v))
    return None


def fmt_ci(mean: float | None, lo: float | None = None, hi: float | None = None, digits: int = 2) -> str:
    """'6.56 [6.10, 7.01]': a mean and its interval with `digits` decimals; an em dash for a missing mean."""
    if mean is None or not math.isfinite(mean):
        return '—'
    if lo is None or hi is None:
        return f'{mean:.{digits}f}'
    return f'{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]'
