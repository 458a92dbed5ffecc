"""Tests for metrics.frechet: FD against scipy's sqrtm and closed forms, FeatureStats (incl. 2 ranks), npz I/O."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.linalg
import torch

from metrics.frechet import FeatureStats, frechet_distance, load_stats, save_stats

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scipy_fid(mu1, sigma1, mu2, sigma2) -> float:
    """EDM's fid.py formula, with scipy.linalg.sqrtm of the non-symmetric product."""
    s = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - s * 2).real)


def random_stats(rng, dim, num_samples=None, cond=None):
    """mu [D] and an SPD sigma: a sample covariance of `num_samples` points, or eigenvalues spread over `cond`."""
    mu = rng.standard_normal(dim)
    if num_samples is not None:
        return mu, np.cov(rng.standard_normal((num_samples, dim)) @ rng.standard_normal((dim, dim)), rowvar=False)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    eigvals = np.logspace(0, -np.log10(cond), dim)
    return mu, (q * eigvals) @ q.T


@pytest.mark.parametrize(
    'dim, kwargs',
    [
        (8, dict(num_samples=100)),
        (64, dict(num_samples=500)),
        (48, dict(cond=1e10)),  # Ill-conditioned.
        (40, dict(num_samples=10)),  # Rank 9: fewer samples than dimensions.
    ],
)
def test_matches_scipy_sqrtm(dim, kwargs):
    rng = np.random.default_rng(dim)
    mu1, sigma1 = random_stats(rng, dim, **kwargs)
    mu2, sigma2 = random_stats(rng, dim, **kwargs)
    ours, ref = frechet_distance(mu1, sigma1, mu2, sigma2), scipy_fid(mu1, sigma1, mu2, sigma2)
    assert abs(ours - ref) <= 1e-6 * abs(ref)


def test_both_rank_deficient_with_equal_means():
    # Only the trace term is left, so this checks it alone against scipy.
    rng = np.random.default_rng(1)
    _, sigma1 = random_stats(rng, 30, num_samples=12)
    _, sigma2 = random_stats(rng, 30, num_samples=12)
    mu = np.zeros(30)
    ours, ref = frechet_distance(mu, sigma1, mu, sigma2), scipy_fid(mu, sigma1, mu, sigma2)
    assert ref > 1
    assert abs(ours - ref) <= 1e-6 * abs(ref)


@pytest.mark.parametrize('kwargs', [dict(num_samples=400), dict(num_samples=20), dict(cond=1e6)])
def test_distance_to_itself_is_zero(kwargs):
    rng = np.random.default_rng(2)
    mu, sigma = random_stats(rng, 32, **kwargs)
    sigma /= np.trace(sigma) / 32  # Unit scale.
    assert abs(frechet_distance(mu, sigma, mu, sigma)) <= 1e-8


def test_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0, 3, size=50), rng.uniform(0, 3, size=50)
    a[:5] = 0  # Degenerate directions are allowed.
    mu1, mu2 = rng.standard_normal(50), rng.standard_normal(50)
    expected = np.square(np.sqrt(a) - np.sqrt(b)).sum() + np.square(mu1 - mu2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_distance_rejects_bad_input():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match='dimensions differ'):
        frechet_distance(mu, sigma, np.zeros(5), np.eye(5))
    with pytest.raises(ValueError, match='shape'):
        frechet_distance(mu, np.eye(3), mu, sigma)
    with pytest.raises(ValueError, match='shape'):
        frechet_distance(np.zeros((4, 1)), sigma, mu, sigma)
    bad = sigma.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match='finite'):
        frechet_distance(mu, sigma, mu, bad)
    with pytest.raises(ValueError, match='finite'):
        frechet_distance(np.full(4, np.inf), sigma, mu, sigma)


