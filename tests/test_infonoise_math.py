"""InfoNoise math: log-grid, formulas, inverse-CDF tables and exact oracles, against closed forms (pivot rules:
test_pivot.py)."""

import io
import json
import math

import numpy as np
import pytest
import scipy.stats
import torch

from infonoise.oracles import (
    empirical_bayes_denoiser,
    empirical_bayes_mse,
    gaussian_denoiser,
    gaussian_mmse,
    two_point_denoiser,
    two_point_mmse,
)
from infonoise.profile import LogGrid, Profile, cumulative, entropy_rate, gate, normalize_density, smooth_log
from infonoise.table import InverseCDFTable

GRID = LogGrid.make(64, 0.002, 80.0)
# One grid step in log σ.
STEP = math.log(80.0 / 0.002) / 64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Log-grid and formulas.


def test_log_grid_edges_centers_widths():
    grid = LogGrid.make(8, 0.002, 80.0)
    k = torch.arange(9, dtype=torch.float64)
    assert grid.num_bins == 8 and grid.edges.dtype == torch.float64
    assert grid.edges[0].item() == 0.002 and grid.edges[-1].item() == 80.0
    torch.testing.assert_close(grid.edges, 0.002 * 40000 ** (k / 8), rtol=1e-14, atol=0)
    torch.testing.assert_close(grid.centers, 0.002 * 40000 ** ((k[:-1] + 0.5) / 8), rtol=1e-14, atol=0)
    torch.testing.assert_close(grid.widths, grid.edges[1:] - grid.edges[:-1], rtol=0, atol=0)
    torch.testing.assert_close(grid.widths.sum(), torch.tensor(80 - 0.002, dtype=torch.float64))
    for bad in [(0, 0.002, 80.0), (8, 0.0, 80.0), (8, 80.0, 0.002)]:
        with pytest.raises(ValueError):
            LogGrid.make(*bad)


def test_bin_index_matches_numpy_reference():
    edges = GRID.edges.numpy()
    rng = np.random.default_rng(0)
    sigma = np.concatenate([np.exp(rng.uniform(np.log(1e-4), np.log(1e4), 20_000)), edges, [0.0, np.inf, 1e-30]])
    expected = np.searchsorted(edges[1:-1], sigma, side='right')
    for dtype in (torch.float64, torch.float32):
        s = torch.from_numpy(sigma).to(dtype)
        ref = np.searchsorted(edges[1:-1], s.double().numpy(), side='right')
        got = GRID.bin_index(s)
        assert got.dtype == torch.int64 and np.array_equal(got.numpy(), ref)
    # An edge e_k starts bin k; sigma_max closes the last bin; out-of-range values go to the end bins.
    assert np.array_equal(expected[20_000 : 20_000 + 65], [*range(64), 63])
    assert expected[-3:].tolist() == [0, 63, 0]


def test_bin_index_and_icdf_stay_on_device():
    # On the meta device any host read (.item(), .tolist(), bool()) raises, so this proves the lookups are sync-free.
    sigma = torch.empty(1000, device='meta')
    bins = GRID.bin_index(sigma)
    assert bins.device.type == 'meta' and bins.dtype == torch.int64 and bins.shape == (1000,)
    table = InverseCDFTable.build(GRID.centers, GRID.widths, torch.ones(64, dtype=torch.float64)).to('meta')
    u = torch.empty(1000, device='meta', dtype=torch.float32)
    draws = table.icdf(u)
    assert draws.device.type == 'meta' and draws.dtype == torch.float64 and draws.shape == (1000,)


