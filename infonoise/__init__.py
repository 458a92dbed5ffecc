"""InfoNoise: an information-guided noise sampler for diffusion training, and InfoGrid σ-grids for generation.

A library for any trainer (Raya et al., "Information-Guided Noise Allocation for Efficient Diffusion Training",
arXiv 2602.18647). It imports only torch and numpy; `infonoise.plots` needs matplotlib.

    from infonoise import InfoNoise
    noise = InfoNoise(weight='edm')                       # or weight=lambda sigma: ..., your loss's x₀-space w(σ)
    sigma = noise.sample(batch_size, device)              # [N] VE noise levels, x = x0 + sigma * eps
    noise.observe(sigma, per_sample_unweighted_x0_mse)    # [N], after the forward pass

Other parameterisations (VP/DDPM ε- or v-prediction, discrete `alphas_cumprod`, rectified flow) convert exactly
with `infonoise.conversions`, whose adapters build InfoNoise for their objective (`DiscreteTimesteps(alphas_cumprod)`,
`FlowMatching()`). After training, `infogrid(n, noise.profile())` gives an inference σ-grid. Every sampler follows one protocol, written in `NoiseSampler`'s docstring.
"""

from infonoise.conversions import (
    DiscreteTimesteps,
    FlowMatching,
    epsilon_loss_weight,
    flow_sigma_from_t,
    flow_t_from_sigma,
    flow_velocity_loss_weight,
    prediction_loss_weight,
    sigma_from_alpha_bar,
    v_loss_weight,
    v_prediction_loss_weight,
    velocity_loss_weight,
)
from infonoise.grids import edm_grid, infogrid, information_coordinate, loguniform_grid
from infonoise.info_noise import InfoNoise
from infonoise.kingma_gao import KingmaGao
from infonoise.profile import Profile
from infonoise.reporting import RefreshCheck
from infonoise.rivals import Curriculum, LaplaceLogSNR, LogitNormal, UniformT
from infonoise.samplers import LogNormal, LogUniform, Mixture, NoiseSampler, PiecewiseLogUniform, VPSampler
from infonoise.weights import WEIGHTS, edm_weight, inverse_variance_weight, min_snr_weight, uniform_weight

__version__ = '0.1.0'

__all__ = [
    'WEIGHTS',
    'Curriculum',
    'DiscreteTimesteps',
    'FlowMatching',
    'InfoNoise',
    'KingmaGao',
    'LaplaceLogSNR',
    'LogNormal',
    'LogUniform',
    'LogitNormal',
    'Mixture',
    'NoiseSampler',
    'PiecewiseLogUniform',
    'Profile',
    'RefreshCheck',
    'UniformT',
    'VPSampler',
    'edm_grid',
    'edm_weight',
    'epsilon_loss_weight',
    'flow_sigma_from_t',
    'flow_t_from_sigma',
    'flow_velocity_loss_weight',
    'infogrid',
    'information_coordinate',
    'inverse_variance_weight',
    'loguniform_grid',
    'min_snr_weight',
    'prediction_loss_weight',
    'sigma_from_alpha_bar',
    'uniform_weight',
    'v_loss_weight',
    'v_prediction_loss_weight',
    'velocity_loss_weight',
]
