"""Figures (infonoise.plots): a closed-form Gaussian-source profile renders to a complete PNG, atomically, with a
heading that says what it shows and fits; the denoising grid keeps its pixels and labels its columns with σ."""

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from infonoise.plots import (
    _per_ln_sigma,
    denoising_figure,
    profile_figure,
    save_denoising_figure,
    save_profile_plot,
    training_title,
)
from infonoise.profile import Profile


def trapezoid(values: torch.Tensor, sigma: torch.Tensor) -> float:
    return float(((values[1:] + values[:-1]) * sigma.diff()).sum() / 2)


def gaussian_profile(c: float = 0.05, sigma_data: float = 0.5) -> Profile:
    """Exact profile of x0 ~ N(0, diag λ), λ in [0.01, 1]: mmse(σ) = mean λσ²/(λ + σ²), gate n = 3, EDM weight."""
    sigma = torch.logspace(math.log10(0.002), math.log10(80), 64, dtype=torch.float64)
    lam = torch.linspace(0.01, 1, 16, dtype=torch.float64)
    mse = (lam * sigma[:, None] ** 2 / (lam + sigma[:, None] ** 2)).mean(1)
    rate = mse / sigma**3
    gated = rate * sigma**3 / (sigma**3 + c**3)
    rho = gated / trapezoid(gated, sigma)
    u = torch.cat([torch.zeros(1, dtype=torch.float64), ((rho[1:] + rho[:-1]) * sigma.diff() / 2).cumsum(0)])
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    pi = rho / weight / trapezoid(rho / weight, sigma)
    phi = pi * weight / trapezoid(pi * weight, sigma)
    count, stderr = torch.full_like(sigma, 256.0), 0.03 * mse  # As a refresh records them.
    return Profile(sigma=sigma, mse=mse, rate=rate, gated=gated, rho=rho, u=u, pi=pi, phi=phi, weight=weight,
                   count=count, stderr=stderr, pivot=c, refreshes=7, raw_pivot=c, pivot_rule='onset')  # fmt: skip


def test_gaussian_profile_renders_a_complete_png(tmp_path):
    path = tmp_path / 'profile.png'
    save_profile_plot(gaussian_profile(), str(path), title='Gaussian source')
    assert os.listdir(tmp_path) == ['profile.png']  # No temporary file is left behind.
    with Image.open(path) as image:
        assert image.format == 'PNG' and image.size == (1700, 540)
        pixels = np.asarray(image.convert('RGB'), dtype=np.float64)
    assert pixels.std() > 20  # Not blank.
    # The ρ / φ curves are drawn in matplotlib's C1 orange (255, 127, 14), the estimate in C3 red (214, 39, 40),
    # and its ±2 standard-error band in red at 25 % over white.
    assert np.all(np.abs(pixels - [255, 127, 14]) < 2, axis=-1).sum() > 500
    estimate = pixels[:, 1150:]
    assert np.all(np.abs(estimate - [214, 39, 40]) < 2, axis=-1).sum() > 300
    assert np.all(np.abs(estimate - [245, 201, 201]) < 3, axis=-1).sum() > 100


def test_profile_without_counts_and_errors_renders(tmp_path):
    # Profile files written before counts and standard errors existed hold NaN there: no band, no counts.
    profile = gaussian_profile()
    unknown = torch.full_like(profile.sigma, math.nan)
    path = tmp_path / 'old.png'
    save_profile_plot(dataclasses.replace(profile, count=unknown, stderr=unknown), str(path))
    with Image.open(path) as image:
        estimate = np.asarray(image.convert('RGB'), dtype=np.float64)[:, 1150:]
    assert np.all(np.abs(estimate - [214, 39, 40]) < 2, axis=-1).sum() > 300
    assert np.all(np.abs(estimate - [245, 201, 201]) < 3, axis=-1).sum() < 20