def test_entropy_rate_and_gate_formulas():
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0], dtype=torch.float64)
    mse = torch.tensor([1e-5, 0.02, 0.1, 0.24], dtype=torch.float64)
    torch.testing.assert_close(entropy_rate(mse, sigma), mse / sigma**3, rtol=1e-15, atol=0)

    c = 0.4
    s = torch.logspace(-3, 3, 61, dtype=torch.float64)
    for n in (2, 3, 5):
        torch.testing.assert_close(gate(s, c, n), s**n / (s**n + c**n), rtol=1e-13, atol=0)
    assert gate(torch.tensor([c], dtype=torch.float64), c).item() == pytest.approx(0.5, abs=1e-15)
    # Limits (App. B.2): (σ/c)ⁿ far below the pivot, 1 far above, with relative error (σ/c)ⁿ resp. (c/σ)ⁿ.
    low, high = torch.tensor([1e-6 * c], dtype=torch.float64), torch.tensor([1e6 * c], dtype=torch.float64)
    assert gate(low, c).item() == pytest.approx(1e-18, rel=1e-12)
    assert gate(high, c).item() == pytest.approx(1.0, abs=1e-17)
    # No overflow or NaN at the extremes.
    extreme = gate(torch.tensor([0.0, 1e-300, 1e300, math.inf], dtype=torch.float64), c)
    assert extreme.tolist() == [0.0, 0.0, 1.0, 1.0]
    # n = 2, c = σ_data is EDM's bounded weight factor σ²/(σ² + σ_data²) (Eq. 53).
    torch.testing.assert_close(gate(s, 0.5, 2), s**2 / (s**2 + 0.25), rtol=1e-13, atol=0)
    for bad_c, bad_n in [(0.0, 3), (-1.0, 3), (1.0, 0)]:
        with pytest.raises(ValueError):
            gate(s, bad_c, bad_n)


def test_smooth_log_is_a_symmetric_gaussian_filter_inside():
    k = torch.arange(41, dtype=torch.float64)
    values = 5 - 0.01 * (k - 20) ** 2
    width = 1.5
    smoothed = smooth_log(values, width)
    # A symmetric kernel lowers a parabola by curvature times the kernel's second moment (away from the ends).
    offsets = torch.arange(-5, 6, dtype=torch.float64)  # radius ceil(3 · 1.5) = 5
    kernel = torch.exp(-0.5 * (offsets / width) ** 2)
    second_moment = (kernel * offsets**2).sum() / kernel.sum()
    torch.testing.assert_close(smoothed[5:36], values[5:36] - 0.01 * second_moment, rtol=0, atol=1e-13)
    # The ends reflect: the first point averages values[|j|].
    reflected = (kernel * values[offsets.abs().long()]).sum() / kernel.sum()
    assert smoothed[0].item() == pytest.approx(reflected.item(), abs=1e-13)
    assert smooth_log(values, 0) is values
    torch.testing.assert_close(
        smooth_log(torch.full((9,), 3.0, dtype=torch.float64), 4.0), torch.full((9,), 3.0, dtype=torch.float64)
    )
    with pytest.raises(ValueError):
        smooth_log(values, -1.0)


def test_smooth_log_keeps_the_peak_and_reduces_noise():
    # Adversarial: a narrow spike beats a broad plateau; naive smoothing would move the peak onto the plateau.
    values = torch.full((64,), 0.1, dtype=torch.float64)
    values[10] = 1.0
    values[30:45] = 0.9
    width = 2.0
    naive = torch.nn.functional.conv1d(
        torch.nn.functional.pad(values.reshape(1, 1, -1), (6, 6), mode='reflect'),
        (lambda w: (w / w.sum()).reshape(1, 1, -1))(torch.exp(-0.5 * (torch.arange(-6, 7.0) / width) ** 2)).double(),
    ).reshape(-1)
    assert naive.argmax().item() != 10
    smoothed = smooth_log(values, width)
    assert smoothed.argmax().item() == 10
    assert not torch.equal(smoothed, values)  # still smoothed, just pulled back toward the raw values

    # A noisy smooth profile gets closer to the truth, and its peak stays put.
    x = torch.linspace(-3, 3, 64, dtype=torch.float64)
    truth = torch.exp(-(x**2))
    noisy = truth * torch.exp(0.1 * torch.randn(64, generator=gen(0), dtype=torch.float64))
    smoothed = smooth_log(noisy, 1.5)
    assert smoothed.argmax() == noisy.argmax()
    assert (smoothed - truth).pow(2).mean() < 0.4 * (noisy - truth).pow(2).mean()


