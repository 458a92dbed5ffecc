"""Profile figure (infonoise.plots): a closed-form Gaussian-source profile renders to a complete PNG, atomically."""

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from infonoise.plots import _per_ln_sigma, save_profile_plot
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
