"""Inference sigma-grids: where a solver evaluates the denoiser.

A grid is a float64 tensor of N+1 noise levels sigma_0 > sigma_1 > ... > sigma_{N-1} > sigma_N = 0 (EDM's
convention, Karras et al. 2022, Sec. 3): the N-step solver starts at sigma_0 and integrates down to 0. Grids
are pure functions of their arguments; solvers (`training.sampling`) take one as input and never build it.

- `edm_grid`: EDM's rho-grid (EDM Eq. 5), the default.
- `infogrid`: the InfoNoise paper's InfoGrid (Eq. 19), uniform in the cumulative information coordinate
  u(sigma) = ∫ s r(s) ds / Z of an entropy-rate profile r = mmse/sigma^3.
- `tangent_grid`: InfoGrid in closed form for a Gaussian source with variances lambda, where
  u(sigma) ∝ Σ sqrt(lambda) arctan(sigma/sqrt(lambda)) (the "tangent law" of Poor, Sun & Zhang 2026).
- `loguniform_grid`: geometric spacing, which is also EDM's "ve" discretization.
- `vp_grid`, `iddpm_grid`: EDM's "vp" and "iddpm" discretizations (EDM Table 1), for its ablations.

Grids and the tangent grid's variances read from files: `infonoise.grid_files`.
`build_grid` picks one by name (what `generate.py --grid` offers); `nfe` and `num_steps_for` convert between
steps and network evaluations of the Heun and Euler solvers.
"""

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from infonoise.profile import Profile

# EDM's default noise range of each discretization (EDM's ablation solver); the VP one is sigma_VP(1e-3), sigma_VP(1).
# EDM's VP noise level (Table 1): σ(t) = √(exp(½β_d t² + β_min t) − 1), t ∈ [ε_t, 1] in training, [ε_s, 1] in sampling.
VP_BETA_D, VP_BETA_MIN, VP_EPSILON_T, VP_EPSILON_S = 19.9, 0.1, 1e-5, 1e-3


def _vp_input(x: float | torch.Tensor) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64)


