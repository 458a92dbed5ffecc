"""Three-panel figure of an InfoNoise profile: the two panels of the paper's Figures 3 and 13, and the estimate itself.

Left, "from rate to allocation" (Sec. 3.1): the entropy-rate estimate r̂ = mse/σ³ (Eq. 11), the gated and smoothed
rate r̃ (Eq. 17), the target density ρ (Eq. 13) and, on a twin axis, its CDF u, entropic time (Eq. 14); the
dashed line is the pivot c of the gate (Sec. 4). Right, "realising ρ under the loss weight" (Sec. 3.2): the
sampling density π ∝ ρ/w (Eq. 16) and the realised emphasis φ = π·w, beside EDM's log-normal training density
(Karras et al. 2022) and the emphasis it gives under the same weight w. Third, what the pivot rules see: r̂ on
log-log axes with a band of ±2 standard errors of each bin's estimate, and the losses behind each bin.

The heading says which profile it is, "Training profile at X kimg after N refreshes" (the default, from the
profile's own record) or the caller's title such as "Offline profile (SOURCE)", and the pivot; it is wrapped to
the figure's width. `save_denoising_figure` draws diagnose.py's grid of noisy and denoised images with σ labels.

The σ-axis is logarithmic, so every curve is drawn per unit ln σ (σ times the density over σ; for the rates
σ·r̂ = dH/d ln σ): equal areas then mean equal mass. All densities are renormalised over σ on the grid with the
trapezoid rule so that they are comparable. The figure is rendered on matplotlib's Agg canvas without pyplot, so
no display is needed and importing this module leaves an interactive session's backend alone.
"""

import math
import os
import secrets
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties

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


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """'1 refresh', '2 refreshes': the count with its noun in the right number."""
    return f'{count} {noun if count == 1 else plural_form or noun + "s"}'


def training_title(profile: Profile) -> str:
    """'Training profile at X kimg after N refreshes' (the kimg where the profile records it)."""
    at = '' if profile.nimg is None else f' at {profile.nimg / 1e3:g} kimg'
    return f'Training profile{at} after {plural(profile.refreshes, "refresh", "refreshes")}'


def _wrap(text: str, limit: float, font: FontProperties, renderer) -> str:
    """`text` broken at spaces (or, for one long word, anywhere) into lines at most `limit` pixels wide."""

    def width(line: str) -> float:
        return renderer.get_text_width_height_descent(line, font, ismath=False)[0]

    lines = []
    for paragraph in text.split('\n'):
        line = ''
        for word in paragraph.split(' '):
            candidate = f'{line} {word}' if line else word
            if width(candidate) <= limit:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = word
            while width(line) > limit and len(line) > 1:  # A path or other long word: cut where it overflows.
                cut = len(line) - 1
                while cut > 1 and width(line[:cut]) > limit:
                    cut -= 1
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return '\n'.join(lines)


def save_profile_plot(
    profile: Profile, path: str, title: str | None = None, P_mean: float = -1.2, P_std: float = 1.2
) -> None:
    """Write the three-panel profile figure to `path` as a PNG; EDM's log-normal uses P_mean and P_std.

    `title` says which profile this is (e.g. 'Offline profile (net.pt)'); by default `training_title`.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f'Cannot write {path}: directory {directory} does not exist')
    _save_atomic(profile_figure(profile, title, P_mean, P_std), path)


def profile_figure(profile: Profile, title: str | None = None, P_mean: float = -1.2, P_std: float = 1.2) -> Figure:
    """The figure `save_profile_plot` writes (1700 x 540 pixels at its 100 dpi)."""
    if not P_std > 0:
        raise ValueError(f'P_std must be positive, got {P_std}')
    k = _curves(profile, P_mean, P_std)
    sigma, c = k['sigma'], profile.pivot
    fig = Figure(figsize=(17, 5.4), dpi=100, layout='constrained')
    renderer = FigureCanvasAgg(fig).get_renderer()
    left, right, estimate = fig.subplots(1, 3)
    rule = f' (rule: {profile.pivot_rule})' if profile.pivot_rule else ''
    details = f'pivot c = {c:.3g}{rule}, {plural(len(sigma), "noise level")}'
    font = FontProperties(size=13)
    heading = _wrap(training_title(profile) if title is None else title, 0.95 * fig.bbox.width, font, renderer)
    fig.suptitle(f'{heading}\n{details}', fontproperties=font)

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
    return fig


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
        # The band can be too thin to see, so its legend entry gives the typical size.
        label = f'±2 standard errors (median ±{200 * float(np.median(rel[known])):.2g} %)'
        low = rate[known] * np.clip(1 - 2 * rel[known], 1e-3, None)
        ax.fill_between(sigma[known], low, rate[known] * (1 + 2 * rel[known]), color='C3', alpha=0.25, lw=0,
                        label=label)  # fmt: skip
    ax.set_yscale('log')
    ax.set_ylabel(r'$\hat r$ (log scale)')
    ax.set_title('The estimate the pivot is read from')
    count = profile.count.numpy()
    counted = count[np.isfinite(count)]
    if counted.size and (counted == counted[0]).all():
        # The same number everywhere (an offline profile's samples per σ): a flat strip would say nothing more.
        ax.plot([], [], ' ', label=f'{counted[0]:g} losses at every σ')
    elif counted.size:
        twin = ax.twinx()
        twin.step(sigma, count, where='mid', color='0.4', lw=1)
        twin.set_ylim(bottom=0)
        twin.set_ylabel('losses per bin')
        ax.plot([], [], color='0.4', lw=1, label='losses per bin (right axis)')


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


def save_denoising_figure(
    grid: np.ndarray, sigmas: Sequence[float], row_labels: Sequence[str], pad: int, path: str, title: str
) -> tuple[int, int]:
    """Write `denoising_figure` to `path` as a PNG; returns the grid's top-left pixel (x, y) in it."""
    fig, corner = denoising_figure(grid, sigmas, row_labels, pad, title)
    _save_atomic(fig, path)
    return corner


