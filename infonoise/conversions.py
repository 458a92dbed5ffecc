"""Exact conversions between EDM's VE noise level σ and the parameterisations other trainers use.

InfoNoise works in VE terms: x = x₀ + σε, and `observe` takes the per-sample, unweighted x₀-space error
mean((x̂₀ − x₀)²). Every trainer below is the same Gaussian channel after a rescaling of x, so each has an exact σ,
an exact x₀-space error and an exact x₀-space loss weight w(σ) (the weight InfoNoise divides out, π ∝ ρ/w):

VP / DDPM, x_t = √ᾱ·x₀ + √(1−ᾱ)·ε. Dividing by √ᾱ gives x₀ + σε with
    σ = √((1−ᾱ)/ᾱ),  ᾱ = 1/(1 + σ²).
    ε-prediction: x̂₀ − x₀ = −σ(ε̂ − ε), so x₀-MSE = σ²·ε-MSE and a plain ε-MSE loss has w(σ) = 1/σ².
    v-prediction (v = √ᾱ·ε − √(1−ᾱ)·x₀): x̂₀ − x₀ = −√(1−ᾱ)(v̂ − v), so x₀-MSE = σ²/(1+σ²)·v-MSE and a plain
    v-MSE loss has w(σ) = (1 + σ²)/σ².
    Linear-β VP SDE (EDM's VP; continuous t): σ(t) = √(exp(½β_d t² + β_min t) − 1) is `infonoise.grids.vp_sigma`,
    its inverse `infonoise.grids.vp_t`.
    Discrete timesteps (a diffusers `alphas_cumprod` table): `DiscreteTimesteps`.

Rectified flow / flow matching, x_t = (1−t)·x₀ + t·ε. Dividing by 1−t gives x₀ + σε with
    σ = t/(1−t),  t = σ/(1+σ).
    Velocity v = ε − x₀: x̂₀ = x_t − t·v̂, so x̂₀ − x₀ = −t(v̂ − v), x₀-MSE = t²·v-MSE and a plain velocity loss
    has w(σ) = 1/t² = ((1+σ)/σ)².  `FlowMatching` wraps a noise sampler in these terms.

A draw σ ~ π maps to t through a monotone function, so t has density π(σ(t))·|dσ/dt| and P(t ∈ [a, b]) =
F(σ(b)) − F(σ(a)) exactly; the tests check this by Monte Carlo for every adapter.
"""

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from infonoise.info_noise import InfoNoise
from infonoise.kingma_gao import KingmaGao
from infonoise.profile import LogGrid
from infonoise.samplers import LogNormal, NoiseSampler, PiecewiseLogUniform, check_observation

# Names of the prediction targets, as diffusers' schedulers call them.
PREDICTIONS = ('epsilon', 'v_prediction', 'sample')


def _check_sampler(sampler: NoiseSampler, members: tuple[str, ...]) -> None:
    """TypeError unless `sampler` has the protocol members an adapter calls (`NoiseSampler`'s docstring)."""
    missing = [name for name in members if not callable(getattr(sampler, name, None))]
    if missing:
        raise TypeError(f'{type(sampler).__name__} is not a noise sampler: it has no {", ".join(missing)}')


