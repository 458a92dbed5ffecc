"""Tests for EDM's ablation sampler: bitwise agreement with `edm_sampler`, and convergence to the exact
probability-flow ODE of a Gaussian source in every time coordinate (schedule sigma(t), scaling s(t))."""

import math

import pytest
import torch

from infonoise.grids import edm_grid
from training.networks import EDMPrecond
from training.sampling import StackedRandomGenerator, ablation_sampler, edm_sampler

LAM = 0.25


class GaussianData:
    """Stub network for data N(0, lam I), whose exact denoiser is D(x; sigma) = x lam / (lam + sigma^2).

    Records every (input, sigma) it is called with; `round_sigma` is the identity unless one is given.
    """

    sigma_min = 0
    sigma_max = float('inf')

    def __init__(self, lam=LAM, round_sigma=None):
        self.lam = lam
        self.inputs, self.sigmas = [], []
        self._round_sigma = round_sigma

    def round_sigma(self, sigma):
        sigma = torch.as_tensor(sigma)
        return sigma if self._round_sigma is None else self._round_sigma(sigma)

    def __call__(self, x, sigma, class_labels=None):
        self.inputs.append(x)
        self.sigmas.append(float(sigma))
        return x * self.lam / (self.lam + sigma**2)


def latents_for(seeds):
    return StackedRandomGenerator('cpu', seeds).randn([len(seeds), 1, 4, 4], dtype=torch.float64)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def ode_error(num_steps, **kwargs):
    """Relative error against the exact flow x(sigma) = x(sigma_0) sqrt((lam + sigma^2) / (lam + sigma_0^2)) to 0.

    The final Euler step from sigma_{N-1} = 0.002 adds at most sigma_{N-1}^2 / (2 lam) = 8e-6 to it.
    """
    sigmas = edm_grid(num_steps)
    latents = latents_for(range(8))
    out = ablation_sampler(GaussianData(), latents, sigmas, **kwargs)
    sigma_0 = sigmas[0].item()
    return relative_error(out, latents * sigma_0 * math.sqrt(LAM / (LAM + sigma_0**2)))


def vp_sigma(t, sigma_min, sigma_max, epsilon_s):
    """The VP schedule through sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max, solved here on its own."""
    a, b = math.log1p(sigma_min**2), math.log1p(sigma_max**2)
    # beta_d t^2 / 2 + beta_min t passes through (epsilon_s, a) and (1, b).
    beta_d = 2 * (a / epsilon_s - b) / (epsilon_s - 1)
    beta_min = b - beta_d / 2
    return math.sqrt(math.expm1(beta_d * t**2 / 2 + beta_min * t))


# ----------------------------------------------------------------------------------------------------------------
# EDM's own choices reproduce edm_sampler.


@pytest.fixture(scope='module')
def tiny_edm_net():
    torch.manual_seed(0)
    net = EDMPrecond(
        8, 1, model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]
    )
    return net.eval().requires_grad_(False)


@pytest.mark.parametrize('solver', ['heun', 'euler'])
@pytest.mark.parametrize('churn', [{}, dict(S_churn=30, S_min=0.05, S_max=20, S_noise=1.007)])
@pytest.mark.parametrize('network', ['tiny_edm', 'stub', 'rounding_stub'])
def test_linear_schedule_without_scaling_equals_edm_sampler_bitwise(request, solver, churn, network):
    if network == 'tiny_edm':
        net, shape = request.getfixturevalue('tiny_edm_net'), [3, 1, 8, 8]
    elif network == 'stub':
        # A float64 denoiser on a grid where t_hat + (t_next - t_hat) != t_next in floating point.
        net, shape = GaussianData(), [3, 1, 4, 4]
    else:
        # Snap to multiples of 1/16, so that rounding happens on the grid and after churn.
        net, shape = GaussianData(round_sigma=lambda s: (torch.round(s * 16) / 16).clip(min=1 / 16)), [3, 1, 4, 4]
    sigmas = edm_grid(6, sigma_min=0.02, sigma_max=40)

    def sample(sampler, **kwargs):
        rnd = StackedRandomGenerator('cpu', [4, 9, 2])
        latents = rnd.randn(shape)
        return sampler(net, latents, sigmas, randn_like=rnd.randn_like, solver=solver, **churn, **kwargs)

    expected = sample(edm_sampler)
    out = sample(ablation_sampler, schedule='linear', scaling='none', alpha=1)
    assert out.dtype == torch.float64
    assert torch.equal(out, expected)
    # The defaults are EDM's choices.
    assert torch.equal(sample(ablation_sampler), expected)


