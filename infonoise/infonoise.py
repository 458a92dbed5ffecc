"""InfoNoise: the online, information-guided training noise sampler (paper Sec. 5, Algorithm 1, App. B and D).

Each observed (σ, ℓ) goes to the FIFO buffer of its log-grid interval. Every `refresh_kimg`, once warm-up is over
and every interval holds at least `min_count` losses (pooled over ranks), the per-interval buffer means update an
EMA of the loss (line 11), which gives the entropy-rate estimate r̂ = mse/σ³ (Eq. 11); a pivot c is calibrated
from r̂ (Sec. 4), the low-noise gate g_{c,n} applied (Eq. 17), optionally smoothed, divided by the loss weight
(Eq. 16) and turned into a continuous inverse-CDF table. Until the first refresh σ comes from the base sampler.

Two additions to a bare reading of Algorithm 1, both documented in the README: durations are in images (kimg),
like the rest of the pipeline; and a `floor` of weight ε. During warm-up σ comes from (1 − ε)·base + ε·log-uniform,
so that every interval gets losses (a log-normal base practically never reaches σ > 30). After a refresh the
floor acts on the emphasis: φ = (1 − ε)·ρ + ε·(log-uniform), π = φ/w, so the table can never collapse onto a few
intervals while the realised emphasis stays within ε of the target ρ.

Per-step work (`sample`, `observe`) is device-side tensor code without host synchronisation; the only syncs
(and the cross-rank all-reduce of per-bin sums and counts) happen at refresh checks.
"""

import warnings
from typing import Any

import torch

import dnnlib
from infonoise import pivot as pivots
from infonoise.profile import LogGrid, Profile, build_profile
from infonoise.samplers import LogUniform, NoiseSampler, ln_sigma_strata
from infonoise.table import InverseCDFTable
from training.loss import WEIGHTS

BASE_SAMPLERS = {
    'lognormal': dict(class_name='infonoise.samplers.LogNormal', P_mean=-1.2, P_std=1.2),
    'loguniform': dict(class_name='infonoise.samplers.LogUniform'),
}


