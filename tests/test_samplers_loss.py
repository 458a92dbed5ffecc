"""Noise samplers (exact distributions by KS tests and moments) and the loss (formulas, Bayes-optimal MSE)."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from infonoise.samplers import LogNormal, LogUniform, Mixture, NoiseSampler, VPSampler
from infonoise.weights import edm_weight
from training.loss import DenoisingLoss

N = 200_000


def draw(sampler: NoiseSampler, n: int = N, seed: int = 0) -> np.ndarray:
    torch.manual_seed(seed)
    sigma = sampler.sample(n, 'cpu')
    assert sigma.dtype == torch.float32 and sigma.shape == (n,)
    return sigma.double().numpy()


def test_lognormal_matches_edm_moments_and_law():
    ln_sigma = np.log(draw(LogNormal()))
    # Standard error of the mean is 1.2/sqrt(N) = 0.0027.
    assert abs(ln_sigma.mean() - (-1.2)) < 0.011
    assert abs(ln_sigma.std() - 1.2) < 0.008
    assert scipy.stats.kstest(ln_sigma, 'norm', args=(-1.2, 1.2)).pvalue > 1e-3
    # A different P_mean moves the law: the test can fail.
    assert scipy.stats.kstest(np.log(draw(LogNormal(P_mean=-1.0))), 'norm', args=(-1.2, 1.2)).pvalue < 1e-6


def test_loguniform_bounds_and_law():
    sigma = draw(LogUniform(0.002, 80))
    assert sigma.min() >= 0.002 * (1 - 1e-6) and sigma.max() <= 80 * (1 + 1e-6)
    u = np.log(sigma / 0.002) / math.log(80 / 0.002)
    assert scipy.stats.kstest(u, 'uniform').pvalue > 1e-3
    # Both ends are reached: the first and last percent of log-space are populated.
    assert (u < 0.01).mean() > 0.005 and (u > 0.99).mean() > 0.005


def test_vp_sampler_is_uniform_in_t():
    s = VPSampler()
    sigma = draw(s)
    # Invert EDM's σ(t) = sqrt(exp(β_d t²/2 + β_min t) − 1).
    t = (np.sqrt(s.beta_min**2 + 2 * s.beta_d * np.log1p(sigma**2)) - s.beta_min) / s.beta_d
    assert scipy.stats.kstest((t - s.epsilon_t) / (1 - s.epsilon_t), 'uniform').pvalue > 1e-3
    assert abs(sigma.max() - 152.167) < 0.2 and sigma.min() > 0.00099


def test_icdf_extremes_are_finite():
    u = torch.tensor([2.0**-40, 0.5, 1 - 2.0**-30], dtype=torch.float64)
    for s in (LogNormal(), LogUniform(), VPSampler()):
        assert torch.isfinite(s.icdf(u)).all() and (s.icdf(u) > 0).all()
    assert LogNormal().icdf(torch.tensor([0.5], dtype=torch.float64)).item() == pytest.approx(math.exp(-1.2))


def test_fixed_samplers_have_empty_state():
    s = LogNormal()
    s.observe(torch.ones(3), torch.ones(3))
    assert s.state_dict() == {}
    s.load_state_dict({})
    for bad in ({'x': 1}, [], None):
        with pytest.raises(ValueError, match='LogNormal has no state'):
            s.load_state_dict(bad)


@pytest.mark.parametrize(
    'make, message',
    [
        (lambda: LogNormal(P_std=0), 'P_std must be a finite number > 0, got 0'),
        (lambda: LogNormal(P_std=math.nan), 'P_std must be a finite number > 0, got nan'),
        (lambda: LogNormal(P_mean=math.inf), 'P_mean must be a finite number, got inf'),
        (lambda: LogNormal(P_mean='-1.2'), "P_mean must be a finite number, got '-1.2'"),
        (lambda: LogUniform(1, 0.5), 'Need 0 < sigma_min < sigma_max < inf, got sigma_min=1, sigma_max=0.5'),
        (
            lambda: LogUniform(0.002, math.inf),
            'Need 0 < sigma_min < sigma_max < inf, got sigma_min=0.002, sigma_max=inf',
        ),
        (lambda: LogUniform(math.nan, 80), 'got sigma_min=nan, sigma_max=80'),
        (lambda: LogUniform(0, 80), 'got sigma_min=0, sigma_max=80'),
        (lambda: LogUniform('0.1', 80), "got sigma_min='0.1', sigma_max=80"),
        (lambda: VPSampler(beta_d=0), 'beta_d must be a finite number > 0'),
        (lambda: VPSampler(beta_min=-0.1), 'beta_min must be a finite number >= 0'),
        (lambda: VPSampler(epsilon_t=1), r'epsilon_t must be a number in \(0, 1\)'),
        (lambda: VPSampler(epsilon_t=math.nan), 'epsilon_t must be a number in'),
        (lambda: Mixture([0.5, 0.6], [LogNormal(), LogUniform()]), 'sum to 1'),
        (lambda: Mixture([0.5], [LogNormal(), LogUniform()]), 'as many weights as samplers'),
        (lambda: DenoisingLoss(weight='nope'), 'Unknown loss weight'),
    ],
)
def test_bad_sampler_arguments(make, message):
    # Every number is checked, NaN and inf included: LogUniform(0.002, inf) used to draw 5 % infinite σ.
    with pytest.raises(ValueError, match=message):
        make()


class NoCDF(NoiseSampler):
    def icdf(self, u):
        return u + 1


def test_mixture_needs_cdfs_only_to_mix():
    assert Mixture([1.0, 0.0], [NoCDF(), LogUniform()]).icdf(torch.tensor([0.5], dtype=torch.float64)) == 1.5
    with pytest.raises(ValueError, match='NoCDF has no cdf'):
        Mixture([0.5, 0.5], [NoCDF(), LogUniform()])


@pytest.mark.parametrize('sampler', [LogNormal(), LogUniform(), VPSampler()])
def test_observe_refuses_what_it_cannot_use(sampler):
    # The fixed samplers ignore observations, but check them as InfoNoise does: the same loop must not fail only
    # once the sampler is switched.
    sigma, mse = torch.rand(8) + 0.1, torch.rand(8)
    sampler.observe(sigma, mse)
    cases = [
        ((sigma, mse.mean()), r'mse has shape \(\) but sigma \(8,\); pass the per-sample MSE'),
        ((sigma, mse[:4]), r'mse has shape \(4,\) but sigma \(8,\)'),
        ((sigma[:, None], mse[:, None]), r'sigma must be 1-D \(one per sample\), got shape \(8, 1\)'),
        ((sigma, (mse * 100).long()), 'mse must be a floating-point tensor, got torch.int64'),
        ((sigma, 0.5), 'mse must be a tensor, got float'),
        ((sigma, mse.to('meta')), 'mse is on meta but sigma on cpu'),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            sampler.observe(*args)


def test_weights_closed_form():
    sigma = torch.tensor([0.1, 0.5, 2.0])
    assert torch.allclose(edm_weight(sigma, 0.5), (sigma**2 + 0.25) / (sigma * 0.5) ** 2)
    assert edm_weight(torch.tensor(0.5), 0.5).item() == pytest.approx(8.0)
    assert torch.allclose(DenoisingLoss('inverse-variance').weight(sigma), 1 / sigma**2)
    assert torch.equal(DenoisingLoss('uniform').weight(sigma), torch.ones(3))


class GaussianBayesDenoiser:
    """Exact posterior mean for data ~ N(0, λ I): D(x; σ) = x·λ/(λ + σ²)."""

    def __init__(self, lam):
        self.lam = lam

    def __call__(self, x, sigma, labels=None, augment_labels=None):
        return x * self.lam / (self.lam + sigma**2)


@pytest.mark.parametrize('weight', ['edm', 'uniform'])
def test_loss_returns_weighted_loss_and_bayes_mse(weight):
    # With the Bayes denoiser the per-sample MSE averages to mmse(σ) = λσ²/(λ+σ²).
    lam, n = 0.25, 4096
    torch.manual_seed(1)
    images = torch.randn(n, 1, 8, 8) * math.sqrt(lam)
    sigma = torch.full((n,), 0.7)
    loss_fn = DenoisingLoss(weight=weight)
    loss, mse = loss_fn(GaussianBayesDenoiser(lam), images, sigma)
    assert loss.shape == mse.shape == (n,)
    assert torch.allclose(loss, loss_fn.weight(sigma) * mse)
    mmse = lam * 0.49 / (lam + 0.49)
    assert mse.mean().item() == pytest.approx(mmse, rel=0.01)


def test_loss_uses_augmented_target():
    # The target is the augmented image, and augment labels reach the network.
    seen = {}

    def augment_pipe(images):
        return images + 1, torch.zeros(images.shape[0], 9)

    def net(x, sigma, labels=None, augment_labels=None):
        seen['augment_labels'] = augment_labels
        return torch.zeros_like(x)

    images = torch.zeros(2, 1, 4, 4)
    _, mse = DenoisingLoss('uniform')(net, images, torch.ones(2), augment_pipe=augment_pipe)
    assert torch.equal(mse, torch.ones(2)) and seen['augment_labels'].shape == (2, 9)
