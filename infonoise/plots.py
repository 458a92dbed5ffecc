"""Three-panel figure of an InfoNoise profile: the two panels of the paper's Figures 3 and 13, and the estimate itself.

Left, "from rate to allocation" (Sec. 3.1): the entropy-rate estimate r̂ = mse/σ³ (Eq. 11), the gated and smoothed
rate r̃ (Eq. 17), the target density ρ (Eq. 13) and, on a twin axis, its CDF u, entropic time (Eq. 14); the
dashed line is the pivot c of the gate (Sec. 4). Right, "realising ρ under the loss weight" (Sec. 3.2): the
sampling density π ∝ ρ/w (Eq. 16) and the realised emphasis φ = π·w, beside EDM's log-normal training density
(Karras et al. 2022) and the emphasis it gives under the same weight w. Third, what the pivot rules see: r̂ on
log-log axes with a band of ±2 standard errors of each bin's estimate, and the losses behind each bin.

The σ-axis is logarithmic, so every curve is drawn per unit ln σ (σ times the density over σ; for the rates
σ·r̂ = dH/d ln σ): equal areas then mean equal mass. All densities are renormalised over σ on the grid with the
trapezoid rule so that they are comparable. The figure is rendered on matplotlib's Agg canvas without pyplot, so
no display is needed and importing this module leaves an interactive session's backend alone.
"""

import math
import os
import secrets

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from infonoise.profile import Profile

_FIELDS = ('sigma', 'mse', 'rate', 'gated', 'rho', 'u', 'pi', 'phi', 'weight')


def _checked_arrays(profile: Profile) -> dict[str, np.ndarray]:
    """The profile's tensors as float64 arrays, refusing anything that would draw a misleading figure."""
    arrays = {name: torch.as_tensor(getattr(profile, name)).detach().double().cpu().numpy() for name in _FIELDS}
    num_points = arrays['sigma'].shape
    for name, values in arrays.items():
        if values.ndim != 1 or values.shape != num_points or values.size < 2:
            raise ValueError(f'Profile field "{name}" has shape {values.shape}; expected [K] with K >= 2 like sigma')
        if not np.isfinite(values).all():
            raise ValueError(f'Profile field "{name}" has non-finite values; cannot plot it')
    if not math.isfinite(profile.pivot):
        raise ValueError(f'Profile pivot c = {profile.pivot} is not finite; cannot plot it')
    if not (arrays['sigma'] > 0).all() or not (np.diff(arrays['sigma']) > 0).all():
        raise ValueError('Profile sigma must be positive and increasing')
    if not (arrays['weight'] > 0).all():
        raise ValueError('Profile loss weight must be positive on the grid')
    return arrays


def _per_ln_sigma(density: np.ndarray, sigma: np.ndarray, name: str = 'density') -> np.ndarray:
    """σ·p(σ) for p the density normalised to unit trapezoid integral over the σ-grid."""
    total = float(np.sum((density[1:] + density[:-1]) * np.diff(sigma)) / 2)
    if not total > 0:
        raise ValueError(f'Profile {name} has no positive mass on the grid; cannot normalise it')
    return sigma * density / total


def _max_normalised(values: np.ndarray, name: str) -> np.ndarray:
    peak = float(values.max())
    if not peak > 0:
        raise ValueError(f'Profile {name} has no positive value; cannot normalise it by its peak')
    return values / peak


def _curves(profile: Profile, P_mean: float, P_std: float) -> dict[str, np.ndarray]:
    """Everything the figure draws, on the σ-grid; computed before drawing so that bad input fails early."""
    a = _checked_arrays(profile)
    sigma = a['sigma']
    pi_edm = np.exp(-0.5 * ((np.log(sigma) - P_mean) / P_std) ** 2) / sigma  # N(ln σ; P_mean, P_std)/σ, unscaled.
    return dict(
        sigma=sigma,
        rate=_max_normalised(sigma * a['rate'], 'rate'),
        gated=_max_normalised(sigma * a['gated'], 'gated rate'),
        rho=_per_ln_sigma(a['rho'], sigma, 'rho'),
        u=a['u'],
        pi=_per_ln_sigma(a['pi'], sigma, 'pi'),
        phi=_per_ln_sigma(a['phi'], sigma, 'phi'),
        pi_edm=_per_ln_sigma(pi_edm, sigma, 'EDM log-normal'),
        phi_edm=_per_ln_sigma(pi_edm * a['weight'], sigma, 'EDM emphasis'),
    )