# ----------------------------------------------------------------------------------------------------------------
# The same probability-flow ODE in other time coordinates, against its closed form.

# Relative error at 64 steps, about twice what it measures on this grid.
HEUN_BOUNDS = {('vp', 'vp'): 1.5e-3, ('ve', 'none'): 7e-2, ('linear', 'none'): 7.5e-3}


@pytest.mark.parametrize('schedule, scaling', list(HEUN_BOUNDS))
def test_heun_converges_to_the_exact_ode_solution_at_second_order(schedule, scaling):
    coords = dict(schedule=schedule, scaling=scaling)
    err_32, err_64 = ode_error(32, **coords), ode_error(64, **coords)
    assert err_64 < HEUN_BOUNDS[schedule, scaling]
    assert 3.2 < err_32 / err_64 < 5.5
    assert ode_error(128, **coords) < err_64 / 3.2


@pytest.mark.parametrize('schedule, scaling', list(HEUN_BOUNDS))
def test_euler_is_first_order(schedule, scaling):
    coords = dict(schedule=schedule, scaling=scaling, solver='euler')
    err_32, err_64 = ode_error(32, **coords), ode_error(64, **coords)
    assert 1.6 < err_32 / err_64 < 2.5
    assert err_64 > 2 * ode_error(64, schedule=schedule, scaling=scaling)


@pytest.mark.parametrize('schedule, scaling', [('vp', 'vp'), ('linear', 'vp')])
def test_heun_with_alpha_below_one_is_still_second_order(schedule, scaling):
    coords = dict(schedule=schedule, scaling=scaling, alpha=0.5)
    err_32, err_64 = ode_error(32, **coords), ode_error(64, **coords)
    assert 3.2 < err_32 / err_64 < 5.5
    assert err_64 < 2e-3
    # A different method from alpha = 1, not the same one.
    assert abs(err_64 - ode_error(64, schedule=schedule, scaling=scaling)) > 1e-5


def test_alpha_places_the_correction_between_t_hat_and_t_next():
    net = GaussianData()
    sigmas = edm_grid(3, sigma_min=0.5, sigma_max=10)
    ablation_sampler(net, latents_for([0]), sigmas, alpha=0.25)
    s = sigmas.tolist()
    expected = [s[0], s[0] + 0.25 * (s[1] - s[0]), s[1], s[1] + 0.25 * (s[2] - s[1]), s[2]]
    assert net.sigmas == pytest.approx(expected, rel=1e-14)


# ----------------------------------------------------------------------------------------------------------------
# Time coordinates: the grid maps to t, the VP schedule is refitted to its ends, x starts at sigma(t_0) s(t_0).


def test_vp_schedule_is_refitted_to_the_grid_ends():
    # Two steps: t_0 = 1 and t_1 = epsilon_s, so alpha = 0.5 evaluates at t = (1 + epsilon_s) / 2.
    sigma_min, sigma_max, epsilon_s = 0.01, 30.0, 0.004
    sigmas = torch.tensor([sigma_max, sigma_min, 0], dtype=torch.float64)
    net = GaussianData()
    latents = latents_for([0, 1])
    ablation_sampler(net, latents, sigmas, schedule='vp', scaling='vp', alpha=0.5, epsilon_s=epsilon_s)
    midpoint = vp_sigma((1 + epsilon_s) / 2, sigma_min, sigma_max, epsilon_s)
    assert net.sigmas == pytest.approx([sigma_max, midpoint, sigma_min], rel=1e-12)
    # x_0 = latents sigma(t_0) s(t_0), and the network sees x / s.
    assert torch.allclose(net.inputs[0], latents * sigma_max, rtol=1e-13, atol=0)


@pytest.mark.parametrize('schedule, scaling', [('vp', 'vp'), ('vp', 'none'), ('ve', 'none'), ('ve', 'vp')])
def test_network_is_evaluated_on_the_rounded_grid_in_every_coordinate(schedule, scaling):
    net = GaussianData(round_sigma=lambda s: (torch.round(s * 16) / 16).clip(min=1 / 16))
    sigmas = edm_grid(5, sigma_min=0.05, sigma_max=12)
    out = ablation_sampler(net, latents_for([0]), sigmas, solver='euler', schedule=schedule, scaling=scaling)
    rounded = [max(round(s * 16) / 16, 1 / 16) for s in sigmas[:-1].tolist()]
    assert net.sigmas == pytest.approx(rounded, rel=1e-12)
    assert out.dtype == torch.float64


