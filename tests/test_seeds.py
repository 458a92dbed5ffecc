"""bench.seeds: bootstrap intervals with known answers, the threshold crossing on handcrafted curves, and the run
cache's round trip and invalidation."""

import math

import numpy as np
import pytest

from bench.seeds import RunCache, bootstrap_ci, examples_to_threshold, fmt_ci, ratio_ci


def test_bootstrap_of_constant_values_has_zero_width():
    assert bootstrap_ci([3.5] * 5) == (3.5, 3.5, 3.5)
    assert ratio_ci([2.0] * 4, [4.0] * 3) == (0.5, 0.5, 0.5)


def test_bootstrap_interval_covers_the_mean_at_its_level():
    """Over 200 fixed samples of 20 draws from N(μ, 1), the 95 % interval covers μ in about 95 % of them: 183 here
    (the percentile bootstrap runs a little short at n = 20, and 200 trials have a binomial spread of ±1.5 %); the
    seeds are fixed, so the count is the same every run."""
    mu, rng = 1.7, np.random.default_rng(123)
    covered = 0
    for rep in range(200):
        mean, lo, hi = bootstrap_ci(rng.normal(mu, 1.0, 20), num=2000, seed=rep)
        assert lo <= mean <= hi
        covered += lo <= mu <= hi
    assert 0.88 <= covered / 200 <= 0.99


def test_ratio_interval():
    """The ratio of means of two groups, its interval around it; the interval narrows with more values."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(6.0, 0.5, 5), rng.normal(3.0, 0.5, 5)
    ratio, lo, hi = ratio_ci(a, b)
    assert ratio == pytest.approx(a.mean() / b.mean()) and lo < ratio < hi
    _, lo_many, hi_many = ratio_ci(rng.normal(6.0, 0.5, 80), rng.normal(3.0, 0.5, 80))
    assert hi_many - lo_many < (hi - lo) / 2 and lo_many < 2.0 < hi_many


def test_bootstrap_refuses_empty():
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        ratio_ci([1.0], [])


def test_examples_to_threshold():
    kimg = [5, 10, 15]
    assert examples_to_threshold(kimg, [40.0, 20.0, 10.0], 50.0) == 5.0  # There at the first evaluation.
    assert examples_to_threshold(kimg, [40.0, 20.0, 10.0], 20.0) == 10.0  # Exactly at an evaluation.
    # Halfway in log FD between 40 and 10 is 20: halfway in kimg.
    assert examples_to_threshold([5, 15], [40.0, 10.0], 20.0) == pytest.approx(10.0)
    # 10·√2 lies halfway in log between the evaluations at 10 (FD 20) and 15 (FD 10).
    assert examples_to_threshold(kimg, [40.0, 20.0, 10.0], 10 * math.sqrt(2)) == pytest.approx(12.5)
    assert examples_to_threshold(kimg, [40.0, 30.0, 25.0], 10.0) is None
    # A curve that rises again: the first crossing counts.
    assert examples_to_threshold(kimg, [8.0, 30.0, 4.0], 10.0) == 5.0


def test_fmt_ci():
    assert fmt_ci(6.5612, 6.1, 7.014) == '6.56 [6.10, 7.01]'
    assert fmt_ci(None) == '—' and fmt_ci(math.nan, 1.0, 2.0) == '—'
    assert fmt_ci(1.234) == '1.23'


def test_run_cache_round_trip_and_invalidation(tmp_path):
    path = str(tmp_path / 'runs.json')
    cache = RunCache(path, dict(kimg=12, samples=500))
    assert cache.get('rf/default/0') is None
    cache.put('rf/default/0', dict(fd={'4': 30.5}, seconds=61.0))
    cache.put('rf/uniform/0', dict(fd={'4': 35.0}, seconds=60.0))
    again = RunCache(path, dict(samples=500, kimg=12))  # Same settings, other key order.
    assert again.get('rf/default/0') == dict(fd={'4': 30.5}, seconds=61.0) and again.get('rf/uniform/0')
    changed = RunCache(path, dict(kimg=15, samples=500))
    assert changed.get('rf/default/0') is None
    changed.put('rf/default/0', dict(fd={'5': 29.0}))
    assert RunCache(path, dict(kimg=12, samples=500)).get('rf/uniform/0') is None  # The old file was replaced.
    assert sorted(p.name for p in tmp_path.iterdir()) == ['runs.json']  # No temporary file left behind.
