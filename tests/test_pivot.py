"""Pivot rules (InfoNoise paper, Sec. 4 and App. B.4) on profiles with known answers: synthetic power laws with a
break at a known σ, exact Gaussian and two-point sources; their invariance to the estimation grid and to a
rescaling of the data; debouncing."""

import math

import numpy as np
import pytest
import torch

from bench.pivot_study import draw_profile, learned_profiles, resample, synthetic_log_rate
from infonoise import pivot
from infonoise.oracles import gaussian_mmse, two_point_mmse
from infonoise.pivot import calibrate, debounce, is_discrete, onset_pivot, powerlaw_break, reference_rate
from infonoise.profile import LogGrid, entropy_rate, gate

# Grids the rules must be invariant to (K, σ_min, σ_max); the first is EDM's range with InfoNoise's default K.
DEFAULT = (64, 0.002, 80.0)
GRIDS = [(32, 0.002, 80.0), (128, 0.002, 80.0), (64, 0.005, 80.0), (64, 0.01, 80.0), (64, 0.002, 200.0)]


def centers(grid=DEFAULT) -> torch.Tensor:
    return LogGrid.make(*grid).centers


def step(grid=DEFAULT) -> float:
    """One grid interval in ln σ."""
    return math.log(grid[2] / grid[1]) / grid[0]


def close(a: float, b: float, tolerance: float) -> bool:
    return abs(math.log(a / b)) <= tolerance


def synthetic(grid=DEFAULT, noise: float = 0.0, seed: int = 0, **params) -> tuple[torch.Tensor, torch.Tensor]:
    """σ and r̂ of `synthetic_log_rate` on a grid, with multiplicative noise."""
    s = centers(grid)
    log_rate = synthetic_log_rate(s.numpy(), **params) + noise * np.random.default_rng(seed).standard_normal(len(s))
    return s, torch.from_numpy(np.exp(log_rate))


