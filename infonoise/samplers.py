"""Training noise samplers: where σ comes from (InfoNoise paper, Sec. 2.1: the density π(σ) of Eq. 5, which the
paper calls the training noise schedule).

Every noise sampler implements one protocol, stated once in `NoiseSampler`'s docstring: what a training loop may call,
which members are required and which are optional with their defaults. The loss never draws σ and the training
loop never names a concrete noise sampler class.

The fixed noise samplers reproduce EDM's training distributions (Karras et al. 2022, Table 1): log-normal for EDM,
log-uniform for VE, and VP's noise level function σ(t) with t uniform on [ε_t, 1]. `Mixture` is a weighted sum of
noise samplers (InfoNoise's warm-up law), with an exact inverse CDF.

The published rivals live in `infonoise.rivals`, the adaptive one in `infonoise.kingma_gao`.
"""

import abc
import math
import numbers
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from infonoise.grids import VP_BETA_D, VP_BETA_MIN, VP_EPSILON_T, vp_sigma, vp_t

if TYPE_CHECKING:
    from infonoise.profile import Profile

# Smallest uniform draw: keeps Φ⁻¹(u) finite when torch.rand returns exactly 0.
_U_MIN = 2.0**-40

# Strata used to describe a distribution by quantiles.
_NUM_STRATA = 4096

# Halvings of the bisection that inverts a mixture's CDF: 2⁻⁵² of the bracket, which for the warm-up mixture is
# under 5 in ln σ (between the log-normal's and the log-uniform's quantiles), so about float64's spacing of ln σ.
_BISECTIONS = 52


def check_number(name: str, value: Any, rule: str, ok: Callable[[float], bool] = lambda v: True) -> float:
    """`value` as a float if it is a finite real number for which `ok` holds; else ValueError
    '<name> must be <rule>, got <value>' (NaN and ±inf are refused whatever `ok` says)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
        raise ValueError(f'{name} must be {rule}, got {value!r}')
    return float(value)


def check_int(name: str, value: Any, minimum: int) -> int:
    """`value` as an int if it is an integer >= `minimum`; else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')
    return int(value)


def check_durations(
    refresh_kimg: Any, warmup_kimg: Any, refresh_steps: Any, warmup_steps: Any, default_warmup_kimg: float
) -> tuple[bool, float, float]:
    """An adaptive sampler's refresh period and warm-up, given in thousands of images (refresh 50 kimg and
    `default_warmup_kimg` when left None) or in steps, both or neither: (in_steps, refresh_every, warmup) in images
    or in steps. ValueError for a mixture of the two or a value out of range."""
    if (refresh_steps is None) != (warmup_steps is None):
        raise ValueError('Give refresh_steps and warmup_steps together (durations in steps), or neither')
    if refresh_steps is not None:
        if refresh_kimg is not None or warmup_kimg is not None:
            raise ValueError('Give durations in images (refresh_kimg, warmup_kimg) or in steps, not both')
        return True, check_int('refresh_steps', refresh_steps, 1), check_int('warmup_steps', warmup_steps, 0)
    refresh = 50.0 if refresh_kimg is None else refresh_kimg
    warmup = default_warmup_kimg if warmup_kimg is None else warmup_kimg
    return (False, 1000 * check_number('refresh_kimg', refresh, 'a finite number > 0', lambda v: v > 0),
            1000 * check_number('warmup_kimg', warmup, 'a finite number >= 0', lambda v: v >= 0))  # fmt: skip


def check_sigma_range(sigma_min: Any, sigma_max: Any) -> tuple[float, float]:
    """(sigma_min, sigma_max) as floats if 0 < sigma_min < sigma_max < inf; else ValueError naming both."""
    numbers_ok = all(not isinstance(v, bool) and isinstance(v, numbers.Real) for v in (sigma_min, sigma_max))
    if not (numbers_ok and 0 < sigma_min < sigma_max < math.inf):
        raise ValueError(f'Need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}')
    return float(sigma_min), float(sigma_max)