def test_normalize_density_and_cumulative():
    q = torch.rand(64, generator=gen(1), dtype=torch.float64) + 0.1
    density = normalize_density(q, GRID.widths)
    assert (density * GRID.widths).sum().item() == pytest.approx(1.0, abs=1e-14)
    for bad in [torch.zeros(64), -q, q * math.nan, q * math.inf]:
        with pytest.raises(ValueError):
            normalize_density(bad.double(), GRID.widths)
    # The trapezoidal rule is exact for a linear density: ∫ σ dσ gives (σ² - σ_1²)/(σ_K² - σ_1²).
    s = GRID.centers
    torch.testing.assert_close(cumulative(3 * s, s), (s**2 - s[0] ** 2) / (s[-1] ** 2 - s[0] ** 2), rtol=1e-13, atol=0)
    with pytest.raises(ValueError):
        cumulative(torch.zeros(64, dtype=torch.float64), s)


def test_profile_round_trips_through_weights_only_load():
    k = 16
    names = ['sigma', 'mse', 'rate', 'gated', 'rho', 'u', 'pi', 'phi', 'weight', 'count', 'stderr']
    tensors = {name: torch.rand(k, generator=gen(i), dtype=torch.float64) for i, name in enumerate(names)}
    tensors['stderr'][3] = math.nan  # Unknown values travel as None (strict JSON) and come back as NaN.
    profile = Profile(**tensors, pivot=0.137, refreshes=12, raw_pivot=0.15, pivot_rule='break', nimg=40_960)
    assert profile.to_dict()['stderr'][3] is None
    buf = io.BytesIO()
    torch.save(profile.to_dict(), buf)
    buf.seek(0)
    loaded = Profile.from_dict(torch.load(buf, weights_only=True))
    for name, value in tensors.items():
        torch.testing.assert_close(getattr(loaded, name), value, rtol=0, atol=0, equal_nan=True)
    assert (loaded.pivot, loaded.refreshes, loaded.raw_pivot, loaded.pivot_rule) == (0.137, 12, 0.15, 'break')
    assert loaded.nimg == 40_960 and json.loads(json.dumps(profile.to_dict()))['nimg'] == 40_960
    # Files written before counts, standard errors, the raw pivot and the refresh's nimg existed load with those
    # unknown.
    dropped = ('count', 'stderr', 'raw_pivot', 'pivot_rule', 'nimg')
    old = {key: v for key, v in profile.to_dict().items() if key not in dropped}
    loaded = Profile.from_dict(old)
    assert loaded.count.isnan().all() and loaded.stderr.isnan().all() and math.isnan(loaded.raw_pivot)
    assert loaded.nimg is None and loaded.to_dict()['nimg'] is None
    with pytest.raises(ValueError):
        Profile(**{**tensors, 'phi': torch.zeros(k + 1)}, pivot=0.1, refreshes=0)
    with pytest.raises(ValueError):
        Profile.from_dict({key: v for key, v in profile.to_dict().items() if key != 'rho'})


