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
import math
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


@dataclass(frozen=True, eq=False)
class LogLinearTable:
    """A density over ln σ that is continuous and piecewise linear between points x_j = ln σ_j (InfoNoise's default
    table, `InfoNoise(build='continuous')`).

    `density` holds g(x_j) ≥ 0, the density per unit ln σ at the points, normalised so that the exact integral of the
    piecewise-linear g is 1; `cdf` is that integral from x_0 to each point. Inside an interval the CDF is quadratic in
    x, so `icdf` solves a quadratic (in its cancellation-free form) instead of interpolating linearly. Unlike the
    σ-linear `InverseCDFTable`, whose density per unit ln σ jumps at every grid point, this law has no steps: mapped
    to another variable (t = σ/(1 + σ) for flow matching) its density is smooth up to the Jacobian.
    """

    log_sigma: torch.Tensor  # [P] increasing x_j (float64)
    density: torch.Tensor  # [P] g(x_j) >= 0, ∫ g dx = 1
    cdf: torch.Tensor  # [P] from 0 to 1

    def __post_init__(self):
        shapes = {tuple(t.shape) for t in (self.log_sigma, self.density, self.cdf)}
        if len(shapes) != 1 or self.log_sigma.ndim != 1 or self.log_sigma.numel() < 2:
            raise ValueError('LogLinearTable needs matching 1-D log_sigma, density and cdf with >= 2 points')
        if any(t.dtype != torch.float64 for t in (self.log_sigma, self.density, self.cdf)):
            raise ValueError('LogLinearTable holds float64 tensors')

    @classmethod
    def build(cls, log_sigma: torch.Tensor, density: torch.Tensor) -> 'LogLinearTable':
        """The law whose density per unit ln σ interpolates `density` (≥ 0, any scale) linearly between `log_sigma`."""
        x = torch.as_tensor(log_sigma, dtype=torch.float64)
        g = torch.as_tensor(density, dtype=torch.float64)
        if x.ndim != 1 or x.shape != g.shape or x.numel() < 2 or not bool((x[1:] > x[:-1]).all()):
            raise ValueError('Table points must be 1-D, strictly increasing, >= 2, with one density value each')
        if not bool(torch.isfinite(g).all()) or bool((g < 0).any()):
            raise ValueError('Density values must be finite and non-negative')
        pieces = 0.5 * (g[1:] + g[:-1]) * (x[1:] - x[:-1])
        total = float(pieces.sum())
        if not (total > 0 and math.isfinite(total)):
            raise ValueError(f'Density has no positive finite mass (∫ g d ln σ = {total})')
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), pieces.cumsum(0) / total])
        cdf[-1] = 1.0
        return cls(x, g / total, cdf)

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    def to(self, device: torch.device | str) -> 'LogLinearTable':
        """The same table with its tensors on `device`."""
        return LogLinearTable(self.log_sigma.to(device), self.density.to(device), self.cdf.to(device))

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.log_sigma.to(device), self.density.to(device), self.cdf.to(device)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        """σ (float64) for uniforms u in [0, 1]: in interval j, F(x) = F_j + g_j s + ½ a s² with s = x − x_j and
        slope a = (g_{j+1} − g_j)/h_j, so s = 2Δ/(g_j + √(g_j² + 2aΔ)) for Δ = u − F_j (exact, also for a = 0)."""
        x, g, cdf = self._on(u.device)
        u = u.to(torch.float64).clamp(0, 1)
        j = _interval(cdf, u)
        h = x[j + 1] - x[j]
        slope = (g[j + 1] - g[j]) / h
        delta = (u - cdf[j]).clamp(min=0)
        root = (g[j].square() + 2 * slope * delta).clamp(min=0).sqrt()
        denominator = g[j] + root
        s = torch.where(denominator > 0, 2 * delta / torch.where(denominator > 0, denominator, 1.0), 0.0)
        return (x[j] + s.clamp(max=h)).exp()

    def cdf_at(self, sigma: torch.Tensor) -> torch.Tensor:
        """P(σ' <= σ): 0 below the first point, 1 above the last."""
        x, g, cdf = self._on(sigma.device)
        v = sigma.to(torch.float64).log().clamp(x[0], x[-1])
        j = _interval(x, v)
        s = v - x[j]
        slope = (g[j + 1] - g[j]) / (x[j + 1] - x[j])
        return (cdf[j] + g[j] * s + 0.5 * slope * s.square()).clamp(0, 1)

    def pdf_at(self, sigma: torch.Tensor) -> torch.Tensor:
        """The density over σ, g(ln σ)/σ (continuous inside the table's range), 0 outside it."""
        x, g, _ = self._on(sigma.device)
        v = sigma.to(torch.float64).log()
        j = _interval(x, v)
        t = ((v - x[j]) / (x[j + 1] - x[j])).clamp(0, 1)
        inside = (v >= x[0]) & (v <= x[-1])
        return torch.where(inside, torch.lerp(g[j], g[j + 1], t) / sigma.to(torch.float64), 0.0)