def test_replaces_an_existing_file_and_keeps_it_when_rendering_fails(tmp_path, monkeypatch):
    path = tmp_path / 'profile.png'
    path.write_bytes(b'old')
    save_profile_plot(gaussian_profile(), str(path))
    new_bytes = path.read_bytes()
    assert new_bytes.startswith(b'\x89PNG') and os.listdir(tmp_path) == ['profile.png']

    def broken_savefig(self, f, **kwargs):
        f.write(b'\x89PNG half')
        raise RuntimeError('disk full')

    monkeypatch.setattr(Figure, 'savefig', broken_savefig)
    with pytest.raises(RuntimeError, match='disk full'):
        save_profile_plot(gaussian_profile(), str(path))
    assert path.read_bytes() == new_bytes and os.listdir(tmp_path) == ['profile.png']


@pytest.mark.parametrize('field', ['rate', 'rho', 'weight'])
def test_non_finite_profile_is_refused_before_writing(tmp_path, field):
    profile = gaussian_profile()
    values = getattr(profile, field).clone()
    values[10] = math.nan
    path = tmp_path / 'profile.png'
    with pytest.raises(ValueError, match=f'"{field}" has non-finite values'):
        save_profile_plot(dataclasses.replace(profile, **{field: values}), str(path))
    assert os.listdir(tmp_path) == []


def test_invalid_inputs_raise_clear_errors(tmp_path):
    profile = gaussian_profile()
    with pytest.raises(ValueError, match='pivot c = nan is not finite'):
        save_profile_plot(dataclasses.replace(profile, pivot=math.nan), str(tmp_path / 'p.png'))
    with pytest.raises(ValueError, match='sigma must be positive and increasing'):
        save_profile_plot(dataclasses.replace(profile, sigma=profile.sigma.flip(0)), str(tmp_path / 'p.png'))
    with pytest.raises(ValueError, match='no positive mass'):
        save_profile_plot(dataclasses.replace(profile, pi=torch.zeros_like(profile.pi)), str(tmp_path / 'p.png'))
    with pytest.raises(ValueError, match='does not exist'):
        save_profile_plot(profile, str(tmp_path / 'missing' / 'p.png'))
    with pytest.raises(ValueError, match='P_std must be positive'):
        save_profile_plot(profile, str(tmp_path / 'p.png'), P_std=0)
    assert os.listdir(tmp_path) == []