def test_profile_load_reads_json_snapshots_and_states(tmp_path):
    k = 8
    sigma = torch.logspace(-2, 1, k, dtype=torch.float64)
    mse = sigma**2 / (1 + sigma**2)  # A unit Gaussian source.
    full = Profile(sigma=sigma, mse=mse, rate=mse / sigma**3, **{n: torch.ones(k, dtype=torch.float64) for n in
                   ('gated', 'rho', 'u', 'pi', 'phi', 'weight', 'count', 'stderr')}, pivot=0.2, refreshes=3)  # fmt: skip
    files = {
        'profile.json': lambda p: p.write_text(json.dumps(full.to_dict())),
        'mse-only.json': lambda p: p.write_text(json.dumps(dict(sigma=sigma.tolist(), mse=mse.tolist()))),
        'snapshot.pt': lambda p: torch.save(dict(format='snapshot', ema={}, profile=full.to_dict()), p),
        'state.pt': lambda p: torch.save(dict(net={}, noise_sampler=dict(buffer=None, profile=full.to_dict())), p),
    }
    for name, write in files.items():
        write(tmp_path / name)
        loaded = Profile.load(str(tmp_path / name))
        # r = mse/σ³ (Eq. 11) is derived when a hand-made profile gives only the mse.
        torch.testing.assert_close(loaded.rate, mse / sigma**3, rtol=1e-15, atol=0)
        assert torch.equal(loaded.sigma, sigma) and (loaded.pivot == 0.2 if name != 'mse-only.json' else True)
    bad = {
        'words.txt': ('hello', 'neither JSON nor a torch file'),
        'deep.json': ('[' * 100_000 + ']' * 100_000, 'nests JSON too deeply'),
        'list.json': ('[1, 2]', 'holds no profile'),
        'strings.json': ('{"sigma": ["a"], "rate": [1]}', 'must be lists of numbers'),
        'ragged.json': ('{"sigma": [1, 2], "rate": [1]}', 'has shape'),
    }
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            Profile.load(str(tmp_path / name))
    torch.save(dict(format='snapshot', profile=None), tmp_path / 'early.pt')
    with pytest.raises(ValueError, match='holds no profile: not trained with InfoNoise, or saved before'):
        Profile.load(str(tmp_path / 'early.pt'))


# ---------------------------------------------------------------------------------------------------------------
# Inverse-CDF tables.


def bimodal_q(shift: float = 0.0) -> torch.Tensor:
    """Two log-normal modes of comparable mass, at σ ≈ 0.05 and σ ≈ 2.7, as a density over σ."""
    log_s = GRID.centers.log()
    modes = torch.exp(-0.5 * ((log_s + 3 + shift) / 0.4) ** 2) + 0.5 * torch.exp(-0.5 * ((log_s - 1) / 0.6) ** 2)
    return modes / GRID.centers


def test_table_draws_follow_its_law():
    table = InverseCDFTable.build(GRID.centers, GRID.widths, bimodal_q())
    draws = table.icdf(torch.rand(100_000, generator=gen(2), dtype=torch.float64))

    def cdf(x):
        return table.cdf_at(torch.from_numpy(x)).numpy()

    assert scipy.stats.kstest(draws.numpy(), cdf).pvalue > 1e-3
    # The same test rejects draws from a table whose first mode sits one grid step lower.
    other = InverseCDFTable.build(GRID.centers, GRID.widths, bimodal_q(shift=STEP))
    assert scipy.stats.kstest(other.icdf(torch.rand(100_000, generator=gen(3))).numpy(), cdf).pvalue < 1e-6
    # Draws are continuous in σ: they lie between grid points, essentially never on one, all distinct.
    assert torch.isin(draws, GRID.centers).sum() == 0 and draws.unique().numel() == draws.numel()


def test_table_density_and_inverse():
    q = bimodal_q()
    table = InverseCDFTable.build(GRID.centers, GRID.widths, q)
    s = GRID.centers
    # Between grid points the density is the trapezoid average of the tabulated endpoints (normalised).
    mids = (s[1:] * s[:-1]).sqrt()
    trapezoid = 0.5 * (q[1:] + q[:-1])
    expected = trapezoid / (trapezoid * (s[1:] - s[:-1])).sum()
    torch.testing.assert_close(table.pdf_at(mids), expected, rtol=1e-12, atol=1e-12 * expected.max().item())
    assert table.pdf_at(torch.tensor([s[0] * 0.99, s[-1] * 1.01], dtype=torch.float64)).tolist() == [0.0, 0.0]
    # Ends, monotonicity and the round trip cdf(icdf(u)) = u.
    u = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    sigma = table.icdf(u)
    assert sigma[0].item() == s[0].item() and sigma[-1].item() == s[-1].item()
    assert bool((sigma[1:] > sigma[:-1]).all())
    torch.testing.assert_close(table.cdf_at(sigma), u, rtol=0, atol=1e-13)
    torch.testing.assert_close(table.cdf_at(s), table.cdf, rtol=0, atol=0)