class InfoNoise(NoiseSampler):
    """Samples σ in proportion to the gated entropy-rate profile divided by the loss weight."""

    def __init__(
        self,
        weight: str = 'edm',  # Loss weight w(σ) that π divides out (Eq. 16): a training.loss.WEIGHTS name.
        sigma_data: float = 0.5,  # σ_data of the EDM weight.
        sigma_min: float = 0.002,  # Lower end of the estimation grid and of π.
        sigma_max: float = 80.0,  # Upper end.
        num_bins: int = 64,  # K log-spaced intervals.
        buffer_size: int = 256,  # B: FIFO capacity per interval.
        ema_rate: float = 0.25,  # β: weight of the new buffer mean in the loss EMA (Alg. 1 line 11).
        refresh_kimg: float = 50.0,  # M: refresh period, in thousands of images.
        warmup_kimg: float = 1000.0,  # N_warm: images drawn from the base sampler before the first refresh.
        min_count: int = 16,  # N_min: losses every interval must hold (over all ranks) before a refresh.
        gate_n: float = 3.0,  # n of the gate g_{c,n} (Eq. 17).
        onset_p: float = 0.002,  # p of the onset-of-information pivot (Eq. 18).
        smoothing: float = 1.0,  # Width (in bins) of the peak-preserving smoothing of the gated rate, 0 = off.
        endpoint: str = 'continuous',  # 'continuous' (onset pivot) or 'discrete' (power-law pivot).
        pivot: float | None = None,  # Fixed pivot c instead of calibrating it at every refresh.
        base: str = 'lognormal',  # Base sampler during warm-up: 'lognormal' (EDM) or 'loguniform'.
        floor: float = 0.05,  # Weight ε of the log-uniform floor (warm-up draws; emphasis after refreshes).
    ):
        if weight not in WEIGHTS:
            raise ValueError(f'Unknown loss weight "{weight}"; choose from {", ".join(WEIGHTS)}')
        if endpoint not in ('continuous', 'discrete'):
            raise ValueError(f'endpoint must be "continuous" or "discrete", got "{endpoint}"')
        if base not in BASE_SAMPLERS:
            raise ValueError(f'Unknown base sampler "{base}"; choose from {", ".join(BASE_SAMPLERS)}')
        if num_bins < 2 or buffer_size < 1 or min_count < 1 or not 0 < ema_rate <= 1 or not 0 <= floor <= 1:
            raise ValueError('Need num_bins >= 2, buffer_size >= 1, min_count >= 1, 0 < ema_rate <= 1, 0 <= floor <= 1')
        if refresh_kimg <= 0 or warmup_kimg < 0 or (pivot is not None and pivot <= 0):
            raise ValueError('Need refresh_kimg > 0, warmup_kimg >= 0 and a positive pivot')
        self.weight_name, self.sigma_data = weight, float(sigma_data)
        self.grid = LogGrid.make(num_bins, sigma_min, sigma_max)
        self.buffer_size, self.ema_rate, self.min_count = int(buffer_size), float(ema_rate), int(min_count)
        self.refresh_nimg, self.warmup_nimg = refresh_kimg * 1000, warmup_kimg * 1000
        self.gate_n, self.onset_p, self.smoothing = float(gate_n), float(onset_p), float(smoothing)
        self.endpoint, self.fixed_pivot, self.floor = endpoint, pivot, float(floor)
        kwargs = dict(BASE_SAMPLERS[base])
        if base == 'loguniform':
            kwargs.update(sigma_min=sigma_min, sigma_max=sigma_max)
        self.base = dnnlib.util.construct_class_by_name(**kwargs)
        self.floor_sampler = LogUniform(sigma_min, sigma_max)
        self.device = torch.device('cpu')
        self._reset()

    def _reset(self) -> None:
        K, B = self.grid.num_bins, self.buffer_size
        self.buffer = torch.zeros(K, B + 1, dtype=torch.float32)  # Column B collects discarded writes.
        self.ptr = torch.zeros(K, dtype=torch.int64)  # Next write position per interval.
        self.count = torch.zeros(K, dtype=torch.int64)  # n_k = min(pushed, B).
        self.nonfinite = torch.zeros((), dtype=torch.int64)  # Ignored non-finite losses.
        self.mse = torch.zeros(K, dtype=torch.float64)  # EMA of the per-interval mean loss.
        self.table: InverseCDFTable | None = None
        self.last_profile: Profile | None = None
        self.nimg = 0  # Images observed, all ranks together.
        self.next_check_nimg = self.refresh_nimg  # Next refresh check.
        self.refreshes = 0
        self.pivot = float('nan')

    def _to(self, device: torch.device | str) -> None:
        device = torch.device(device)
        if device != self.device:
            self.device = device
            for name in ('buffer', 'ptr', 'count', 'nonfinite'):
                setattr(self, name, getattr(self, name).to(device))
            self.table = self.table.to(device) if self.table is not None else None

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return WEIGHTS[self.weight_name](sigma, self.sigma_data)

    # Sampling: the table after the first refresh; before it, the base mixed with the log-uniform floor.
    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        return self.table.icdf(u) if self.table is not None else self.base.icdf(u)

    def sample(self, n: int, device: torch.device | str = 'cpu') -> torch.Tensor:
        self._to(device)
        u = torch.rand(n, device=device, dtype=torch.float64).clamp_(min=2.0**-40)
        if self.table is not None:
            return self.icdf(u).to(torch.float32)
        use_floor = torch.rand(n, device=device) < self.floor
        return torch.where(use_floor, self.floor_sampler.icdf(u), self.icdf(u)).to(torch.float32)

    # Alg. 1 line 8: push each loss into its interval's FIFO buffer, evicting the oldest.
    def observe(self, sigma: torch.Tensor, mse: torch.Tensor) -> None:
        self._to(sigma.device)
        B, K = self.buffer_size, self.grid.num_bins
        sigma, mse = sigma.detach().flatten(), mse.detach().flatten().to(torch.float32)
        finite = torch.isfinite(mse) & torch.isfinite(sigma)
        self.nonfinite += (~finite).sum()
        bins = self.grid.bin_index(torch.where(finite, sigma, 1.0))
        onehot = torch.nn.functional.one_hot(bins, K) * finite[:, None]
        rank = ((onehot.cumsum(0) - onehot) * onehot).sum(1)  # Earlier same-interval losses in this batch.
        new = onehot.sum(0)
        keep = finite & (rank >= new[bins] - B)  # Only the newest B of a batch can survive.
        col = torch.where(keep, (self.ptr[bins] + rank) % B, B)
        self.buffer.index_put_((bins, col), torch.where(finite, mse, 0.0))
        self.ptr = (self.ptr + new) % B
        self.count = torch.minimum(self.count + new, torch.full_like(self.count, B))

        # Refresh check (Alg. 1 line 9); the image count is known on the host, so no sync is needed to decide.
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.nimg += sigma.numel() * world
        if self.nimg >= self.next_check_nimg:
            self.next_check_nimg = (self.nimg // self.refresh_nimg + 1) * self.refresh_nimg
            if self.nimg > self.warmup_nimg:
                self.refresh()

    def _pooled_buffer_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-interval loss sums and counts over all ranks (float64, CPU)."""
        valid = torch.arange(self.buffer_size, device=self.device)[None, :] < self.count[:, None]
        stats = torch.stack([(self.buffer[:, : self.buffer_size].double() * valid).sum(1), self.count.double()])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(stats)
        return stats[0].cpu(), stats[1].cpu()

    def refresh(self) -> bool:
        """Alg. 1 lines 10–16; returns whether the table was rebuilt."""
        sums, counts = self._pooled_buffer_stats()
        if counts.min() < self.min_count:
            return False
        self.mse = (1 - self.ema_rate) * self.mse + self.ema_rate * (sums / counts)
        sigma, widths = self.grid.centers, self.grid.widths
        try:
            profile = build_profile(
                self.grid, self.mse.clone(), self.calibrate_pivot, self.loss_weight(sigma), self.gate_n,
                self.smoothing, self.floor, refreshes=self.refreshes + 1,
            )  # fmt: skip
            table = InverseCDFTable.build(sigma, widths, profile.phi / profile.weight)  # π ∝ φ/w (Eq. 16).
        except ValueError as e:
            warnings.warn(f'InfoNoise: degenerate profile ({e}); keeping the previous table', stacklevel=2)
            return False
        self.table, self.pivot = table.to(self.device), profile.pivot
        self.refreshes += 1
        self.last_profile = profile
        return True

    def calibrate_pivot(self, sigma: torch.Tensor, rate: torch.Tensor) -> float:
        """Sec. 4 / App. B.4: fixed c, onset-of-information (continuous), or power-law boundary (discrete)."""
        if self.fixed_pivot is not None:
            return float(self.fixed_pivot)
        if not torch.isfinite(rate).all() or not (rate > 0).any():
            raise ValueError('the entropy-rate estimate is not finite and positive')
        if self.endpoint == 'discrete':
            return pivots.discrete_pivot(sigma, rate)
        return pivots.onset_pivot(sigma, rate, self.onset_p)

    def profile(self) -> dict[str, Any] | None:
        return self.last_profile.to_dict() if self.last_profile is not None else None

    def ln_sigma_points(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.table is not None:
            return ln_sigma_strata(self.table.to('cpu').icdf)
        # Warm-up mixture: base strata weighted 1 − floor, log-uniform strata weighted floor.
        x_base, w_base = self.base.ln_sigma_points()
        x_floor, w_floor = self.floor_sampler.ln_sigma_points()
        return torch.cat([x_base, x_floor]), torch.cat([(1 - self.floor) * w_base, self.floor * w_floor])

    def describe(self) -> dict[str, float]:
        stats = dict(super().describe(), refreshes=float(self.refreshes), nonfinite=float(self.nonfinite))
        if self.refreshes > 0:
            stats['pivot'] = self.pivot
        return stats

    def state_dict(self) -> dict[str, Any]:
        return dict(
            buffer=self.buffer.cpu(), ptr=self.ptr.cpu(), count=self.count.cpu(), nonfinite=self.nonfinite.cpu(),
            mse=self.mse.clone(), nimg=self.nimg, next_check_nimg=self.next_check_nimg, refreshes=self.refreshes,
            pivot=self.pivot, table=None if self.table is None else dict(sigma=self.table.sigma.cpu(), cdf=self.table.cdf.cpu()),
            profile=self.profile(),
        )  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        K, B = self.grid.num_bins, self.buffer_size
        if tuple(state['buffer'].shape) != (K, B + 1):
            raise ValueError(f'InfoNoise state has buffers {tuple(state["buffer"].shape)}, expected {(K, B + 1)}')
        self._reset()
        self.device = torch.device('cpu')
        self.buffer, self.ptr, self.count = state['buffer'].clone(), state['ptr'].clone(), state['count'].clone()
        self.nonfinite, self.mse = state['nonfinite'].clone(), state['mse'].clone()
        self.nimg, self.next_check_nimg = state['nimg'], state['next_check_nimg']
        self.refreshes, self.pivot = state['refreshes'], state['pivot']
        if state['table'] is not None:
            self.table = InverseCDFTable(sigma=state['table']['sigma'], cdf=state['table']['cdf'])
        self.last_profile = Profile.from_dict(state['profile']) if state['profile'] is not None else None
