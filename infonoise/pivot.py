"""Calibrating the gate pivot c from the current entropy-rate profile (InfoNoise paper, Sec. 4 and App. B.4).

The pivot c of the low-noise gate g_{c,n} (Eq. 17) is set at every refresh from the ungated rate r̂_k on the
log-grid, by a rule that depends on the endpoint type of the data:

- continuous endpoints, the onset of information (Eq. 18, `onset_pivot`): scanning from high to low noise, the
  first σ where the normalised rate r̂/r_ref rises to p = 0.002. The paper normalises by max r̂, which for
  continuous data sits at the grid's lowest bin (r ∝ 1/σ there, Eq. 48), so c would move with an arbitrary grid
  bound. We normalise by r_ref, the rate at a fixed σ_ref = 0.004·σ_data (EDM's σ_min = 0.002 for σ_data = 0.5):
  the largest r̂ of the bin holding σ_ref and the bins above it, extended by the 1/σ law down to σ_ref when the
  grid starts above it (`reference_rate`). On EDM's grid [0.002, 80] with σ_data = 0.5 that is max r̂: the paper's
  rule, exactly.
- discrete endpoints, the upper end of the low-noise power law (App. B.4, `powerlaw_break`): log r̂ is nearly
  linear in log σ next to σ_min, with a slope that may drift slowly, and then turns up into a mid-noise bump or a
  flatter shoulder, where information arrives faster than the power law predicts. At every gap t of the grid a
  continuous two-line ("hinge") fit to the points within W = 0.5 decades of t measures the local slope change D(t)
  (`slope_changes`). Scanning up from σ_min, the power law ends at the first run of gaps with D >= 0.5 below
  10·σ_data (beyond, the rate is the σ⁻³ tail); c is the hinge position of the best fit around that run's largest
  D. A slope that drifts by s per decade gives D ≈ s·W,
  so drifts below about 0.75 per decade stay below the threshold, while a rise of 1 or more is found. A steepening
  (D < 0, the rate falling faster than the power law, as into the σ⁻³ tail) is not the start of the informative
  window and does not end the power law. Where no rise exists there is no boundary to find: if the rate per unit
  ln σ reaches half its maximum at low noise (one power law at least as steep as 1/σ over the whole grid, say), c
  falls back to the onset rule, and if it does not (the exact profile of a two-point source, whose rate rises
  from 0), there is nothing to gate and c is σ_ref (`calibrate`).

Both rules are invariant to the grid: c stays within one grid interval when σ_min, σ_max or the number of bins
change, and scales with the data (mmse_k(σ) = k²·mmse_1(σ/k) with σ_data -> k·σ_data gives c -> k·c), as
`bench/pivot_study.py` and the tests check on synthetic and learned profiles. InfoNoise then takes the median
of the last few calibrated values (`debounce`), so that c does not jump with the noise of one refresh.
Why these constants, measured on synthetic profiles with known breaks: docs/pivot-rules.md and
`python -m bench.pivot_study`.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

# A tabulated profile: [K] values as a tensor, an array or a list (float64 internally).
ArrayLike = torch.Tensor | np.ndarray | list[float]

# σ_ref of the onset rule relative to σ_data: EDM's σ_min = 0.002 at EDM's σ_data = 0.5.
SIGMA_REF_PER_SIGMA_DATA = 0.004
# Half-width, in decades of σ, of the local two-line fits that measure slope changes.
BREAK_WINDOW = 0.5
# Rise D of the local slope that ends the low-noise power law.
BREAK_MIN_CHANGE = 0.5
# No break above this many σ_data: there the mmse is within a few percent of the data's variance (the σ⁻³ tail).
BREAK_MAX_SIGMA_DATA = 10.0
# Floor on the relative standard error of a bin's rate in the fit weights.
STDERR_FLOOR = 0.02
# Refreshes whose calibrated pivots are pooled by their median.
DEBOUNCE = 5


@dataclass(frozen=True)
class Pivot:
    """A calibrated pivot c and the rule that gave it: 'onset', 'break', 'onset, no break', 'reference, no break'
    (`calibrate`) or 'fixed' (InfoNoise's `pivot`)."""

    value: float
    rule: str


def _profile_arrays(sigma, rate) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 numpy copies of a profile: increasing positive σ, finite non-negative rate, max > 0."""
    s = torch.as_tensor(sigma).detach().to('cpu', torch.float64).numpy()
    r = torch.as_tensor(rate).detach().to('cpu', torch.float64).numpy()
    if s.ndim != 1 or s.shape != r.shape or s.size < 2:
        raise ValueError(f'Need matching 1-D sigma and rate with >= 2 points, got {s.shape} and {r.shape}')
    if not (np.all(s > 0) and np.all(np.diff(s) > 0)):
        raise ValueError('sigma must be positive and strictly increasing')
    if not (np.all(np.isfinite(r)) and np.all(r >= 0) and r.max() > 0):
        raise ValueError('rate must be finite and non-negative with a positive maximum')
    return s, r


def _log_edges(s: np.ndarray) -> tuple[float, np.ndarray]:
    """Lower edge and upper edges (log σ) of the bins of log-spaced centres: the geometric midpoints."""
    log_s = np.log(s)
    upper = np.append(0.5 * (log_s[1:] + log_s[:-1]), 1.5 * log_s[-1] - 0.5 * log_s[-2])
    return 1.5 * log_s[0] - 0.5 * log_s[1], upper


def reference_rate(sigma: ArrayLike, rate: ArrayLike, sigma_ref: float) -> float:
    """r_ref of the onset rule: the largest r̂ of the bin that holds σ_ref and of every bin above it; if the grid
    starts above σ_ref, also the lowest bin's r̂ carried down to σ_ref by the 1/σ law of continuous endpoints
    (Eq. 48), r̂_1·σ_min/σ_ref. Bin edges are the geometric midpoints of the (log-spaced) centres σ_k."""
    s, r = _profile_arrays(sigma, rate)
    if not sigma_ref > 0:
        raise ValueError(f'sigma_ref must be positive, got {sigma_ref}')
    lower_edge, upper = _log_edges(s)
    tol = 1e-9  # Edges rebuilt from centres are exact up to rounding.
    ref = float(r[upper > math.log(sigma_ref) + tol].max(initial=0.0))
    if lower_edge > math.log(sigma_ref) + tol:
        ref = max(ref, float(r[0]) * math.exp(lower_edge) / sigma_ref)
    return ref


def onset_pivot(sigma: ArrayLike, rate: ArrayLike, p: float = 0.002, sigma_ref: float | None = None) -> float:
    """Onset-of-information pivot (Eq. 18): c = inf{σ : r̂(σ')/r_ref < p for all σ' >= σ}.

    r_ref is `reference_rate(sigma, rate, sigma_ref)`, or max r̂ (the paper's normalisation) for sigma_ref=None.
    Eq. 18 writes sup, but the set of σ above which the normalised rate stays below p is an up-set, so its
    supremum would always be σ_max; the rule the paper describes ("scanning from high to low noise, ... the
    first persistent crossing") is its infimum. On the grid we walk down from the top while r̂_k/r_ref < p and
    return the last σ_k still below p. The walk stops at the first value >= p, even an isolated one. If the top
    grid value is already >= p, it is c; if no grid value reaches p, c is the lowest one.
    """
    if not 0 < p < 1:
        raise ValueError(f'The onset threshold p must be in (0, 1), got {p}')
    s, r = _profile_arrays(sigma, rate)
    ref = r.max() if sigma_ref is None else reference_rate(s, r, sigma_ref)
    above = np.flatnonzero(r >= p * ref)
    return float(s[0] if above.size == 0 else s[min(above[-1] + 1, s.size - 1)])


def _hinge_fits(x, y, weights, hinges) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares of y ≈ a + b(x - t) + d·max(x - t, 0), one fit per hinge t of `hinges` [G] with its
    own weights [G, K] (0 outside its window): the slope changes d and the weighted RSS, both [G]."""
    z = x[None, :] - hinges[:, None]
    design = np.stack([np.ones_like(z), z, np.maximum(z, 0)], axis=-1)  # [G, K, 3]
    weighted = design * weights[..., None]
    normal = np.einsum('gki,gkj->gij', weighted, design)
    coef = np.einsum('gij,gj->gi', np.linalg.pinv(normal), np.einsum('gki,k->gi', weighted, y))
    residual = y[None, :] - np.einsum('gki,gi->gk', design, coef)
    return coef[:, 2], (weights * residual**2).sum(1)


def _log_profile(sigma, rate, rel_err) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log σ, log r̂, weights) of the bins with a positive rate; weights 1/(e² + floor²) with e the relative
    standard error of the bin's estimate (0 where unknown or not given)."""
    s, r = _profile_arrays(sigma, rate)
    e = np.zeros_like(r)
    if rel_err is not None:
        e = torch.as_tensor(rel_err).detach().to('cpu', torch.float64).numpy()
        if e.shape != r.shape:
            raise ValueError(f'rel_err has shape {e.shape}, expected {r.shape}')
        e = np.where(np.isfinite(e), e, 0.0)
    keep = r > 0
    return np.log(s[keep]), np.log(r[keep]), 1 / (e[keep] ** 2 + STDERR_FLOOR**2)


def slope_changes(
    sigma: ArrayLike, rate: ArrayLike, rel_err: ArrayLike | None = None, window: float = BREAK_WINDOW
) -> tuple[np.ndarray, np.ndarray]:
    """The local slope change D(t) of log r̂ against log σ at the gaps t between grid points (returned as σ).

    At each gap, a continuous two-line fit with its hinge at t to the points within `window` decades of t
    (weighted by the bins' standard errors) gives D = slope above t - slope below t. Gaps whose window holds
    fewer than two points or less than half the window on either side of t get NaN. `rel_err` is the relative
    standard error of each bin's estimate (the same for its mse and its rate), None for the floor alone.
    """
    x, y, w = _log_profile(sigma, rate, rel_err)
    half = window * math.log(10)
    gaps = 0.5 * (x[1:] + x[:-1])
    near = np.abs(x[None, :] - gaps[:, None]) <= half  # [G, K]
    below, above = (near & (x[None, :] < gaps[:, None])).sum(1), (near & (x[None, :] > gaps[:, None])).sum(1)
    valid = (below >= 2) & (above >= 2) & (np.minimum(gaps - x[0], x[-1] - gaps) >= half / 2)
    changes = np.full(gaps.shape, np.nan)
    if valid.any():
        changes[valid] = _hinge_fits(x, y, near[valid] * w[None, :], gaps[valid])[0]
    return np.exp(gaps), changes


def powerlaw_break(
    sigma: ArrayLike,
    rate: ArrayLike,
    rel_err: ArrayLike | None = None,
    window: float = BREAK_WINDOW,
    min_change: float = BREAK_MIN_CHANGE,
    sigma_data: float = 0.5,
) -> float | None:
    """Upper end of the low-noise power law (App. B.4): where its slope first rises by `min_change` or more within
    `window` decades, scanning up from σ_min; None if it never does. See the module docstring.

    Rises above 10·σ_data do not count: there mmse(σ) is within a few percent of the data's variance (for a
    Gaussian dimension of variance λ, mmse = λσ²/(λ + σ²)), the rate is the σ⁻³ tail, and no window starts; an
    early, poorly fitted network can bend the estimate there either way.
    """
    gaps, changes = slope_changes(sigma, rate, rel_err, window)
    rises = (np.nan_to_num(changes, nan=-np.inf) >= min_change) & (gaps <= BREAK_MAX_SIGMA_DATA * sigma_data)
    if not rises.any():
        return None
    # The first run of gaps where the slope rises, and its largest rise.
    first = last = int(np.argmax(rises))
    while last + 1 < rises.size and rises[last + 1]:
        last += 1
    peak = first + int(np.argmax(changes[first : last + 1]))
    # Refine: the hinge position that fits the points around the peak best, within one grid step of it.
    x, y, w = _log_profile(sigma, rate, rel_err)
    t0, step = math.log(gaps[peak]), float(np.median(np.diff(x)))
    near = np.abs(x - t0) <= window * math.log(10)
    candidates = np.linspace(t0 - step, t0 + step, 41)
    rss = _hinge_fits(x, y, np.broadcast_to(near * w, (candidates.size, x.size)), candidates)[1]
    return float(math.exp(candidates[int(np.argmin(rss))]))


def concentrates_at_low_noise(
    sigma: ArrayLike, rate: ArrayLike, sigma_ref: float, window: float = BREAK_WINDOW
) -> bool:
    """Whether the rate per unit ln σ, r̂·σ (Eq. 28), reaches half its maximum within `window` decades of the low
    end of the profile (σ_ref, or the grid's lower edge if it starts above σ_ref): the boundary concentration the
    gate is for (App. B.1). It does for the 1/σ law of continuous data (r̂·σ flat) and steeper power laws; it does
    not where the rate rises from 0 at low noise, as for a finite set of points. Bins below σ_ref do not count."""
    s, r = _profile_arrays(sigma, rate)
    lower_edge, upper = _log_edges(s)
    per_efold = np.where(upper > math.log(sigma_ref), r * s, 0.0)
    low = max(math.log(sigma_ref), lower_edge) + window * math.log(10)
    return bool(per_efold[np.log(s) <= low].max(initial=0.0) >= 0.5 * per_efold.max())


def calibrate(
    sigma: ArrayLike,
    rate: ArrayLike,
    endpoint: str,
    rel_err: ArrayLike | None = None,
    p: float = 0.002,
    sigma_data: float = 0.5,
) -> Pivot:
    """The pivot for the endpoint type of data with scale `sigma_data` (σ_ref = 0.004·σ_data anchors the onset rule):

    - continuous endpoints: the onset of information ('onset');
    - discrete endpoints: the power-law break ('break'). Without one, the onset rule if the profile concentrates at
      low noise ('onset, no break'), as a power law at least as steep as 1/σ does; otherwise there is nothing to
      gate and c is σ_ref ('reference, no break'), as for the exact profile of two points, whose rate rises from 0.
    """
    if not sigma_data > 0:
        raise ValueError(f'sigma_data must be positive, got {sigma_data}')
    sigma_ref = SIGMA_REF_PER_SIGMA_DATA * sigma_data
    if endpoint == 'continuous':
        return Pivot(onset_pivot(sigma, rate, p, sigma_ref), 'onset')
    if endpoint != 'discrete':
        raise ValueError(f'endpoint must be "continuous" or "discrete", got "{endpoint}"')
    c = powerlaw_break(sigma, rate, rel_err, sigma_data=sigma_data)
    if c is not None:
        return Pivot(c, 'break')
    if concentrates_at_low_noise(sigma, rate, sigma_ref):
        return Pivot(onset_pivot(sigma, rate, p, sigma_ref), 'onset, no break')
    return Pivot(float(sigma_ref), 'reference, no break')


def debounce(values: list[float]) -> float:
    """Median of the last `DEBOUNCE` pivots (for an even count, the geometric mean of the middle two)."""
    recent = sorted(values[-DEBOUNCE:])
    if not recent or not all(0 < v < math.inf for v in recent):
        raise ValueError(f'Need positive finite pivots, got {values}')
    middle = len(recent) // 2
    return recent[middle] if len(recent) % 2 else math.sqrt(recent[middle - 1] * recent[middle])


def is_discrete(pixels: np.ndarray) -> bool:
    """Whether uint8 data has discrete (binary) endpoints: only the extreme values 0 and 255, or a single value."""
    if pixels.dtype != np.uint8:
        raise ValueError(f'Endpoint detection expects uint8 pixels, got {pixels.dtype}')
    if pixels.size == 0:
        raise ValueError('Endpoint detection needs at least one pixel')
    present = np.flatnonzero(np.bincount(pixels.reshape(-1), minlength=256))
    return present.size == 1 or set(present.tolist()) <= {0, 255}
