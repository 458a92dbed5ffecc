"""The published rivals of InfoNoise among fixed training-noise laws (docs/library.md, "Rival schedules"): logit-normal
time (SD3, JiT), Laplace in log-SNR, uniform rectified-flow time, and a curriculum that switches between two laws.
Each is a `NoiseSampler` with an exact inverse CDF and CDF; the adaptive rival is `infonoise.kingma_gao`.

All live in the same VE σ (x = x₀ + σε; a rectified-flow x_t divided by 1 − t has σ = t/(1 − t), a VP x_t divided by
√ᾱ has σ = √((1 − ᾱ)/ᾱ)), so each law applies unchanged to EDM-style training and through the adapters of
`infonoise.conversions`.
"""

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch

from infonoise.samplers import LogNormal, NoiseSampler, check_int, check_number


def _normal_icdf(u: torch.Tensor) -> torch.Tensor:
    """Φ⁻¹(u) = √2 · erfinv(2u − 1), the standard normal quantile."""
    return math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Φ(z) = ½ erfc(−z/√2), accurate in both tails."""
    return 0.5 * torch.erfc(-z / math.sqrt(2.0))


class LogitNormal(NoiseSampler):
    """Logit-normal time of rectified flow: t = sigmoid(z), z ~ N(m, s²) (Esser et al. 2024, "Scaling Rectified Flow
    Transformers for High-Resolution Image Synthesis" (SD3), Sec. 3.1, the logit-normal density
    π_ln(t; m, s) = exp(−(logit t − m)²/(2s²)) / (s√(2π)·t(1 − t))).

    With x_t = (1 − t)·x₀ + t·ε (t = 1 is pure noise), σ = t/(1 − t) = e^z, so ln σ ~ N(m, s²): the same σ is the VE
    noise level of x_t/(1 − t) = x₀ + σε, so the law applies as is to EDM-style training (a log-normal in σ).
    Named settings: `LogitNormal.sd3()` = (0, 1), SD3's default; `LogitNormal.jit()`, JiT's (Li & He 2025, "Back to
    Basics: Let Denoising Generative Models Denoise"): JiT writes x_t = t·x₀ + (1 − t)·ε (t = 1 is clean) and draws
    logit t ~ N(−0.8, 0.8), which in the convention here is m = +0.8, s = 0.8: median σ = e^0.8 ≈ 2.2, noisier.
    """

    def __init__(self, m: float = 0.0, s: float = 1.0):
        self.m = check_number('m', m, 'a finite number')
        self.s = check_number('s', s, 'a finite number > 0', lambda v: v > 0)

    @classmethod
    def sd3(cls) -> 'LogitNormal':
        """SD3's logit-normal(0, 1) (Esser et al. 2024, Sec. 3.1 and 5.1)."""
        return cls(0.0, 1.0)

    @classmethod
    def jit(cls) -> 'LogitNormal':
        """JiT's logit-normal (Li & He 2025): N(−0.8, 0.8) on JiT's clean-at-1 time, so m = +0.8, s = 0.8 here."""
        return cls(0.8, 0.8)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.m + self.s * _normal_icdf(u))

    def cdf(self, sigma: torch.Tensor) -> torch.Tensor:
        return _normal_cdf((sigma.to(torch.float64).log() - self.m) / self.s)


class LaplaceLogSNR(NoiseSampler):
    """The Laplace noise schedule: log-SNR λ = −2 ln σ ~ Laplace(μ, b), p(λ) = exp(−|λ − μ|/b)/(2b) (Hang, Gu, Geng
    & Guo, "Improved Noise Schedule for Diffusion Training", ICCV 2025, arXiv 2407.03297, Sec. 2: the Laplace p(λ)).

    It puts the draws around λ = μ (σ = e^(−μ/2); μ = 0 is SNR = 1, where signal and noise trade places) with
    exponential tails. Defaults μ = 0, b = 0.5: the defaults of public implementations of the schedule (λ(t) =
    μ − b·sign(½ − t)·ln(1 − 2|½ − t|) for uniform t, the inverse CDF of this law), not read off the paper itself,
    which could not be read offline; pass other values if your reference differs.
    Exact in both directions: σ falls as λ rises, so P(σ' <= σ) = 1 − F_λ(−2 ln σ) and σ(u) = exp(−F_λ⁻¹(1 − u)/2).
    """

    def __init__(self, mu: float = 0.0, b: float = 0.5):
        self.mu = check_number('mu', mu, 'a finite number')
        self.b = check_number('b', b, 'a finite number > 0', lambda v: v > 0)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        # λ = F_λ⁻¹(1 − u): μ + b·ln(2(1 − u)) for u >= ½, μ − b·ln(2u) below; both logs of values in (0, 1].
        u = u.to(torch.float64)
        upper = u >= 0.5
        lam = self.mu + self.b * torch.where(upper, torch.log(2 * (1 - u)), -torch.log(2 * u.clamp(max=0.5)))
        return torch.exp(-0.5 * lam)

    def cdf(self, sigma: torch.Tensor) -> torch.Tensor:
        lam = -2 * sigma.to(torch.float64).log()
        tail = 0.5 * torch.exp(-(lam - self.mu).abs() / self.b)  # P(λ' beyond λ on λ's far side of μ).
        return torch.where(lam < self.mu, 1 - tail, tail)