def vp_sigma(t: float | torch.Tensor, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    """VP's noise level function σ(t), in t's dtype for a tensor (float64 for a number); expm1 keeps small t exact."""
    t = _vp_input(t)
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


def vp_t(sigma: float | torch.Tensor, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    """The inverse t(σ) = (√(β_min² + 2β_d ln(1 + σ²)) − β_min)/β_d, same dtype rule; log1p keeps small σ exact."""
    sigma = _vp_input(sigma)
    return ((beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - beta_min) / beta_d


DEFAULT_RANGES = {
    'vp': (vp_sigma(VP_EPSILON_S).item(), vp_sigma(1.0).item()),
    've': (0.02, 100.0),
    'iddpm': (0.002, 81.0),
    'edm': (0.002, 80.0),
}


def _check(num_steps: int, sigma_min: float, sigma_max: float) -> None:
    if num_steps < 2:
        raise ValueError(f'A sigma-grid needs at least 2 steps, got {num_steps}')
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f'Need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}')


def _finish(sigmas: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Pin the ends to sigma_max and sigma_min exactly and append the final 0."""
    sigmas = sigmas.to(torch.float64).clone()
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def edm_grid(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's rho-grid (EDM Eq. 5): sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.

    Computed in EDM's order of operations, so the values equal EDM's bit for bit (the ends are not re-pinned).
    """
    _check(num_steps, sigma_min, sigma_max)
    if rho <= 0:
        raise ValueError(f'rho must be positive, got {rho}')
    step_indices = torch.arange(num_steps, dtype=torch.float64)
    sigmas = (
        sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def loguniform_grid(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    """Geometric spacing sigma_i = sigma_max (sigma_min/sigma_max)^(i/(N-1)); EDM's "ve" discretization."""
    _check(num_steps, sigma_min, sigma_max)
    fraction = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    return _finish(sigma_max * (sigma_min / sigma_max) ** fraction, sigma_min, sigma_max)


def vp_grid(num_steps: int, sigma_min: float, sigma_max: float, epsilon_s: float = VP_EPSILON_S) -> torch.Tensor:
    """EDM's "vp" discretization: t uniform on [1, epsilon_s] mapped through VP's sigma(t), with beta_d
    and beta_min refitted so that sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max (as EDM's ablation solver does).
    """
    _check(num_steps, sigma_min, sigma_max)
    if not 0 < epsilon_s < 1:
        raise ValueError(f'epsilon_s must lie in (0, 1), got {epsilon_s}')
    beta_d, beta_min = vp_coefficients(sigma_min, sigma_max, epsilon_s)
    t = 1 + torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1) * (epsilon_s - 1)
    return _finish(vp_sigma(t, beta_d, beta_min), sigma_min, sigma_max)


def vp_coefficients(sigma_min: float, sigma_max: float, epsilon_s: float = VP_EPSILON_S) -> tuple[float, float]:
    """beta_d, beta_min of VP's sigma(t) through sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max (EDM)."""
    beta_d = 2 * (math.log(sigma_min**2 + 1) / epsilon_s - math.log(sigma_max**2 + 1)) / (epsilon_s - 1)
    beta_min = math.log(sigma_max**2 + 1) - 0.5 * beta_d
    return beta_d, beta_min


def iddpm_grid(
    num_steps: int, sigma_min: float, sigma_max: float, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000
) -> torch.Tensor:
    """EDM's "iddpm" discretization: the improved-DDPM noise levels u_j that lie in [sigma_min, sigma_max], of which
    num_steps are picked at evenly spaced indices. The ends are those u_j, not sigma_min/sigma_max themselves."""
    _check(num_steps, sigma_min, sigma_max)
    u = torch.zeros(M + 1, dtype=torch.float64)
    j = torch.arange(M + 1)
    alpha_bar = (0.5 * math.pi * j / M / (C_2 + 1)).sin() ** 2
    for i in range(M, 0, -1):
        u[i - 1] = ((u[i] ** 2 + 1) / (alpha_bar[i - 1] / alpha_bar[i]).clip(min=C_1) - 1).sqrt()
    u = u[(u >= sigma_min) & (u <= sigma_max)]
    if len(u) < num_steps:
        raise ValueError(f'Only {len(u)} iDDPM noise levels lie in [{sigma_min:g}, {sigma_max:g}]; need {num_steps}')
    index = ((len(u) - 1) / (num_steps - 1) * torch.arange(num_steps, dtype=torch.float64)).round().to(torch.int64)
    return torch.cat([u[index], torch.zeros(1, dtype=torch.float64)])


def _uniform_in(u_of_log_sigma: Callable, num_steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Points uniform in a strictly increasing coordinate u(ln sigma), found by bisection to float64 precision."""
    lo_u, hi_u = u_of_log_sigma(np.log([sigma_min, sigma_max]))
    targets = hi_u - np.arange(num_steps) / (num_steps - 1) * (hi_u - lo_u)
    lo = np.full(num_steps, math.log(sigma_min))
    hi = np.full(num_steps, math.log(sigma_max))
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        below = u_of_log_sigma(mid) < targets
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return _finish(torch.from_numpy(np.exp(0.5 * (lo + hi))), sigma_min, sigma_max)


def tangent_grid(
    num_steps: int, variances: Sequence[float] | torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0
) -> torch.Tensor:
    """InfoGrid of a Gaussian source with per-component variances lambda: uniform in u ∝ Σ sqrt(lambda) arctan(sigma/sqrt(lambda)).

    This is Eq. 19 in closed form (sigma r(sigma) = mmse/sigma^2 = Σ lambda/(lambda + sigma^2)). Zero variances
    contribute nothing and are dropped; one positive variance is needed.
    """
    _check(num_steps, sigma_min, sigma_max)
    lam = np.asarray(torch.as_tensor(variances, dtype=torch.float64).reshape(-1))
    if lam.size == 0 or not np.isfinite(lam).all() or (lam < 0).any() or not (lam > 0).any():
        raise ValueError('tangent_grid needs finite, non-negative variances, at least one of them positive')
    scale = np.sqrt(lam[lam > 0])
    return _uniform_in(
        lambda log_sigma: (scale * np.arctan(np.exp(np.asarray(log_sigma))[..., None] / scale)).sum(-1),
        num_steps,
        sigma_min,
        sigma_max,
    )


def information_coordinate(
    sigma: Sequence[float] | torch.Tensor, rate: Sequence[float] | torch.Tensor
) -> Callable[[np.ndarray], np.ndarray]:
    """The unnormalised u(ln sigma) = ∫ s r(s) ds of Eq. 19 from a tabulated profile (ascending sigma, rate >= 0).

    The integrand s r(s) ds = s^2 r(s) d(ln s) is interpolated linearly in log-log coordinates between the points
    (so power laws are exact), held constant beyond them, and integrated exactly in ln s. Points with a
    non-finite rate are skipped; rates are floored at 1e-12 of the largest so that u is strictly increasing.
    """
    sigma = np.asarray(torch.as_tensor(sigma, dtype=torch.float64).reshape(-1))
    rate = np.asarray(torch.as_tensor(rate, dtype=torch.float64).reshape(-1))
    if sigma.shape != rate.shape:
        raise ValueError(f'Profile sigma and rate differ in length: {sigma.size} vs {rate.size}')
    keep = np.isfinite(rate) & np.isfinite(sigma) & (sigma > 0)
    sigma, rate = sigma[keep], rate[keep]
    if sigma.size < 2 or (np.diff(sigma) <= 0).any():
        raise ValueError('A profile needs at least 2 finite points at strictly increasing sigma > 0')
    if (rate < 0).any() or not (rate > 0).any():
        raise ValueError('A profile rate must be non-negative and positive somewhere')
    log_sigma = np.log(sigma)
    log_f = np.log(np.maximum(sigma**2 * rate, 1e-12 * (sigma**2 * rate).max()))

    # Exact integral of exp(a + b x) over each piece, with b -> 0 handled by expm1.
    def piece(x0, x1, f0_log, slope):
        width = x1 - x0
        small = np.abs(slope * width) < 1e-8
        safe_slope = np.where(small, 1.0, slope)
        return np.exp(f0_log) * np.where(small, width, np.expm1(safe_slope * width) / safe_slope)

    slopes = np.diff(log_f) / np.diff(log_sigma)
    nodes = np.concatenate([[0.0], np.cumsum(piece(log_sigma[:-1], log_sigma[1:], log_f[:-1], slopes))])

    def u(x):
        x = np.asarray(x, dtype=np.float64)
        k = np.clip(np.searchsorted(log_sigma, x, side='right') - 1, 0, len(log_sigma) - 2)
        inside = nodes[k] + piece(log_sigma[k], np.clip(x, log_sigma[0], log_sigma[-1]), log_f[k], slopes[k])
        below = np.exp(log_f[0]) * np.minimum(x - log_sigma[0], 0)
        above = np.exp(log_f[-1]) * np.maximum(x - log_sigma[-1], 0)
        return inside + below + above

    return u


GRID_ENDS = ('sigma_min', 'zero')


def infogrid(
    num_steps: int,
    sigma: Sequence[float] | torch.Tensor | Profile,
    rate: Sequence[float] | torch.Tensor | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    end: str = 'sigma_min',
) -> torch.Tensor:
    """InfoGrid (InfoNoise paper, Eq. 19): uniform in u(sigma) = ∫_{sigma_min}^{sigma} s r(s) ds / Z.

    `sigma` is a `Profile` (e.g. InfoNoise's `profile()`, or `Profile.load(path)`), or σ points with `rate`, the
    entropy-rate profile r = mmse/σ³ there. The range defaults to the one the profile was trained on
    (`Profile.sigma_range()`; for bare points, the first and last σ); give `sigma_min`, `sigma_max` for another
    (EDM's sampler uses 0.002 and 80).

    `end` says how the grid reaches 0 (N = `num_steps`, N + 1 values returned):
    - 'sigma_min' (EDM's convention, for Heun): sigma_max = σ_0 > ... > σ_{N−1} = sigma_min, then 0. Heun spends
      2N − 1 evaluations; Euler spends N, the last of them at sigma_min only to remove noise of that size.
    - 'zero' (for Euler): σ_0 = sigma_max and N − 1 more levels uniform in u down to u = 1/N, then 0: every one of
      Euler's N evaluations sits at a level the profile gave a share of information, and the last step lands on 0.
    """
    if isinstance(sigma, Profile):
        if rate is not None:
            raise ValueError('Give a Profile, or σ points and their rate, not both')
        default_min, default_max = sigma.sigma_range()
        sigma, rate = sigma.sigma, sigma.rate
    else:
        if rate is None:
            raise ValueError('infogrid needs a Profile, or σ points and their rate')
        points = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        default_min, default_max = float(points[0]), float(points[-1])
    sigma_min = default_min if sigma_min is None else sigma_min
    sigma_max = default_max if sigma_max is None else sigma_max
    _check(num_steps, sigma_min, sigma_max)
    if end not in GRID_ENDS:
        raise ValueError(f'end must be one of {", ".join(GRID_ENDS)}, got {end!r}')
    u = information_coordinate(sigma, rate)
    if end == 'sigma_min':
        return _uniform_in(u, num_steps, sigma_min, sigma_max)
    # N + 1 points uniform in u from sigma_max to sigma_min; the last (sigma_min) is replaced by 0.
    grid = _uniform_in(u, num_steps + 1, sigma_min, sigma_max)
    return torch.cat([grid[:-2], torch.zeros(1, dtype=torch.float64)])


GRID_NAMES = ('edm', 'infogrid', 'loguniform', 'tangent', 'vp', 've', 'iddpm')


def build_grid(
    name: str,
    num_steps: int,
    sigma_min: float,
    sigma_max: float,
    *,
    rho: float = 7.0,
    profile: Profile | None = None,
    variances: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """The σ-grid `name` (one of GRID_NAMES) with `num_steps` steps on [sigma_min, sigma_max]: 'edm' uses `rho`,
    'infogrid' the profile's σ and rate, 'tangent' the Gaussian source's `variances`; 've' is 'loguniform'.
    ValueError for an unknown name or a missing input."""
    if name == 'edm':
        return edm_grid(num_steps, sigma_min, sigma_max, rho)
    if name in ('loguniform', 've'):
        return loguniform_grid(num_steps, sigma_min, sigma_max)
    if name == 'vp':
        return vp_grid(num_steps, sigma_min, sigma_max)
    if name == 'iddpm':
        return iddpm_grid(num_steps, sigma_min, sigma_max)
    if name == 'tangent':
        if variances is None:
            raise ValueError('the tangent grid needs the variances of the Gaussian source')
        return tangent_grid(num_steps, variances, sigma_min, sigma_max)
    if name == 'infogrid':
        if profile is None:
            raise ValueError('InfoGrid needs an information profile')
        return infogrid(num_steps, profile.sigma, profile.rate, sigma_min, sigma_max)
    raise ValueError(f'Unknown σ-grid "{name}"; choose from {", ".join(GRID_NAMES)}')


SOLVERS = ('heun', 'euler')


def nfe(num_steps: int, solver: str) -> int:
    """Network evaluations of an N-step solve: Heun 2N − 1 (no correction on the last step to σ = 0, EDM
    Algorithm 2), Euler N."""
    if solver not in SOLVERS:
        raise ValueError(f'Unknown solver "{solver}"; expected "heun" or "euler"')
    return 2 * num_steps - 1 if solver == 'heun' else num_steps


def num_steps_for(nfe: int, solver: str) -> int:
    """The steps N that spend exactly `nfe` network evaluations (the inverse of `nfe`); ValueError if none do
    (an even budget for Heun) or if N < 2 (a σ-grid needs at least 2 steps)."""
    if solver not in SOLVERS:
        raise ValueError(f'Unknown solver "{solver}"; expected "heun" or "euler"')
    if solver == 'heun' and nfe % 2 == 0:
        raise ValueError(f'Heun spends 2N - 1 evaluations on N steps, so NFE must be odd, got {nfe}')
    num_steps = (nfe + 1) // 2 if solver == 'heun' else nfe
    if num_steps < 2:
        raise ValueError(f'NFE {nfe} gives {num_steps} {solver} step; a σ-grid needs at least 2')
    return num_steps
