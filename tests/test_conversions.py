"""infonoise.conversions against closed forms (the Gaussian-channel identities of each parameterisation) and by
Monte Carlo (the adapters' draws have the intended law in the user's own variable)."""

import math

import pytest
import torch

from infonoise import DiscreteTimesteps, FlowMatching, InfoNoise, LogNormal, LogUniform, conversions
from infonoise.grids import vp_sigma, vp_t
from infonoise.samplers import NoiseSampler


def ddpm_alphas_cumprod(T: int = 1000) -> torch.Tensor:
    """DDPM's linear β schedule (1e-4 to 0.02), as diffusers' DDPMScheduler builds alphas_cumprod."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)


class Recorder(NoiseSampler):
    """A log-uniform sampler that records what `observe` receives."""

    def __init__(self):
        self.inner, self.seen = LogUniform(0.002, 80), []

    def icdf(self, u):
        return self.inner.icdf(u)

    def cdf(self, sigma):
        return self.inner.cdf(sigma)

    def observe(self, sigma, mse):
        self.seen.append((sigma, mse))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    guess = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)  # An arbitrary network output.
    sigma = torch.exp(torch.empty(64, dtype=torch.float64).uniform_(-6, 5, generator=g))
    return x0, eps, guess, sigma


def mse(a, b):
    return (a - b).square().flatten(1).mean(1)


def col(v):
    return v[:, None, None, None]


def test_vp_identities(batch):
    # x_t = √ᾱ·x₀ + √(1−ᾱ)·ε is x₀ + σε after division by √ᾱ; an ε- or v-prediction's implied x̂₀ has the stated
    # x₀-space error and its plain loss is w(σ) times that error.
    x0, eps, guess, sigma = batch
    a = conversions.alpha_bar_from_sigma(sigma)
    torch.testing.assert_close(conversions.sigma_from_alpha_bar(a), sigma)
    x_t = col(a.sqrt()) * x0 + col((1 - a).sqrt()) * eps
    torch.testing.assert_close(x_t / col(a.sqrt()), x0 + col(sigma) * eps)
    # ε-prediction: x̂₀ = (x_t − √(1−ᾱ)ε̂)/√ᾱ.
    x0_hat = (x_t - col((1 - a).sqrt()) * guess) / col(a.sqrt())
    torch.testing.assert_close(mse(x0_hat, x0), conversions.x0_mse(mse(guess, eps), sigma, 'epsilon'))
    torch.testing.assert_close(mse(guess, eps), conversions.epsilon_loss_weight(sigma) * mse(x0_hat, x0))
    # v-prediction: v = √ᾱ·ε − √(1−ᾱ)·x₀ and x̂₀ = √ᾱ·x_t − √(1−ᾱ)·v̂.
    v = col(a.sqrt()) * eps - col((1 - a).sqrt()) * x0
    x0_hat = col(a.sqrt()) * x_t - col((1 - a).sqrt()) * guess
    torch.testing.assert_close(mse(x0_hat, x0), conversions.x0_mse(mse(guess, v), sigma, 'v_prediction'))
    torch.testing.assert_close(mse(guess, v), conversions.v_loss_weight(sigma) * mse(x0_hat, x0))
    torch.testing.assert_close(conversions.x0_mse(mse(guess, x0), sigma, 'sample'), mse(guess, x0))
    for prediction in conversions.PREDICTIONS:
        w = conversions.prediction_loss_weight(prediction)
        assert w(sigma).shape == sigma.shape
    with pytest.raises(ValueError, match='Unknown prediction "eps"'):
        conversions.x0_mse(mse(guess, x0), sigma, 'eps')


def test_vp_sde_time():
    t = torch.linspace(1e-5, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(vp_t(vp_sigma(t)), t, rtol=1e-9, atol=1e-12)


def test_flow_identities(batch):
    # x_t = (1−t)·x₀ + t·ε is x₀ + σε after division by 1−t; the velocity ε − x₀ has x̂₀ = x_t − t·v̂.
    x0, eps, guess, sigma = batch
    t = conversions.flow_t_from_sigma(sigma)
    torch.testing.assert_close(conversions.flow_sigma_from_t(t), sigma)
    x_t = col(1 - t) * x0 + col(t) * eps
    torch.testing.assert_close(x_t / col(1 - t), x0 + col(sigma) * eps)
    x0_hat = x_t - col(t) * guess
    v_mse = mse(guess, eps - x0)
    torch.testing.assert_close(mse(x0_hat, x0), t**2 * v_mse)
    torch.testing.assert_close(v_mse, conversions.velocity_loss_weight(sigma) * mse(x0_hat, x0))
    # The adapter hands σ and the x₀-space MSE to the sampler.
    recorder = Recorder()
    FlowMatching(recorder).observe(t, v_mse)
    torch.testing.assert_close(recorder.seen[0][0], sigma)
    torch.testing.assert_close(recorder.seen[0][1], mse(x0_hat, x0))


def test_flow_draws_have_the_intended_density_in_t():
    # σ log-uniform on [σ_min, σ_max] maps to t = σ/(1+σ) with density 1/(t(1−t)·ln(σ_max/σ_min)); a histogram of
    # 400k draws agrees with it within Monte-Carlo error in every bin.
    torch.manual_seed(0)
    lo, hi = 0.01, 100.0
    fm = FlowMatching(LogUniform(lo, hi))
    t = fm.sample_t(400_000).double()
    assert t.min() >= lo / (1 + lo) - 1e-6 and t.max() <= hi / (1 + hi) + 1e-6
    edges = torch.linspace(lo / (1 + lo), hi / (1 + hi), 41, dtype=torch.float64)
    counts = torch.histogram(t, edges).hist
    # ∫ dt / (t(1−t)) = logit(t), so the exact bin probabilities are differences of logit(t)/ln(σ_max/σ_min).
    expected = torch.diff(torch.logit(edges)) / math.log(hi / lo) * t.numel()
    assert float(((counts - expected).abs() / expected.sqrt()).max()) < 4.5
    torch.testing.assert_close(fm.cdf_t(edges), (torch.logit(edges) - math.log(lo)) / math.log(hi / lo))


def test_discrete_timesteps_get_their_interval_mass():
    # 1,000 DDPM timesteps under a log-normal σ-law: each timestep's probability is the law's mass of its interval
    # between geometric midpoints (the first reaching down to 0, the last up to ∞), and 400k draws have those
    # frequencies.
    alpha_bar = ddpm_alphas_cumprod()
    law = LogNormal(0.5, 1.5)
    steps = DiscreteTimesteps(alpha_bar, law)
    sigmas = conversions.sigma_from_alpha_bar(alpha_bar)
    p = steps.probabilities()
    assert p.shape == (1000,) and float(p.sum()) == pytest.approx(1, abs=1e-12)
    mid = (sigmas[1:] * sigmas[:-1]).sqrt()
    z = lambda s: 0.5 * torch.erfc(-(s.log() - 0.5) / (1.5 * math.sqrt(2)))  # noqa: E731
    torch.testing.assert_close(p[1:-1], z(mid[1:]) - z(mid[:-1]))
    torch.testing.assert_close(p[0], z(mid[0]))
    torch.manual_seed(0)
    draws = steps.sample(400_000)
    assert draws.dtype == torch.int64 and 0 <= int(draws.min()) and int(draws.max()) <= 999
    # Group into 20 blocks of 50 timesteps (enough counts per block for a normal approximation).
    counts = torch.bincount(draws, minlength=1000).double().reshape(20, 50).sum(1)
    expected = p.reshape(20, 50).sum(1) * draws.numel()
    assert float(((counts - expected).abs() / expected.clamp(min=1).sqrt()).max()) < 4.5


def test_discrete_timesteps_observe_and_infonoise():
    alpha_bar = ddpm_alphas_cumprod()
    recorder = Recorder()
    steps = DiscreteTimesteps(alpha_bar, recorder, prediction='epsilon')
    t = torch.tensor([0, 10, 999])
    steps.observe(t, torch.ones(3))
    sigma = conversions.sigma_from_alpha_bar(alpha_bar)[t]
    torch.testing.assert_close(recorder.seen[0][0], sigma)
    torch.testing.assert_close(recorder.seen[0][1], sigma**2)
    # With InfoNoise on the timesteps' σ range: every interval holds a timestep at 32 bins, not at 256.
    lo, hi = steps.sigma_range()
    steps.check_bins(InfoNoise(sigma_min=lo, sigma_max=hi, num_bins=32).grid.edges)
    with pytest.raises(ValueError, match='holds no timestep'):
        steps.check_bins(InfoNoise(sigma_min=lo, sigma_max=hi, num_bins=256).grid.edges)
    # After a refresh the probabilities follow the table: they sum to 1 and match the table's interval masses.
    noise = InfoNoise(
        weight=conversions.epsilon_loss_weight, sigma_min=lo, sigma_max=hi, num_bins=32, min_count=4,
        refresh_steps=5, warmup_steps=20,
    )  # fmt: skip
    steps = DiscreteTimesteps(alpha_bar, noise)
    torch.manual_seed(0)
    for _ in range(40):
        ts = steps.sample(256)
        s = steps.sigmas[ts]
        steps.observe(ts, 1 / (1 + s**2))  # ε-MSE of a unit-Gaussian source: mmse/σ² = 1/(1 + σ²).
    assert noise.refreshes > 0
    p = steps.probabilities()
    assert float(p.sum()) == pytest.approx(1, abs=1e-9)
    cdf = noise.table.cdf_at(steps.edges[1:-1])
    torch.testing.assert_close(p[1:-1], (cdf[1:] - cdf[:-1]).clamp(min=0))
    # What `sample` draws from was rebuilt at the last refresh (it caches the law between refreshes).
    torch.testing.assert_close(steps._on('cpu')['cumulative'], p.cumsum(0))


def test_out_of_range_timesteps_and_t_are_refused_at_once_on_the_cpu():
    alpha_bar = ddpm_alphas_cumprod(100)
    steps = DiscreteTimesteps(alpha_bar, Recorder())
    with pytest.raises(ValueError, match=r'timesteps must lie in \[0, 100\), got 2 outside, e.g. -1'):
        steps.observe(torch.tensor([-1, 0, 99, 100]), torch.ones(4))
    with pytest.raises(ValueError, match=r'timesteps must be 1-D'):
        steps.observe(torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 2))
    fm = FlowMatching(Recorder())
    for t in (1.0, 0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r't must lie in \(0, 1\), got 1 outside'):
            fm.observe(torch.tensor([0.5, t]), torch.ones(2))


def test_out_of_range_timesteps_are_refused_not_wrapped(monkeypatch):
    # On an accelerator (simulated: no check at once) indexing would wrap −1 to the last timestep; the adapter hands
    # the sampler σ = NaN instead (no host sync), and InfoNoise refuses it at its next refresh check.
    monkeypatch.setattr(conversions, '_checked_at_once', lambda device: False)
    alpha_bar = ddpm_alphas_cumprod(100)
    recorder = Recorder()
    DiscreteTimesteps(alpha_bar, recorder).observe(torch.tensor([-1, 0, 99, 100]), torch.ones(4))
    sigma = recorder.seen[0][0]
    assert sigma[[0, 3]].isnan().all() and torch.equal(sigma[1:3], conversions.sigma_from_alpha_bar(alpha_bar)[[0, 99]])
    lo, hi = conversions.sigma_from_alpha_bar(alpha_bar)[[0, -1]].tolist()
    noise = InfoNoise(conversions.epsilon_loss_weight, sigma_min=lo, sigma_max=hi, num_bins=4, refresh_steps=2,
                      warmup_steps=10)  # fmt: skip
    steps = DiscreteTimesteps(alpha_bar, noise)
    steps.observe(torch.tensor([-1, 5]), torch.ones(2))
    with pytest.raises(ValueError, match='1 σ that are not positive and finite .*DiscreteTimesteps timestep outside'):
        steps.observe(torch.tensor([3, 5]), torch.ones(2))
    with pytest.raises(ValueError, match='timesteps must be an int32/int64 tensor, got torch.float32'):
        steps.observe(torch.tensor([3.0, 5.0]), torch.ones(2))
    with pytest.raises(ValueError, match='per-sample MSE'):
        steps.observe(torch.tensor([3, 5]), torch.ones(2).mean())
    # Flow matching: t = 1 is σ = ∞, refused the same way.
    fm = FlowMatching(num_bins=4, refresh_steps=1, warmup_steps=10)
    with pytest.raises(ValueError, match='1 σ that are not positive and finite'):
        fm.observe(torch.tensor([0.5, 1.0]), torch.ones(2))


def test_adapters_need_a_noise_sampler():
    for make in (lambda: FlowMatching(object()), lambda: DiscreteTimesteps(ddpm_alphas_cumprod(10), object())):
        with pytest.raises(TypeError, match='is not a noise sampler: it has no'):
            make()
    with pytest.raises(ValueError, match='must decrease strictly and lie in'):
        DiscreteTimesteps(torch.tensor([0.9, math.nan]), LogNormal())


def test_discrete_timesteps_reject_bad_tables():
    with pytest.raises(ValueError, match='decrease strictly'):
        DiscreteTimesteps(torch.tensor([0.5, 0.9]), LogNormal())
    with pytest.raises(ValueError, match='Unknown prediction'):
        DiscreteTimesteps(ddpm_alphas_cumprod(10), LogNormal(), prediction='x0')