def test_table_with_empty_region_and_degenerate_inputs():
    q = bimodal_q()
    q[20:40] = 0.0
    q[-3:] = 0.0
    table = InverseCDFTable.build(GRID.centers, GRID.widths, q)
    draws = table.icdf(torch.cat([torch.rand(50_000, generator=gen(4)), torch.tensor([0.0, 1.0])]))
    assert bool(torch.isfinite(draws).all())
    # No mass strictly between grid points 20 and 39, nor above point 60 (intervals with two zero ends); u = 1 on
    # the flat top still gives a finite σ.
    assert ((draws > GRID.centers[20]) & (draws < GRID.centers[39])).sum() == 0
    assert draws[:-1].max() <= GRID.centers[60]
    for bad in [torch.zeros(64), -bimodal_q(), bimodal_q() * math.nan, bimodal_q() * math.inf]:
        with pytest.raises(ValueError):
            InverseCDFTable.build(GRID.centers, GRID.widths, bad.double())
    with pytest.raises(ValueError):
        InverseCDFTable.build(GRID.centers.flip(0), GRID.widths, bimodal_q())


# ---------------------------------------------------------------------------------------------------------------
# Oracles.


def test_gaussian_mmse_matches_monte_carlo():
    lam = torch.tensor([0.1, 1.0, 4.0], dtype=torch.float64)
    n, sigma = 200_000, 0.5
    x0 = lam.sqrt() * torch.randn(n, 3, generator=gen(5), dtype=torch.float64)
    x = x0 + sigma * torch.randn(n, 3, generator=gen(6), dtype=torch.float64)
    err = (gaussian_denoiser(x, sigma, lam) - x0).pow(2).sum(1)
    assert abs(err.mean() - gaussian_mmse(sigma, lam)) < 4 * err.std() / math.sqrt(n)
    sigmas = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    assert gaussian_mmse(sigmas, lam).shape == (3,)
    torch.testing.assert_close(gaussian_mmse(sigmas, lam, mean=True), gaussian_mmse(sigmas, lam) / 3)
    # One σ per row gives the same as row-by-row calls.
    per_row = gaussian_denoiser(x[:3], sigmas, lam)
    torch.testing.assert_close(per_row[1], gaussian_denoiser(x[1:2], 0.5, lam)[0])