def test_feature_stats_in_chunks_match_numpy():
    rng = np.random.default_rng(4)
    features = rng.standard_normal((203, 16)) * 3 + rng.standard_normal(16)
    stats = FeatureStats()
    for chunk in np.array_split(features, [1, 50, 51, 150]):  # Uneven chunks, float32 on the way in.
        stats.append(torch.from_numpy(chunk).float())
    stats.merge_across_ranks()  # No process group: a no-op.
    features32 = features.astype(np.float32).astype(np.float64)
    assert stats.num_items == 203
    assert stats.mu.dtype == np.float64 and stats.sigma.dtype == np.float64
    np.testing.assert_allclose(stats.mu, features32.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(features32, rowvar=False, ddof=1), rtol=1e-10, atol=1e-10)


def test_feature_stats_need_two_samples_and_fixed_shape():
    stats = FeatureStats()
    with pytest.raises(ValueError, match='at least 2 samples'):
        _ = stats.mu
    stats.append(torch.ones(1, 3))
    with pytest.raises(ValueError, match='at least 2 samples.*got 1'):
        _ = stats.sigma
    with pytest.raises(ValueError, match='dimension changed'):
        stats.append(torch.ones(2, 4))
    with pytest.raises(ValueError, match=r'\[N, D\]'):
        stats.append(torch.ones(3))
    stats.merge_across_ranks()
    with pytest.raises(RuntimeError, match='after merge'):
        stats.append(torch.ones(1, 3))


MERGE_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from metrics.frechet import FeatureStats
    rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.distributed.init_process_group('gloo', init_method='file://' + store, rank=rank, world_size=2)
    features = np.load(out + '/features.npy')
    stats = FeatureStats()
    for chunk in np.array_split(features[rank::2], 3):
        stats.append(torch.from_numpy(chunk))
    stats.merge_across_ranks()
    np.savez(f'{out}/rank{rank}.npz', n=stats.num_items, mu=stats.mu, sigma=stats.sigma)
    torch.distributed.destroy_process_group()
    """
)


def test_feature_stats_merge_across_two_ranks(tmp_path):
    features = np.random.default_rng(5).standard_normal((61, 6)) + 2
    np.save(tmp_path / 'features.npy', features)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    procs = [
        subprocess.Popen(
            [sys.executable, '-c', MERGE_SCRIPT, str(rank), str(tmp_path / 'store'), str(tmp_path)],
            cwd=REPO_ROOT,
            env=env,
        )
        for rank in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    for rank in range(2):
        result = np.load(tmp_path / f'rank{rank}.npz')
        assert int(result['n']) == 61
        np.testing.assert_allclose(result['mu'], features.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(result['sigma'], np.cov(features, rowvar=False), rtol=1e-10, atol=1e-12)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    mu, sigma = random_stats(rng, 10, num_samples=50)
    path = str(tmp_path / 'sub' / 'ref.npz')
    save_stats(path, mu, sigma)
    with np.load(path) as data:
        assert sorted(data.files) == ['mu', 'sigma']
        assert data['mu'].dtype == np.float64
    for source in (path, 'file://' + path):
        mu2, sigma2 = load_stats(source)
        np.testing.assert_array_equal(mu2, mu)
        np.testing.assert_array_equal(sigma2, sigma)


def test_load_rejects_wrong_keys_and_shapes(tmp_path):
    wrong_keys = str(tmp_path / 'wrong-keys.npz')
    np.savez(wrong_keys, mean=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match=r'wrong-keys\.npz.*mu'):
        load_stats(wrong_keys)
    wrong_shape = str(tmp_path / 'wrong-shape.npz')
    np.savez(wrong_shape, mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r'wrong-shape\.npz.*shape'):
        load_stats(wrong_shape)
    single = str(tmp_path / 'single.npy')
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match=r'single\.npy'):
        load_stats(single)
    with pytest.raises(ValueError, match=r'bad\.npz'):
        save_stats(str(tmp_path / 'bad.npz'), np.zeros(3), np.eye(2))