def test_churn_raises_sigma_by_gamma_in_the_schedule_and_draws_noise_every_step():
    calls = []

    def counting_randn_like(x):
        calls.append(x.shape)
        return torch.randn_like(x)

    sigmas = torch.tensor([80, 0.05, 0], dtype=torch.float64)
    net = GaussianData()
    churn = dict(S_churn=0.2, S_max=50, randn_like=counting_randn_like)
    ablation_sampler(net, latents_for([0]), sigmas, solver='euler', schedule='vp', scaling='vp', **churn)
    # gamma = S_churn / N = 0.1 only for sigma = 0.05 (inside [S_min, S_max]); noise is drawn on both steps.
    assert net.sigmas == pytest.approx([80, 0.055], rel=1e-12)
    assert len(calls) == 2

    # gamma is capped at sqrt(2) - 1.
    net = GaussianData()
    ablation_sampler(net, latents_for([0]), sigmas, solver='euler', schedule='ve', S_churn=100)
    assert net.sigmas == pytest.approx([80 * math.sqrt(2), 0.05 * math.sqrt(2)], rel=1e-12)


def test_churn_adds_noise_in_unscaled_coordinates():
    # x_hat / s(t_hat) = x / s(t) + sqrt(sigma_hat^2 - sigma^2) S_noise n: the scaling cancels out of the noise.
    sigma_max, gamma, S_noise = 20.0, 0.1, 1.5
    sigmas = torch.tensor([sigma_max, 0.01, 0], dtype=torch.float64)
    noise = latents_for([5])
    net = GaussianData()
    latents = latents_for([0])
    churn = dict(S_churn=2 * gamma, S_noise=S_noise, randn_like=lambda x: noise)
    ablation_sampler(net, latents, sigmas, solver='euler', schedule='vp', scaling='vp', **churn)
    sigma_hat = sigma_max * (1 + gamma)
    expected = latents * sigma_max + math.sqrt(sigma_hat**2 - sigma_max**2) * S_noise * noise
    assert net.sigmas[0] == pytest.approx(sigma_hat, rel=1e-12)
    assert torch.allclose(net.inputs[0], expected, rtol=1e-12, atol=1e-12)


def test_stochastic_sampling_is_seed_exact_in_vp_coordinates():
    def sample(seeds):
        rnd = StackedRandomGenerator('cpu', seeds)
        latents = rnd.randn([len(seeds), 1, 4, 4], dtype=torch.float64)
        churn = dict(S_churn=40, S_min=0.05, S_max=50)
        coords = dict(schedule='vp', scaling='vp')
        return ablation_sampler(GaussianData(), latents, edm_grid(12), randn_like=rnd.randn_like, **coords, **churn)

    batch = sample([3, 7])
    assert torch.equal(batch[1], sample([7])[0])
    deterministic = ablation_sampler(GaussianData(), latents_for([3, 7]), edm_grid(12), schedule='vp', scaling='vp')
    assert relative_error(batch, deterministic) > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Arguments.


@pytest.mark.parametrize(
    'kwargs, message',
    [
        (dict(solver='rk4'), 'solver'),
        (dict(schedule='cosine'), 'schedule'),
        (dict(scaling='ve'), 'scaling'),
        (dict(alpha=0), 'alpha'),
        (dict(alpha=1.5), 'alpha'),
        (dict(alpha=-0.5), 'alpha'),
        (dict(schedule='vp', epsilon_s=0), 'epsilon_s'),
        (dict(schedule='vp', epsilon_s=1), 'epsilon_s'),
        # ln(1 + 0.5^2) > 1e-3 ln(1 + 80^2): no increasing VP schedule through both ends.
        (dict(schedule='vp', sigmas=edm_grid(4, sigma_min=0.5)), 'increasing'),
        (dict(sigmas=torch.tensor([1.0, 10.0, 0.0])), 'descending'),
    ],
)
def test_bad_arguments_raise_clear_value_errors(kwargs, message):
    kwargs = dict(dict(sigmas=edm_grid(4)), **kwargs)
    with pytest.raises(ValueError, match=message):
        ablation_sampler(GaussianData(), latents_for([0]), **kwargs)
