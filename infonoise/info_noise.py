"""InfoNoise: the online, information-guided training noise sampler (paper Sec. 5, Algorithm 1, App. B and D).

Each observed (σ, ℓ) goes to the FIFO buffer of its log-grid interval. Every `refresh_kimg`, once warm-up is over
and every interval holds at least `min_count` losses (pooled over ranks), the per-interval buffer means update an
EMA of the loss (line 11), which gives the entropy-rate estimate r̂ = mse/σ³ (Eq. 11); a pivot c is calibrated
from r̂ (Sec. 4), the low-noise gate g_{c,n} applied (Eq. 17), optionally smoothed, divided by the loss weight
(Eq. 16) and turned into a continuous inverse-CDF table. Until the first refresh σ comes from the warm-up law.

Two additions to a bare reading of Algorithm 1, both documented in docs/infonoise.md: durations are in images
(kimg), like the rest of the pipeline, or in steps (calls of `observe`); and a `floor` of weight ε. During warm-up
σ comes from the mixture (1 − ε)·base + ε·log-uniform (`samplers.Mixture`, drawn by its exact inverse CDF), so that
every interval gets losses (a log-normal base practically never reaches σ > 30). After a refresh the floor acts on
the emphasis: φ = (1 − ε)·ρ + ε·(log-uniform), π = φ/w, so the table can never collapse onto a few intervals while
the realised emphasis stays within ε of the target ρ.

Per-step work (`sample`, `observe`) is device-side tensor code without host synchronisation; the only syncs
(and the cross-rank all-reduce of per-bin sums and counts) happen at refresh checks. Inputs `observe` cannot bin
(σ not positive and finite, negative losses) are counted on the device and refused at the next check.

InfoNoise says what it does: every refresh check produces a `RefreshCheck` (refreshed, with the pivot, the peak of
ρ and the quantiles of ln σ; or skipped, with the reason), handed to `callback` if one is set, and
`schedule_report` tells before training whether and when InfoNoise can adapt at all.
"""

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from infonoise import law
from infonoise import pivot as pivots
from infonoise.pivot import Pivot
from infonoise.profile import LogGrid, Profile, build_profile, entropy_rate, normalize_density
from infonoise.reporting import RefreshCheck, schedule_report, shortest_interval
from infonoise.samplers import (
    LogNormal,
    LogUniform,
    Mixture,
    NoiseSampler,
    check_durations,
    check_int,
    check_number,
    check_observation,
    check_sigma_range,
)
from infonoise.state import load_state, save_state
from infonoise.table import InverseCDFTable
from infonoise.weights import WeightFn, resolve_weight