# VP / DDPM.
def sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """σ = √((1 − ᾱ)/ᾱ) for ᾱ ∈ (0, 1] (any shape)."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def alpha_bar_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """ᾱ = 1/(1 + σ²) (any shape)."""
    return 1 / (1 + torch.as_tensor(sigma) ** 2)


def x0_mse(mse: torch.Tensor, sigma: torch.Tensor, prediction: str) -> torch.Tensor:
    """The x₀-space MSE from a VP network's per-sample MSE in its own target: 'epsilon' (× σ²), 'v_prediction'
    (× σ²/(1+σ²)) or 'sample' (unchanged). mse and σ are [N]."""
    if prediction == 'epsilon':
        return sigma**2 * mse
    if prediction == 'v_prediction':
        return sigma**2 / (1 + sigma**2) * mse
    if prediction == 'sample':
        return mse
    raise ValueError(f'Unknown prediction "{prediction}"; choose from {", ".join(PREDICTIONS)}')


def epsilon_loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """x₀-space weight of a plain ε-MSE loss: w(σ) = 1/σ²."""
    return 1 / sigma**2


def v_prediction_loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """x₀-space weight of a plain MSE on diffusers' v-prediction target √ᾱ·ε − √(1−ᾱ)·x₀: w(σ) = (1 + σ²)/σ².
    (Not the flow-matching velocity ε − x₀: that is `flow_velocity_loss_weight`.)"""
    return (1 + sigma**2) / sigma**2


def prediction_loss_weight(prediction: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The x₀-space weight w(σ) of a plain, unweighted MSE on `prediction` (a callable for InfoNoise's weight=)."""
    weights = {'epsilon': epsilon_loss_weight, 'v_prediction': v_prediction_loss_weight, 'sample': torch.ones_like}
    if prediction not in weights:
        raise ValueError(f'Unknown prediction "{prediction}"; choose from {", ".join(PREDICTIONS)}')
    return weights[prediction]


def _checked_at_once(device: torch.device) -> bool:
    """Whether `observe` checks values at once: on the CPU reading them costs no synchronisation; elsewhere a bad
    value becomes σ = NaN, which InfoNoise refuses at its next check."""
    return device.type == 'cpu'


def _check_weight(sampler: NoiseSampler, expected: Callable, what: str) -> None:
    """ValueError unless an InfoNoise `sampler` divides out the weight `expected` (compared on its own grid)."""
    if not isinstance(sampler, InfoNoise):
        return
    sigma = sampler.grid.centers
    got, want = sampler.loss_weight(sigma).to(torch.float64), expected(sigma).to(torch.float64)
    if not torch.allclose(got, want, rtol=1e-6, atol=0):
        k = int(((got - want).abs() / want.abs()).argmax())
        raise ValueError(
            f'InfoNoise divides out w(σ) = {float(got[k]):.4g} at σ = {float(sigma[k]):.3g}, but {what} has '
            f'x₀-space weight {float(want[k]):.4g} there; build it with weight= that function (or let the adapter '
            'build it), or pass loss_weight= the x₀-space weight of the loss you train with'
        )


def _warn_range(sampler: NoiseSampler, low: float, high: float, what: str) -> None:
    """A loud warning if an InfoNoise `sampler`'s σ range does not cover [low, high]: σ outside it is never drawn
    after the first refresh."""
    if isinstance(sampler, InfoNoise):
        lo, hi = float(sampler.grid.edges[0]), float(sampler.grid.edges[-1])
        if lo > low * (1 + 1e-9) or hi < high * (1 - 1e-9):
            warnings.warn(
                f'InfoNoise covers σ {lo:.4g}-{hi:.4g} but {what} spans σ {low:.4g}-{high:.4g}: the rest is never '
                'drawn after its first refresh; let the adapter build InfoNoise, or build it on that range',
                UserWarning,
                stacklevel=3,
            )


def _build(builds: type[NoiseSampler], kwargs: dict, extra: dict) -> NoiseSampler:
    """The adaptive noise sampler an adapter builds: InfoNoise, or KingmaGao with the same weight, range and base
    (the reference law q); `extra` are the user's keyword arguments, which override."""
    if builds not in (InfoNoise, KingmaGao):
        raise ValueError(f'builds must be InfoNoise or KingmaGao, got {builds!r}')
    return builds(**dict(kwargs, **extra))


# Rectified flow / flow matching.
def flow_sigma_from_t(t: torch.Tensor) -> torch.Tensor:
    """σ = t/(1 − t) for x_t = (1 − t)·x₀ + t·ε, t ∈ [0, 1)."""
    return t / (1 - t)


def flow_t_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """t = σ/(1 + σ)."""
    return sigma / (1 + sigma)