def save_profile_plot(
    profile: Profile, path: str, title: str | None = None, P_mean: float = -1.2, P_std: float = 1.2
) -> None:
    """Write the two-panel profile figure to `path` as a PNG; EDM's log-normal uses P_mean and P_std."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f'Cannot write {path}: directory {directory} does not exist')
    if not P_std > 0:
        raise ValueError(f'P_std must be positive, got {P_std}')
    k = _curves(profile, P_mean, P_std)
    sigma, c = k['sigma'], profile.pivot
    fig = Figure(figsize=(17, 5.4), layout='constrained')
    FigureCanvasAgg(fig)
    left, right, estimate = fig.subplots(1, 3)
    rule = f' ({profile.pivot_rule})' if profile.pivot_rule else ''
    refreshes = f'{profile.refreshes} refresh{"" if profile.refreshes == 1 else "es"}'
    heading = f'InfoNoise profile after {refreshes}, pivot c = {c:.3g}{rule}'
    fig.suptitle(heading if title is None else f'{title}: {heading}')

    # Left: rates share a max-normalised scale; ρ is a true density; u lives on [0, 1] on a twin axis.
    left.plot(sigma, k['rate'], color='0.5', ls='--', label=r'rate $\hat r$ (max = 1)')
    left.plot(sigma, k['gated'], color='C0', label=r'gated rate $\tilde r$ (max = 1)')
    left.fill_between(sigma, k['rho'], color='C1', alpha=0.3, lw=0)
    left.plot(sigma, k['rho'], color='C1', lw=2, label=r'target density $\rho$')
    left.set_ylim(bottom=0)
    left.set_ylabel(r'per unit $\ln\sigma$ (rates: $\sigma\cdot$rate, max-normalised)')
    left.set_title('From rate to allocation')
    twin = left.twinx()
    twin.plot(sigma, k['u'], color='C2', lw=1.5, label=r'entropic time $u$ (CDF of $\rho$)')
    twin.set_ylim(0, 1.05)
    twin.set_ylabel(r'$u(\sigma)$')

    # Right: InfoNoise beside EDM's log-normal, both under the profile's loss weight.
    right.plot(sigma, k['pi'], color='C0', lw=2, label=r'InfoNoise sampling $\pi$')
    right.plot(sigma, k['phi'], color='C1', lw=2, label=r'InfoNoise emphasis $\phi = \pi w$')
    right.plot(sigma, k['pi_edm'], color='C0', ls=':', label=r'EDM log-normal $\pi_{EDM}$')
    right.plot(sigma, k['phi_edm'], color='C1', ls=':', label=r'EDM emphasis $\pi_{EDM} w$')
    right.set_ylim(bottom=0)
    right.set_ylabel(r'density per unit $\ln\sigma$ ($\sigma\cdot$density)')
    right.set_title(r'Realising $\rho$ under the loss weight $w$')

    _draw_estimate(estimate, profile)

    for ax in (left, right, estimate):
        ax.set_xscale('log')
        ax.set_xlim(sigma[0], sigma[-1])
        ax.set_xlabel(r'noise level $\sigma$')
        ax.axvline(c, color='k', ls='--', lw=1, label=f'pivot c = {c:.3g}')
        ax.grid(alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    twin_handles, twin_labels = twin.get_legend_handles_labels()
    # Legends go below the panels, where no profile shape can hide under them.
    below = dict(loc='upper center', bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize='small', frameon=False)
    left.legend(handles + twin_handles, labels + twin_labels, **below)
    right.legend(**below)
    estimate.legend(**dict(below, ncol=2))
    _save_atomic(fig, path)


def _draw_estimate(ax, profile: Profile) -> None:
    """r̂ on log-log axes with ±2 standard errors where known, and the losses per bin on a twin axis."""
    sigma = profile.sigma.numpy()
    rate = profile.rate.numpy()
    rel = (profile.stderr / profile.mse).numpy()
    positive = rate > 0
    ax.plot(
        sigma[positive], rate[positive], color='C3', marker='o', ms=2.5, lw=1, label=r'rate $\hat r$ = mse/$\sigma^3$'
    )
    known = positive & np.isfinite(rel)
    if known.any():
        low = rate[known] * np.clip(1 - 2 * rel[known], 1e-3, None)
        ax.fill_between(sigma[known], low, rate[known] * (1 + 2 * rel[known]), color='C3', alpha=0.25, lw=0,
                        label='±2 standard errors')  # fmt: skip
    ax.set_yscale('log')
    ax.set_ylabel(r'$\hat r$ (log scale)')
    ax.set_title('The estimate the pivot is read from')
    count = profile.count.numpy()
    if np.isfinite(count).any():
        twin = ax.twinx()
        twin.step(sigma, count, where='mid', color='0.4', lw=1)
        twin.set_ylim(bottom=0)
        twin.set_ylabel('losses per bin (grey)')


def _save_atomic(fig: Figure, path: str) -> None:
    """Render to a temporary file beside `path`, then rename: `path` never holds a partial PNG."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(directory, f'.{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp')
    try:
        with open(tmp_path, 'xb') as f:  # Created with the usual umask permissions, unlike mkstemp's 0600.
            fig.savefig(f, format='png', dpi=100)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
