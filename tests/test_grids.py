"""Tests for the inference sigma-grids: shape contract, EDM's values, closed forms, grid files, choice by name and
the NFE of the solvers."""

import json
import math

import numpy as np
import pytest
import torch

from infonoise import grid_files, grids
from infonoise.profile import Profile

# EDM's 18-step grid as printed in the reference facts (section 7).
EDM_GRID_18 = '80 57.586 40.786 28.375 19.352 12.910 8.401 5.315 3.257 1.923 1.088 0.585 0.296 0.140 0.0600 0.0229 0.00753 0.002 0'

# A Gaussian spectrum with very different scales, and its exact entropy-rate profile r = mmse/sigma^3.
LAMBDAS = np.array([1.0, 0.25, 0.01, 1e-4, 1e-6])


def gaussian_profile(num_points=512, lo=1e-3, hi=200.0):
    sigma = np.exp(np.linspace(math.log(lo), math.log(hi), num_points))
    mmse = (LAMBDAS * sigma[:, None] ** 2 / (LAMBDAS + sigma[:, None] ** 2)).sum(1)
    return sigma, mmse / sigma**3


def all_grids(num_steps, sigma_min=0.002, sigma_max=80.0):
    sigma, rate = gaussian_profile()
    return {
        'edm': grids.edm_grid(num_steps, sigma_min, sigma_max),
        'loguniform': grids.loguniform_grid(num_steps, sigma_min, sigma_max),
        'tangent': grids.tangent_grid(num_steps, LAMBDAS, sigma_min, sigma_max),
        'infogrid': grids.infogrid(num_steps, sigma, rate, sigma_min, sigma_max),
        'vp': grids.vp_grid(num_steps, sigma_min, sigma_max),
    }


@pytest.mark.parametrize('num_steps', [2, 3, 18, 35])
def test_grids_are_descending_end_in_zero_and_span_the_range(num_steps):
    for name, grid in all_grids(num_steps, 0.01, 50.0).items():
        assert grid.dtype == torch.float64 and grid.shape == (num_steps + 1,), name
        assert grid[-1].item() == 0, name
        assert (grid[1:] < grid[:-1]).all(), name
        assert grid[0].item() == pytest.approx(50.0, rel=1e-12), name
        assert grid[-2].item() == pytest.approx(0.01, rel=1e-12), name


def test_edm_grid_matches_edm_printed_values():
    grid = grids.edm_grid(18)
    # Within one unit of the last printed digit (0.0600 is a rounding of 0.059947).
    for value, printed in zip(grid.tolist(), EDM_GRID_18.split()):
        decimals = len(printed.split('.')[1]) if '.' in printed else 0
        assert abs(value - float(printed)) <= 10**-decimals, (value, printed)


def test_edm_grid_is_linear_in_sigma_to_the_one_over_rho():
    grid = grids.edm_grid(10, sigma_min=0.01, sigma_max=50, rho=3)
    steps = grid[:-1] ** (1 / 3)
    assert torch.allclose(steps[1:] - steps[:-1], (steps[1] - steps[0]).expand(9), rtol=0, atol=1e-12)


def test_loguniform_grid_has_a_constant_ratio():
    grid = grids.loguniform_grid(9, 0.002, 80)
    ratios = grid[1:-1] / grid[:-2]
    assert torch.allclose(ratios, torch.full_like(ratios, (0.002 / 80) ** (1 / 8)), rtol=1e-12, atol=0)


def test_infogrid_of_the_exact_gaussian_profile_is_the_tangent_law():
    sigma, rate = gaussian_profile()
    for num_steps in (4, 18, 64):
        info = grids.infogrid(num_steps, sigma, rate, 0.002, 80)
        tangent = grids.tangent_grid(num_steps, LAMBDAS)
        assert torch.allclose(info[:-1], tangent[:-1], rtol=1e-4, atol=0), num_steps


