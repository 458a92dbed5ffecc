"""Tests for the Gaussian-source evaluator: closed forms, the exact sampler law against edm_sampler, the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
from bench.gaussian import (
    GaussianDenoiser,
    cifar_like_spectrum,
    compare_grids,
    exact_profile,
    gaussian_kl,
    main,
    make_spectrum,
    mnist5k_images,
    mnist5k_spectrum,
    ode_limit_variance,
    output_variance,
    pca,
    sampler_gain,
    sampler_kl,
)
from infonoise.grids import edm_grid, infogrid, loguniform_grid, num_steps_for, tangent_grid
from training.dataset import mnist5k_digits
from training.sampling import edm_sampler

LAM = torch.tensor([4.0, 1.0, 0.01, 1e-6], dtype=torch.float64)  # One variance per pixel of a 1x2x2 image.

# (solver, grid): coarse enough that output variances are far from λ, so a wrong step rule shows.
COARSE = [
    ('euler', edm_grid(3)),
    ('euler', loguniform_grid(4, sigma_max=2.0)),
    ('heun', edm_grid(3)),
    ('heun', loguniform_grid(4, sigma_max=2.0)),
]


def random_basis(dim: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))[0]


def sample(net, num: int, grid, solver, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(num, 1, 2, 2, generator=gen, dtype=torch.float64)
    return edm_sampler(net, latents, grid, solver=solver).reshape(num, -1)


# ----------------------------------------------------------------------------------------------------------------
# Profile.


def test_mmse_limits():
    lam = torch.tensor([4.0, 1.0, 0.25, 0.01, 0.0], dtype=torch.float64)
    profile = exact_profile(lam, torch.tensor([1e-7, 1e7], dtype=torch.float64))
    # σ -> ∞: all variance is lost (relative error λ/σ²); σ -> 0: σ² per non-constant component (error σ²/λ).
    assert profile.mmse[1].item() == pytest.approx(lam.sum().item(), rel=1e-12)
    assert (profile.mmse[0] / 1e-14).item() == pytest.approx(4, rel=1e-10)
    torch.testing.assert_close(profile.rate, profile.mmse / profile.sigma**3, rtol=1e-15, atol=0)


def test_rate_is_derivative_of_conditional_entropy():
    # Eq. 11: H[x0 | xσ] = ½ Σ ln(2πe λσ²/(λ+σ²)); its σ-derivative by central differences is mmse/σ³.
    def entropy(sigma):
        return 0.5 * torch.log(2 * math.pi * math.e * LAM * sigma**2 / (LAM + sigma**2)).sum().item()

    sigma = torch.logspace(-3, 2, 11, dtype=torch.float64)
    eps = 1e-5
    numeric = torch.tensor([(entropy(s * (1 + eps)) - entropy(s * (1 - eps))) / (2 * eps * s) for s in sigma])
    torch.testing.assert_close(exact_profile(LAM, sigma).rate, numeric.to(torch.float64), rtol=1e-7, atol=0)


def test_infogrid_on_exact_profile_is_tangent_law():
    lam = torch.tensor([9.0, 1.0, 0.1, 1e-3, 1e-5], dtype=torch.float64)
    errors = []
    for num_points in (512, 1024):
        points = torch.logspace(math.log10(0.002), math.log10(80), num_points, dtype=torch.float64)
        profile = exact_profile(lam, points)
        error = max(
            (infogrid(n, profile.sigma, profile.rate)[:-1] / tangent_grid(n, lam)[:-1]).log().abs().max().item()
            for n in (4, 18, 50)
        )
        errors.append(error)
    # A relative error of 5e-5 at 512 points that shrinks about 4x per doubling: quadrature error, not a mismatch.
    assert errors[0] < 5e-5
    assert errors[1] < errors[0] / 3


# ----------------------------------------------------------------------------------------------------------------
# Denoiser and the exact sampler law.


def test_denoiser_matches_closed_form_and_per_sample_sigma():
    basis, mean = random_basis(4), torch.tensor([0.5, -0.3, 0.2, 1.0], dtype=torch.float64)
    net = GaussianDenoiser(LAM, img_channels=1, img_resolution=2, mean=mean, basis=basis)
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    expected = torch.stack(
        [mean + basis @ (LAM / (LAM + s**2) * (basis.T @ (xi.reshape(4) - mean))) for xi, s in zip(x, sigma)]
    )
    torch.testing.assert_close(net(x, sigma).reshape(3, 4), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(net(x, sigma.reshape(3, 1, 1, 1)), net(x, sigma), rtol=0, atol=0)
    torch.testing.assert_close(net(x[1:2], 1.0), net(x, sigma)[1:2], rtol=0, atol=0)
    assert (net.label_dim, net.img_channels, net.img_resolution) == (0, 1, 2)
    assert torch.equal(net.round_sigma(torch.tensor(0.3, dtype=torch.float64)), torch.tensor(0.3, dtype=torch.float64))


@pytest.mark.parametrize('solver, grid', COARSE)
def test_gain_is_what_edm_sampler_does(solver, grid):
    # The sampler is linear: unit latents along each pixel come out as σ_0 M along that pixel, exactly.
    latents = torch.eye(4, dtype=torch.float64).reshape(4, 1, 2, 2)
    out = edm_sampler(GaussianDenoiser(LAM, 1, 2), latents, grid, solver=solver).reshape(4, 4)
    torch.testing.assert_close(out, torch.diag(grid[0] * sampler_gain(LAM, grid, solver)), rtol=1e-12, atol=0)


def test_constant_pixels_stay_at_the_mean():
    lam = torch.tensor([1.0, 0.0, 0.25, 0.0], dtype=torch.float64)
    mean = torch.tensor([0.1, -0.7, 0.2, 0.9], dtype=torch.float64)
    out = sample(GaussianDenoiser(lam, 1, 2, mean=mean), 5, edm_grid(6), 'heun')
    assert torch.equal(out[:, [1, 3]], mean[[1, 3]].expand(5, 2))
    assert sampler_gain(lam, edm_grid(6), 'heun')[[1, 3]].tolist() == [0.0, 0.0]


def test_single_step_and_ode_limit_closed_forms():
    # One step from σ_0 is the final Euler step alone: the output is D(σ_0 z; σ_0) = σ_0 z λ/(λ+σ_0²).
    sigma_0 = 3.0
    expected = sigma_0**2 * LAM**2 / (LAM + sigma_0**2) ** 2
    for solver in ('heun', 'euler'):
        torch.testing.assert_close(output_variance(LAM, [sigma_0, 0.0], solver), expected, rtol=1e-12, atol=0)
    # Small steps converge to the exact flow down to σ_min followed by that final step, at Heun's order 2 and
    # Euler's order 1: doubling N divides the error by 4 and by 2.
    limit = ode_limit_variance(LAM, 80.0, 0.002)
    for solver, ratio, largest in (('heun', 4, 1e-4), ('euler', 2, 1e-2)):
        errors = [(output_variance(LAM, edm_grid(n), solver) / limit - 1).abs().max().item() for n in (500, 1000)]
        assert errors[0] / errors[1] == pytest.approx(ratio, rel=0.05) and errors[1] < largest, (solver, errors)


@pytest.mark.parametrize('solver, grid', COARSE)
def test_monte_carlo_output_variance(solver, grid):
    num = 20000
    predicted = output_variance(LAM, grid, solver)
    tolerance = 5 * math.sqrt(2 / num)  # Five standard errors of a variance estimate with known mean 0.
    assert ((predicted / LAM - 1).abs() > 3 * tolerance).any()
    out = sample(GaussianDenoiser(LAM, 1, 2), num, grid, solver)
    empirical = (out**2).mean(0)
    assert ((empirical / predicted - 1).abs() < tolerance).all(), (empirical / predicted).tolist()


@pytest.mark.parametrize('solver, grid', COARSE)
def test_monte_carlo_with_basis_and_mean(solver, grid):
    num = 20000
    basis, mean = random_basis(4, seed=2), torch.tensor([0.5, -0.3, 0.2, 1.0], dtype=torch.float64)
    gain = sampler_gain(LAM, grid, solver)
    # In U's coordinates the output is M (σ_0 z - Uᵀ mean): mean -M Uᵀ mean, variance σ_0² M².
    predicted_mean, predicted_var = -gain * (basis.T @ mean), grid[0] ** 2 * gain**2
    coords = (sample(GaussianDenoiser(LAM, 1, 2, mean=mean, basis=basis), num, grid, solver) - mean) @ basis
    assert ((coords.mean(0) - predicted_mean).abs() < 5 * (predicted_var / num).sqrt()).all()
    empirical = ((coords - predicted_mean) ** 2).mean(0)
    assert ((empirical / predicted_var - 1).abs() < 5 * math.sqrt(2 / num)).all(), (empirical / predicted_var).tolist()


# ----------------------------------------------------------------------------------------------------------------
# KL.


def test_kl_of_identical_laws_is_zero_and_closed_form():
    assert gaussian_kl(LAM, LAM) == 0.0
    var = LAM * torch.tensor([0.5, 2.0, 1.0, 4.0], dtype=torch.float64)
    expected = 0.5 * sum(1 / r - 1 + math.log(r) for r in (0.5, 2.0, 1.0, 4.0))
    assert gaussian_kl(LAM, var) == pytest.approx(expected, rel=1e-14)
    assert sampler_kl(LAM, edm_grid(5), 'euler') == gaussian_kl(LAM, output_variance(LAM, edm_grid(5), 'euler'))


@pytest.mark.parametrize('solver', ['heun', 'euler'])
def test_kl_decreases_with_nfe_on_every_grid(solver):
    nfe_list = [7, 11, 17, 25, 35]
    table = compare_grids(cifar_like_spectrum().lam, nfe_list, solver)
    assert list(table) == ['edm(rho=7)', 'infogrid', 'loguniform']
    for name, values in table.items():
        assert all(b < a for a, b in zip(values, values[1:])), (name, values)
        assert values[-1] < 0.05 * values[0], (name, values)
    assert [num_steps_for(nfe, solver) for nfe in nfe_list] == ([4, 6, 9, 13, 18] if solver == 'heun' else nfe_list)


# ----------------------------------------------------------------------------------------------------------------
# Spectra.


def test_pca_recovers_a_known_covariance():
    dim, lam = 4, torch.tensor([3.0, 2.0, 0.5, 0.0], dtype=torch.float64)
    basis, mean = random_basis(dim, seed=3), torch.arange(dim, dtype=torch.float64)
    # Latents ±√D e_k have mean 0 and maximum-likelihood covariance exactly I.
    z = math.sqrt(dim) * torch.cat([torch.eye(dim), -torch.eye(dim)]).to(torch.float64)
    got_mean, got_lam, got_basis = pca((mean + z * lam.sqrt() @ basis.T).reshape(2 * dim, 2, 2))
    torch.testing.assert_close(got_mean, mean, rtol=0, atol=1e-14)
    torch.testing.assert_close(got_lam, lam, rtol=0, atol=1e-13)
    torch.testing.assert_close((got_basis[:, :3].T @ basis[:, :3]).abs(), torch.eye(3, dtype=torch.float64))


def test_make_spectrum_drops_degenerate_components():
    spectrum = make_spectrum('toy', torch.tensor([0.5, 1e-13, 0.0, 2.0, 1e-11], dtype=torch.float64))
    assert spectrum.lam.tolist() == [2.0, 0.5, 1e-11] and spectrum.num_dropped == 2
    assert make_spectrum('toy', torch.tensor([0.5, 1e-13, 0.0, 2.0]), floor=0).num_dropped == 1


def test_cifar_like_spectrum():
    spectrum = cifar_like_spectrum()
    assert (spectrum.lam.numel(), spectrum.num_dropped, spectrum.name) == (3072, 0, 'cifar-like')
    assert spectrum.lam.sum().item() == pytest.approx(0.25 * 3072, rel=1e-13)
    k = torch.arange(1, 3073, dtype=torch.float64)
    torch.testing.assert_close(spectrum.lam * k, spectrum.lam[:1].expand(3072), rtol=1e-13, atol=0)


def test_mnist5k_spectrum():
    digits = mnist5k_digits()[0]
    spectrum = mnist5k_spectrum()
    # PCA keeps the total variance: Σλ equals the summed per-pixel variance of x/127.5 - 1.
    pixel_var = (digits.reshape(5000, -1) / 127.5 - 1).var(0).sum()
    assert spectrum.lam.sum().item() == pytest.approx(pixel_var, rel=1e-10)
    # 121 pixels are 0 in every digit; 10 more directions have round-off variance (the next is 6e-9 of the top).
    assert (spectrum.lam.numel(), spectrum.num_dropped) == (653, 131)
    assert int((digits.reshape(5000, -1).std(0) == 0).sum()) == 121
    # At 16x16 the pixels are dataset_tool's (padded to 32, Lanczos), i.e. the demo dataset's.
    resize = dataset_tool.make_transform(None, (16, 16))
    expected = np.stack([resize(d) for d in dataset_tool.pad_mnist(digits[:50])])
    np.testing.assert_array_equal(((mnist5k_images(16)[:50, 0] + 1) * 127.5).round().numpy(), expected)


# ----------------------------------------------------------------------------------------------------------------
# Errors and the command line.


def test_bad_inputs_raise():
    bad_spectra = [torch.tensor([1.0, -0.1]), torch.tensor([]), torch.tensor([1.0, float('nan')]), torch.zeros(3)]
    for lam in bad_spectra:
        with pytest.raises(ValueError):
            make_spectrum('bad', lam)
    with pytest.raises(ValueError, match='non-negative'):
        exact_profile(torch.tensor([1.0, -1.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match='positive'):
        exact_profile(LAM, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match='drop degenerate'):
        sampler_kl(torch.tensor([1.0, 0.0]), edm_grid(4))
    with pytest.raises(ValueError, match='solver'):
        sampler_gain(LAM, edm_grid(4), 'rk4')
    for grid in ([80.0, 1.0], [1.0, 80.0, 0.0], [[80.0, 0.0]]):
        with pytest.raises(ValueError, match='sigma-grid'):
            sampler_gain(LAM, grid)
    with pytest.raises(ValueError, match='one variance per pixel'):
        GaussianDenoiser(LAM, 1, 3)
    with pytest.raises(ValueError, match='orthonormal'):
        GaussianDenoiser(LAM, 1, 2, basis=2 * torch.eye(4))
    with pytest.raises(ValueError, match='odd'):
        num_steps_for(8, 'heun')
    with pytest.raises(ValueError, match='at least 2'):
        num_steps_for(1, 'euler')


def test_cli_table_and_json(tmp_path):
    path = tmp_path / 'kl.json'
    result = CliRunner().invoke(main, ['--nfe', '7,11', '--solver', 'euler', '--json', str(path)])
    assert result.exit_code == 0, result.output
    assert 'mnist5k-28x28: 653 components kept, 131 dropped' in result.output
    data = json.loads(path.read_text())
    assert data['nfe'] == [7, 11] and data['solver'] == 'euler'
    cifar = data['spectra']['cifar-like']
    assert cifar['kl'] == compare_grids(cifar_like_spectrum().lam, [7, 11], 'euler')
    limit = gaussian_kl(cifar_like_spectrum().lam, ode_limit_variance(cifar_like_spectrum().lam, 80.0, 0.002))
    assert cifar['ode_limit_kl'] == limit and cifar['num_unresolved'] == 0
    mnist = data['spectra']['mnist5k-28x28']
    assert mnist['num_unresolved'] == int((mnist5k_spectrum().lam < 0.002**2).sum()) > 0
    assert 0 < mnist['ode_limit_kl_unresolved'] < mnist['ode_limit_kl']

    result = CliRunner().invoke(main, ['--nfe', '8'])
    assert result.exit_code == 1 and 'NFE must be odd' in result.output
