"""Fréchet distance between Gaussians and the feature statistics it is computed from (the core of FID).

EDM's fid.py (Karras et al. 2022) accumulates detector features in float64 as a count, a sum and a Gram matrix,
all-reduces them across ranks, turns them into the mean and the unbiased covariance, stores those as an npz with
keys `mu` [D] and `sigma` [D, D], and reports

    FID = ||mu_1 - mu_2||^2 + tr(sigma_1 + sigma_2 - 2 (sigma_1 sigma_2)^(1/2)).

EDM takes the matrix square root with `scipy.linalg.sqrtm` (a Schur decomposition of a non-symmetric matrix).
Here the trace term comes from two symmetric eigen-decompositions instead, which is exact, real and several times
faster: with A = sigma_1^(1/2), sigma_1 sigma_2 = A (A sigma_2 A) A^(-1) is similar to the symmetric positive
semi-definite A sigma_2 A, so tr (sigma_1 sigma_2)^(1/2) is the sum of the square roots of its eigenvalues.
"""

import os

import numpy as np
import torch

import dnnlib


def _check_stats(mu: np.ndarray, sigma: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """`mu` [D] and `sigma` [D, D] as finite float64 arrays, or a ValueError that says what is wrong."""
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f'{what}: expected mu of shape [D] and sigma of shape [D, D], got {mu.shape} and {sigma.shape}'
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f'{what}: mu and sigma must be finite (found NaN or inf)')
    return mu, sigma


def _clip_eigvals(eigvals: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with rounding noise set to 0.

    Eigenvalues below D * eps * max (numpy's matrix_rank tolerance) are indistinguishable from 0; left as they are,
    their square roots would add ~1e-8 each to the trace, so that a rank-deficient covariance would be at a distance
    of ~1e-7 from itself.
    """
    tol = eigvals.shape[0] * np.finfo(np.float64).eps * max(eigvals.max(initial=0), 0)
    return np.where(eigvals > tol, eigvals, 0)


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance matrix."""
    eigvals, eigvecs = np.linalg.eigh((sigma + sigma.T) / 2)
    return (eigvecs * np.sqrt(_clip_eigvals(eigvals))) @ eigvecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), i.e. FID when these are detector statistics."""
    mu1, sigma1 = _check_stats(mu1, sigma1, 'first distribution')
    mu2, sigma2 = _check_stats(mu2, sigma2, 'second distribution')
    if mu1.shape != mu2.shape:
        raise ValueError(f'Feature dimensions differ: {mu1.shape[0]} and {mu2.shape[0]}')

    # tr (sigma1 sigma2)^(1/2) = tr (A sigma2 A)^(1/2) with A = sigma1^(1/2); symmetrise against rounding.
    a = _sqrt_psd(sigma1)
    m = a @ sigma2 @ a
    eigvals = np.linalg.eigvalsh((m + m.T) / 2)
    trace_sqrt = np.sqrt(_clip_eigvals(eigvals)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


class FeatureStats:
    """Running float64 count, sum and Gram matrix of features [N, D]; gives mu and the unbiased sigma as EDM does.

    The accumulators live on the device of the first batch, so that `merge_across_ranks` can all-reduce them with
    whatever backend the process group uses (NCCL needs CUDA tensors, Gloo takes CPU ones).
    """

    def __init__(self) -> None:
        self.num_items = 0
        self._sum: torch.Tensor | None = None
        self._gram: torch.Tensor | None = None
        self._merged = False

    def append(self, features: torch.Tensor) -> None:
        """Add a batch of features [N, D] (any float dtype, any device)."""
        if self._merged:
            raise RuntimeError('FeatureStats: cannot append after merge_across_ranks()')
        if features.ndim != 2:
            raise ValueError(f'FeatureStats: expected features of shape [N, D], got {tuple(features.shape)}')
        features = features.detach().to(torch.float64)
        if self._sum is None:
            self._sum = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device)
            self._gram = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64, device=features.device)
        if features.shape[1] != self._sum.shape[0]:
            raise ValueError(
                f'FeatureStats: feature dimension changed from {self._sum.shape[0]} to {features.shape[1]}'
            )
        features = features.to(self._sum.device)
        self.num_items += features.shape[0]
        self._sum += features.sum(dim=0)
        self._gram += features.T @ features

    def merge_across_ranks(self) -> None:
        """Sum count, sum and Gram matrix over all ranks (once); a no-op without a multi-process group."""
        if self._merged:
            return
        self._merged = True
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if torch.distributed.get_world_size() == 1:
            return
        if self._sum is None:
            raise RuntimeError('FeatureStats: every rank must append at least one batch before merging')
        count = torch.tensor(self.num_items, dtype=torch.float64, device=self._sum.device)
        for tensor in (count, self._sum, self._gram):
            torch.distributed.all_reduce(tensor)
        self.num_items = int(count.item())

    def _require_two(self) -> None:
        if self.num_items < 2:
            raise ValueError(f'FeatureStats: need at least 2 samples for mean and covariance, got {self.num_items}')

    @property
    def mu(self) -> np.ndarray:
        """Mean feature [D], float64."""
        self._require_two()
        return (self._sum / self.num_items).cpu().numpy()

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased feature covariance [D, D], float64: (sum f^T f - n mu mu^T) / (n - 1), as in EDM's fid.py."""
        self._require_two()
        n = self.num_items
        mu = self._sum / n
        return ((self._gram - n * torch.outer(mu, mu)) / (n - 1)).cpu().numpy()


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write reference statistics in EDM's format: `np.savez(path, mu=mu, sigma=sigma)`, float64."""
    mu, sigma = _check_stats(mu, sigma, f'Statistics for "{path}"')
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with dnnlib.util.atomic_write(path) as f:  # EDM's np.savez, but never a half-written file at `path`.
        np.savez(f, mu=mu, sigma=sigma)


def load_stats(path_or_url: str) -> tuple[np.ndarray, np.ndarray]:
    """Read (mu, sigma) from an EDM-format npz, given as a local path or a URL (downloads are cached)."""
    with dnnlib.util.open_url(path_or_url) as f:
        try:
            data = np.load(f)
        except ValueError as e:
            raise ValueError(f'"{path_or_url}" is not an npz file of reference statistics: {e}') from e
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f'"{path_or_url}" is a single array, not an npz file with keys mu and sigma')
        missing = {'mu', 'sigma'} - set(data.files)
        if missing:
            raise ValueError(f'"{path_or_url}" lacks key(s) {sorted(missing)}; it has {sorted(data.files)}')
        mu, sigma = data['mu'], data['sigma']
    return _check_stats(mu, sigma, f'"{path_or_url}"')