def test_tangent_grid_is_uniform_in_the_arctan_coordinate():
    grid = grids.tangent_grid(12, LAMBDAS, 0.002, 80)[:-1].numpy()
    scale = np.sqrt(LAMBDAS)
    u = (scale * np.arctan(grid[:, None] / scale)).sum(1)
    np.testing.assert_allclose(np.diff(u), np.full(11, np.diff(u).mean()), rtol=1e-9)

    # One variance: the grid is sigma_i = s tan(u_i) with u uniform between arctan(sigma_min/s) and arctan(sigma_max/s).
    s = 0.5
    single = grids.tangent_grid(6, [s**2], 0.002, 80)[:-1]
    angles = torch.linspace(math.atan(80 / s), math.atan(0.002 / s), 6, dtype=torch.float64)
    assert torch.allclose(single, s * torch.tan(angles), rtol=1e-9, atol=0)


def test_infogrid_is_uniform_in_information_for_a_power_law_profile():
    # r = sigma^-2: s r(s) = 1/s, so u is ln sigma and InfoGrid is log-uniform (exact under log-log interpolation).
    sigma = np.exp(np.linspace(-7, 5, 7))
    grid = grids.infogrid(10, sigma, sigma**-2.0, 0.002, 80)
    assert torch.allclose(grid, grids.loguniform_grid(10, 0.002, 80), rtol=1e-10, atol=0)


def test_infogrid_puts_more_steps_where_the_rate_is_higher():
    sigma = np.exp(np.linspace(math.log(0.002), math.log(80), 64))
    bump = np.exp(-0.5 * ((np.log(sigma) - math.log(0.5)) / 0.3) ** 2)
    grid = grids.infogrid(21, sigma, (1e-3 + bump) / sigma**2)[:-1]
    inside = ((grid > 0.5 * math.exp(-0.6)) & (grid < 0.5 * math.exp(0.6))).sum().item()
    assert inside >= 12  # The band holds ~95% of u; log-uniform would put 2 of 21 points there.


def test_iddpm_grid_picks_evenly_spaced_iddpm_levels():
    from training.networks import iDDPMPrecond

    grid = grids.iddpm_grid(5, *grids.DEFAULT_RANGES['iddpm'])
    assert grid.shape == (6,) and grid[-1] == 0 and (grid[1:] < grid[:-1]).all()
    net = iDDPMPrecond(8, 1, model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    u = net.u.to(torch.float64)
    assert torch.allclose(grid[0], u[u <= 81].max(), rtol=1e-5) and torch.allclose(
        grid[-2], u[u >= 0.002].min(), rtol=1e-4
    )  # The network tabulates u in float32.


def test_vp_grid_refits_beta_to_the_range():
    beta_d, beta_min = grids.vp_coefficients(*grids.DEFAULT_RANGES['vp'])
    assert beta_d == pytest.approx(19.9, rel=1e-9) and beta_min == pytest.approx(0.1, rel=1e-9)
    grid = grids.vp_grid(4, 0.01, 100)
    t = torch.tensor([1, 2 / 3 + 1e-3 / 3, 1 / 3 + 2e-3 / 3, 1e-3], dtype=torch.float64)
    beta_d, beta_min = grids.vp_coefficients(0.01, 100)
    assert torch.allclose(grid[:-1], torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt(), rtol=1e-12)


@pytest.mark.parametrize(
    'call',
    [
        lambda: grids.edm_grid(1),
        lambda: grids.loguniform_grid(0),
        lambda: grids.edm_grid(4, sigma_min=0),
        lambda: grids.edm_grid(4, sigma_min=90),
        lambda: grids.edm_grid(4, rho=0),
        lambda: grids.tangent_grid(4, [-1.0, 1.0]),
        lambda: grids.tangent_grid(4, []),
        lambda: grids.infogrid(4, [0.1, 1.0, 10.0], [1.0, 1.0]),
        lambda: grids.infogrid(4, [1.0, 0.1], [1.0, 1.0]),
        lambda: grids.infogrid(4, [0.1, 1.0], [0.0, 0.0]),
        lambda: grids.iddpm_grid(200, 0.002, 0.01),
    ],
)
def test_bad_grid_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


def test_grid_files_round_trip_and_reject_garbage(tmp_path):
    grid = grids.edm_grid(7)
    as_json = tmp_path / 'grid.json'
    as_json.write_text(json.dumps({'grid': 'edm', 'sigmas': grid.tolist()}))
    assert torch.equal(grid_files.read_grid_file(str(as_json)), grid)
    as_text = tmp_path / 'grid.txt'
    as_text.write_text('\n'.join(str(v) for v in grid[:-1].tolist()))  # No final 0: it is appended.
    assert torch.equal(grid_files.read_grid_file(str(as_text)), grid)

    for name, text in {
        'words.txt': 'eighty forty',
        'ascending.txt': '1 2 3',
        'one.json': '[80]',
        'nested.json': '[[80, 1]]',
        'negative.txt': '80 -1 0',
        'object.json': '{"steps": 4}',
        'deep.json': '[' * 100_000 + ']' * 100_000,  # Too deep for Python's parser: a ValueError, not RecursionError.
    }.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match=name):
            grid_files.read_grid_file(str(path))


