"""The entropy-rate profile on InfoNoise's log-grid (InfoNoise paper, Secs. 2.2-3 and Algorithm 1).

InfoNoise estimates the conditional-entropy rate r(σ) = mmse(σ)/σ³ (Eq. 11) from training losses binned on K
log-spaced intervals, gates its low-noise tail (Eq. 17), normalises it into a target emphasis ρ (Eq. 13) with
CDF u (Eq. 14), and samples σ from π ∝ ρ/w (Eq. 16). This module holds the grid, those formulas as short pure
functions, and the `Profile` record that a refresh produces. All tabulated quantities are float64.
"""

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, eq=False)
class LogGrid:
    """K log-spaced intervals I_k = [e_k, e_{k+1}) over [sigma_min, sigma_max] (Algorithm 1's grid)."""

    edges: torch.Tensor
    # Interior edges per device, so that binning on an accelerator copies them there only once.
    _inner: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        if self.edges.ndim != 1 or self.edges.numel() < 2:
            raise ValueError(f'LogGrid needs at least two edges, got shape {tuple(self.edges.shape)}')

    @classmethod
    def make(cls, num_bins: int, sigma_min: float, sigma_max: float) -> 'LogGrid':
        if num_bins < 1:
            raise ValueError(f'num_bins must be at least 1, got {num_bins}')
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f'Need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}')
        log_edges = torch.linspace(math.log(sigma_min), math.log(sigma_max), num_bins + 1, dtype=torch.float64)
        edges = log_edges.exp()
        # Pin the ends exactly so that sigma_min and sigma_max are grid values.
        edges[0], edges[-1] = sigma_min, sigma_max
        return cls(edges)

    @property
    def num_bins(self) -> int:
        return self.edges.numel() - 1

    @property
    def centers(self) -> torch.Tensor:
        """Geometric midpoints σ_k = sqrt(e_k e_{k+1}): the midpoints in log σ."""
        return (self.edges[:-1] * self.edges[1:]).sqrt()

    @property
    def widths(self) -> torch.Tensor:
        """Interval lengths Δσ_k = e_{k+1} - e_k (BuildSampler's quadrature weights)."""
        return self.edges[1:] - self.edges[:-1]

    def bin_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """Bin k of each σ (int64, on σ's device); values outside [sigma_min, sigma_max] go to the end bins.

        Comparing σ with the edges is binning in log σ (log is monotone) without the rounding of a log, so a σ
        equal to an edge e_k lands in bin k exactly.
        """
        inner = self._inner.get(sigma.device)
        if inner is None:
            inner = self._inner[sigma.device] = self.edges[1:-1].to(sigma.device)
        # With right=True, bucketize counts the interior edges <= σ: that count is the bin of [e_k, e_{k+1}).
        return torch.bucketize(sigma.to(torch.float64), inner, right=True)


