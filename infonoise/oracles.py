"""Exact denoisers and MMSE profiles for sources where they are known (InfoNoise paper, App. A and D.1).

Under the Gaussian channel x = x0 + σε the Bayes denoiser is the posterior mean and its error mmse(σ) sets the
entropy rate mmse/σ³ (Eq. 11). Three sources have it in closed or exactly computable form:

- a Gaussian N(0, diag λ): linear denoiser x·λ/(λ+σ²), mmse = Σ λσ²/(λ+σ²);
- the two-point source ±a (App. A.3): denoiser a·tanh(ax/σ²) (Eq. 42), mmse by 1-D quadrature of Eq. 43;
- a finite data set (App. A.2): the empirical-Bayes posterior mean, a softmax over squared distances (D.1),
  whose Monte-Carlo error is the exact offline profile of that data set (`empirical_bayes_denoiser`, defined
  in `infonoise.empirical_bayes` and re-exported here).

They serve as test oracles and offline diagnostics. Everything is computed in float64.
"""

import math
from collections.abc import Callable

import numpy as np
import torch

# The finite-data-set oracle is the empirical-Bayes denoiser itself: one implementation of that formula.
from infonoise.empirical_bayes import empirical_bayes_denoiser

# 24-point Gauss-Legendre nodes and weights on [-1, 1], for the two-point quadrature.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(24)


