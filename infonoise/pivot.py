"""Calibrating the gate pivot c from the current entropy-rate profile (InfoNoise paper, Sec. 4 and App. B.4).

The pivot c of the low-noise gate g_{c,n} (Eq. 17) is set at every refresh from the ungated profile r̂_k on the
log-grid, by a rule that depends on the endpoint type of the data:

- continuous endpoints: the onset of information (Eq. 18), where the peak-normalised rate first rises to p when
  scanning from high to low noise (`onset_pivot`);
- discrete endpoints: the upper end of the low-noise power-law segment, where log r is linear in log σ (Eq. 49,
  `powerlaw_pivot`), with a log-log knee detector as the fallback (`knee_pivot`).

`is_discrete` decides the endpoint type from the data. Every rule returns a grid value σ_k.
"""

import math

import numpy as np
import torch


def _profile_arrays(sigma: torch.Tensor, rate: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
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


def onset_pivot(sigma: torch.Tensor, rate: torch.Tensor, p: float = 0.002) -> float:
    """Onset-of-information pivot (Eq. 18): c = inf{σ : r̄(σ') < p for all σ' >= σ}, r̄ = rate/max(rate).

    Eq. 18 writes sup, but the set of σ above which r̄ stays below p is an up-set, so its supremum would always
    be σ_max; the rule the paper describes ("scanning from high to low noise, ... the first persistent
    crossing") is its infimum. On the grid we walk down from the top while r̄_k < p and return the last σ_k
    still below p: the smallest grid value with r̄ < p at it and at every grid value above it. The walk stops
    at the first value >= p, even an isolated one. If r̄ >= p already at the top grid value, that value is c.
    """
    if not 0 < p < 1:
        raise ValueError(f'The onset threshold p must be in (0, 1), got {p}')
    s, r = _profile_arrays(sigma, rate)
    above = np.flatnonzero(r / r.max() >= p)
    # The peak has r̄ = 1 >= p, so `above` is never empty.
    return float(s[min(above[-1] + 1, s.size - 1)])


def powerlaw_pivot(sigma: torch.Tensor, rate: torch.Tensor, tol: float = 0.1, min_decades: float = 0.5) -> float | None:
    """Upper end of the maximal stable log-log power-law segment adjacent to σ_min (App. B.4, Eq. 49).

    The segment is σ_1..σ_m grown one grid point at a time from the low-noise end. It is stable while a
    least-squares line through (log σ_k, log r_k) over the segment leaves every residual within `tol` in log r
    (0.1 ≈ 10%, several times the few-percent scatter of per-bin loss estimates), i.e. the slope s = d log r /
    d log σ stays constant. Growth stops at the first point that breaks this or has r = 0; c is the last σ_m
    kept. Returns None when no stable segment spans at least `min_decades` decades of σ and four points.
    A profile that is one power law over the whole grid returns its top value.
    """
    if not tol > 0 or not min_decades > 0:
        raise ValueError(f'tol and min_decades must be positive, got {tol} and {min_decades}')
    s, r = _profile_arrays(sigma, rate)
    usable = int(np.argmin(r > 0)) if np.any(r <= 0) else s.size
    if usable < 4:
        return None
    x = np.log(s[:usable])
    y = np.log(r[:usable])
    long_enough = np.flatnonzero(x - x[0] >= min_decades * math.log(10) * (1 - 1e-9))
    if long_enough.size == 0:
        return None
    first = max(4, int(long_enough[0]) + 1)
    kept = None
    for m in range(first, usable + 1):
        slope, intercept = np.polyfit(x[:m], y[:m], 1)
        if np.abs(y[:m] - (slope * x[:m] + intercept)).max() > tol:
            break
        kept = m
    return None if kept is None else float(s[kept - 1])


def knee_pivot(sigma: torch.Tensor, rate: torch.Tensor) -> float:
    """Knee of the low-noise side of the profile in log-log coordinates (App. B.4's fallback, "Kneedle" style).

    The low-noise side runs from σ_1 to the peak of r·σ = mmse/σ², the rate per unit log-SNR (Eq. 28), which
    stays flat along the σ⁻¹ tails of both endpoint types and so peaks at the informative window, not at σ_min.
    (If that peak sits in the first two grid points, the whole grid is used.) The knee is the grid point
    farthest from the chord joining the two ends of that side in (log σ, log r) - where the curve bends most
    away from a straight line. This distance is a vertical one; it picks the same point as the perpendicular
    distance after rescaling both axes, so the knee does not depend on the units of σ or r. Grid points with
    r = 0 (an exact denoiser of discrete data, say) have no log-log position and are skipped.
    """
    s, r = _profile_arrays(sigma, rate)
    s, r = s[r > 0], r[r > 0]
    if s.size < 3:
        raise ValueError('The knee detector needs a positive rate at three grid points or more')
    end = int(np.argmax(r * s))
    if end < 2:
        end = s.size - 1
    x = np.log(s[: end + 1])
    y = np.log(r[: end + 1])
    chord = y[0] + (y[-1] - y[0]) * (x - x[0]) / (x[-1] - x[0])
    return float(s[int(np.argmax(np.abs(y - chord)))])


def discrete_pivot(sigma: torch.Tensor, rate: torch.Tensor) -> float:
    """Pivot for discrete endpoints (App. B.4): the power-law boundary, else the log-log knee."""
    c = powerlaw_pivot(sigma, rate)
    return knee_pivot(sigma, rate) if c is None else c


def is_discrete(pixels: np.ndarray) -> bool:
    """Whether uint8 data has discrete (binary) endpoints: only the extreme values 0 and 255, or a single value."""
    if pixels.dtype != np.uint8:
        raise ValueError(f'Endpoint detection expects uint8 pixels, got {pixels.dtype}')
    if pixels.size == 0:
        raise ValueError('Endpoint detection needs at least one pixel')
    present = np.flatnonzero(np.bincount(pixels.reshape(-1), minlength=256))
    return present.size == 1 or set(present.tolist()) <= {0, 255}