class UniformT(NoiseSampler):
    """Rectified flow's plain schedule: t uniform on [t_min, t_max], σ = t/(1 − t) (Liu et al. 2022, "Flow Straight
    and Fast"; Lipman et al. 2022, "Flow Matching for Generative Modeling"). In σ its density is 1/(1 + σ)² on
    [σ(t_min), σ(t_max)], so it reaches far more small and large σ than a logit-normal."""

    def __init__(self, t_min: float = 1e-3, t_max: float = 1 - 1e-3):
        numbers_ok = all(not isinstance(v, bool) and isinstance(v, numbers.Real) for v in (t_min, t_max))
        if not (numbers_ok and 0 < t_min < t_max < 1):
            raise ValueError(f'Need 0 < t_min < t_max < 1, got t_min={t_min!r}, t_max={t_max!r}')
        self.t_min, self.t_max = float(t_min), float(t_max)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        t = self.t_min + u.to(torch.float64) * (self.t_max - self.t_min)
        return t / (1 - t)

    def cdf(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(torch.float64)
        return ((sigma / (1 + sigma) - self.t_min) / (self.t_max - self.t_min)).clamp(0, 1)


# Named settings a `Curriculum` (and a config file) may give instead of an instance, as train.py's --sampler names them.
NAMED_SAMPLERS: dict[str, Callable[[], NoiseSampler]] = {
    'lognormal': LogNormal,
    'sd3': LogitNormal.sd3,
    'jit': LogitNormal.jit,
    'laplace': LaplaceLogSNR,
    'uniform-t': UniformT,
}


def named_sampler(name: str, value: 'str | NoiseSampler') -> NoiseSampler:
    """`value` if it is a noise sampler, else the one NAMED_SAMPLERS calls that; ValueError naming `name` otherwise."""
    if isinstance(value, NoiseSampler):
        return value
    if value not in NAMED_SAMPLERS:
        raise ValueError(f'{name} must be a NoiseSampler or one of {", ".join(NAMED_SAMPLERS)}, got {value!r}')
    return NAMED_SAMPLERS[value]()


class Curriculum(NoiseSampler):
    """Curriculum sampling: σ from `first` until `switch_kimg`·1000 images have been observed, from `second` after
    (Sun 2026, "Curriculum Sampling: A Two-Phase Curriculum for Efficient Training of Flow Matching", arXiv
    2603.12517: logit-normal first for fast structure learning, then uniform t to refine the endpoints).

    The switch is hard, at a number of images: the paper's abstract describes two phases and we could not read its
    exact switch rule or default offline, so train.py puts it at half of --duration (--curriculum-switch). `first` and
    `second` are noise samplers or names in NAMED_SAMPLERS ('sd3', 'uniform-t', ...), so a JSON config can hold them.
    The image count is host-side, all ranks together (as InfoNoise counts), so `sample` and `observe` never
    synchronise; `observe` also reaches the active component. `table` is the active component, replaced at the switch
    (`NoiseSampler`'s convention), so `DiscreteTimesteps` recomputes its timestep probabilities then.
    """

    def __init__(self, first: 'str | NoiseSampler', second: 'str | NoiseSampler', switch_kimg: float):
        self.first, self.second = named_sampler('first', first), named_sampler('second', second)
        self.switch_kimg = check_number('switch_kimg', switch_kimg, 'a finite number >= 0', lambda v: v >= 0)
        self.nimg = 0  # Images observed, all ranks together.
        self.table = self._active()

    def _active(self) -> NoiseSampler:
        return self.first if self.nimg < self.switch_kimg * 1000 else self.second

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        return self.table.icdf(u)

    def cdf(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.table.cdf(sigma)

    def sample(self, n: int, device: torch.device | str = 'cpu') -> torch.Tensor:
        return self.table.sample(n, device)

    def ln_sigma_points(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.table.ln_sigma_points()

    def observe(self, sigma: torch.Tensor, mse: torch.Tensor) -> None:
        self.table.observe(sigma, mse)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.nimg += sigma.numel() * world
        if (active := self._active()) is not self.table:
            self.table = active
            if self.callback is not None:
                self.callback(f'Curriculum: {type(active).__name__} from {self.nimg} images on')

    def summary(self) -> str:
        return f'curriculum {"2/2" if self.table is self.second else "1/2"}'

    def schedule_report(self, total_nimg: int, batch_size: int) -> list[str]:
        first, second = type(self.first).__name__, type(self.second).__name__
        lines = [f'Curriculum: {first} until {self.switch_kimg:g} kimg, then {second}']
        if self.switch_kimg * 1000 >= total_nimg:
            lines.append(f'Warning: the switch at {self.switch_kimg:g} kimg comes after the run\'s {total_nimg / 1000:g} '
                         f'kimg, so every σ comes from {first}')  # fmt: skip
        return lines

    def state_dict(self) -> dict[str, Any]:
        return dict(nimg=self.nimg, first=self.first.state_dict(), second=self.second.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != {'nimg', 'first', 'second'}:
            what = f'keys {sorted(state)}' if isinstance(state, dict) else type(state).__name__
            raise ValueError(f'Curriculum state needs keys first, nimg, second, got {what}')
        nimg = check_int('Curriculum state nimg', state['nimg'], 0)
        self.first.load_state_dict(state['first'])
        self.second.load_state_dict(state['second'])
        self.nimg = nimg
        self.table = self._active()
