"""Kingma & Gao's adaptive noise schedule: a rival of InfoNoise that samples σ where the weighted loss is large.

Kingma & Gao, "Understanding Diffusion Objectives as the ELBO with Simple Data Augmentation" (NeurIPS 2023), the
appendix on the adaptive noise schedule: the density of the log-SNR λ is proportional to a running average of the
weighted loss in each histogram bin of λ, used as an importance-sampling proposal whose weights leave the training
objective unchanged. It reduces the variance of the loss estimate; the objective's emphasis stays that of the
reference law q. InfoNoise instead changes the emphasis itself, towards the information rate (docs/library.md,
"Adaptive and learned rivals").

Our construction is exact and draws with one uniform, without a density of q. On K log-spaced bins of σ (the end bins
reach down to 0 and up to ∞), with Q_k = q's mass in bin k and L_k the running average of the weighted loss w(σ)·mse
there,
    g_k = (1 − ε)·L_k / Σ_j Q_j·L_j + ε,     p(σ) = q(σ)·g_k for σ in bin k,
so that Σ_k Q_k·g_k = 1, bin k gets P_k = Q_k·g_k, and the importance weight q/p = 1/g_k is at most 1/ε. A uniform u
maps to q's probability coordinate by the piecewise-linear map between the cumulative P and the cumulative Q, and
σ = q.icdf of that; cdf(σ) goes the other way through q.cdf. Before the first refresh p = q exactly.

Losses are summed per bin on the device (index_add_, no host synchronisation); a refresh check all-reduces the sums
and counts, so every rank builds the identical law. A bin that got no loss since the last refresh keeps its previous
L_k; a bin never observed yet enters the law with the mean L of the others. Bins of σ are the same on both sides (an
importance weight uses the bin of the float32 σ drawn; a draw that rounds across a bin edge, probability ~1e-7 per
edge, gets its neighbour's weight).
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from infonoise.profile import LogGrid
from infonoise.samplers import (
    LogNormal,
    LogUniform,
    NoiseSampler,
    VPSampler,
    check_durations,
    check_int,
    check_number,
    check_observation,
    check_sigma_range,
)
from infonoise.weights import WeightFn, resolve_weight

# Largest float64 below 1: keeps q.icdf finite at the top of its probability coordinate.
_V_MAX = 1 - 2.0**-53
_V_MIN = 2.0**-40  # As `NoiseSampler.sample` clamps its uniforms.

STATE_KEYS = ('sums', 'counts', 'loss', 'g', 'nimg', 'steps', 'next_check', 'refreshes')


@dataclasses.dataclass(frozen=True, eq=False)
class ProposalTable:
    """The law p = q·g_k of one refresh: the bins' cumulative q-mass and p-mass ([K + 1], from 0 to 1) and g ([K]).

    A new object at every refresh, so that `DiscreteTimesteps` (which keys its cache on the table's identity) sees the
    law change. Tensors are float64 on the CPU; `on(device)` copies them once per device."""

    cdf_q: torch.Tensor
    cdf_p: torch.Tensor
    g: torch.Tensor
    _devices: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    @classmethod
    def build(cls, cdf_q: torch.Tensor, g: torch.Tensor) -> 'ProposalTable':
        """The table for bin factors g on bins of cumulative q-mass cdf_q; P_k = Q_k·g_k normalised to sum 1."""
        mass = (cdf_q[1:] - cdf_q[:-1]) * g
        cdf_p = torch.cat([torch.zeros(1, dtype=torch.float64), mass.cumsum(0)])
        return cls(cdf_q, cdf_p / cdf_p[-1], g)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cdf_q, cdf_p, g) on `device`, copied there at the first request."""
        if device not in self._devices:
            self._devices[device] = (self.cdf_q.to(device), self.cdf_p.to(device), self.g.to(device))
        return self._devices[device]


@dataclasses.dataclass(frozen=True)
class KingmaGaoRefresh:
    """One refresh check of `KingmaGao`: the bins that held losses, and the largest importance weight now."""

    nimg: int
    step: int
    refreshed: bool
    refreshes: int
    bins_observed: int = 0
    max_importance: float = math.nan

    def __str__(self) -> str:
        if not self.refreshed:
            return f'Kingma-Gao check at {self.nimg / 1e3:g} kimg (step {self.step}) skipped: no losses binned'
        return (
            f'Kingma-Gao refresh {self.refreshes} at {self.nimg / 1e3:g} kimg (step {self.step}): '
            f'{self.bins_observed} bins observed, largest importance weight {self.max_importance:.3g}'
        )


def proposal_factors(Q: torch.Tensor, L: torch.Tensor, floor: float) -> torch.Tensor:
    """g_k = (1 − ε)·L_k / Σ_j Q_j L_j + ε (Kingma & Gao's adaptive schedule with a floor ε): p = q·g, Σ_k Q_k g_k
    = 1. With no loss at all (Σ Q L = 0) the law stays q (g ≡ 1)."""
    total = (Q * L).sum()
    if not total > 0:
        return torch.ones_like(L)
    return (1 - floor) * L / total + floor


class KingmaGao(NoiseSampler):
    """Importance-sampled σ: p(σ) ∝ q(σ)·(running weighted loss of σ's bin), with weights `importance` = q/p.

        noise = KingmaGao(weight='edm')                     # q = EDM's log-normal
        sigma = noise.sample(batch_size, device)
        loss = noise.importance(sigma) * w(sigma) * mse     # None before the first refresh: weights 1
        noise.observe(sigma, mse)                           # [N] per-sample, UNweighted x0-space MSE

    Durations are in images (`refresh_kimg`, `warmup_kimg`, all ranks) or in steps (`refresh_steps`, `warmup_steps`:
    calls of `observe`), as InfoNoise's; in a distributed run every rank calls `observe` equally often.
    """

    def __init__(
        self,
        weight: str | WeightFn = 'edm',  # w(σ) of the loss averaged per bin: a name in infonoise.WEIGHTS or σ -> w.
        sigma_data: float = 0.5,  # σ_data of the EDM weight.
        sigma_min: float = 0.002,  # Lower end of the bins (the first bin reaches down to 0 for sampling).
        sigma_max: float = 80.0,  # Upper end (the last bin reaches up to ∞).
        num_bins: int = 64,  # K log-spaced bins.
        ema_rate: float = 0.25,  # Weight of the new per-bin mean in the running average L_k.
        floor: float = 0.05,  # ε: g_k >= ε, so importance weights are at most 1/ε.
        refresh_kimg: float | None = None,  # Refresh period in thousands of images [default: 50].
        warmup_kimg: float | None = None,  # Images drawn from q before the first refresh [default: 0].
        base: str | NoiseSampler = 'lognormal',  # q: 'lognormal' (EDM), 'loguniform', 'vp' or an instance with a cdf.
        refresh_steps: int | None = None,  # Refresh period in steps (calls of `observe`) instead of refresh_kimg.
        warmup_steps: int | None = None,  # Warm-up in steps instead of warmup_kimg.
        callback: Callable[[KingmaGaoRefresh], None] | None = None,  # Called with every refresh check.
    ):
        self.in_steps, self.refresh_every, self.warmup = check_durations(
            refresh_kimg, warmup_kimg, refresh_steps, warmup_steps, default_warmup_kimg=0.0
        )
        sigma_min, sigma_max = check_sigma_range(sigma_min, sigma_max)
        self.sigma_data = check_number('sigma_data', sigma_data, 'a finite number > 0', lambda v: v > 0)
        self.weight_fn = resolve_weight(weight, self.sigma_data)
        self.grid = LogGrid.make(check_int('num_bins', num_bins, 1), sigma_min, sigma_max)
        self.ema_rate = check_number('ema_rate', ema_rate, 'a number in (0, 1]', lambda v: 0 < v <= 1)
        self.floor = check_number('floor', floor, 'a number in (0, 1]', lambda v: 0 < v <= 1)
        named = dict(lognormal=lambda: LogNormal(-1.2, 1.2), loguniform=lambda: LogUniform(sigma_min, sigma_max),
                     vp=VPSampler)  # fmt: skip
        if not isinstance(base, NoiseSampler) and base not in named:
            raise ValueError(f'Unknown base "{base}"; choose "lognormal", "loguniform", "vp" or pass a NoiseSampler')
        self.base = base if isinstance(base, NoiseSampler) else named[base]()
        if type(self.base).cdf is NoiseSampler.cdf:
            raise ValueError(f'KingmaGao needs a base with a cdf; {type(self.base).__name__} has none')
        # Cumulative q-mass at the bin edges, the end bins reaching to 0 and ∞.
        inner = self.base.cdf(self.grid.edges[1:-1]).to(torch.float64).cpu()
        self.cdf_q = torch.cat([torch.zeros(1, dtype=torch.float64), inner, torch.ones(1, dtype=torch.float64)])
        self.callback = callback
        self.device = torch.device('cpu')
        self._reset()

    def _reset(self) -> None:
        K = self.grid.num_bins
        self.sums = torch.zeros(K, dtype=torch.float64, device=self.device)  # Σ w·mse per bin since the last check.
        self.counts = torch.zeros(K, dtype=torch.float64, device=self.device)
        self.loss = torch.full((K,), math.nan, dtype=torch.float64)  # L_k; NaN until the bin's first loss.
        self.table: ProposalTable | None = None
        self.nimg = self.steps = self.refreshes = 0
        self.next_check = self.refresh_every

    @property
    def bin_mass(self) -> torch.Tensor:
        """Q_k: the reference law q's mass in each bin ([K], float64)."""
        return self.cdf_q[1:] - self.cdf_q[:-1]

    @property
    def factors(self) -> torch.Tensor:
        """g_k = p/q in each bin ([K], float64 CPU); ones before the first refresh."""
        return torch.ones(self.grid.num_bins, dtype=torch.float64) if self.table is None else self.table.g

    def _to(self, device: torch.device | str) -> None:
        device = torch.device(device)
        if device != self.device:
            self.device, self.sums, self.counts = device, self.sums.to(device), self.counts.to(device)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            return self.base.icdf(u)
        cdf_q, cdf_p, g = self.table.on(u.device)
        u = u.to(torch.float64)
        k = (torch.searchsorted(cdf_p, u, right=True) - 1).clamp(0, g.numel() - 1)
        v = torch.minimum(cdf_q[k] + (u - cdf_p[k]) / g[k], cdf_q[k + 1])
        return self.base.icdf(v.clamp(_V_MIN, _V_MAX))

    def cdf(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            return self.base.cdf(sigma)
        cdf_q, cdf_p, g = self.table.on(sigma.device)
        k = self.grid.bin_index(sigma)
        f = cdf_p[k] + g[k] * (self.base.cdf(sigma).to(torch.float64) - cdf_q[k])
        return torch.minimum(torch.maximum(f, cdf_p[k]), cdf_p[k + 1])

    def importance(self, sigma: torch.Tensor) -> torch.Tensor | None:
        """q(σ)/p(σ) = 1/g_{k(σ)} (float32, σ's shape and device); None before the first refresh (p = q)."""
        if self.table is None:
            return None
        g = self.table.on(sigma.device)[2]
        return (1 / g[self.grid.bin_index(sigma)]).to(torch.float32)

    def sample(self, n: int, device: torch.device | str = 'cpu') -> torch.Tensor:
        self._to(device)
        return super().sample(n, device)

    def observe(self, sigma: torch.Tensor, mse: torch.Tensor) -> None:
        """Add each w(σ)·mse to its bin's sum (device-side; non-finite values and σ <= 0 are skipped); refresh when a
        check is due. Within a bin p ∝ q, so the plain per-bin mean estimates q's conditional mean: no weights."""
        check_observation(sigma, mse)
        self._to(sigma.device)
        sigma, mse = sigma.detach().to(torch.float64), mse.detach().to(torch.float64)
        weighted = self.weight_fn(sigma).to(torch.float64) * mse
        use = (sigma > 0) & torch.isfinite(sigma) & torch.isfinite(weighted) & (weighted >= 0)
        bins = self.grid.bin_index(torch.where(use, sigma, 1.0))
        self.sums.index_add_(0, bins, torch.where(use, weighted, 0.0))
        self.counts.index_add_(0, bins, use.to(torch.float64))
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.nimg += sigma.numel() * world
        self.steps += 1
        clock = self.steps if self.in_steps else self.nimg
        if clock >= self.next_check:
            self.next_check = (clock // self.refresh_every + 1) * self.refresh_every
            if clock > self.warmup:
                self.refresh()

    def refresh(self) -> bool:
        """Pool the per-bin sums over ranks, update the running averages L_k and build the new law; returns whether
        it did (not when no bin got a loss). The sums start again from zero either way."""
        stats = torch.stack([self.sums, self.counts])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(stats)
        sums, counts = stats.cpu()
        self.sums.zero_()
        self.counts.zero_()
        seen = counts > 0
        event = dict(nimg=self.nimg, step=self.steps)
        if not bool(seen.any()):
            return self._report(KingmaGaoRefresh(refreshed=False, refreshes=self.refreshes, **event))
        means = sums / counts.clamp(min=1)
        ema = (1 - self.ema_rate) * self.loss + self.ema_rate * means
        # A bin's first mean starts its average; a bin without losses keeps its previous one (NaN: none yet).
        self.loss = torch.where(seen, torch.where(self.loss.isnan(), means, ema), self.loss)
        known = ~self.loss.isnan()
        loss = self.loss.nan_to_num(float(self.loss[known].mean()))  # Bins never observed: the mean of the others.
        self.table = ProposalTable.build(self.cdf_q, proposal_factors(self.bin_mass, loss, self.floor))
        self.refreshes += 1
        check = KingmaGaoRefresh(refreshed=True, refreshes=self.refreshes, bins_observed=int(seen.sum()),
                                 max_importance=float(1 / self.table.g.min()), **event)  # fmt: skip
        return self._report(check)

    def _report(self, event: KingmaGaoRefresh) -> bool:
        if self.callback is not None:
            self.callback(event)
        return event.refreshed

    def schedule_report(self, total_nimg: int, batch_size: int) -> list[str]:
        clock = total_nimg if not self.in_steps else math.ceil(total_nimg / batch_size)
        first = max(self.refresh_every, self.warmup + 1)
        if first > clock:
            return [f'Warning: Kingma-Gao never refreshes in this run (first check after {first:g} '
                    f'{"steps" if self.in_steps else "images"}); σ stays the base law']  # fmt: skip
        return []

    def summary(self) -> str:
        return f'refreshes {self.refreshes:<4d}'

    def describe(self) -> dict[str, float]:
        return dict(super().describe(), refreshes=float(self.refreshes))

    def state_dict(self) -> dict[str, Any]:
        return dict(
            sums=self.sums.cpu().clone(), counts=self.counts.cpu().clone(), loss=self.loss.clone(),
            g=None if self.table is None else self.table.g.clone(), nimg=self.nimg, steps=self.steps,
            next_check=self.next_check, refreshes=self.refreshes,
        )  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; ValueError naming the field that does not fit this configuration."""
        if not isinstance(state, dict) or set(state) != set(STATE_KEYS):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f'KingmaGao state must have keys {", ".join(STATE_KEYS)}, got {got}')
        K = self.grid.num_bins
        for key in ('sums', 'counts', 'loss') + (() if state['g'] is None else ('g',)):
            value = state[key]
            if not isinstance(value, torch.Tensor) or value.dtype != torch.float64 or tuple(value.shape) != (K,):
                raise ValueError(f'KingmaGao state: {key} must be a float64 tensor of shape ({K},)')
        if state['g'] is not None and not bool((torch.isfinite(state['g']) & (state['g'] > 0)).all()):
            raise ValueError('KingmaGao state: g must be finite and > 0')
        if (state['g'] is None) != (state['refreshes'] == 0):
            raise ValueError('KingmaGao state: g must be present exactly when refreshes > 0')
        self._reset()
        self.device = torch.device('cpu')
        self.sums, self.counts, self.loss = (state[key].clone() for key in ('sums', 'counts', 'loss'))
        self.nimg, self.steps, self.next_check = int(state['nimg']), int(state['steps']), state['next_check']
        self.refreshes = int(state['refreshes'])
        if state['g'] is not None:
            self.table = ProposalTable.build(self.cdf_q, state['g'].clone())