def _rowwise(sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """σ as a float64 tensor broadcastable against x [N, ...]: a scalar, or one value per row."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    if sigma.ndim == 1 and x.ndim > 1:
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return sigma


def gaussian_mmse(sigma: float | torch.Tensor, lam: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """mmse(σ) = Σ_i λ_i σ²/(λ_i + σ²) for x0 ~ N(0, diag λ); with mean=True the mean over the D dimensions
    (the per-pixel error our loss reports). Shape of σ."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    lam = torch.as_tensor(lam, dtype=torch.float64, device=sigma.device)
    var = sigma[..., None] ** 2
    per_dim = lam * var / (lam + var)
    return per_dim.mean(-1) if mean else per_dim.sum(-1)


def gaussian_denoiser(x: torch.Tensor, sigma: float | torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Exact posterior mean E[x0 | x] = x·λ/(λ + σ²) for x0 ~ N(0, diag λ); x is [N, D], σ scalar or [N]."""
    x = x.to(torch.float64)
    lam = torch.as_tensor(lam, dtype=torch.float64, device=x.device)
    return x * lam / (lam + _rowwise(sigma, x) ** 2)


def two_point_denoiser(x: torch.Tensor, sigma: float | torch.Tensor, a: float) -> torch.Tensor:
    """Bayes denoiser a·tanh(ax/σ²) for x0 = ±a with equal probability (Eq. 42)."""
    x = x.to(torch.float64)
    return a * torch.tanh(a * x / _rowwise(sigma, x) ** 2)


def _two_point_mmse(sigma: float, a: float) -> float:
    """mmse(σ) = a² E[sech²(a x/σ²)] (Eq. 43) with x = a + σε by symmetry, by composite Gauss-Legendre quadrature.

    With s = a/σ and t = s + ε the expectation is e^{-s²/2}/√(2π) ∫ sech²(st) e^{st} e^{-t²/2} dt. Factoring
    e^{-s²/2} out keeps the integrand O(1) for every σ: it is a unit Gaussian for s -> 0 and a bump of width
    1/s at t = 0 (integral -> π/s) for s -> ∞, where mmse -> a²√(π/2) e^{-s²/2}/s. The integrand is smooth on each
    side of t = 0, so panels that grow geometrically away from 0 (from 10⁻³·min(1, 1/s) to 40, beyond which
    e^{-t²/2} < 1e-300), 24 nodes each, resolve both shapes to rounding error.
    """
    s = a / sigma
    edges = np.concatenate([[0.0], np.geomspace(1e-3 * min(1.0, 1.0 / s), 40.0, 96)])
    half, mid = (edges[1:] - edges[:-1])[:, None] / 2, (edges[1:] + edges[:-1])[:, None] / 2
    t = np.concatenate([(mid + half * _GL_NODES).ravel(), -(mid + half * _GL_NODES).ravel()])
    w = np.tile((half * _GL_WEIGHTS).ravel(), 2)
    y = np.abs(s * t)
    # log(sech²(st) e^{st}) = st + 2 log 2 - 2|st| - 2 log(1 + e^{-2|st|}).
    f = np.exp(-0.5 * t * t + s * t + 2 * math.log(2) - 2 * y - 2 * np.log1p(np.exp(-2 * y)))
    return a * a * math.exp(-0.5 * s * s) * float(f @ w) / math.sqrt(2 * math.pi)


def two_point_mmse(sigma: float | torch.Tensor, a: float) -> torch.Tensor:
    """Exact 1-D mmse(σ) of the two-point source ±a (App. A.3), float64 with the shape of σ."""
    if not a > 0:
        raise ValueError(f'The two-point half-distance a must be positive, got {a}')
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if not bool((sigma > 0).all()):
        raise ValueError('two_point_mmse needs positive noise levels')
    values = [_two_point_mmse(s, a) for s in sigma.reshape(-1).tolist()]
    return torch.tensor(values, dtype=torch.float64).reshape(sigma.shape)


def empirical_bayes_mse(
    sigma: float,
    data: torch.Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
    held_out: bool = False,
) -> float:
    """Monte-Carlo mmse(σ) of a finite data set (App. A.2): mean over data points x_i ~ data and noise of the
    per-dimension mean squared error of the exact empirical-Bayes denoiser at x_i + σε.

    With `held_out`, x_i is left out of the posterior (leave-one-out): the error of the set's Bayes denoiser on a
    point it has not seen, capped by σ² (the error of returning x itself). Both are denoisers of a fresh draw from
    the distribution the set came from, so this is an upper bound of that distribution's mmse which, unlike the
    set's own mmse, does not collapse to 0 where the posterior snaps to the training point (memorisation: below
    σ ≈ 1.8 for MNIST-5k at 16x16, whose nearest neighbours are far apart in 256 dimensions)."""
    if num_samples < 1:
        raise ValueError(f'num_samples must be positive, got {num_samples}')
    flat = data.reshape(data.shape[0], -1).to(torch.float64)
    # Chunk the observations so that the [chunk, N] distance matrix stays around 4M entries.
    chunk = max(1, 4_000_000 // flat.shape[0])
    flat_sq = flat.square().sum(1)
    total = 0.0
    for start in range(0, num_samples, chunk):
        n = min(chunk, num_samples - start)
        idx = torch.randint(flat.shape[0], (n,), generator=generator, device=flat.device)
        clean = flat[idx]
        noise = torch.randn(clean.shape, generator=generator, dtype=torch.float64, device=flat.device)
        denoised = empirical_bayes_denoiser(clean + sigma * noise, sigma, flat, flat_sq, idx if held_out else None)
        error = ((denoised - clean) ** 2).mean(1)
        total += float((error.clamp(max=sigma**2) if held_out else error).sum())
    return total / num_samples


def tabulated(sigma: torch.Tensor, values: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function of σ interpolating `values` at increasing `sigma` linearly in ln σ (held beyond the ends), e.g. an
    exact mmse for InfoNoise's `reference_mse`."""
    x = torch.as_tensor(sigma, dtype=torch.float64).log()
    y = torch.as_tensor(values, dtype=torch.float64)
    if x.ndim != 1 or x.shape != y.shape or x.numel() < 2 or not bool((x[1:] > x[:-1]).all()):
        raise ValueError('tabulated needs matching 1-D sigma (strictly increasing, >= 2) and values')

    def f(s: torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(s, dtype=torch.float64).log()
        j = (torch.searchsorted(x.to(v.device), v, right=True) - 1).clamp(0, x.numel() - 2)
        xs, ys = x.to(v.device), y.to(v.device)
        return torch.lerp(ys[j], ys[j + 1], ((v - xs[j]) / (xs[j + 1] - xs[j])).clamp(0, 1))

    return f