def test_density_per_unit_ln_sigma_of_a_log_normal_is_the_normal_density():
    # σ·p(σ) for p = N(ln σ; μ, s)/σ is N(ln σ; μ, s), whatever the grid spacing in σ.
    mu, s = -1.2, 1.2
    sigma = np.exp(np.linspace(mu - 8 * s, mu + 8 * s, 4001))
    density = np.exp(-0.5 * ((np.log(sigma) - mu) / s) ** 2) / sigma
    normal = np.exp(-0.5 * ((np.log(sigma) - mu) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    np.testing.assert_allclose(_per_ln_sigma(density, sigma), normal, rtol=1e-4, atol=1e-12)


def inside_figure(fig: Figure) -> bool:
    """Whether everything drawn (titles, labels, legends) lies within the figure's canvas."""
    fig.canvas.draw()
    drawn, canvas = fig.get_tightbbox(fig.canvas.get_renderer()), fig.bbox_inches
    return drawn.x0 >= canvas.x0 and drawn.y0 >= canvas.y0 and drawn.x1 <= canvas.x1 and drawn.y1 <= canvas.y1


def test_training_title_says_kimg_and_refreshes_in_the_right_number():
    profile = gaussian_profile()
    assert (
        training_title(dataclasses.replace(profile, nimg=40_960)) == 'Training profile at 40.96 kimg after 7 refreshes'
    )
    assert (
        training_title(dataclasses.replace(profile, nimg=1000, refreshes=1))
        == 'Training profile at 1 kimg after 1 refresh'
    )
    assert training_title(profile) == 'Training profile after 7 refreshes'  # A file from before nimg was recorded.


LONG_PATH = (
    '/home/someone/training-runs/00012-mnist-32x32-uncond-ddpmpp-edm-infonoise-gpus8-batch512-fp32/' * 2
    + 'network-snapshot-020000.pt'
)


@pytest.mark.parametrize(
    'title, first_line',
    [
        (None, 'Training profile at 2.048 kimg after 7 refreshes'),
        ('Exact profile (empirical Bayes, 1 image)', 'Exact profile (empirical Bayes, 1 image)'),
        (f'Offline profile (network:{LONG_PATH})', 'Offline profile'),  # Too wide for one line: wrapped.
        ('Offline profile (' + 'x' * 300 + ')', 'Offline profile'),  # One word wider than the figure: cut.
    ],
)
def test_heading_says_what_the_figure_shows_and_fits(title, first_line):
    fig = profile_figure(dataclasses.replace(gaussian_profile(), nimg=2048), title)
    heading = fig.get_suptitle()
    assert heading.split('\n')[0] == first_line
    assert heading.split('\n')[-1] == 'pivot c = 0.05 (rule: onset), 64 noise levels'
    if title is not None:  # Wrapped, not shortened.
        assert ''.join(heading.rsplit('\n', 1)[0].split()) == ''.join(title.split())
    assert inside_figure(fig)


def test_estimate_legend_gives_counts_and_error_size():
    def legend(profile: Profile) -> list[str]:
        estimate = profile_figure(profile).axes[2]  # left, right, estimate, then the twin axes.
        assert estimate.get_title() == 'The estimate the pivot is read from'
        return [text.get_text() for text in estimate.get_legend().get_texts()]

    profile = gaussian_profile()  # 256 losses in every bin, standard errors 3 % of the mse.
    assert legend(profile)[1:3] == ['±2 standard errors (median ±6 %)', '256 losses at every σ']
    varying = dataclasses.replace(profile, count=torch.arange(64, dtype=torch.float64) + 1)
    assert 'losses per bin (right axis)' in legend(varying)
    fig = profile_figure(varying)
    assert fig.axes[-1].get_ylabel() == 'losses per bin' and fig.axes[-1].lines[0].get_ydata()[5] == 6
    unknown = torch.full_like(profile.sigma, math.nan)
    assert legend(dataclasses.replace(profile, count=unknown, stderr=unknown)) == [
        r'rate $\hat r$ = mse/$\sigma^3$',
        'pivot c = 0.05',
    ]


@pytest.mark.parametrize('channels', [1, 3])
def test_denoising_figure_keeps_the_grid_pixels_and_labels_sigma(tmp_path, channels):
    # Two rows of three 4x5 cells, pad 2: a 14x23 grid of random pixels.
    grid = np.random.default_rng(channels).integers(0, 256, [14, 23, channels], dtype=np.uint8)
    sigmas, rows = [0.001, 1, 1000], ['noisy', 'denoised']
    fig, _ = denoising_figure(grid, sigmas, rows, 2, 'A title wider than the grid')
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ['0.001', '1', '1000']
    assert ax.get_xlabel() == 'noise level σ' and [t.get_text() for t in ax.get_yticklabels()] == rows
    np.testing.assert_allclose(ax.get_xticks(), [2 + 2.5, 2 + 7 + 2.5, 2 + 14 + 2.5])  # Cell centres.
    assert inside_figure(fig)
    path = tmp_path / 'figure.png'
    left, top = save_denoising_figure(grid, sigmas, rows, 2, str(path), 'A title wider than the grid')
    with Image.open(path) as image:
        pixels = np.asarray(image.convert('RGB'))
    assert pixels.shape[1] > 23 + left  # Widened to hold the title.
    assert np.array_equal(pixels[top : top + 14, left : left + 23], np.broadcast_to(grid, [14, 23, 3]))


def test_denoising_figure_refuses_a_grid_that_does_not_match():
    grid = np.zeros([14, 23, 1], dtype=np.uint8)
    with pytest.raises(ValueError, match='does not hold 2 columns'):
        denoising_figure(grid, [1, 2], ['noisy', 'denoised'], 2, 'title')