def entropy_rate(mse: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Conditional-entropy rate r = dH[x0|xσ]/dσ = mmse/σ³ (Eq. 11, the I-MMSE identity)."""
    return mse / sigma**3


def gate(sigma: torch.Tensor, c: float, n: float = 3) -> torch.Tensor:
    """Low-noise gate g_{c,n}(σ) = σⁿ/(σⁿ + cⁿ) (Eq. 17); the paper uses n = 3 (n >= 2 vanishes at σ -> 0).

    Written as sigmoid(n log(σ/c)), which equals Eq. 17 and neither overflows nor loses the (σ/c)ⁿ tail.
    """
    if not c > 0:
        raise ValueError(f'The gate pivot c must be positive, got {c}')
    if not n > 0:
        raise ValueError(f'The gate exponent n must be positive, got {n}')
    return torch.sigmoid(n * (torch.log(sigma) - math.log(c)))


def smooth_log(values: torch.Tensor, width: float) -> torch.Tensor:
    """Light Gaussian smoothing across neighbouring log-grid points that keeps the peak in place (Sec. 5).

    The kernel has a standard deviation of `width` grid points, is cut at 3 widths (at most K - 1 points) and
    reflects at the ends. If smoothing would move the argmax, the result is blended back toward the raw values
    with the smallest weight that restores it, so argmax(smoothed) == argmax(values) always.
    """
    if width < 0:
        raise ValueError(f'Smoothing width must be non-negative, got {width}')
    num = values.numel()
    if width == 0 or num < 2:
        return values
    radius = min(math.ceil(3 * width), num - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=values.dtype, device=values.device)
    kernel = torch.exp(-0.5 * (offsets / width) ** 2)
    kernel = kernel / kernel.sum()
    padded = torch.nn.functional.pad(values.reshape(1, 1, num), (radius, radius), mode='reflect')
    smoothed = torch.nn.functional.conv1d(padded, kernel.reshape(1, 1, -1)).reshape(num)

    peak = int(values.argmax())
    if int(smoothed.argmax()) == peak:
        return smoothed
    # (1-t)·smoothed + t·values keeps the peak above bin j once t > d_j/(d_j + e_j); ties go to the first index.
    d = smoothed - smoothed[peak]
    e = values[peak] - values
    index = torch.arange(num, device=values.device)
    binding = (d > 0) | ((d == 0) & (index < peak))
    t = (d[binding] / (d[binding] + e[binding])).max().item()
    t = min(1.0, t + 1e-3 * (1 - t))
    blended = (1 - t) * smoothed + t * values
    return blended if int(blended.argmax()) == peak else values


def normalize_density(q: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """q / Σ_k q_k Δσ_k: tabulated values as a density over σ (BuildSampler, Sec. 5)."""
    if q.shape != widths.shape:
        raise ValueError(f'Density values {tuple(q.shape)} and widths {tuple(widths.shape)} differ in shape')
    if not bool(torch.isfinite(q).all()) or bool((q < 0).any()):
        raise ValueError('Density values must be finite and non-negative')
    total = float((q * widths).sum())
    if not (total > 0 and math.isfinite(total)):
        raise ValueError(f'Density has no positive finite mass (Σ q Δσ = {total})')
    return q / total


def cumulative(density: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """CDF at the points: trapezoidal integral of the density over σ from points[0], scaled to end at 1 (Eq. 14)."""
    if density.shape != points.shape or points.ndim != 1 or points.numel() < 2:
        raise ValueError(f'Need matching 1-D density and points with >= 2 entries, got {tuple(density.shape)}')
    steps = 0.5 * (density[1:] + density[:-1]) * (points[1:] - points[:-1])
    cdf = torch.cat([torch.zeros(1, dtype=steps.dtype, device=steps.device), steps.cumsum(0)])
    total = float(cdf[-1])
    if not (total > 0 and math.isfinite(total)):
        raise ValueError(f'Density integrates to {total} over the points; need a positive finite mass')
    return cdf / total


_PROFILE_TENSORS = ('sigma', 'mse', 'rate', 'gated', 'rho', 'u', 'pi', 'phi', 'weight', 'count', 'stderr')
# Fields that older profile files lack: they load as NaN (unknown).
_OPTIONAL_TENSORS = ('count', 'stderr')


@dataclass(frozen=True, eq=False)
class Profile:
    """What InfoNoise knows at a refresh (all [K] float64 CPU tensors, aligned with LogGrid.centers)."""

    sigma: torch.Tensor  # σ_k
    mse: torch.Tensor  # EMA per-bin loss (Alg. 1 line 11)
    rate: torch.Tensor  # r̂_k = mse_k/σ_k³ (Alg. 1 line 12)
    gated: torch.Tensor  # r̃_k = r̂_k·g(σ_k), after optional smoothing (Alg. 1 line 14)
    rho: torch.Tensor  # target emphasis ρ_k: r̃ normalised over σ (Eq. 13)
    u: torch.Tensor  # CDF of ρ at σ_k (Eq. 14)
    pi: torch.Tensor  # sampling density π_k ∝ ρ_k/w(σ_k), normalised over σ (Eq. 16)
    phi: torch.Tensor  # realised emphasis φ_k = π_k·w(σ_k), normalised over σ (Eq. 7)
    weight: torch.Tensor  # loss weight w(σ_k)
    count: torch.Tensor  # losses behind each bin's estimate (NaN where unknown)
    stderr: torch.Tensor  # standard error of each bin's loss estimate (relative error × mse; NaN where unknown)
    pivot: float  # gate pivot c
    refreshes: int
    raw_pivot: float = math.nan  # c as calibrated at this refresh, before debouncing (Sec. 4)
    pivot_rule: str = ''  # infonoise.pivot.Pivot's rule: 'onset', 'break', ..., 'fixed'
    nimg: int | None = None  # Training images seen at the refresh that built it; None offline and in older files.
    sigma_min: float = math.nan  # The trained σ range (the estimation grid's ends); NaN where unknown.
    sigma_max: float = math.nan

    def sigma_range(self) -> tuple[float, float]:
        """The σ range the profile was trained on; where unknown (older or hand-made files), its first and last σ."""
        if math.isfinite(self.sigma_min) and math.isfinite(self.sigma_max):
            return self.sigma_min, self.sigma_max
        return float(self.sigma[0]), float(self.sigma[-1])

    def __post_init__(self):
        shape = self.sigma.shape
        if len(shape) != 1:
            raise ValueError(f'Profile tensors must be 1-D, got sigma of shape {tuple(shape)}')
        for name in _PROFILE_TENSORS:
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f'Profile.{name} has shape {tuple(getattr(self, name).shape)}, expected {tuple(shape)}'
                )

    def to_dict(self) -> dict:
        """Plain lists and numbers, loadable with torch.load(weights_only=True); unknown values are None."""
        d = {name: [None if math.isnan(v) else v for v in getattr(self, name).tolist()] for name in _PROFILE_TENSORS}
        d.update(pivot=float(self.pivot), refreshes=int(self.refreshes), pivot_rule=self.pivot_rule)
        d.update(raw_pivot=None if math.isnan(self.raw_pivot) else float(self.raw_pivot))
        d.update(nimg=None if self.nimg is None else int(self.nimg))
        d.update(
            {k: None if math.isnan(getattr(self, k)) else float(getattr(self, k)) for k in ('sigma_min', 'sigma_max')}
        )
        return d

    @classmethod
    def from_dict(cls, d: dict, partial: bool = False) -> 'Profile':
        """The profile `to_dict` wrote (fields older files lack load as NaN). With `partial`, a record of just a
        "sigma" list and a "rate" or "mse" list (a hand-made profile, enough for InfoGrid) loads too: the missing
        one of rate and mse follows from r = mse/σ³ (Eq. 11), everything else is unknown (NaN). ValueError else."""
        if not isinstance(d, dict):
            raise ValueError(f'a profile must be a dict of lists, got {type(d).__name__}')
        required = ('sigma',) if partial else (*_PROFILE_TENSORS, 'pivot', 'refreshes')
        missing = [k for k in required if k not in d and k not in _OPTIONAL_TENSORS]
        if missing or ('rate' not in d and 'mse' not in d):
            raise ValueError(f'Profile data lacks {", ".join(missing or ["rate (or mse)"])}')
        try:
            num = len(d['sigma'])
            tensors = {
                name: torch.tensor(
                    [math.nan if v is None else v for v in d.get(name, [None] * num)], dtype=torch.float64
                )
                for name in _PROFILE_TENSORS
            }
            pivot, refreshes = float(d.get('pivot', math.nan)), int(d.get('refreshes', 0))
            raw, nimg = d.get('raw_pivot'), d.get('nimg')
            raw, nimg = math.nan if raw is None else float(raw), None if nimg is None else int(nimg)
            ends = [math.nan if d.get(k) is None else float(d[k]) for k in ('sigma_min', 'sigma_max')]
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise ValueError('Profile values must be lists of numbers (null where unknown) and numbers') from None
        if 'rate' not in d:
            tensors['rate'] = entropy_rate(tensors['mse'], tensors['sigma'])
        elif 'mse' not in d:
            tensors['mse'] = tensors['rate'] * tensors['sigma'] ** 3
        return cls(
            **tensors,
            pivot=pivot,
            refreshes=refreshes,
            raw_pivot=raw,
            pivot_rule=str(d.get('pivot_rule', '')),
            nimg=nimg,
            sigma_min=ends[0],
            sigma_max=ends[1],
        )

    @classmethod
    def load(cls, path: str) -> 'Profile':
        """The profile in a file: JSON (as training's profile-*.json and diagnose.py write it, or a hand-made
        "sigma" with "rate" or "mse", see `from_dict`) or a torch file (torch.load(weights_only=True)) holding one
        under 'profile', such as our network snapshot, or our training state under 'noise_sampler'. OSError if the
        file cannot be read, ValueError (one line, naming the file) if it holds no profile."""
        with open(path, 'rb') as f:
            content = f.read(2)
            is_torch = content == b'PK'  # torch.save writes a zip archive, read by torch.load below.
            content += b'' if is_torch else f.read()
        try:
            data: Any = torch.load(path, map_location='cpu', weights_only=True) if is_torch else json.loads(content)
        except RecursionError:  # json.loads of a deeply nested file.
            raise ValueError(f'"{path}" nests JSON too deeply to read') from None
        except Exception:
            raise ValueError(f'"{path}" is neither JSON nor a torch file that loads with weights_only=True') from None
        if isinstance(data, dict) and isinstance(data.get('noise_sampler'), dict) and 'profile' not in data:
            data = data['noise_sampler']  # A training state.
        if isinstance(data, dict) and 'profile' in data and 'sigma' not in data:
            if data['profile'] is None:
                raise ValueError(
                    f'"{path}" holds no profile: not trained with InfoNoise, or saved before its first refresh'
                )
            data = data['profile']
        if not isinstance(data, dict) or 'sigma' not in data or not ('rate' in data or 'mse' in data):
            raise ValueError(f'"{path}" holds no profile (a "sigma" list and a "rate" or "mse" list)')
        try:
            return cls.from_dict(data, partial=True)
        except ValueError as e:
            raise ValueError(f'"{path}": {e}') from None

    def peak(self) -> float:
        """σ at the maximum of the target density per unit ln σ, σ·ρ (where the target emphasis puts most mass)."""
        return float(self.sigma[(self.sigma * self.rho).argmax()])


def build_profile(
    grid: LogGrid,
    mse: torch.Tensor,
    pivot: float,
    weight: torch.Tensor,
    gate_n: float = 3,
    smoothing: float = 1.0,
    floor: float = 0.05,
    refreshes: int = 1,
    count: torch.Tensor | None = None,
    stderr: torch.Tensor | None = None,
    raw_pivot: float = math.nan,
    pivot_rule: str = '',
    nimg: int | None = None,
    sigma_range: tuple[float, float] | None = None,
) -> Profile:
    """Alg. 1 lines 12-16 from per-interval losses `mse` on `grid`: the rate r̂ = mse/σ³, the gated rate with pivot
    c = `pivot` and smoothing, ρ (Eq. 13) and its CDF u, the emphasis φ = (1 - floor) ρ + floor · (log-uniform),
    and π ∝ φ/w (Eq. 16) for the loss weights `weight` at the centres. `count` and `stderr` (per bin, NaN where
    unknown), `raw_pivot`, `pivot_rule`, `nimg` (training images seen) and `sigma_range` (the grid ends) are recorded.

    Raises ValueError for a degenerate profile (e.g. no positive mass after gating).
    """
    sigma, widths = grid.centers, grid.widths
    unknown = torch.full_like(sigma, math.nan)
    rate = entropy_rate(mse, sigma)
    gated = smooth_log(rate * gate(sigma, pivot, gate_n), smoothing)
    rho = normalize_density(gated, widths)
    phi = (1 - floor) * rho + floor * normalize_density(1 / sigma, widths)
    return Profile(
        sigma=sigma,
        mse=mse,
        rate=rate,
        gated=gated,
        rho=rho,
        u=cumulative(rho, sigma),
        pi=normalize_density(phi / weight, widths),
        phi=phi,
        weight=weight,
        count=unknown if count is None else torch.as_tensor(count, dtype=torch.float64),
        stderr=unknown if stderr is None else torch.as_tensor(stderr, dtype=torch.float64),
        pivot=float(pivot),
        refreshes=refreshes,
        raw_pivot=raw_pivot,
        pivot_rule=pivot_rule,
        nimg=nimg,
        sigma_min=math.nan if sigma_range is None else sigma_range[0],
        sigma_max=math.nan if sigma_range is None else sigma_range[1],
    )
