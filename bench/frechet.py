"""FID's Fréchet distance: scipy.linalg.sqrtm (EDM's fid.py) against metrics.frechet, same inputs, same run.

The two covariances are sample covariances of correlated Gaussian features, like detector statistics, so that
both have the spread of eigenvalues that real FID inputs have. Prints both times, the speed-up and the relative
difference of the two results.

    python -m bench.frechet              # D = 2048, as for the Inception detector
    python -m bench.frechet --dim=512 --repeats=3
"""

import statistics
import time

import click
import numpy as np
import scipy.linalg

from metrics.frechet import frechet_distance


def scipy_fid(mu1, sigma1, mu2, sigma2) -> float:
    """EDM's formula: sqrtm of the non-symmetric product, real part of the trace."""
    s = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - s * 2).real)


def random_stats(rng: np.random.Generator, dim: int, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    mix = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    features = rng.standard_normal((num_samples, dim)) @ mix + rng.standard_normal(dim)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def timed(fn, repeats: int) -> tuple[float, float]:
    """The result and the median time in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


@click.command()
@click.option('--dim', help='Feature dimension', type=click.IntRange(min=2), default=2048, show_default=True)
@click.option('--samples', help='Samples per covariance', type=click.IntRange(min=2), default=10000, show_default=True)
@click.option('--repeats', help='Timed runs of each method', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--seed', type=int, default=0, show_default=True)
def main(dim, samples, repeats, seed):
    rng = np.random.default_rng(seed)
    stats = random_stats(rng, dim, samples) + random_stats(rng, dim, samples)
    ref, t_scipy = timed(lambda: scipy_fid(*stats), repeats)
    ours, t_ours = timed(lambda: frechet_distance(*stats), repeats)
    print(f'D = {dim}, covariances of {samples} samples, median of {repeats} run(s)')
    print(f'scipy sqrtm:      FD = {ref:.10g}  {t_scipy:8.3f} s')
    print(f'torch_utils:      FD = {ours:.10g}  {t_ours:8.3f} s')
    print(f'speed-up: {t_scipy / t_ours:.2f}x')
    print(f'relative difference: {abs(ours - ref) / abs(ref):.3e}')


if __name__ == '__main__':
    main()
