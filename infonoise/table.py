"""Inverse-CDF sampling from a density tabulated on the log-grid (InfoNoise paper, Sec. 5 and App. D).

BuildSampler (Algorithm 1, line 16) turns tabulated values q_k at the grid points σ_k into a law of continuous σ, drawn
by inverse CDF: normalise q with the interval widths Δσ_k, integrate it over σ by the trapezoidal rule into a CDF at the
grid points, and map a uniform u back to σ by linear interpolation between the two grid points whose CDF values bracket
u ("Inverse-CDF sampling on a log-grid", App. D). Draws are continuous in σ, not bin centres.

The table's CDF is piecewise linear, so its draws have a piecewise-constant density; `cdf_at` and `pdf_at`
are that exact law, which the tests compare draws against. Lookups use torch only (searchsorted + lerp), so
they run on any device without host synchronisation.
"""

import dataclasses
from dataclasses import dataclass

import torch

from infonoise.profile import cumulative, normalize_density


def _interval(points: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index j in [0, K-2] of the interval [points_j, points_{j+1}) holding each value (clamped at the ends)."""
    j = torch.searchsorted(points, values, right=True) - 1
    return j.clamp(0, points.numel() - 2)


@dataclass(frozen=True, eq=False)
class InverseCDFTable:
    """A continuous density on [σ_1, σ_K] tabulated at grid points: CDF by trapezoidal integration, σ by linear
    interpolation of the inverse CDF between the two bracketing grid points (continuous σ, not bin centres)."""

    sigma: torch.Tensor  # [K] increasing grid points (float64)
    cdf: torch.Tensor  # [K] CDF at the points: cdf[0] = 0, cdf[-1] = 1, non-decreasing

    def __post_init__(self):
        if self.sigma.ndim != 1 or self.sigma.shape != self.cdf.shape or self.sigma.numel() < 2:
            raise ValueError(f'Need matching 1-D sigma and cdf with >= 2 points, got {tuple(self.sigma.shape)}')
        if self.sigma.dtype != torch.float64 or self.cdf.dtype != torch.float64:
            raise ValueError('InverseCDFTable holds float64 tensors')

    @classmethod
    def build(cls, sigma: torch.Tensor, widths: torch.Tensor, q: torch.Tensor) -> 'InverseCDFTable':
        """BuildSampler: tabulate the density ∝ q at the points `sigma` with quadrature widths `widths`."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if sigma.ndim != 1 or sigma.numel() < 2 or not bool((sigma[1:] > sigma[:-1]).all()):
            raise ValueError('Table points must be a 1-D strictly increasing sequence of at least two values')
        density = normalize_density(
            torch.as_tensor(q, dtype=torch.float64), torch.as_tensor(widths, dtype=torch.float64)
        )
        return cls(sigma, cumulative(density, sigma))

    def to(self, device: torch.device | str) -> 'InverseCDFTable':
        """The same table with its tensors on `device`."""
        return dataclasses.replace(self, sigma=self.sigma.to(device), cdf=self.cdf.to(device))

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        """σ (float64) for uniforms u in [0, 1], on u's device: linear interpolation of the inverse CDF."""
        sigma, cdf = self.sigma.to(u.device), self.cdf.to(u.device)
        u = u.to(torch.float64).clamp(0, 1)
        # cdf[j] <= u < cdf[j+1], so the bracket has positive width except at u = 1 after a flat top.
        j = _interval(cdf, u)
        lo, hi = cdf[j], cdf[j + 1]
        t = ((u - lo) / torch.where(hi > lo, hi - lo, 1.0)).clamp(0, 1)
        return torch.lerp(sigma[j], sigma[j + 1], t)

    def cdf_at(self, sigma: torch.Tensor) -> torch.Tensor:
        """The table's piecewise-linear CDF at σ: 0 below σ_1, 1 above σ_K."""
        points, cdf = self.sigma.to(sigma.device), self.cdf.to(sigma.device)
        sigma = sigma.to(torch.float64)
        j = _interval(points, sigma)
        t = ((sigma - points[j]) / (points[j + 1] - points[j])).clamp(0, 1)
        return torch.lerp(cdf[j], cdf[j + 1], t)

    def pdf_at(self, sigma: torch.Tensor) -> torch.Tensor:
        """The table's piecewise-constant density at σ: the CDF's slope on [σ_j, σ_{j+1}), 0 outside [σ_1, σ_K]."""
        points, cdf = self.sigma.to(sigma.device), self.cdf.to(sigma.device)
        sigma = sigma.to(torch.float64)
        j = _interval(points, sigma)
        slope = (cdf[j + 1] - cdf[j]) / (points[j + 1] - points[j])
        inside = (sigma >= points[0]) & (sigma <= points[-1])
        return torch.where(inside, slope, 0.0)