def denoising_figure(
    grid: np.ndarray, sigmas: Sequence[float], row_labels: Sequence[str], pad: int, title: str
) -> tuple[Figure, tuple[int, int]]:
    """The tiled image `grid` (uint8 HWC, one column per σ in `sigmas`, one row per label, `pad` pixels between
    cells and around them, as `training.sampling.tile_images` makes it) with a title, the σ of each column above
    it and the row labels on the left; and the grid's top-left pixel (x, y) in the figure.

    The grid is copied into the figure pixel for pixel (matplotlib's figimage, no resampling) at 100 dpi; only
    the margins are drawn, sized from the labels' measured extents so that no text is cut off.
    """
    height, width, channels = grid.shape
    if grid.dtype != np.uint8 or channels not in (1, 3):
        raise ValueError(f'Need a uint8 image [H, W, 1 or 3], got {grid.dtype} {tuple(grid.shape)}')
    cols, rows = len(sigmas), len(row_labels)
    cell_w, cell_h = (width - pad) / max(cols, 1) - pad, (height - pad) / max(rows, 1) - pad
    if cols < 1 or rows < 1 or cell_w < 1 or cell_h < 1 or cell_w % 1 or cell_h % 1:
        raise ValueError(f'A {width}x{height} grid with pad {pad} does not hold {cols} columns and {rows} rows')
    fig = Figure(dpi=100)
    renderer = FigureCanvasAgg(fig).get_renderer()

    def size(text: str, points: float) -> tuple[float, float]:
        w, h, _ = renderer.get_text_width_height_descent(text, FontProperties(size=points), ismath=False)
        return w, h

    # Margins in pixels: row labels on the left; title, axis label and σ labels above, with some air.
    left = round(max(size(label, 10)[0] for label in row_labels)) + 16
    top = round(size(title, 12)[1] + size('noise level σ', 10)[1] + size('0.1', 9)[1]) + 40
    fig_w, fig_h = max(left + width + 12, round(size(title, 12)[0]) + 24), top + height + 8
    fig.set_size_inches(fig_w / 100, fig_h / 100)
    fig.figimage(grid.repeat(3, axis=2) if channels == 1 else grid, xo=left, yo=8, origin='upper')

    # A transparent axes exactly over the grid, in its pixel coordinates, carries the tick labels.
    ax = fig.add_axes((left / fig_w, 8 / fig_h, width / fig_w, height / fig_h))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.patch.set_visible(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xticks([pad + (cell_w + pad) * j + cell_w / 2 for j in range(cols)], [f'{s:.4g}' for s in sigmas])
    ax.set_yticks([pad + (cell_h + pad) * i + cell_h / 2 for i in range(rows)], list(row_labels))
    ax.tick_params(length=0, labelsize=9, top=True, labeltop=True, bottom=False, labelbottom=False)
    ax.tick_params(axis='y', labelsize=10)
    ax.xaxis.set_label_position('top')
    ax.set_xlabel('noise level σ', fontsize=10)
    fig.text(0.5, 1 - 6 / fig_h, title, ha='center', va='top', fontsize=12)
    return fig, (left, top)
