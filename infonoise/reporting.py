"""What InfoNoise says about itself: each refresh check as a `RefreshCheck`, and before training a
`schedule_report` of whether and when InfoNoise can adapt in a run (InfoNoise paper, Algorithm 1, line 9).

The checks go to `InfoNoise.callback` (the training loop records them in stats.jsonl, and prints them with
--verbose); the report is `InfoNoise.schedule_report`.
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from infonoise.profile import LogGrid


@dataclass(frozen=True)
class RefreshCheck:
    """One refresh check (Alg. 1 line 9): whether the table was rebuilt, and with what or why not."""

    nimg: int  # Images seen at the check, all ranks together.
    step: int  # Calls of `observe` (optimiser steps) at the check.
    refreshed: bool
    refreshes: int  # Refreshes so far, this one included.
    reason: str = ''  # Why a check was skipped.
    pivot: float = math.nan  # The gate pivot c in use after the check.
    raw_pivot: float = math.nan  # c as calibrated at this check, before debouncing.
    pivot_rule: str = ''
    peak: float = math.nan  # σ at the peak of ρ per unit ln σ.
    ln_sigma_quantiles: tuple[float, ...] = ()  # 10/50/90 % quantiles of ln σ under the new table.
    since_nimg: int | None = None  # Images since the last refresh; None before the first.
    since_seconds: float | None = None  # Wall time since the last refresh, if this process saw it.

    def __str__(self) -> str:
        since = ''  # Before the first refresh there is nothing to count from.
        if self.since_nimg is not None:
            seconds = '' if self.since_seconds is None else f' ({self.since_seconds:.0f} s)'
            since = f'; {self.since_nimg / 1e3:g} kimg{seconds} since the last refresh'
        if not self.refreshed:
            return f'InfoNoise check at {self.nimg / 1e3:g} kimg (step {self.step}) skipped: {self.reason}{since}'
        q = '/'.join(f'{v:.2f}' for v in self.ln_sigma_quantiles)
        return (
            f'InfoNoise refresh {self.refreshes} at {self.nimg / 1e3:g} kimg (step {self.step}): pivot c = {self.pivot:.4g} '
            f'({self.pivot_rule}; this refresh {self.raw_pivot:.4g}), ρ peaks at σ = {self.peak:.3g}, '
            f'ln σ q10/q50/q90 = {q}{since}'
        )


def shortest_interval(grid: 'LogGrid', counts: torch.Tensor, min_count: int) -> str:
    """Why a refresh must wait: the interval of `grid` with the fewest losses `counts` [K], against N_min."""
    k = int(counts.argmin())
    lo, hi = float(grid.edges[k]), float(grid.edges[k + 1])
    short = int((counts < min_count).sum())
    return (
        f'interval {k + 1} of {grid.num_bins} (σ {lo:.3g}-{hi:.3g}) holds {int(counts[k])} of N_min = '
        f'{min_count} losses ({short} interval{"s" if short > 1 else ""} short)'
    )


def schedule_report(noise: Any, total_nimg: int, batch_size: int) -> list[str]:
    """Before training: how the InfoNoise `noise` will adapt in a run of `total_nimg` images at `batch_size` per step
    (all ranks together), and warnings (lines starting 'Warning:') when it cannot: the warm-up outlasts the run,
    the intervals are not expected to collect N_min losses in time, or the refresh period is shorter than a step.

    During the warm-up interval k receives a share p_k of the draws: (1 - ε) times the base noise sampler's
    probability of the interval plus ε times its share of ln σ (the floor). Counts pool over ranks and never
    drop, so the first refresh can happen once every interval holds N_min losses: after n images with
    probability Π_k P(Poisson(n·p_k) >= N_min), which we solve for 1/2 (the median wait; never if N_min
    exceeds the buffers' capacity B × ranks).
    """
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    scale = batch_size if noise.in_steps else 1  # Images per unit of the durations.
    refresh_nimg, warmup_nimg = noise.refresh_every * scale, noise.warmup * scale
    x, w = noise.base.ln_sigma_points()
    log_edges = noise.grid.edges.log()
    base = torch.bincount(noise.grid.bin_index(x.exp()), weights=w, minlength=noise.grid.num_bins)
    share = (1 - noise.floor) * base + noise.floor * (log_edges[1:] - log_edges[:-1]) / (log_edges[-1] - log_edges[0])
    rarest = int(share.argmin())
    # P(Poisson(λ) >= N) is the regularised lower incomplete gamma function P(N, λ).
    all_full = lambda n: float(torch.special.gammainc(torch.tensor(float(noise.min_count)), n * share).prod())  # noqa: E731
    need = math.inf
    if noise.min_count <= noise.buffer_size * world:
        lo, hi = 1.0, 1e15  # Bisect in log n for the median.
        for _ in range(100):
            mid = math.sqrt(lo * hi)
            lo, hi = (lo, mid) if all_full(mid) >= 0.5 else (mid, hi)
        need = hi
    first = max(warmup_nimg, need)  # The first check at or after it can refresh.
    first = math.ceil(first / refresh_nimg) * refresh_nimg if math.isfinite(first) else math.inf
    kimg = lambda n: f'{n / 1e3:.4g} kimg'  # noqa: E731
    lo_edge, hi_edge = float(noise.grid.edges[rarest]), float(noise.grid.edges[rarest + 1])
    rule = (
        'fixed' if noise.fixed_pivot is not None else 'onset' if noise.endpoint == 'continuous' else 'power-law break'
    )
    lines = [
        f'InfoNoise: {noise.grid.num_bins} intervals on [{float(noise.grid.edges[0]):g}, '
        f'{float(noise.grid.edges[-1]):g}], warm-up {kimg(warmup_nimg)} under {noise.base_name} '
        f'(+{noise.floor:.0%} log-uniform), then a refresh check every {kimg(refresh_nimg)}; pivot: {rule}',
        f'InfoNoise: the rarest interval (σ {lo_edge:.3g}-{hi_edge:.3g}) gets {float(share[rarest]):.3%} of the '
        f'warm-up draws, {float(share[rarest]) * refresh_nimg:.1f} per refresh period; N_min = '
        f'{noise.min_count} losses in every interval take '
        + (f'≈{kimg(need)} (median)' if math.isfinite(need) else f'forever (B × ranks = {noise.buffer_size * world} < N_min)'),
    ]  # fmt: skip
    last_check = total_nimg // refresh_nimg * refresh_nimg  # The last check within the run.
    chance = all_full(last_check) if math.isfinite(need) else 0.0
    if warmup_nimg >= last_check:
        lines.append(
            f'Warning: InfoNoise will not adapt: its warm-up ({kimg(warmup_nimg)}) lasts until the last '
            f'refresh check of the run ({kimg(last_check)} of {kimg(total_nimg)}), so every σ comes from the '
            f'{noise.base_name} base sampler'
        )
    elif chance < 0.9:
        lines.append(
            f'Warning: InfoNoise may not adapt: the chance that every interval holds N_min = {noise.min_count} '
            f'losses by the last refresh check ({kimg(last_check)}) is {chance:.0%}; lower N_min or the number '
            'of intervals, or lengthen the run'
        )
    else:
        lines.append(f'InfoNoise: first refresh expected at {kimg(first)} of {kimg(total_nimg)}')
    if refresh_nimg < batch_size:
        lines.append(
            f'Warning: the InfoNoise refresh period ({refresh_nimg:g} images) is shorter than one step '
            f'({batch_size} images): it checks once per step instead'
        )
    return lines