def gaussian_rate(sigma: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return entropy_rate(gaussian_mmse(sigma, lam, mean=True), sigma)


SPECTRUM = torch.logspace(-4, 0, 784, dtype=torch.float64)  # Per-dimension variances of a Gaussian source.


# ----------------------------------------------------------------------------------------------------------------
# Onset of information (continuous endpoints).


def bump(center: float, width: float) -> torch.Tensor:
    """A peak-normalised profile r̄ = exp(-(log σ - log center)²/(2 width²)) on the default grid."""
    return torch.exp(-0.5 * ((centers().log() - math.log(center)) / width) ** 2)


def test_onset_pivot_on_a_clean_rise():
    s = centers()
    # Flat below p above σ_40, rising below it: c is the grid value σ_40 itself.
    rate = torch.where(torch.arange(64) >= 40, 1e-4, 1 / (1 + s))
    assert onset_pivot(s, rate) == s[40].item()
    # Smooth bump: r̄ = p at σ* = center · exp(width √(2 ln(1/p))); c is the first grid value above σ*.
    p, center, width = 0.002, 0.3, 0.8
    sigma_star = center * math.exp(width * math.sqrt(2 * math.log(1 / p)))
    c = onset_pivot(s, 7.0 * bump(center, width), p)
    assert sigma_star <= c < sigma_star * math.exp(step())
    assert onset_pivot(s, 1e6 * bump(center, width), p) == c
    # Profile already above p at the top: c is the top grid value.
    assert onset_pivot(s, bump(10.0, 3.0)) == s[-1].item()
    for bad_p in (0.0, 1.0):
        with pytest.raises(ValueError):
            onset_pivot(s, bump(center, width), bad_p)
    with pytest.raises(ValueError):
        onset_pivot(s, torch.zeros(64, dtype=torch.float64))


def test_onset_pivot_follows_eq_18_literally_with_a_blip():
    # Eq. 18 asks r̄ < p at every σ' >= c. A single blip above p at high noise therefore sets c just above the
    # blip, even though the profile drops back below p before the real rise.
    s = centers()
    rate = bump(0.3, 0.8)
    clean = onset_pivot(s, rate)
    rate[58] = 0.01
    assert rate[50:58].max() < 0.002 and s[58] > clean
    assert onset_pivot(s, rate) == s[59].item()


def test_reference_rate():
    s = centers()
    rate = 1 / s
    # σ_ref at the grid's lower edge: every bin counts, and the maximum is the lowest bin's.
    assert reference_rate(s, rate, 0.002) == rate.max().item()
    # σ_ref inside the grid: the bin holding it and those above; the bins below it do not count.
    k = int(LogGrid.make(*DEFAULT).bin_index(torch.tensor([0.01])))
    assert reference_rate(s, rate, 0.01) == rate[k].item() < rate.max().item()
    # σ_ref below the grid: the lowest bin carried down by the 1/σ law, from the grid's lower edge.
    s5 = centers((64, 0.005, 80.0))
    assert reference_rate(s5, 1 / s5, 0.002) == pytest.approx((1 / s5[0]).item() * 0.005 / 0.002, rel=1e-12)
    with pytest.raises(ValueError):
        reference_rate(s, rate, 0.0)


def test_onset_pivot_against_the_exact_gaussian_crossing():
    # The exact rate of a Gaussian source crosses p·r_ref once, where a dense bisection finds it; c is the first
    # grid value above the crossing (the last one still below p scanning down).
    s = centers()
    ref = reference_rate(s, gaussian_rate(s, SPECTRUM), 0.002)
    lo, hi = 0.002, 80.0
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        below = gaussian_rate(torch.tensor([mid], dtype=torch.float64), SPECTRUM).item() < 0.002 * ref
        lo, hi = (lo, mid) if below else (mid, hi)
    c = onset_pivot(s, gaussian_rate(s, SPECTRUM), 0.002, 0.002)
    assert c == s[s > hi][0].item()


def test_onset_pivot_is_the_papers_on_edms_grid():
    # On [0.002, 80] with σ_ref = 0.004·σ_data = 0.002 the reference is max r̂: the paper's rule, value for value.
    for grid in (DEFAULT, (32, 0.002, 80.0), (128, 0.002, 80.0)):
        s = centers(grid)
        for rate in (gaussian_rate(s, SPECTRUM), gaussian_rate(s, SPECTRUM / 4), 1 / (s * (1 + s**2))):
            assert onset_pivot(s, rate, 0.002, 0.004 * 0.5) == onset_pivot(s, rate, 0.002)


@pytest.mark.parametrize('grid', GRIDS)
def test_onset_pivot_does_not_depend_on_the_grid(grid):
    # The same Gaussian source on another grid: c within one interval (of the coarser grid); the paper's max
    # normalisation moves with σ_min instead.
    tolerance = max(step(grid), step())
    s0, s = centers(), centers(grid)
    for lam in (
        SPECTRUM,
        0.25 * 3072 / torch.arange(1, 3073, dtype=torch.float64) / sum(1 / i for i in range(1, 3073)),
    ):
        c0 = onset_pivot(s0, gaussian_rate(s0, lam), 0.002, 0.002)
        assert close(onset_pivot(s, gaussian_rate(s, lam), 0.002, 0.002), c0, tolerance)
        if grid[1] == 0.01:
            assert not close(onset_pivot(s, gaussian_rate(s, lam)), c0, 2 * tolerance)


@pytest.mark.parametrize('k', [0.5, 2.0])
def test_onset_pivot_scales_with_the_data(k):
    # Data scaled by k: variances by k², mmse_k(σ) = k²·mmse_1(σ/k), σ_data and with it σ_ref by k: c by k.
    s = centers()
    c1 = onset_pivot(s, gaussian_rate(s, SPECTRUM), 0.002, 0.004 * 0.5)
    ck = onset_pivot(s, gaussian_rate(s, k * k * SPECTRUM), 0.002, 0.004 * 0.5 * k)
    assert close(ck, k * c1, step())


# ----------------------------------------------------------------------------------------------------------------
# Power-law break (discrete endpoints).


@pytest.mark.parametrize('sigma_b', [0.03, 0.2, 1.3])
def test_two_segment_power_law_break_within_one_interval(sigma_b):
    # r ∝ σ^-1.5 below σ_b and σ^+1 above, 3 % multiplicative noise per bin: the break within one interval in at
    # least 95 of 100 draws (noise-free: always).
    params = dict(c=sigma_b, slope=-1.5, jump=2.5, width=0.01)
    assert close(powerlaw_break(*synthetic(**params)), sigma_b, step())
    hits = sum(
        close(powerlaw_break(*synthetic(noise=0.03, seed=i, **params)) or 1e9, sigma_b, step()) for i in range(100)
    )
    assert hits >= 95


@pytest.mark.parametrize('kind', ['bump', 'shoulder'])
def test_slowly_curving_power_law_then_bump_or_shoulder(kind):
    # The learned binarized-MNIST shape: the slope drifts from -1.3 to about -2 over 0.002-0.17, then turns up into
    # a bump (slope +1) or a flatter shoulder (slope -0.7) at c = 0.17, and into the σ⁻³ tail a decade later.
    # The drift (0.35 per decade) must not end the power law; c is at the foot of the bump or shoulder.
    jump = 3.0 if kind == 'bump' else 1.3
    params = dict(c=0.17, slope=-1.3, drift=-0.7 / math.log10(0.17 / 0.002), jump=jump, width=0.05, top=1.7)
    s, rate = synthetic(**params)
    assert math.log(rate[5] / rate[0]) / math.log(s[5] / s[0]) == pytest.approx(-1.33, abs=0.05)
    assert close(powerlaw_break(s, rate), 0.17, step())
    assert calibrate(s, rate, 'discrete').rule == 'break'
    hits = sum(close(powerlaw_break(*synthetic(noise=0.03, seed=i, **params)) or 1e9, 0.17, step()) for i in range(40))
    assert hits >= 38


def test_pure_power_law_falls_back_to_the_onset_rule():
    # One power law over the whole grid (even one whose slope drifts by ±0.5 per decade) has no break: the rule says
    # so. Steeper than 1/σ all along, it concentrates at low noise, and the pivot falls back to the onset rule.
    for drift in (0.0, 0.5, -0.5):
        assert powerlaw_break(*synthetic(c=1.0, slope=-1.5, drift=drift, jump=0.0)) is None
    for drift in (0.0, -0.5):
        s, rate = synthetic(c=1.0, slope=-1.5, drift=drift, jump=0.0)
        result = calibrate(s, rate, 'discrete', sigma_data=0.5)
        assert result == pivot.Pivot(onset_pivot(s, rate, 0.002, 0.002), 'onset, no break')
    # Flatter than 1/σ it does not concentrate at low noise: nothing to gate, c is σ_ref.
    s, rate = synthetic(c=1.0, slope=-0.5, jump=0.0)
    assert calibrate(s, rate, 'discrete', sigma_data=0.5) == pivot.Pivot(0.002, 'reference, no break')
    # A slope rising by 1.5 per decade is not a power law any more: the rule finds a break. One falling as fast is a
    # steepening, never a break.
    assert powerlaw_break(*synthetic(c=1.0, slope=-1.5, drift=1.5, jump=0.0)) is not None
    assert powerlaw_break(*synthetic(c=1.0, slope=-1.5, drift=-1.5, jump=0.0)) is None


def test_a_steepening_is_not_the_break():
    # The power law steepens by 1 at 0.04 (the rate falls faster: less information, not a window), then breaks up
    # into a bump at 0.3: c is the bump's foot.
    params = dict(c=0.3, slope=-1.3, jump=3.0, width=0.05, top=2.0, steepen=0.04, steepen_by=-1.0)
    s, rate = synthetic(**params)
    assert close(powerlaw_break(s, rate), 0.3, step())
    hits = sum(close(powerlaw_break(*synthetic(noise=0.03, seed=i, **params)) or 1e9, 0.3, step()) for i in range(40))
    assert hits >= 38


def test_two_point_source_keeps_its_window():
    # The exact two-point profile has no low-noise power law: its rate underflows to 0 below σ ≈ 0.03a and rises
    # steeply to its peak, bending down all the way (no rise of the slope, no break), and the rate per unit ln σ
    # peaks in the window, not at low noise. Nothing to gate: c is σ_ref, below the peak, and the gated rate keeps
    # the peak.
    s = centers()
    rate = entropy_rate(two_point_mmse(s, 1.0), s)
    result = calibrate(s, rate, 'discrete', sigma_data=0.5)
    assert result == pivot.Pivot(0.002, 'reference, no break')
    peak = s[rate.argmax()].item()
    gated = rate * gate(s, result.value, 3)
    assert s[gated.argmax()].item() == peak


def test_no_break_in_the_far_tail():
    # A power law turning into the σ⁻³ tail at σ = 1, with no window, whose last four bins bend up (as an early,
    # poorly fitted network can bend them): above 10·σ_data a rise is no window, so there is no break and the onset
    # fallback stands. For data 20 times larger the same rise would count.
    s, rate = synthetic(c=1.0, slope=-1.2, jump=-1.8, width=0.3)
    rate[-4:] *= torch.tensor([1.0, 1.5, 2.5, 4.0], dtype=torch.float64)
    assert powerlaw_break(s, rate, sigma_data=10.0) > 30
    assert powerlaw_break(s, rate) is None
    assert calibrate(s, rate, 'discrete', sigma_data=0.5).rule == 'onset, no break'


def test_a_flat_low_end_counts_as_concentrated():
    # The 1/σ law of continuous data (rate per unit ln σ flat at low noise) into a σ⁻³ tail, 5 % noise per bin:
    # the profile concentrates at low noise whatever the noise does to its exact maximum, so the fallback is the
    # onset rule, never σ_ref.
    for seed in range(20):
        s, rate = synthetic(c=0.5, slope=-1.0, jump=-2.0, width=0.3, noise=0.05, seed=seed)
        assert pivot.concentrates_at_low_noise(s, rate, 0.002)
        assert calibrate(s, rate, 'discrete', sigma_data=0.5).rule.startswith('onset')


def test_standard_errors_weight_the_fit():
    # Two badly sampled bins 80 % too high in the middle of the power law. Unweighted they make a false break
    # below them; with their large standard errors they cannot, and the break stays where it is.
    s, rate = synthetic(c=0.3, slope=-1.5, jump=2.5, width=0.01)
    rate[19:21] *= 1.8
    assert powerlaw_break(s, rate) < s[19]
    rel_err = torch.full_like(rate, 0.01)
    rel_err[19:21] = 0.5
    assert close(powerlaw_break(s, rate, rel_err), 0.3, step())


@pytest.mark.parametrize('grid', GRIDS)
def test_power_law_break_does_not_depend_on_the_grid(grid):
    tolerance = max(step(grid), step())
    rng = np.random.default_rng(3)
    for i in range(10):
        params = draw_profile('bump' if i % 2 else 'shoulder', rng)
        c0 = powerlaw_break(*synthetic(**params))
        assert close(powerlaw_break(*synthetic(grid, **params)), c0, tolerance)


@pytest.mark.parametrize('k', [0.5, 2.0])
def test_power_law_break_scales_with_the_data(k):
    # r_k(σ) = mmse_k(σ)/σ³ = r_1(σ/k)/k: every σ of the profile moves by k, its level by 1/k.
    rng = np.random.default_rng(4)
    for i in range(10):
        params = draw_profile('bump' if i % 2 else 'shoulder', rng)
        c1 = powerlaw_break(*synthetic(**params))
        s, rate = synthetic(**dict(params, c=params['c'] * k, top=params['top'] * k, sigma_lo=0.002 * k))
        assert close(powerlaw_break(s, rate / k), k * c1, step())


# Learned profiles of the CPU benchmarks (tests/data/, K = 32 on [0.002, 80]) and the rule InfoNoise calibrates on
# each (before debouncing). bmnist16: binarized MNIST-5k 16x16, w = 1, seed 0, at 10, 40 and 80 kEx; mnist16:
# MNIST-5k 16x16, EDM objective, seed 0, at 10, 40 and 80 kEx; 'firstrule' is the 60-kEx profile of the run made
# with the first version of the rule, whose low-noise slope steepens by 0.6 below the bump (docs/pivot-rules.md).
# An onset pivot is checked against its definition (Eq. 18); a power-law break, which has no closed form, against
# the pivot recorded when the fixture was made and the slope change that defines it.
LEARNED = {
    'profile-bmnist16-seed0-000010.json': ('discrete', 'onset, no break', None),
    'profile-bmnist16-seed0-000040.json': ('discrete', 'break', 0.29203596236502466),
    'profile-bmnist16-seed0-000080.json': ('discrete', 'break', 0.296911523942866),
    'profile-bmnist16-firstrule-seed0-000060.json': ('discrete', 'break', 0.29203596236502466),
    'profile-mnist16-seed0-000010.json': ('continuous', 'onset', None),
    'profile-mnist16-seed0-000040.json': ('continuous', 'onset', None),
    'profile-mnist16-seed0-000080.json': ('continuous', 'onset', None),
}
P = 0.002  # The paper's onset threshold p.


def learned(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """σ, r̂ and the relative standard errors of a learned profile."""
    d = learned_profiles()[name]
    stderr = torch.tensor([math.nan if v is None else v for v in d['stderr']], dtype=torch.float64)
    mse = torch.tensor(d['mse'], dtype=torch.float64)
    return torch.tensor(d['sigma'], dtype=torch.float64), torch.tensor(d['rate'], dtype=torch.float64), stderr / mse


def assert_eq_18(s: torch.Tensor, rate: torch.Tensor, c: float) -> None:
    """c = inf{σ : r̄(σ') < p for all σ' >= σ} on the grid (Eq. 18, scanning down from high noise; see
    `onset_pivot` for why inf), with r̄ = r̂ / max r̂ (Eq. above it): c is a grid value, r̄ < p at c and at every
    grid value above it, and r̄ >= p at the grid value just below it (the first persistent crossing)."""
    r_bar = (rate / rate.max()).tolist()
    k = s.tolist().index(c)
    assert all(v < P for v in r_bar[k:]), r_bar[k:]
    assert k > 0 and r_bar[k - 1] >= P, (k, r_bar[max(k - 1, 0)])


@pytest.mark.parametrize('name', LEARNED)
def test_learned_profiles_give_the_defined_pivots(name):
    endpoint, rule, recorded = LEARNED[name]
    s, rate, rel_err = learned(name)
    c = calibrate(s, rate, endpoint, rel_err, sigma_data=0.5)
    assert c.rule == rule
    if rule.startswith('onset'):
        # On EDM's grid with σ_data = 0.5 the reference σ_ref = 0.002 lies in the lowest bin, so r_ref = max r̂:
        # the paper's normalisation, which `assert_eq_18` uses.
        torch.testing.assert_close(s, LogGrid.make(32, 0.002, 80.0).centers, rtol=1e-12, atol=0)
        assert_eq_18(s, rate, c.value)
    else:  # At the foot of the mid-noise bump: the slope rises by more than 1 across c.
        assert c.value == pytest.approx(recorded, rel=1e-9)
        x, y = s.log().numpy(), rate.log().numpy()
        half = 0.5 * math.log(10)
        below = np.polyfit(*(v[(x < math.log(c.value)) & (x > math.log(c.value) - half)] for v in (x, y)), 1)[0]
        above = np.polyfit(*(v[(x > math.log(c.value)) & (x < math.log(c.value) + half)] for v in (x, y)), 1)[0]
        assert above - below > 1


def test_eq_18_check_can_fail():
    # The definition check itself rejects a pivot one grid value too high or too low.
    s, rate, _ = learned('profile-mnist16-seed0-000040.json')
    k = s.tolist().index(onset_pivot(s, rate, P))
    for wrong in (s[k - 1].item(), s[k + 1].item()):
        with pytest.raises(AssertionError):
            assert_eq_18(s, rate, wrong)


@pytest.mark.parametrize('name', LEARNED)
def test_learned_profiles_on_other_grids(name):
    # The same learned profile resampled (log-log) onto every grid, its standard errors scaled with the bins'
    # widths: c within one interval of the coarser grid of the pivot on its own grid.
    endpoint = LEARNED[name][0]
    s, rate, rel_err = learned(name)
    expected = calibrate(s, rate, endpoint, rel_err, sigma_data=0.5).value
    own_step = math.log(s[1] / s[0])
    for grid in GRIDS:
        t = centers(grid)
        r = torch.from_numpy(resample(s.numpy(), rate.numpy(), t.numpy()))
        e = torch.from_numpy(
            np.interp(t.log().numpy(), s.log().numpy(), rel_err.numpy()) * math.sqrt(own_step / step(grid))
        )
        c = calibrate(t, r, endpoint, e, sigma_data=0.5).value
        assert close(c, expected, max(own_step, step(grid))), (grid, c)


def test_calibrate_and_debounce():
    s, rate = synthetic(c=0.3, slope=-1.5, jump=2.5)
    assert calibrate(s, rate, 'continuous', sigma_data=0.5) == pivot.Pivot(onset_pivot(s, rate, 0.002, 0.002), 'onset')
    with pytest.raises(ValueError):
        calibrate(s, rate, 'binary')
    # The median of the last five in log σ: one wild value among them does not move it.
    assert debounce([0.2]) == 0.2
    assert debounce([0.1, 0.4]) == pytest.approx(0.2)
    assert debounce([5.0, 0.2, 0.21, 0.19, 0.2, 0.001]) == 0.2
    assert debounce([0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.1, 0.1, 0.1]) == 0.1  # Only the last five count.
    with pytest.raises(ValueError):
        debounce([])


def test_is_discrete():
    binary = np.random.default_rng(0).choice(np.array([0, 255], dtype=np.uint8), size=(10, 8, 8))
    assert is_discrete(binary)
    assert is_discrete(np.full((4, 4), 128, dtype=np.uint8))
    assert not is_discrete(np.array([0, 128, 255], dtype=np.uint8))
    assert not is_discrete(np.array([0, 254, 255], dtype=np.uint8))
    with pytest.raises(ValueError):
        is_discrete(binary.astype(np.float32))
    with pytest.raises(ValueError):
        is_discrete(np.zeros(0, dtype=np.uint8))
