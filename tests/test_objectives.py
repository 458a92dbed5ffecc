"""InfoNoise in other objectives (issue 23): the continuous law and its floor, the adapters that build or check
InfoNoise, the oracle and the variants, InfoGrid's trained range and Euler end. Losses come from closed forms."""

import math
import warnings

import pytest
import scipy.stats
import torch

from infonoise import (
    DiscreteTimesteps,
    FlowMatching,
    InfoNoise,
    LogNormal,
    epsilon_loss_weight,
    flow_t_from_sigma,
    flow_velocity_loss_weight,
    grids,
    law,
    oracles,
)
from infonoise.table import LogLinearTable
from tests.test_conversions import ddpm_alphas_cumprod
from tests.test_infonoise import LAM, feed, gaussian_losses

V = float(LAM.mean())  # Per-element variance of the Gaussian source.


def gaussian_eps_losses(steps: DiscreteTimesteps, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample ε-MSE of the exact Bayes denoiser: x₀-error / σ²."""
    sigma = steps.sigmas[t]
    return (gaussian_losses(sigma.float(), gen).double() / sigma**2).float()


def train_ddpm(steps: DiscreteTimesteps, num: int = 120, batch: int = 256) -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    for _ in range(num):
        t = steps.sample(batch)
        steps.observe(t, gaussian_eps_losses(steps, t, gen))


def test_ddpm_epsilon_after_refreshes_every_timestep_keeps_probability():
    # The defect: with w = 1/σ² the floor mixed in before the division took ~75 % of the draws (median t 943) and the
    # table stopped at the outer bin centres, so timesteps 985-999 had probability 0.
    steps = DiscreteTimesteps(
        ddpm_alphas_cumprod(), prediction='epsilon', warmup_steps=10, refresh_steps=5, min_count=4
    )
    train_ddpm(steps)
    assert steps.sampler.refreshes >= 10 and steps.sampler.floor == 0.05
    p = steps.probabilities()
    assert bool((p > 0).all()) and float(p[999]) > 1e-4 and float(p[0]) > 0
    # The draws spread over the timesteps instead of piling up at t ≈ 1000 (the exact mmse of a source with
    # per-element variance ~0.3 puts its information around σ ≈ 0.1-2, i.e. t ≈ 100-600).
    assert float(p[:500].sum()) > 0.2 and float(p[900:].sum()) < 0.3
    paper = DiscreteTimesteps(ddpm_alphas_cumprod(), build='paper', warmup_steps=10, refresh_steps=5, min_count=4)
    train_ddpm(paper)
    old = paper.probabilities()
    assert float(old[:500].sum()) < 0.1 and float(old[900:].sum()) > 0.6 and float(old[999]) == 0
    draws = torch.bincount(steps.sample(400_000), minlength=1000).double() / 400_000
    assert float((draws - p).abs().max()) < 0.002


@pytest.mark.parametrize('prediction', ['epsilon', 'v_prediction', 'sample'])
def test_the_floor_is_eps_of_the_draws_whatever_the_weight(prediction):
    steps, bare = (DiscreteTimesteps(ddpm_alphas_cumprod(), prediction=prediction, floor=f) for f in (0.05, 0.0))
    for s in (steps, bare):
        s.sampler.fix_profile(oracles.gaussian_mmse(s.sampler.grid.centers, LAM, mean=True))
    # The law is (1 − ε)·(the floorless law) + ε·log-uniform on [σ_0, σ_999], at every σ.
    lo, hi = steps.sigma_range()
    x = torch.linspace(math.log(lo), math.log(hi), 200, dtype=torch.float64)
    log_uniform = (x - math.log(lo)) / math.log(hi / lo)
    expected = 0.95 * bare.sampler.cdf(x.exp()) + 0.05 * log_uniform
    torch.testing.assert_close(steps.sampler.cdf(x.exp()), expected, atol=1e-12, rtol=0)


def test_discrete_timesteps_build_infonoise_for_their_table():
    steps = DiscreteTimesteps(ddpm_alphas_cumprod(), 'v_prediction')
    noise, (lo, hi) = steps.sampler, steps.sigma_range()
    assert steps.prediction == 'v_prediction' and isinstance(noise, InfoNoise)
    assert (float(noise.grid.edges[0]), float(noise.grid.edges[-1])) == steps.sigma_range()
    # The most intervals that each hold a timestep: K works, K + 1 leaves one empty.
    K = noise.grid.num_bins
    assert steps.empty_interval(noise.grid.edges) is None
    assert steps.empty_interval(InfoNoise(sigma_min=lo, sigma_max=hi, num_bins=K + 1).grid.edges) is not None
    # Warm-up under uniform timesteps (plus the floor): each timestep gets 0.95/T + its log-uniform share.
    p = steps.probabilities()
    share = noise.warmup_law.components[1][1].cdf(steps.edges[1:].clamp(max=1e9)) - noise.warmup_law.components[1][
        1
    ].cdf(steps.edges[:-1].clamp(min=1e-9))
    torch.testing.assert_close(p, 0.95 / 1000 + 0.05 * share, atol=1e-12, rtol=0)


def test_adapters_refuse_or_warn_instead_of_silence():
    alpha_bar = ddpm_alphas_cumprod()
    lo, hi = DiscreteTimesteps(alpha_bar).sigma_range()
    # InfoNoise's default σ range and K = 64 inside DiscreteTimesteps: intervals below σ_0 = 0.01 never fill.
    with pytest.raises(ValueError, match='holds no timestep, so InfoNoise would never refresh'):
        DiscreteTimesteps(alpha_bar, InfoNoise(weight=epsilon_loss_weight), 'epsilon')
    # A weight that is not the prediction's.
    with pytest.raises(ValueError, match='InfoNoise divides out w.*plain epsilon loss has x₀-space weight'):
        DiscreteTimesteps(alpha_bar, InfoNoise('edm', sigma_min=lo, sigma_max=hi, num_bins=16), 'epsilon')
    with pytest.raises(ValueError, match='the flow velocity loss has x₀-space weight'):
        FlowMatching(InfoNoise('edm', sigma_min=0.001, sigma_max=999))
    # A weighted loss is fine when the adapter is told its weight.
    min_snr = lambda s: epsilon_loss_weight(s) * torch.clamp(5 / (1 / s**2), max=1)  # noqa: E731
    DiscreteTimesteps(alpha_bar, InfoNoise(min_snr, sigma_min=lo, sigma_max=hi, num_bins=16), loss_weight=min_snr)
    # A range that misses part of the objective's: warned (those σ are never drawn after a refresh).
    with pytest.warns(UserWarning, match=r'InfoNoise covers σ 0.002-80 but t ∈ \[0.001, 0.999\] spans'):
        FlowMatching(InfoNoise(flow_velocity_loss_weight))
    with pytest.warns(UserWarning, match='but the 1000 timesteps span'):
        DiscreteTimesteps(alpha_bar, InfoNoise(epsilon_loss_weight, sigma_min=lo, sigma_max=50, num_bins=16))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        FlowMatching(), DiscreteTimesteps(alpha_bar)
    with pytest.raises(TypeError, match='apply only when FlowMatching builds it'):
        FlowMatching(LogNormal(), num_bins=8)


def test_flow_matching_builds_infonoise_with_a_logit_normal_warm_up():
    fm = FlowMatching()
    noise = fm.sampler
    t_range = flow_t_from_sigma(noise.grid.edges[[0, -1]])
    torch.testing.assert_close(t_range, torch.tensor([1e-3, 1 - 1e-3], dtype=torch.float64))
    torch.testing.assert_close(noise.loss_weight(noise.grid.centers), flow_velocity_loss_weight(noise.grid.centers))
    torch.manual_seed(0)
    t = fm.sample_t(100_000).double()
    lo, hi = math.log(1e-3 / (1 - 1e-3)), math.log((1 - 1e-3) / 1e-3)

    def cdf(v):  # 0.95·logit-normal(0, 1) + 0.05·log-uniform σ, in logit t.
        return 0.95 * scipy.stats.norm.cdf(v) + 0.05 * ((v - lo) / (hi - lo)).clip(0, 1)

    assert scipy.stats.kstest(torch.logit(t).numpy(), cdf).pvalue > 1e-3


def test_continuous_law_has_no_saw_tooth_and_covers_the_range():
    kwargs = dict(warmup_kimg=0, refresh_kimg=1.024, min_count=16, base='loguniform')
    noise = {b: InfoNoise('uniform', build=b, **kwargs) for b in law.BUILDS}
    for s in noise.values():
        feed(s, gaussian_losses, steps=40)
        assert s.refreshes > 0
    # Density per unit ln σ just below and above each interior table point.
    x = noise['continuous'].table.log_sigma[2:-2]
    for build, s in noise.items():
        below = (x - 1e-7).exp() * s.table.pdf_at((x - 1e-7).exp())
        above = (x + 1e-7).exp() * s.table.pdf_at((x + 1e-7).exp())
        jump = float(((above - below).abs() / below).max())
        if build == 'continuous':
            assert jump < 1e-5
        else:  # Piecewise constant in σ: σ·π jumps where the slope changes, within a factor of the bin ratio.
            assert jump > 0.05
    # The continuous law draws across [σ_min, σ_max]; the paper's table stops at the outer bin centres.
    c = noise['continuous']
    assert float(c.cdf(torch.tensor([0.0021], dtype=torch.float64))) > 0
    assert float(c.cdf(torch.tensor([79.0], dtype=torch.float64))) < 1
    assert float(noise['paper'].cdf(torch.tensor([0.00205], dtype=torch.float64))) == 0


def test_log_linear_table_is_exact():
    x = torch.tensor([-3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    table = LogLinearTable.build(x, torch.tensor([0.0, 2.0, 1.0, 3.0], dtype=torch.float64))
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)
    torch.testing.assert_close(table.cdf_at(table.icdf(u)), u, atol=1e-12, rtol=0)
    # ∫ of g = trapezoids: masses 2, 2.25, 3 of 7.25.
    torch.testing.assert_close(table.cdf, torch.tensor([0, 2, 4.25, 7.25], dtype=torch.float64) / 7.25)


def test_oracle_fixed_profile_never_refreshes_and_round_trips():
    noise = InfoNoise('uniform', warmup_kimg=0, refresh_kimg=1.024, min_count=4, floor=0.0, smoothing=0)
    exact = oracles.gaussian_mmse(noise.grid.centers, LAM, mean=True)
    noise.fix_profile(exact)
    prof = noise.profile()
    # The same gate and pivot rule as a refresh, with w = 1: π ∝ gated rate.
    torch.testing.assert_close(prof.rate, exact / noise.grid.centers**3)
    table = noise.table
    feed(noise, gaussian_losses, steps=20)
    assert noise.table is table and noise.refreshes == 1
    other = InfoNoise('uniform', warmup_kimg=0, refresh_kimg=1.024, min_count=4, floor=0.0, smoothing=0)
    other.load_state_dict(noise.state_dict())
    assert other.frozen and torch.equal(other.table.cdf, table.cdf)
    with pytest.raises(ValueError, match=r'fix_profile: mse must be \[64\]'):
        noise.fix_profile(exact[:3])


def test_variants():
    sigma = InfoNoise().grid.centers
    exact = oracles.gaussian_mmse(sigma, LAM, mean=True)
    make = lambda **kw: InfoNoise('edm', floor=0.0, **kw)  # noqa: E731
    plain, projected, tempered, half = make(), make(projection='lognormal'), make(temper=1e-9), make(temper=0.5)
    for s in (plain, projected, tempered, half):
        s.fix_profile(exact)
    # Projection: a log-normal with the moments of ln σ of the information law.
    draws = plain.sample(400_000).double().log()
    proj = projected.sample(400_000).double().log()
    assert abs(float(draws.mean() - proj.mean())) < 0.02 and abs(float(draws.std() / proj.std() - 1)) < 0.02
    assert scipy.stats.normaltest(proj[:5000].numpy()).pvalue > 1e-3
    # Tempering: β → 0 gives the base (EDM's log-normal), β = ½ the normalised geometric mean.
    assert abs(float(tempered.sample(400_000).double().log().mean()) + 1.2) < 0.02
    g = {n: s.table.density[1:-1] for n, s in (('plain', plain), ('half', half))}
    base = law.base_density(plain.base, plain.grid)
    geometric = (base * g['plain']).sqrt()
    ratio = g['half'] / geometric
    torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-9, atol=0)
    # Excess loss: the reference subtracted (never below 0); the data-variance bound caps the loss.
    excess = InfoNoise(reference_mse=lambda s: 0.5 * oracles.gaussian_mmse(s, LAM, mean=True))
    torch.testing.assert_close(excess.information_mse(exact), 0.5 * exact)
    bounded = InfoNoise(data_variance=0.01)
    assert bool((bounded.information_mse(exact) <= sigma**2 * 0.01 / (sigma**2 + 0.01) + 1e-15).all())
    with pytest.raises(ValueError, match='need build=.continuous.'):
        InfoNoise(build='paper', projection='lognormal')


def test_held_out_empirical_bayes_mse_does_not_collapse():
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(40, 1, 2, 2, generator=gen, dtype=torch.float64)
    sigma = torch.logspace(-2, 1, 12, dtype=torch.float64).tolist()
    own = torch.tensor([oracles.empirical_bayes_mse(s, data, 4000, gen) for s in sigma], dtype=torch.float64)
    held = torch.tensor([oracles.empirical_bayes_mse(s, data, 4000, gen, True) for s in sigma], dtype=torch.float64)
    sigma = torch.tensor(sigma, dtype=torch.float64)
    # The set's own mmse collapses at small σ (the posterior snaps to the training point); left out, the point is
    # fresh data: the error is capped by σ² (returning x), exactly σ² where the neighbours are far.
    assert float(own[0] / sigma[0] ** 2) < 0.05 and float(held[0] / sigma[0] ** 2) == pytest.approx(1, abs=1e-12)
    assert bool((held <= sigma**2 * (1 + 1e-12)).all()) and bool((held >= own * 0.9).all())
    # Far above the spacing of the data, leaving one of 40 points out barely matters (Monte-Carlo noise aside).
    torch.testing.assert_close(held[-1], own[-1], rtol=0.1, atol=0)


def test_infogrid_takes_the_trained_range_and_has_an_euler_end():
    noise = InfoNoise('edm', sigma_min=0.01, sigma_max=50)
    noise.fix_profile(oracles.gaussian_mmse(noise.grid.centers, LAM, mean=True))
    p = noise.profile()
    assert p.sigma_range() == (0.01, 50.0)
    grid = grids.infogrid(8, p)
    torch.testing.assert_close(grid, grids.infogrid(8, p.sigma, p.rate, 0.01, 50))
    euler = grids.infogrid(8, p, end='zero')
    assert len(euler) == 9 and float(euler[0]) == 50 and float(euler[-1]) == 0 and float(euler[-2]) > 0.01
    # The 8 levels sit at u = 1, 7/8, ..., 1/8 of the information coordinate over the trained range.
    u = grids.information_coordinate(p.sigma, p.rate)
    lo, hi = u(math.log(0.01)), u(math.log(50))
    levels = (u(euler[:-1].log().numpy()) - lo) / (hi - lo)
    torch.testing.assert_close(torch.from_numpy(levels), torch.arange(8, 0, -1, dtype=torch.float64) / 8)
    with pytest.raises(ValueError, match='end must be one of'):
        grids.infogrid(8, p, end='last')


def test_adapters_name_their_own_arguments_in_observe_errors():
    fm = FlowMatching(num_bins=8)
    cases = {
        'observe: t must be a floating-point tensor, got torch.int64': (torch.tensor([0, 1]), torch.ones(2)),
        'observe: t must be a tensor, got list': ([0.5], torch.ones(1)),
        r'observe: t must be 1-D \(one per sample\), got shape \(1, 2\)': (torch.full((1, 2), 0.5), torch.ones(1, 2)),
        r'observe: velocity_mse has shape \(\) but t \(2,\); pass the per-sample MSE': (
            torch.full((2,), 0.5),
            torch.ones(2).mean(),
        ),
    }
    for message, (t, mse) in cases.items():
        with pytest.raises(ValueError, match=message):
            fm.observe(t, mse)
    steps = DiscreteTimesteps(ddpm_alphas_cumprod(), num_bins=8)
    with pytest.raises(ValueError, match=r'observe: mse has shape \(\) but timesteps \(2,\)'):
        steps.observe(torch.tensor([3, 5]), torch.ones(2).mean())
    with pytest.raises(ValueError, match='observe: mse must be a floating-point tensor'):
        steps.observe(torch.tensor([3, 5]), torch.ones(2, dtype=torch.int64))
