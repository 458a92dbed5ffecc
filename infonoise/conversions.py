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
from collections.abc import Callable

import torch

from infonoise.samplers import NoiseSampler, check_observation

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


def v_loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """x₀-space weight of a plain v-MSE loss: w(σ) = (1 + σ²)/σ²."""
    return (1 + sigma**2) / sigma**2


def prediction_loss_weight(prediction: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The x₀-space weight w(σ) of a plain, unweighted MSE on `prediction` (a callable for InfoNoise's weight=)."""
    weights = {'epsilon': epsilon_loss_weight, 'v_prediction': v_loss_weight, 'sample': torch.ones_like}
    if prediction not in weights:
        raise ValueError(f'Unknown prediction "{prediction}"; choose from {", ".join(PREDICTIONS)}')
    return weights[prediction]


# Rectified flow / flow matching.
def flow_sigma_from_t(t: torch.Tensor) -> torch.Tensor:
    """σ = t/(1 − t) for x_t = (1 − t)·x₀ + t·ε, t ∈ [0, 1)."""
    return t / (1 - t)


def flow_t_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """t = σ/(1 + σ)."""
    return sigma / (1 + sigma)


def velocity_loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """x₀-space weight of a plain velocity loss ‖v̂ − (ε − x₀)‖²: w(σ) = 1/t² = ((1 + σ)/σ)²."""
    return ((1 + sigma) / sigma) ** 2


class FlowMatching:
    """A noise sampler (e.g. InfoNoise(weight=velocity_loss_weight)) in rectified-flow terms.

        t = fm.sample_t(batch, device)                   # [N] float32 in (0, 1)
        x_t = (1 - t) * x0 + t * eps; loss = ((net(x_t, t) - (eps - x0)) ** 2).mean(dims)
        fm.observe(t, velocity_mse)                      # [N] per-sample, unweighted

    t ranges over σ/(1+σ) of the noise sampler's σ range: [0.002, 80] gives t ∈ [0.0020, 0.9877].
    """

    def __init__(self, sampler: NoiseSampler):
        _check_sampler(sampler, ('sample', 'observe', 'cdf'))
        self.sampler = sampler

    def sample_t(self, n: int, device: torch.device | str = 'cpu') -> torch.Tensor:
        """n times t = σ/(1 + σ) (float32, on `device`) of σ drawn from the noise sampler."""
        sigma = self.sampler.sample(n, device).to(torch.float64)
        return flow_t_from_sigma(sigma).to(torch.float32)

    def observe(self, t: torch.Tensor, velocity_mse: torch.Tensor) -> None:
        """Hand the noise sampler σ = t/(1 − t) and the x₀-space MSE t²·velocity_mse (both [N], per sample, unweighted).
        A t outside [0, 1) gives a σ that is not positive and finite, which InfoNoise refuses at its next check."""
        check_observation(t, velocity_mse)
        t = t.detach().to(torch.float64)
        self.sampler.observe(flow_sigma_from_t(t), t**2 * velocity_mse.detach().to(torch.float64))

    def cdf_t(self, t: torch.Tensor) -> torch.Tensor:
        """P(t' <= t) under the noise sampler's current law."""
        return self.sampler.cdf(flow_sigma_from_t(torch.as_tensor(t, dtype=torch.float64)))


class DiscreteTimesteps:
    """A noise sampler over a DDPM-style table of timesteps (diffusers' `scheduler.alphas_cumprod`, [T]).

    Timestep i has σ_i = √((1 − ᾱ_i)/ᾱ_i), increasing in i, and stands for the σ-interval between the geometric
    midpoints of its neighbours (the first reaches down to 0, the last up to ∞). It is drawn with the probability
    the noise sampler gives that interval, F(e_{i+1}) − F(e_i), the exact discrete counterpart of the continuous law
    (not the nearest timestep of a continuous draw in another variable).

        t = steps.sample(batch, device)                  # [N] int64 timesteps
        x_t = scheduler.add_noise(x0, eps, t); loss = ((net(x_t, t) - eps) ** 2).mean(dims)
        steps.observe(t, eps_mse)                        # [N] per-sample, unweighted, in the prediction's target

    Build the InfoNoise sampler on `steps.sigma_range()` with `weight=prediction_loss_weight(prediction)`;
    `check_bins` says whether every interval of its estimation grid holds a timestep (else it could never fill).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, sampler: NoiseSampler, prediction: str = 'epsilon'):
        alpha_bar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        if alpha_bar.ndim != 1 or alpha_bar.numel() < 2:
            raise ValueError(f'alphas_cumprod must be 1-D with at least 2 entries, got {tuple(alpha_bar.shape)}')
        if not bool(((alpha_bar > 0) & (alpha_bar < 1)).all()) or not bool((alpha_bar[1:] < alpha_bar[:-1]).all()):
            raise ValueError('alphas_cumprod must decrease strictly and lie in (0, 1)')
        if prediction not in PREDICTIONS:
            raise ValueError(f'Unknown prediction "{prediction}"; choose from {", ".join(PREDICTIONS)}')
        _check_sampler(sampler, ('observe', 'cdf'))
        self.sampler, self.prediction = sampler, prediction
        self.sigmas = sigma_from_alpha_bar(alpha_bar)  # [T] increasing
        self._cache: dict = {}  # Per device: σ_i, and the cumulative probabilities with the law they were made for.
        mid = (self.sigmas[1:] * self.sigmas[:-1]).sqrt()
        self.edges = torch.cat([torch.zeros(1, dtype=torch.float64), mid, torch.full((1,), math.inf)])  # [T + 1]

    def sigma_range(self) -> tuple[float, float]:
        """σ of the first and the last timestep: the range to build the noise sampler's bins on."""
        return float(self.sigmas[0]), float(self.sigmas[-1])

    def check_bins(self, edges: torch.Tensor) -> None:
        """Raise if an interval of the estimation grid `edges` ([K + 1], e.g. InfoNoise(...).grid.edges) holds
        no timestep σ_i: it would never collect losses and InfoNoise would never refresh."""
        edges = torch.as_tensor(edges, dtype=torch.float64)
        inside = self.sigmas[(self.sigmas >= edges[0]) & (self.sigmas <= edges[-1])]
        counts = torch.bincount((torch.searchsorted(edges, inside, right=True) - 1).clamp(0, edges.numel() - 2),
                                minlength=edges.numel() - 1)  # fmt: skip
        if bool((counts == 0).any()):
            k = int((counts == 0).nonzero()[0])
            raise ValueError(
                f'interval {k + 1} of {edges.numel() - 1} (σ {float(edges[k]):.3g}-{float(edges[k + 1]):.3g}) holds '
                'no timestep; use fewer intervals or a higher sigma_min'
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
            cache.update(law=law, cumulative=self.probabilities().cumsum(0).to(device))
        return cache

    def sample(self, n: int, device: torch.device | str = 'cpu') -> torch.Tensor:
        """n timesteps (int64, on `device`) by inverse CDF of uniforms from torch's global RNG."""
        cumulative = self._on(device)['cumulative']
        u = torch.rand(n, device=device, dtype=torch.float64) * cumulative[-1]
        return torch.searchsorted(cumulative, u, right=True).clamp(max=self.sigmas.numel() - 1)

    def observe(self, timesteps: torch.Tensor, mse: torch.Tensor) -> None:
        """Hand the noise sampler σ_i and the x₀-space MSE of per-sample losses `mse` in the prediction's target.

        A timestep outside [0, T) (which indexing would wrap, e.g. −1 to T − 1) becomes σ = NaN, which InfoNoise
        counts on the device and refuses at its next refresh check: no host synchronisation per step."""
        if not isinstance(timesteps, torch.Tensor) or timesteps.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f'observe: timesteps must be an int32/int64 tensor, got {getattr(timesteps, "dtype", timesteps)}'
            )
        sigmas = self._on(timesteps.device)['sigmas']
        inside = (timesteps >= 0) & (timesteps < len(sigmas))
        sigma = torch.where(inside, sigmas[timesteps.clamp(0, len(sigmas) - 1)], math.nan)
        check_observation(sigma, mse)
        self.sampler.observe(sigma, x0_mse(mse.detach().to(torch.float64), sigma, self.prediction))