def flow_velocity_loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """x₀-space weight of a plain flow-matching velocity loss ‖v̂ − (ε − x₀)‖²: w(σ) = 1/t² = ((1 + σ)/σ)².
    (Not diffusers' v-prediction: that is `v_prediction_loss_weight`.)"""
    return ((1 + sigma) / sigma) ** 2


# Older names, kept so that code written against 0.1 runs: the same functions.
v_loss_weight = v_prediction_loss_weight
velocity_loss_weight = flow_velocity_loss_weight


class FlowMatching:
    """InfoNoise (or any noise sampler) in rectified-flow terms, x_t = (1 − t)·x₀ + t·ε.

        fm = FlowMatching()                              # builds InfoNoise, see below; fm.sampler is it
        t = fm.sample_t(batch, device)                   # [N] float32 in (0, 1)
        x_t = (1 - t) * x0 + t * eps; loss = ((net(x_t, t) - (eps - x0)) ** 2).mean(dims)
        fm.observe(t, velocity_mse)                      # [N] per-sample, unweighted

    With no `sampler`, it builds InfoNoise for this objective: weight = the plain velocity loss's x₀-space weight
    (`flow_velocity_loss_weight`, or `loss_weight` if your loss is weighted), σ over [σ(t_min), σ(t_max)]
    (t ∈ [0.001, 0.999]: Euler starts at t = 1), warm-up under logit-normal(0, 1) in t (SD3's default, = log-normal
    (0, 1) in σ); other keyword arguments go to InfoNoise. `builds=KingmaGao` builds Kingma & Gao's adaptive
    schedule the same way instead (reference law q = that logit-normal), whose `importance_t` the loss is multiplied
    by. A `sampler` given is checked instead: an InfoNoise whose weight is not the loss's is refused, one whose σ
    range misses [t_min, t_max] warned about.
    """

    def __init__(
        self,
        sampler: NoiseSampler | None = None,
        *,
        t_min: float = 1e-3,
        t_max: float = 1 - 1e-3,
        loss_weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
        builds: type[NoiseSampler] = InfoNoise,
        **infonoise_kwargs: Any,
    ):
        if not 0 < t_min < t_max < 1:
            raise ValueError(f'Need 0 < t_min < t_max < 1, got t_min={t_min!r}, t_max={t_max!r}')
        weight = loss_weight or flow_velocity_loss_weight
        low, high = t_min / (1 - t_min), t_max / (1 - t_max)
        if sampler is None:
            kwargs = dict(weight=weight, sigma_min=low, sigma_max=high, base=LogNormal(0.0, 1.0))
            sampler = _build(builds, kwargs, infonoise_kwargs)
        elif infonoise_kwargs:
            raise TypeError(
                f'InfoNoise arguments ({", ".join(infonoise_kwargs)}) apply only when FlowMatching builds it'
            )
        _check_sampler(sampler, ('sample', 'observe', 'cdf'))
        _check_weight(sampler, weight, 'the flow velocity loss')
        _warn_range(sampler, low, high, f't ∈ [{t_min:g}, {t_max:g}]')
        self.sampler = sampler

    def sample_t(self, n: int, device: torch.device | str = 'cpu') -> torch.Tensor:
        """n times t = σ/(1 + σ) (float32, on `device`) of σ drawn from the noise sampler."""
        sigma = self.sampler.sample(n, device).to(torch.float64)
        return flow_t_from_sigma(sigma).to(torch.float32)

    def observe(self, t: torch.Tensor, velocity_mse: torch.Tensor) -> None:
        """Hand the noise sampler σ = t/(1 − t) and the x₀-space MSE t²·velocity_mse (both [N], per sample,
        unweighted). t must lie in (0, 1): on the CPU a ValueError says so at once; on an accelerator (no host
        synchronisation per step) such a t becomes σ = NaN, which InfoNoise refuses at its next check."""
        check_observation(t, velocity_mse, ('t', 'velocity_mse'))
        t = t.detach().to(torch.float64)
        inside = (t > 0) & (t < 1)
        if _checked_at_once(t.device) and not bool(inside.all()):
            bad = t[~inside]
            raise ValueError(f'observe: t must lie in (0, 1), got {bad.numel()} outside, e.g. {float(bad[0]):g}')
        sigma = torch.where(inside, flow_sigma_from_t(torch.where(inside, t, 0.5)), math.nan)
        self.sampler.observe(sigma, t**2 * velocity_mse.detach().to(torch.float64))

    def importance_t(self, t: torch.Tensor) -> torch.Tensor | None:
        """The noise sampler's importance weights (`NoiseSampler.importance`) at σ = t/(1 − t): the factors of the
        per-sample loss that keep the reference law's objective; None = all ones. t as `sample_t` drew it."""
        return self.sampler.importance(flow_sigma_from_t(torch.as_tensor(t).detach().to(torch.float64)))

    def cdf_t(self, t: torch.Tensor) -> torch.Tensor:
        """P(t' <= t) under the noise sampler's current law."""
        return self.sampler.cdf(flow_sigma_from_t(torch.as_tensor(t, dtype=torch.float64)))