class InfoNoise(NoiseSampler):
    """Samples σ in proportion to the gated entropy-rate profile divided by the loss weight (π ∝ ρ/w, Eq. 16).

    Use it from any training loop, on every rank:

        sigma = noise.sample(batch_size, device)              # [N] float32 VE noise levels
        ...                                                   # x = x0 + sigma * eps, denoise, loss = w(sigma) * mse
        noise.observe(sigma, mse)                             # [N] per-sample, UNweighted x0-space MSE

    `observe` wants, per sample, the mean over elements of (D(x0 + σε; σ) − x0)², the denoiser's error in x0 space
    at the VE noise level σ (another parameterisation converts with `infonoise.conversions`). Refreshes all-reduce
    statistics, so in a distributed run every rank must call `observe` equally often with equal batch sizes.

    Durations (refresh period, warm-up) are in images (`refresh_kimg`, `warmup_kimg`, counting all ranks) or in
    optimiser steps (`refresh_steps`, `warmup_steps`: calls of `observe`); give one pair or the other.
    """

    def __init__(
        self,
        weight: str | WeightFn = 'edm',  # w(σ) that π divides out (Eq. 16): a name in infonoise.WEIGHTS or σ -> w(σ).
        sigma_data: float = 0.5,  # σ_data of the EDM weight; the onset pivot's reference σ is 0.004·σ_data.
        sigma_min: float = 0.002,  # Lower end of the estimation grid and of π.
        sigma_max: float = 80.0,  # Upper end.
        num_bins: int = 64,  # K log-spaced intervals.
        buffer_size: int = 256,  # B: FIFO capacity per interval.
        ema_rate: float = 0.25,  # β: weight of the new buffer mean in the loss EMA (Alg. 1 line 11).
        refresh_kimg: float | None = None,  # M: refresh period, in thousands of images [default: 50].
        warmup_kimg: float | None = None,  # N_warm: images drawn from the base noise sampler first [default: 1000].
        min_count: int = 16,  # N_min: losses every interval must hold (over all ranks) before a refresh.
        gate_n: float = 3.0,  # n of the gate g_{c,n} (Eq. 17).
        onset_p: float = 0.002,  # p of the onset-of-information pivot (Eq. 18).
        smoothing: float = 1.0,  # Width (in bins) of the peak-preserving smoothing of the gated rate, 0 = off.
        endpoint: str = 'continuous',  # 'continuous' (onset pivot) or 'discrete' (power-law break).
        pivot: float | None = None,  # Fixed pivot c instead of calibrating it at every refresh.
        base: str | NoiseSampler = 'lognormal',  # Warm-up sampler: 'lognormal' (EDM), 'loguniform' or an instance.
        floor: float = 0.05,  # Weight ε of the log-uniform floor (warm-up draws; emphasis after refreshes).
        refresh_steps: int | None = None,  # M in steps (calls of `observe`) instead of refresh_kimg.
        warmup_steps: int | None = None,  # N_warm in steps instead of warmup_kimg.
        callback: Callable[[RefreshCheck], None] | None = None,  # Called with every refresh check.
        build: str = 'continuous',  # BuildSampler: 'continuous' or 'paper' (Alg. 1 as written), `infonoise.law`.
        projection: str | None = None,  # 'lognormal': the log-normal with π_info's moments of ln σ (continuous).
        temper: float = 1.0,  # β: π ∝ base^(1−β)·π_info^β with the warm-up base (continuous); 1 = InfoNoise.
        reference_mse: Callable[[torch.Tensor], torch.Tensor] | None = None,  # Excess loss: subtract this mse(σ).
        data_variance: float | None = None,  # Bound the loss by the linear estimator's σ²v/(σ² + v) (per element).
    ):
        if endpoint not in ('continuous', 'discrete'):
            raise ValueError(f'endpoint must be "continuous" or "discrete", got "{endpoint}"')
        self.in_steps, self.refresh_every, self.warmup = check_durations(
            refresh_kimg, warmup_kimg, refresh_steps, warmup_steps, default_warmup_kimg=1000.0
        )
        sigma_min, sigma_max = check_sigma_range(sigma_min, sigma_max)
        self.sigma_data = check_number('sigma_data', sigma_data, 'a finite number > 0', lambda v: v > 0)
        self.weight_fn = resolve_weight(weight, self.sigma_data)
        self.grid = LogGrid.make(check_int('num_bins', num_bins, 2), sigma_min, sigma_max)
        self.buffer_size = check_int('buffer_size', buffer_size, 1)
        self.min_count = check_int('min_count', min_count, 1)
        self.ema_rate = check_number('ema_rate', ema_rate, 'a number in (0, 1]', lambda v: 0 < v <= 1)
        self.gate_n = check_number('gate_n', gate_n, 'a finite number > 0', lambda v: v > 0)
        self.onset_p = check_number('onset_p', onset_p, 'a number in (0, 1)', lambda v: 0 < v < 1)
        self.smoothing = check_number('smoothing', smoothing, 'a finite number >= 0', lambda v: v >= 0)
        self.floor = check_number('floor', floor, 'a number in [0, 1]', lambda v: 0 <= v <= 1)
        if pivot is not None:
            pivot = check_number('pivot', pivot, 'a finite number > 0 (or None: calibrated)', lambda v: v > 0)
        self.endpoint, self.fixed_pivot = endpoint, pivot
        if build not in law.BUILDS:
            raise ValueError(f'build must be one of {", ".join(law.BUILDS)}, got {build!r}')
        if projection not in law.PROJECTIONS:
            raise ValueError(f'projection must be None or "lognormal", got {projection!r}')
        self.temper = check_number('temper', temper, 'a number in (0, 1]', lambda v: 0 < v <= 1)
        if build == 'paper' and (projection is not None or self.temper != 1):
            raise ValueError("projection and temper act on the continuous law; they need build='continuous'")
        if reference_mse is not None and not callable(reference_mse):
            raise ValueError('reference_mse must be a callable σ -> Bayes mse(σ), or None')
        if data_variance is not None:
            data_variance = check_number('data_variance', data_variance, 'a finite number > 0', lambda v: v > 0)
        self.build, self.projection, self.reference_mse, self.data_variance = (
            build,
            projection,
            reference_mse,
            data_variance,
        )
        # The warm-up's base: an instance as given, or EDM's log-normal, or log-uniform on the estimation grid.
        named = dict(lognormal=lambda: LogNormal(-1.2, 1.2), loguniform=lambda: LogUniform(sigma_min, sigma_max))
        if not isinstance(base, NoiseSampler) and base not in named:
            raise ValueError(f'Unknown base sampler "{base}"; choose "lognormal", "loguniform" or pass a NoiseSampler')
        self.base = base if isinstance(base, NoiseSampler) else named[base]()
        self.base_name = base if isinstance(base, str) else type(base).__name__
        self.warmup_law = Mixture([1 - self.floor, self.floor], [self.base, LogUniform(sigma_min, sigma_max)])
        self.device = torch.device('cpu')
        self.callback = callback
        self._reset()

    def _reset(self) -> None:
        K, B = self.grid.num_bins, self.buffer_size
        self.buffer = torch.zeros(K, B + 1, dtype=torch.float32)  # Column B collects discarded writes.
        self.ptr = torch.zeros(K, dtype=torch.int64)  # Next write position per interval.
        self.count = torch.zeros(K, dtype=torch.int64)  # n_k = min(pushed, B).
        self.nonfinite = torch.zeros((), dtype=torch.int64)  # Ignored non-finite losses.
        self.invalid = torch.zeros(2, dtype=torch.int64)  # σ not positive and finite, negative losses: refused.
        self.mse = torch.zeros(K, dtype=torch.float64)  # EMA of the per-interval mean loss.
        self.table: InverseCDFTable | None = None
        self._profile: Profile | None = None
        self.last_check: RefreshCheck | None = None
        self.nimg = 0  # Images observed, all ranks together.
        self.steps = 0  # Calls of `observe`.
        self.next_check = self.refresh_every  # Next refresh check, in images or steps (`in_steps`).
        self.frozen = False  # A fixed law (`fix_profile`): no refresh ever replaces it.
        self.refreshes = 0
        self.pivot = float('nan')
        self.raw_pivots: list[float] = []  # Calibrated pivots of the last refreshes, for debouncing.
        self.last_refresh_nimg: int | None = None
        self.last_refresh_time: float | None = None  # time.monotonic() of the last refresh in this process.

    @property
    def clock(self) -> int:
        """Time as the durations count it: steps or images."""
        return self.steps if self.in_steps else self.nimg

    def _to(self, device: torch.device | str) -> None:
        device = torch.device(device)
        if device != self.device:
            self.device = device
            for name in ('buffer', 'ptr', 'count', 'nonfinite', 'invalid'):
                setattr(self, name, getattr(self, name).to(device))
            self.table = self.table.to(device) if self.table is not None else None

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """w(σ), the loss weight that π divides out."""
        return self.weight_fn(sigma)

    # Sampling: the table after the first refresh; before it, the warm-up mixture of the base and the floor.
    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        return self.table.icdf(u) if self.table is not None else self.warmup_law.icdf(u)

    def cdf(self, sigma: torch.Tensor) -> torch.Tensor:
        """P(σ' <= σ) under the current law: the table's, or before the first refresh the warm-up mixture."""
        return self.table.cdf_at(sigma) if self.table is not None else self.warmup_law.cdf(sigma)

    def sample(self, n: int, device: torch.device | str = 'cpu') -> torch.Tensor:
        """n σ values (float32, on `device`, torch's global RNG): icdf of one uniform each, so from the table after
        the first refresh and from the warm-up mixture before it."""
        self._to(device)
        return super().sample(n, device)

    def observe(self, sigma: torch.Tensor, mse: torch.Tensor) -> None:
        """Alg. 1 line 8: push each per-sample loss (σ [N] VE, mse [N] unweighted x₀-space MSE, mean over elements)
        into its interval's FIFO buffer, evicting the oldest; refresh when a check is due. Non-finite losses are
        counted and ignored; σ that is not positive and finite, and negative losses, are counted and refused
        (ValueError) at the next check. In a distributed run every rank must call this equally often."""
        check_observation(sigma, mse)
        self._to(sigma.device)
        B, K = self.buffer_size, self.grid.num_bins
        sigma, mse = sigma.detach(), mse.detach().to(torch.float32)
        good_sigma, finite = (sigma > 0) & (sigma < math.inf), torch.isfinite(mse)
        self.invalid += torch.stack([(~good_sigma).sum(), (finite & (mse < 0)).sum()])
        self.nonfinite += (good_sigma & ~finite).sum()
        use = good_sigma & finite & (mse >= 0)
        bins = self.grid.bin_index(torch.where(use, sigma, 1.0))
        onehot = torch.nn.functional.one_hot(bins, K) * use[:, None]
        rank = ((onehot.cumsum(0) - onehot) * onehot).sum(1)  # Earlier same-interval losses in this batch.
        new = onehot.sum(0)
        keep = use & (rank >= new[bins] - B)  # Only the newest B of a batch can survive.
        col = torch.where(keep, (self.ptr[bins] + rank) % B, B)
        self.buffer.index_put_((bins, col), torch.where(use, mse, 0.0))
        self.ptr = (self.ptr + new) % B
        self.count = torch.minimum(self.count + new, torch.full_like(self.count, B))

        # Refresh check (Alg. 1 line 9); the image count is known on the host, so no sync is needed to decide.
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.nimg += sigma.numel() * world
        self.steps += 1
        if self.clock >= self.next_check:
            self.next_check = (self.clock // self.refresh_every + 1) * self.refresh_every
            self._refuse_invalid()
            if self.clock > self.warmup and not self.frozen:
                self.refresh()

    def _pooled_buffer_stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-interval loss sums, sums of squares and counts over all ranks (float64, CPU)."""
        valid = torch.arange(self.buffer_size, device=self.device)[None, :] < self.count[:, None]
        values = self.buffer[:, : self.buffer_size].double() * valid
        stats = torch.stack([values.sum(1), values.square().sum(1), self.count.double()])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(stats)
        return stats[0].cpu(), stats[1].cpu(), stats[2].cpu()

    def _refuse_invalid(self) -> None:
        """At a check (which reads the device anyway): ValueError if `observe` got inputs it cannot bin."""
        bad_sigma, bad_mse = self.invalid.tolist()
        if bad_sigma or bad_mse:
            raise ValueError(
                f'InfoNoise.observe got {bad_sigma} σ that are not positive and finite (a negative or NaN σ, or a '
                f'DiscreteTimesteps timestep outside its table) and {bad_mse} negative losses by step {self.steps}; '
                'σ must be the VE noise level drawn and mse the per-sample squared error'
            )

    def refresh(self) -> bool:
        """Alg. 1 lines 10–16; returns whether the table was rebuilt. Reports the check to `callback`."""
        sums, squares, counts = self._pooled_buffer_stats()
        since = None if self.last_refresh_nimg is None else self.nimg - self.last_refresh_nimg
        seconds = None if self.last_refresh_time is None else time.monotonic() - self.last_refresh_time
        check = dict(nimg=self.nimg, step=self.steps, refreshes=self.refreshes, since_nimg=since, since_seconds=seconds)
        if counts.min() < self.min_count:
            reason = shortest_interval(self.grid, counts, self.min_count)
            return self._report(RefreshCheck(refreshed=False, reason=reason, **check))
        means = sums / counts
        # Relative standard error of each buffer mean; recorded at the scale of the EMA (which starts from 0).
        rel_err = ((squares / counts - means.square()).clamp(min=0) / (counts - 1).clamp(min=1)).sqrt() / means
        mse = (1 - self.ema_rate) * self.mse + self.ema_rate * means
        sigma = self.grid.centers
        try:
            # Sec. 4 / App. B.4: a fixed c, or calibrated (onset for continuous, power-law break for discrete
            # endpoints, `infonoise.pivot`) and debounced over the last refreshes.
            if self.fixed_pivot is not None:
                calibrated, pivot = Pivot(self.fixed_pivot, 'fixed'), self.fixed_pivot
            else:
                rate = entropy_rate(self.information_mse(mse), sigma)
                calibrated = pivots.calibrate(sigma, rate, self.endpoint, rel_err, self.onset_p, self.sigma_data)
                pivot = pivots.debounce([*self.raw_pivots, calibrated.value])
            profile, table = self._law(mse, pivot, counts, rel_err * mse, calibrated)
        except ValueError as e:
            reason = f'degenerate profile ({e}); the previous table stays'
            return self._report(RefreshCheck(refreshed=False, reason=reason, **check))
        self.mse, self.table, self.pivot = mse, table.to(self.device), profile.pivot
        self.raw_pivots = [*self.raw_pivots, calibrated.value][-pivots.DEBOUNCE :]
        self.refreshes += 1
        self._profile = profile
        self.last_refresh_nimg, self.last_refresh_time = self.nimg, time.monotonic()
        q = self.describe()
        quantiles = tuple(q[f'ln_sigma_q{p}'] for p in (10, 50, 90))
        check.update(refreshes=self.refreshes, pivot=profile.pivot, raw_pivot=calibrated.value)
        check.update(pivot_rule=calibrated.rule, peak=profile.peak(), ln_sigma_quantiles=quantiles)
        return self._report(RefreshCheck(refreshed=True, **check))

    def information_mse(self, mse: torch.Tensor) -> torch.Tensor:
        """The per-bin loss the rate is formed from: the estimate, less `reference_mse` (excess loss), and at most
        the linear estimator's error σ²v/(σ² + v) for `data_variance` v (an upper bound of every mmse)."""
        sigma = self.grid.centers
        if self.reference_mse is not None:
            reference = torch.as_tensor(self.reference_mse(sigma), dtype=torch.float64).reshape(sigma.shape)
            mse = (mse - reference).clamp(min=0)
        if self.data_variance is not None:
            v = self.data_variance
            mse = torch.minimum(mse, sigma**2 * v / (sigma**2 + v))
        return mse

    def _law(self, mse: torch.Tensor, pivot: float, counts, stderr, calibrated: Pivot) -> tuple[Profile, Any]:
        """The profile and the table drawn from, for per-bin losses `mse` and pivot c (Alg. 1 lines 12–16)."""
        grid, sigma = self.grid, self.grid.centers
        paper = self.build == 'paper'
        profile = build_profile(
            grid, self.information_mse(mse), pivot, self.loss_weight(sigma), self.gate_n, self.smoothing,
            self.floor if paper else 0.0, refreshes=self.refreshes + 1, count=counts, stderr=stderr,
            raw_pivot=calibrated.value, pivot_rule=calibrated.rule, nimg=self.nimg,
            sigma_range=(float(grid.edges[0]), float(grid.edges[-1])),
        )  # fmt: skip
        if paper:
            return profile, InverseCDFTable.build(sigma, grid.widths, profile.phi / profile.weight)  # π ∝ φ/w.
        base = law.base_density(self.base, grid) if self.temper != 1 else None
        table, pi = law.continuous_law(grid, profile.pi, self.floor, self.projection, self.temper, base)
        phi = normalize_density(pi * profile.weight, grid.widths)
        return dataclasses.replace(profile, pi=pi, phi=phi), table

    def fix_profile(
        self, mse: torch.Tensor, stderr: torch.Tensor | None = None, count: torch.Tensor | None = None
    ) -> None:
        """Draw from the law of the per-bin x₀-space loss `mse` ([K] at `grid.centers`, e.g. an exact mmse) from now
        on, with the same pivot rule, gate, division by w and floor as a refresh, and never refresh (an oracle).
        `stderr` (its standard errors, weighting the discrete pivot rule's fit) and `count` are optional."""
        mse = torch.as_tensor(mse, dtype=torch.float64).reshape(-1)
        if mse.shape != self.grid.centers.shape or not bool((torch.isfinite(mse) & (mse >= 0)).all()):
            raise ValueError(f'fix_profile: mse must be [{self.grid.num_bins}] finite values >= 0')
        sigma = self.grid.centers
        if self.fixed_pivot is not None:
            calibrated = Pivot(self.fixed_pivot, 'fixed')
        else:
            rate = entropy_rate(self.information_mse(mse), sigma)
            rel_err = None if stderr is None else torch.as_tensor(stderr, dtype=torch.float64) / mse
            calibrated = pivots.calibrate(sigma, rate, self.endpoint, rel_err, self.onset_p, self.sigma_data)
        profile, table = self._law(mse, calibrated.value, count, stderr, calibrated)
        self.mse, self.table, self.pivot, self._profile = mse, table.to(self.device), profile.pivot, profile
        self.refreshes, self.frozen = self.refreshes + 1, True

    def _report(self, check: RefreshCheck) -> bool:
        self.last_check = check
        if self.callback is not None:
            self.callback(check)
        return check.refreshed

    def schedule_report(self, total_nimg: int, batch_size: int) -> list[str]:
        """Before training: whether and when InfoNoise can adapt in a run (`infonoise.reporting.schedule_report`)."""
        return schedule_report(self, total_nimg, batch_size)

    def profile(self) -> Profile | None:
        """The profile built by the last refresh (σ_k, mse, rate, gated rate, ρ, u, π, φ, w, pivot); None before."""
        return self._profile

    def describe(self) -> dict[str, float]:
        stats = dict(super().describe(), refreshes=float(self.refreshes), nonfinite=float(self.nonfinite))
        if self.refreshes > 0:
            stats['pivot'] = self.pivot
        return stats

    def summary(self) -> str:
        pivot = f' pivot {self.pivot:<7.4g}' if self.refreshes > 0 else ''
        return f'refreshes {self.refreshes:<4d}{pivot}'

    def state_dict(self) -> dict[str, Any]:
        return save_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; ValueError naming the field if the state does not fit this noise sampler
        (`infonoise.state.check_state`). States written before a field existed load with its default."""
        load_state(self, state)