def check_observation(sigma: Any, mse: Any, names: tuple[str, str] = ('sigma', 'mse')) -> None:
    """Refuse what `observe` cannot use: non-tensors, non-float dtypes, σ not 1-D, an mse of another shape or
    device than σ (the common mistake: `loss.mean()` instead of the per-sample losses). Host-side metadata only:
    no value is read, so no host synchronisation. `names` are the caller's names of the two (an adapter's t)."""
    for name, x in zip(names, (sigma, mse)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f'observe: {name} must be a tensor, got {type(x).__name__}')
        if not x.is_floating_point():
            raise ValueError(f'observe: {name} must be a floating-point tensor, got {x.dtype}')
    first, second = names
    if sigma.ndim != 1:
        raise ValueError(f'observe: {first} must be 1-D (one per sample), got shape {tuple(sigma.shape)}')
    if mse.shape != sigma.shape:
        raise ValueError(
            f'observe: {second} has shape {tuple(mse.shape)} but {first} {tuple(sigma.shape)}; pass the per-sample '
            f'MSE (mean over elements of each sample, one value per {first}), not e.g. loss.mean()'
        )
    if mse.device != sigma.device:
        raise ValueError(f'observe: {second} is on {mse.device} but {first} on {sigma.device}')


def ln_sigma_strata(icdf: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """ln icdf(u) at the midpoints u of equal-probability strata, and the strata probabilities (CPU, float64)."""
    u = (torch.arange(_NUM_STRATA, dtype=torch.float64) + 0.5) / _NUM_STRATA
    return icdf(u).log(), torch.full((_NUM_STRATA,), 1 / _NUM_STRATA, dtype=torch.float64)


class NoiseSampler(abc.ABC):
    """A density over σ given by its inverse CDF. Its docstring is THE noise-sampler protocol: a training loop
    (training/training_loop.py, examples/) builds a noise sampler from its config, never names its class, and calls
    only the members below. Subclasses implement `icdf`; every other member has a default here.

    Required (a fixed noise sampler keeps the defaults):
        icdf(u) -> Tensor                   σ (float64) for uniforms u ∈ [0, 1) (float64), monotone; abstract.
        sample(n, device) -> Tensor[n]      n σ (float32) on `device`: icdf(u) of u = torch.rand(n, float64)
                                            clamped to >= 2⁻⁴⁰, one draw from torch's global RNG, so that
                                            reseeding reproduces it and icdf describes exactly what is drawn.
        observe(sigma, mse) -> None         after every forward pass, on every rank, with equal batch sizes: σ [N]
                                            as drawn and the per-sample, unweighted x₀-space MSE [N] (mean over
                                            elements, Alg. 1 line 7). Default: `check_observation`, nothing else.
        state_dict() -> dict                everything a bit-exact resume needs, as plain tensors, numbers, lists
                                            and dicts (torch.load(weights_only=True)). Default: {}.
        load_state_dict(state) -> None      restore it; ValueError naming what is wrong. Default: refuses any key.
    Optional, with their defaults:
        callback: Callable | None = None    called with each event of an adaptive noise sampler (InfoNoise:
                                            every refresh check, a printable `RefreshCheck`); the training loop
                                            records them in stats.jsonl and prints them with --verbose.
        cdf(sigma) -> Tensor                P(σ' <= σ) (float64); default raises NotImplementedError.
        importance(sigma) -> Tensor | None  per-sample factors [N] (float32, σ's device) that the weighted loss
                                            must be multiplied by so that its expectation is the objective under
                                            the noise sampler's reference law (an importance-sampling proposal
                                            such as `KingmaGao`: q(σ)/p(σ)); None = all ones, and the loop leaves
                                            the loss untouched. Called after `sample`, before `observe`, with the σ
                                            drawn; no host synchronisation. Default: None.
        profile() -> Profile | None         the learned information profile (InfoNoise); None.
        schedule_report(total_nimg, batch_size) -> list[str]   lines to print before training; [].
        summary() -> str                    a few words of state for the tick line; ''.
        describe() -> dict[str, float]      tick statistics: mean and 10/50/90 % quantiles of ln σ.
        ln_sigma_points() -> (ln σ, weights)   equal-probability strata of ln σ, behind `describe`.

    `sample` and `observe` run every step and must not synchronise with the host (no .item(), no bool of a device
    tensor); the other members run once per tick, check or checkpoint.

    A noise sampler whose law changes during training (InfoNoise at a refresh, `Curriculum` at its switch) replaces
    its attribute `table` by a new object whenever its law changes, and never mutates it in place: adapters that
    cache something derived from the law (`DiscreteTimesteps`' timestep probabilities) key the cache on the identity of
    `getattr(sampler, 'table', None)`. A noise sampler without `table` is taken as fixed.
    """

    # Called with each event of an adaptive noise sampler; fixed noise samplers have none.
    callback: Callable[[Any], None] | None = None

    @abc.abstractmethod
    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        """Map uniforms u ∈ [0, 1) (float64) to σ values (float64)."""

    def cdf(self, sigma: torch.Tensor) -> torch.Tensor:
        """P(σ' <= σ) under the current distribution (float64, shape and device of σ)."""
        raise NotImplementedError(f'{type(self).__name__} has no CDF')

    def sample(self, n: int, device: torch.device | str = 'cpu') -> torch.Tensor:
        """Draw n noise levels (float32) from torch's global RNG on `device`: icdf of one uniform each."""
        u = torch.rand(n, device=device, dtype=torch.float64).clamp_(min=_U_MIN)
        return self.icdf(u).to(torch.float32)

    def observe(self, sigma: torch.Tensor, mse: torch.Tensor) -> None:
        """Per-sample σ and unweighted MSE of the step just taken; fixed noise samplers only check their shapes."""
        check_observation(sigma, mse)

    def importance(self, sigma: torch.Tensor) -> torch.Tensor | None:
        """Factors of the weighted loss that restore the reference law's objective; None: the law is its own."""
        return None

    def profile(self) -> 'Profile | None':
        """The learned information profile (InfoNoise); fixed noise samplers have none."""
        return None

    def schedule_report(self, total_nimg: int, batch_size: int) -> list[str]:
        """Lines to print before a run of `total_nimg` images at `batch_size` per step ('Warning: ...' for
        settings that keep the noise sampler from working as intended); fixed noise samplers have nothing to say."""
        return []

    def summary(self) -> str:
        """A few words of state for the training loop's tick line ('' for fixed noise samplers)."""
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
        """Everything a bit-exact resume needs (plain tensors and numbers; empty for fixed noise samplers)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        if not isinstance(state, dict) or state:
            what = f'keys {sorted(state)}' if isinstance(state, dict) else type(state).__name__
            raise ValueError(f'{type(self).__name__} has no state, got {what}')


class LogNormal(NoiseSampler):
    """EDM's training distribution: ln σ ~ N(P_mean, P_std²) (EDM Table 1)."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2):
        self.P_mean = check_number('P_mean', P_mean, 'a finite number')
        self.P_std = check_number('P_std', P_std, 'a finite number > 0', lambda v: v > 0)

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
        self.sigma_min, self.sigma_max = check_sigma_range(sigma_min, sigma_max)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u

    def cdf(self, sigma: torch.Tensor) -> torch.Tensor:
        x = sigma.to(torch.float64).log()
        return ((x - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)).clamp(0, 1)


class VPSampler(NoiseSampler):
    """EDM's VP training distribution: t ~ U[ε_t, 1], σ(t) = √(exp(½β_d t² + β_min t) − 1)."""

    def __init__(self, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN, epsilon_t: float = VP_EPSILON_T):
        # β_d > 0 and β_min >= 0 keep σ(t) increasing and t(σ) defined (vp_t divides by β_d).
        self.beta_d = check_number('beta_d', beta_d, 'a finite number > 0', lambda v: v > 0)
        self.beta_min = check_number('beta_min', beta_min, 'a finite number >= 0', lambda v: v >= 0)
        self.epsilon_t = check_number('epsilon_t', epsilon_t, 'a number in (0, 1)', lambda v: 0 < v < 1)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        return vp_sigma(1 + u * (self.epsilon_t - 1), self.beta_d, self.beta_min)

    def cdf(self, sigma: torch.Tensor) -> torch.Tensor:
        # σ increases with t, and t = 1 + u(ε_t − 1) is uniform on [ε_t, 1].
        t = vp_t(sigma.to(torch.float64), self.beta_d, self.beta_min)
        return ((t - self.epsilon_t) / (1 - self.epsilon_t)).clamp(0, 1)


class Mixture(NoiseSampler):
    """Σ_i w_i·(law of noise sampler i), e.g. InfoNoise's warm-up law (1 − ε)·base + ε·log-uniform.

    `icdf` is the exact inverse of the mixture's CDF F = Σ w_i F_i, so `sample` draws from the mixture with one
    uniform per σ and a grid of `icdf` values describes what is drawn. F is a weighted mean of the F_i, so the root
    of F(σ) = u lies between the smallest and the largest component quantile F_i⁻¹(u); a fixed number of
    bisection steps in ln σ finds it to float64 precision, vectorised on u's device without host synchronisation,
    and monotone in u. Components of weight 0 are dropped; a single remaining one is used as is, so only a true
    mixture needs every component's `cdf`.
    """

    def __init__(self, weights: Sequence[float], samplers: Sequence[NoiseSampler]):
        if len(weights) != len(samplers) or not samplers:
            raise ValueError(f'Mixture needs as many weights as samplers, got {len(weights)} and {len(samplers)}')
        w = [check_number('A mixture weight', v, 'a finite number >= 0', lambda v: v >= 0) for v in weights]
        if not math.isclose(sum(w), 1, abs_tol=1e-9):
            raise ValueError(f'Mixture weights must sum to 1, got {sum(w)}')
        self.components = [(v, s) for v, s in zip(w, samplers) if v > 0]
        for _, s in self.components:
            if len(self.components) > 1 and type(s).cdf is NoiseSampler.cdf:
                raise ValueError(f'{type(s).__name__} has no cdf, which a mixture needs to invert its CDF')

    def cdf(self, sigma: torch.Tensor) -> torch.Tensor:
        return sum(w * s.cdf(sigma) for w, s in self.components)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        if len(self.components) == 1:
            return self.components[0][1].icdf(u)
        quantiles = torch.stack([s.icdf(u).to(torch.float64) for _, s in self.components]).log()
        lo, hi = quantiles.min(0).values, quantiles.max(0).values
        for _ in range(_BISECTIONS):
            mid = 0.5 * (lo + hi)
            below = self.cdf(mid.exp()) < u
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (0.5 * (lo + hi)).exp()


class PiecewiseLogUniform(NoiseSampler):
    """A law given by its CDF at increasing points σ_j, linear in ln σ between them (uniform in ln σ on each piece).

    `DiscreteTimesteps` uses it for uniform timesteps: through the timesteps' interval edges with CDF i/T, so each
    timestep gets exactly 1/T.
    """

    def __init__(self, sigma: torch.Tensor, cdf: torch.Tensor):
        self.log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
        self.cdf_points = torch.as_tensor(cdf, dtype=torch.float64)
        x, c = self.log_sigma, self.cdf_points
        if x.ndim != 1 or x.shape != c.shape or x.numel() < 2 or not bool((x[1:] > x[:-1]).all()):
            raise ValueError('PiecewiseLogUniform needs >= 2 strictly increasing σ > 0 and one CDF value each')
        if not bool((c[1:] >= c[:-1]).all()) or float(c[0]) != 0 or abs(float(c[-1]) - 1) > 1e-12:
            raise ValueError('PiecewiseLogUniform: the CDF values must rise from 0 to 1')

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        x, c = self.log_sigma.to(u.device), self.cdf_points.to(u.device)
        u = u.to(torch.float64).clamp(0, 1)
        j = (torch.searchsorted(c, u, right=True) - 1).clamp(0, c.numel() - 2)
        width = c[j + 1] - c[j]
        t = ((u - c[j]) / torch.where(width > 0, width, 1.0)).clamp(0, 1)
        return torch.lerp(x[j], x[j + 1], t).exp()

    def cdf(self, sigma: torch.Tensor) -> torch.Tensor:
        x, c = self.log_sigma.to(sigma.device), self.cdf_points.to(sigma.device)
        v = sigma.to(torch.float64).log()
        j = (torch.searchsorted(x, v, right=True) - 1).clamp(0, x.numel() - 2)
        return torch.lerp(c[j], c[j + 1], ((v - x[j]) / (x[j + 1] - x[j])).clamp(0, 1))