def test_two_point_mmse_matches_monte_carlo_and_asymptotics():
    a, n = 2.0, 200_000
    for sigma in (0.3 * a, a, 3 * a):
        x0 = a * torch.where(torch.rand(n, generator=gen(7)) < 0.5, -1.0, 1.0).double()
        x = x0 + sigma * torch.randn(n, generator=gen(8), dtype=torch.float64)
        err = (two_point_denoiser(x, sigma, a) - x0).pow(2)
        assert abs(err.mean() - two_point_mmse(sigma, a)) < 4 * err.std() / math.sqrt(n)
    # High noise (s = a/σ -> 0): mmse/a² = 1 - s² + s⁴ - (5/3)s⁶ + O(s⁸), from the Taylor series of tanh².
    for ratio in (10.0, 100.0):
        s = 1 / ratio
        value = two_point_mmse(ratio * a, a).item() / a**2
        assert abs(value - (1 - s**2 + s**4 - 5 / 3 * s**6)) < 10 * s**8
    # Low noise (s -> ∞): mmse = a² √(π/2) e^{-s²/2}/s · (1 - π²/(8s²) + O(s⁻⁴)).
    for s in (20.0, 30.0):
        leading = a**2 * math.sqrt(math.pi / 2) * math.exp(-(s**2) / 2) / s
        assert abs(two_point_mmse(a / s, a).item() / leading - (1 - math.pi**2 / (8 * s**2))) < 5 / s**4
    # Mid-range: Gauss-Hermite quadrature of Eq. 43 (accurate where the integrand is smooth, σ >= 0.7a).
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)
    for ratio in (0.7, 1.0, 2.0, 5.0):
        s = 1 / ratio
        gh = a**2 * (weights / np.cosh(s * s + s * nodes) ** 2).sum() / math.sqrt(2 * math.pi)
        assert two_point_mmse(ratio * a, a).item() == pytest.approx(gh, rel=1e-9)
    # Scaling: mmse(σ; a) = a² mmse(σ/a; 1), and the tiny-σ end underflows to 0 without NaN.
    sigmas = torch.logspace(-3, 3, 25, dtype=torch.float64)
    torch.testing.assert_close(two_point_mmse(a * sigmas, a), a**2 * two_point_mmse(sigmas, 1.0), rtol=1e-9, atol=0)
    assert bool(torch.isfinite(two_point_mmse(sigmas, 1.0)).all())


def test_two_point_rate_peaks_in_the_symmetry_breaking_window():
    # App. A.3: the rate mmse/σ³ peaks near the bifurcation σ_c = a; our quadrature puts the peak at σ ≈ 0.645a.
    a = 1.5
    sigma = a * torch.logspace(-1, 1, 401, dtype=torch.float64)
    rate = entropy_rate(two_point_mmse(sigma, a), sigma)
    peak = sigma[rate.argmax()].item() / a
    assert 0.5 < peak < 2 and peak == pytest.approx(0.645, abs=0.01)


def test_empirical_bayes_denoiser():
    # Two points ±1 in one dimension: the softmax posterior mean is a·tanh(ax/σ²) with a = 1.
    data = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    x = torch.linspace(-4, 4, 81, dtype=torch.float64)[:, None]
    for sigma in (0.05, 0.5, 5.0):
        torch.testing.assert_close(empirical_bayes_denoiser(x, sigma, data), two_point_denoiser(x, sigma, 1.0))
    # At tiny σ it returns the nearest data point exactly, without NaN, for image-sized vectors.
    data = torch.rand(50, 3, 8, 8, generator=gen(9), dtype=torch.float64) * 2 - 1
    x = torch.rand(20, 3, 8, 8, generator=gen(10), dtype=torch.float64) * 2 - 1
    nearest = torch.cdist(x.reshape(20, -1), data.reshape(50, -1)).argmin(1)
    out = empirical_bayes_denoiser(x, 1e-3, data)
    assert out.shape == x.shape and torch.equal(out, data[nearest])
    # One σ per row.
    per_row = empirical_bayes_denoiser(x[:2], torch.tensor([1e-3, 10.0]), data)
    torch.testing.assert_close(per_row[1], empirical_bayes_denoiser(x[1:2], 10.0, data)[0])


def test_empirical_bayes_mse_matches_two_point_oracle():
    data = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    n = 40_000
    for sigma in (0.5, 1.0):
        estimate = empirical_bayes_mse(sigma, data, n, generator=gen(11))
        # The squared error is bounded by (2a)² = 4, so its standard error is below 2/√n.
        assert abs(estimate - two_point_mmse(sigma, 1.0).item()) < 4 * 2 / math.sqrt(n)
    # Distinct points at tiny noise are recovered exactly.
    points = torch.rand(30, 16, generator=gen(12), dtype=torch.float64)
    assert empirical_bayes_mse(1e-3, points, 1000, generator=gen(13)) == 0.0
