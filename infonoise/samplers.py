"""Training noise samplers: where σ comes from (InfoNoise paper, Sec. 2.1: the schedule π(σ) of Eq. 5).

Every sampler implements one protocol (DESIGN.md): `sample(n, device)` draws σ by the inverse CDF of uniforms,
`observe(sigma, mse)` receives the per-sample σ and unweighted denoising error after each forward pass (a no-op
for the fixed samplers here), and `state_dict()` / `load_state_dict()` carry what an exact resume needs. The loss
never draws σ and the training loop never names a concrete sampler class.

The fixed samplers reproduce EDM's training distributions (Karras et al. 2022, Table 1): log-normal for EDM,
log-uniform for VE, and the VP schedule's σ(t) with t uniform on [ε_t, 1].
"""

import abc
import math
from collections.abc import Callable
from typing import Any

import torch

from infonoise.grids import VP_BETA_D, VP_BETA_MIN, VP_EPSILON_T, vp_sigma, vp_t

# Smallest uniform draw: keeps Φ⁻¹(u) finite when torch.rand returns exactly 0.
_U_MIN = 2.0**-40

# Strata used to describe a distribution by quantiles.
_NUM_STRATA = 4096


def ln_sigma_strata(icdf: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """ln icdf(u) at the midpoints u of equal-probability strata, and the strata probabilities (CPU, float64)."""
    u = (torch.arange(_NUM_STRATA, dtype=torch.float64) + 0.5) / _NUM_STRATA
    return icdf(u).log(), torch.full((_NUM_STRATA,), 1 / _NUM_STRATA, dtype=torch.float64)


class NoiseSampler(abc.ABC):
    """Base class: a density over σ given by its inverse CDF."""

    # Called with each event of an adaptive sampler (InfoNoise: every refresh check, printable); fixed samplers
    # have none.
    callback: Callable[[Any], None] | None = None

    @abc.abstractmethod
    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        """Map uniforms u ∈ [0, 1) (float64) to σ values (float64)."""

    def cdf(self, sigma: torch.Tensor) -> torch.Tensor:
        """P(σ' <= σ) under the current distribution (float64, shape and device of σ)."""
        raise NotImplementedError(f'{type(self).__name__} has no CDF')

    def sample(self, n: int, device: torch.device | str = 'cpu') -> torch.Tensor:
        """Draw n noise levels (float32) from torch's global RNG on `device`."""
        u = torch.rand(n, device=device, dtype=torch.float64).clamp_(min=_U_MIN)
        return self.icdf(u).to(torch.float32)

    def observe(self, sigma: torch.Tensor, mse: torch.Tensor) -> None:  # noqa: B027
        """Per-sample σ and unweighted MSE of the step just taken; fixed samplers ignore them."""

    def profile(self) -> dict[str, Any] | None:
        """The learned information profile (InfoNoise); fixed samplers have none."""
        return None

    def schedule_report(self, total_nimg: int, batch_size: int) -> list[str]:
        """Lines to print before a run of `total_nimg` images at `batch_size` per step ('Warning: ...' for
        settings that keep the sampler from working as intended); fixed samplers have nothing to say."""
        return []

    def summary(self) -> str:
        """A few words of state for the training loop's tick line ('' for fixed samplers)."""
        return ''

    def ln_sigma_points(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ln σ at the midpoints of equal-probability strata, and their probabilities (CPU, float64)."""
        return ln_sigma_strata(self.icdf)

    def describe(self) -> dict[str, float]:
        """Mean and 10/50/90% quantiles of ln σ under the current distribution, for the tick statistics."""
        x, w = self.ln_sigma_points()
        order = x.argsort()
        x, cdf = x[order], w[order].cumsum(0)
        stats = dict(ln_sigma_mean=float((x * w[order]).sum()))
        for q in (10, 50, 90):
            stats[f'ln_sigma_q{q}'] = float(x[torch.searchsorted(cdf, torch.tensor(q / 100, dtype=cdf.dtype))])
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Everything a bit-exact resume needs (plain tensors and numbers; empty for fixed samplers)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        if state:
            raise ValueError(f'{type(self).__name__} has no state, got keys {sorted(state)}')


class LogNormal(NoiseSampler):
    """EDM's training distribution: ln σ ~ N(P_mean, P_std²) (EDM Table 1)."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2):
        if P_std <= 0:
            raise ValueError(f'P_std must be positive, got {P_std}')
        self.P_mean = float(P_mean)
        self.P_std = float(P_std)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        # Φ⁻¹(u) = √2 · erfinv(2u − 1).
        z = math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
        return torch.exp(self.P_mean + self.P_std * z)

    def cdf(self, sigma: torch.Tensor) -> torch.Tensor:
        z = (sigma.to(torch.float64).log() - self.P_mean) / self.P_std
        return 0.5 * torch.erfc(-z / math.sqrt(2.0))


class LogUniform(NoiseSampler):
    """ln σ uniform on [ln σ_min, ln σ_max]; with (0.02, 100) it is EDM's VE training distribution."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f'Need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}')
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u

    def cdf(self, sigma: torch.Tensor) -> torch.Tensor:
        x = sigma.to(torch.float64).log()
        return ((x - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)).clamp(0, 1)


class VPSampler(NoiseSampler):
    """EDM's VP training distribution: t ~ U[ε_t, 1], σ(t) = √(exp(½β_d t² + β_min t) − 1)."""

    def __init__(self, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN, epsilon_t: float = VP_EPSILON_T):
        if not 0 < epsilon_t < 1:
            raise ValueError(f'epsilon_t must be in (0, 1), got {epsilon_t}')
        self.beta_d = float(beta_d)
        self.beta_min = float(beta_min)
        self.epsilon_t = float(epsilon_t)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        return vp_sigma(1 + u * (self.epsilon_t - 1), self.beta_d, self.beta_min)

    def cdf(self, sigma: torch.Tensor) -> torch.Tensor:
        # σ increases with t, and t = 1 + u(ε_t − 1) is uniform on [ε_t, 1].
        t = vp_t(sigma.to(torch.float64), self.beta_d, self.beta_min)
        return ((t - self.epsilon_t) / (1 - self.epsilon_t)).clamp(0, 1)