class DiscreteTimesteps:
    """A noise sampler over a DDPM-style table of timesteps (diffusers' `scheduler.alphas_cumprod`, [T]).

    Timestep i has σ_i = √((1 − ᾱ_i)/ᾱ_i), increasing in i, and stands for the σ-interval between the geometric
    midpoints of its neighbours (the first reaches down to 0, the last up to ∞). It is drawn with the probability
    the noise sampler gives that interval, F(e_{i+1}) − F(e_i), the exact discrete counterpart of the continuous law
    (not the nearest timestep of a continuous draw in another variable).

        steps = DiscreteTimesteps(scheduler.alphas_cumprod, prediction='epsilon')   # builds InfoNoise, see below
        t = steps.sample(batch, device)                  # [N] int64 timesteps
        x_t = scheduler.add_noise(x0, eps, t); loss = ((net(x_t, t) - eps) ** 2).mean(dims)
        steps.observe(t, eps_mse)                        # [N] per-sample, unweighted, in the prediction's target

    With no `sampler`, it builds InfoNoise for this table: weight = the plain `prediction` loss's x₀-space weight
    (or `loss_weight` if your loss is weighted), σ over [σ_0, σ_{T−1}], the most intervals (at most 64, or
    `num_bins`) that each hold a timestep, warm-up under uniform timesteps (the DDPM default); other keyword arguments
    go to InfoNoise (`builds=KingmaGao`: Kingma & Gao's schedule, reference law the uniform timesteps, and
    `importance(t)` the exact ratio of the timestep's reference probability to its current one).
    A `sampler` given is checked instead: an InfoNoise with another weight or an interval that no
    timestep falls in is refused (it would divide out the wrong weight, or never refresh), one that does not cover
    every timestep warned about. For ε-prediction pass `data_variance=` (the data's mean per-pixel variance): σ²
    times a small ε-error otherwise inflates the rate at the largest σ (docs/results.md: 1.66× uniform timesteps'
    FD without it, 1.016× with it).
    """

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        sampler: NoiseSampler | str | None = None,
        prediction: str = 'epsilon',
        *,
        loss_weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
        builds: type[NoiseSampler] = InfoNoise,
        **infonoise_kwargs: Any,
    ):
        if isinstance(sampler, str):  # DiscreteTimesteps(alphas_cumprod, 'v_prediction').
            sampler, prediction = None, sampler
        alpha_bar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        if alpha_bar.ndim != 1 or alpha_bar.numel() < 2:
            raise ValueError(f'alphas_cumprod must be 1-D with at least 2 entries, got {tuple(alpha_bar.shape)}')
        if not bool(((alpha_bar > 0) & (alpha_bar < 1)).all()) or not bool((alpha_bar[1:] < alpha_bar[:-1]).all()):
            raise ValueError('alphas_cumprod must decrease strictly and lie in (0, 1)')
        if prediction not in PREDICTIONS:
            raise ValueError(f'Unknown prediction "{prediction}"; choose from {", ".join(PREDICTIONS)}')
        self.prediction = prediction
        self.sigmas = sigma_from_alpha_bar(alpha_bar)  # [T] increasing
        self._cache: dict = {}  # Per device: σ_i, and the cumulative probabilities with the law they were made for.
        mid = (self.sigmas[1:] * self.sigmas[:-1]).sqrt()
        self.edges = torch.cat([torch.zeros(1, dtype=torch.float64), mid, torch.full((1,), math.inf)])  # [T + 1]
        weight = loss_weight or prediction_loss_weight(prediction)
        low, high = self.sigma_range()
        if sampler is None:
            num_bins = infonoise_kwargs.pop('num_bins', None)
            if num_bins is None:
                num_bins = max(k for k in range(2, 65) if self.empty_interval(LogGrid.make(k, low, high).edges) is None)
            kwargs = dict(weight=weight, sigma_min=low, sigma_max=high, num_bins=num_bins, base=self.uniform_law())
            sampler = _build(builds, kwargs, infonoise_kwargs)
        elif infonoise_kwargs:
            raise TypeError(
                f'InfoNoise arguments ({", ".join(infonoise_kwargs)}) apply only when DiscreteTimesteps builds it'
            )
        _check_sampler(sampler, ('observe', 'cdf'))
        _check_weight(sampler, weight, f'the plain {prediction} loss')
        if isinstance(sampler, InfoNoise):
            self.check_bins(sampler.grid.edges)
            _warn_range(sampler, low, high, f'the {len(self.sigmas)} timesteps')
        self.sampler = sampler

    def uniform_law(self) -> PiecewiseLogUniform:
        """Uniform timesteps as a law of σ: CDF i/T at the interval edges, so that each timestep gets exactly 1/T."""
        T = len(self.sigmas)
        points = torch.cat([self.sigmas[:1], self.edges[1:-1], self.sigmas[-1:]])
        return PiecewiseLogUniform(points, torch.arange(T + 1, dtype=torch.float64) / T)

    def sigma_range(self) -> tuple[float, float]:
        """σ of the first and the last timestep: the range to build the noise sampler's bins on."""
        return float(self.sigmas[0]), float(self.sigmas[-1])

    def empty_interval(self, edges: torch.Tensor) -> int | None:
        """The first interval of the grid `edges` ([K + 1]) that holds no timestep σ_i, or None."""
        edges = torch.as_tensor(edges, dtype=torch.float64)
        inside = self.sigmas[(self.sigmas >= edges[0]) & (self.sigmas <= edges[-1])]
        counts = torch.bincount((torch.searchsorted(edges, inside, right=True) - 1).clamp(0, edges.numel() - 2),
                                minlength=edges.numel() - 1)  # fmt: skip
        return int((counts == 0).nonzero()[0]) if bool((counts == 0).any()) else None

    def check_bins(self, edges: torch.Tensor) -> None:
        """Raise if an interval of the estimation grid `edges` ([K + 1], e.g. InfoNoise(...).grid.edges) holds
        no timestep σ_i: it would never collect losses and InfoNoise would never refresh."""
        edges = torch.as_tensor(edges, dtype=torch.float64)
        k = self.empty_interval(edges)
        if k is not None:
            raise ValueError(
                f'interval {k + 1} of {edges.numel() - 1} (σ {float(edges[k]):.3g}-{float(edges[k + 1]):.3g}) holds '
                'no timestep, so InfoNoise would never refresh; use fewer intervals (num_bins) or a higher sigma_min'
            )

    def probabilities(self) -> torch.Tensor:
        """[T] probability of each timestep under the noise sampler's current law (float64, CPU)."""
        cdf = self.sampler.cdf(self.edges[1:-1])
        cdf = torch.cat(
            [torch.zeros(1, dtype=torch.float64), cdf.cpu().to(torch.float64), torch.ones(1, dtype=torch.float64)]
        )
        return (cdf[1:] - cdf[:-1]).clamp(min=0)

    def _on(self, device: torch.device | str) -> dict:
        """σ_i on `device`, and the cumulative timestep probabilities there, recomputed only when the noise sampler's
        law changes (InfoNoise replaces its `table` at each refresh; other noise samplers are taken as fixed): no
        per-step host round trip."""
        cache = self._cache.setdefault(str(device), dict(sigmas=self.sigmas.to(device), law=(), cumulative=None))
        law = getattr(self.sampler, 'table', None)
        if cache['cumulative'] is None or cache['law'] is not law:
            probabilities = self.probabilities()
            ratio = self.reference_ratio(probabilities)
            cache.update(law=law, cumulative=probabilities.cumsum(0).to(device))
            cache.update(ratio=None if ratio is None else ratio.to(device))
        return cache

    def reference_ratio(self, probabilities: torch.Tensor) -> torch.Tensor | None:
        """[T] reference probability / current probability of each timestep (float32), for a noise sampler whose
        `importance` is not None, its reference law being its `base` (KingmaGao's q); None for the others. A timestep
        that is never drawn gets 1."""
        base = getattr(self.sampler, 'base', None)
        if base is None or self.sampler.importance(self.sigmas[:1]) is None:
            return None
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), base.cdf(self.edges[1:-1]).cpu().to(torch.float64),
                         torch.ones(1, dtype=torch.float64)])  # fmt: skip
        reference = (cdf[1:] - cdf[:-1]).clamp(min=0)
        drawn = probabilities > 0
        return torch.where(drawn, reference / torch.where(drawn, probabilities, 1.0), 1.0).to(torch.float32)

    def importance(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample factors [N] (float32) of the loss at `timesteps` (as `sample` drew them) that keep the reference
        law's objective: the exact ratio of the timestep's reference probability to its current one; None = all
        ones (noise samplers without importance weights)."""
        ratio = self._on(timesteps.device)['ratio']
        return None if ratio is None else ratio[timesteps.clamp(0, len(self.sigmas) - 1)]

    def sample(self, n: int, device: torch.device | str = 'cpu') -> torch.Tensor:
        """n timesteps (int64, on `device`) by inverse CDF of uniforms from torch's global RNG."""
        cumulative = self._on(device)['cumulative']
        u = torch.rand(n, device=device, dtype=torch.float64) * cumulative[-1]
        return torch.searchsorted(cumulative, u, right=True).clamp(max=self.sigmas.numel() - 1)

    def observe(self, timesteps: torch.Tensor, mse: torch.Tensor) -> None:
        """Hand the noise sampler σ_i and the x₀-space MSE of per-sample losses `mse` in the prediction's target.

        A timestep outside [0, T) (which indexing would wrap, e.g. −1 to T − 1) is refused: on the CPU at once, on an
        accelerator (no host synchronisation per step) as σ = NaN, which InfoNoise refuses at its next check."""
        if not isinstance(timesteps, torch.Tensor) or timesteps.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f'observe: timesteps must be an int32/int64 tensor, got {getattr(timesteps, "dtype", timesteps)}'
            )
        if timesteps.ndim != 1:
            raise ValueError(f'observe: timesteps must be 1-D (one per sample), got shape {tuple(timesteps.shape)}')
        sigmas = self._on(timesteps.device)['sigmas']
        inside = (timesteps >= 0) & (timesteps < len(sigmas))
        if _checked_at_once(timesteps.device) and not bool(inside.all()):
            bad = timesteps[~inside]
            raise ValueError(
                f'observe: timesteps must lie in [0, {len(sigmas)}), got {bad.numel()} outside, e.g. {int(bad[0])}'
            )
        sigma = torch.where(inside, sigmas[timesteps.clamp(0, len(sigmas) - 1)], math.nan)
        check_observation(sigma, mse, ('timesteps', 'mse'))
        self.sampler.observe(sigma, x0_mse(mse.detach().to(torch.float64), sigma, self.prediction))