def test_variances_from_a_scale_or_a_file(tmp_path):
    assert grid_files.read_variances('0.5') == [0.25]
    (tmp_path / 'object.json').write_text(json.dumps({'variances': [1.0, 0.01]}))
    (tmp_path / 'list.json').write_text('[1.0, 0.01]')
    for name in ('object.json', 'list.json'):
        assert grid_files.read_variances(str(tmp_path / name)) == [1.0, 0.01]
    (tmp_path / 'deep.json').write_text('[' * 100_000 + ']' * 100_000)
    (tmp_path / 'words.json').write_text('{"variances": ["a"]}')
    cases = {'-1': 'positive finite', 'inf': 'positive finite', 'nan': 'positive finite', 'nofile': 'neither a number',
             str(tmp_path / 'deep.json'): 'too deeply', str(tmp_path / 'words.json'): 'no JSON list of variances'}  # fmt: skip
    for spec, message in cases.items():
        with pytest.raises(ValueError, match=message):
            grid_files.read_variances(spec)


def test_build_grid_by_name_is_the_named_function():
    sigma, rate = gaussian_profile()
    profile = Profile.from_dict(dict(sigma=sigma.tolist(), rate=rate.tolist()), partial=True)
    expected = {
        'edm': grids.edm_grid(9, 0.01, 50.0, 5.0),
        'loguniform': grids.loguniform_grid(9, 0.01, 50.0),
        've': grids.loguniform_grid(9, 0.01, 50.0),
        'vp': grids.vp_grid(9, 0.01, 50.0),
        'iddpm': grids.iddpm_grid(9, 0.01, 50.0),
        'tangent': grids.tangent_grid(9, LAMBDAS, 0.01, 50.0),
        'infogrid': grids.infogrid(9, sigma, rate, 0.01, 50.0),
    }
    assert set(expected) == set(grids.GRID_NAMES)
    for name, grid in expected.items():
        built = grids.build_grid(name, 9, 0.01, 50.0, rho=5.0, profile=profile, variances=LAMBDAS)
        assert torch.equal(built, grid), name
    for name, message in (('infogrid', 'information profile'), ('tangent', 'variances'), ('ddim', 'Unknown σ-grid')):
        with pytest.raises(ValueError, match=message):
            grids.build_grid(name, 9, 0.01, 50.0)


def test_nfe_and_its_inverse():
    # EDM's 18 Heun steps are its 35-NFE sampler (Algorithm 2 skips the correction of the last step); Euler: N.
    assert grids.nfe(18, 'heun') == 35 and grids.nfe(2, 'heun') == 3 and grids.nfe(18, 'euler') == 18
    for solver in grids.SOLVERS:
        for num_steps in range(2, 40):
            assert grids.num_steps_for(grids.nfe(num_steps, solver), solver) == num_steps
    for nfe, solver, message in ((8, 'heun', 'must be odd'), (1, 'heun', 'at least 2'), (1, 'euler', 'at least 2')):
        with pytest.raises(ValueError, match=message):
            grids.num_steps_for(nfe, solver)
    with pytest.raises(ValueError, match='Unknown solver'):
        grids.nfe(4, 'rk4')
