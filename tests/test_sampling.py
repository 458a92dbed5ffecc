"""Tests for EDM's sampler, generate.py and image output, against closed forms and exact counts."""

import math

import numpy as np
import PIL.Image
import pytest
import torch

from infonoise.grids import edm_grid
from training.sampling import StackedRandomGenerator, edm_sampler, images_to_uint8, save_image_grid, tile_images


class GaussianDenoiser:
    """Stub network whose data is N(0, lam I): the exact denoiser is D(x; sigma) = x lam / (lam + sigma^2)."""

    sigma_min = 0
    sigma_max = float('inf')
    label_dim = 0
    img_channels = 1
    img_resolution = 4

    def __init__(self, lam: float = 0.25, round_sigma=None):
        self.lam = lam
        self.called_sigmas = []
        self._round_sigma = round_sigma

    def round_sigma(self, sigma):
        sigma = torch.as_tensor(sigma)
        return sigma if self._round_sigma is None else self._round_sigma(sigma)

    def __call__(self, x, sigma, class_labels=None):
        self.called_sigmas.append(float(sigma))
        self.last_denoised = x * self.lam / (self.lam + sigma**2)
        return self.last_denoised


def latents_for(seeds):
    return StackedRandomGenerator('cpu', seeds).randn([len(seeds), 1, 4, 4], dtype=torch.float64)


def ode_solution(latents, sigmas, lam, sigma):
    """Probability-flow ODE from sigma_0: x(sigma) = x(sigma_0) sqrt((lam + sigma^2) / (lam + sigma_0^2))."""
    sigma_0 = sigmas[0].item()
    return latents * sigma_0 * math.sqrt((lam + sigma**2) / (lam + sigma_0**2))


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def sampler_error(num_steps, solver, lam=0.25):
    """Error against the exact ODE flow to sigma_{N-1} followed by the sampler's exact final Euler step
    (which returns D(x; sigma_{N-1})), so only the integrator's error remains."""
    sigmas = edm_grid(num_steps)
    latents = latents_for(range(8))
    out = edm_sampler(GaussianDenoiser(lam), latents, sigmas, solver=solver)
    sigma_last = sigmas[-2].item()
    expected = ode_solution(latents, sigmas, lam, sigma_last) * lam / (lam + sigma_last**2)
    return relative_error(out, expected)


# ----------------------------------------------------------------------------------------------------------------
# Sampler on the Gaussian source, where the probability-flow ODE has a closed form.


def test_heun_matches_closed_form_and_beats_euler():
    lam = 0.25
    sigmas = edm_grid(64)
    latents = latents_for(range(8))
    expected = ode_solution(latents, sigmas, lam, 0.0)
    heun = edm_sampler(GaussianDenoiser(lam), latents, sigmas, solver='heun')
    euler = edm_sampler(GaussianDenoiser(lam), latents, sigmas, solver='euler')
    assert heun.dtype == torch.float64
    assert relative_error(heun, expected) < 0.01
    assert relative_error(euler, expected) > 5 * relative_error(heun, expected)


def test_heun_is_second_order_and_euler_first_order():
    heun_ratio = sampler_error(32, 'heun') / sampler_error(64, 'heun')
    euler_ratio = sampler_error(32, 'euler') / sampler_error(64, 'euler')
    assert 3.2 < heun_ratio < 5.5
    assert 1.6 < euler_ratio < 2.5
    assert sampler_error(18, 'heun') < 0.5 * sampler_error(18, 'euler')


def test_sampler_evaluates_rounded_grid_and_skips_last_correction():
    # Snap to multiples of 1/16, at least 0.25, so that rounding is visible and would move the final 0.
    net = GaussianDenoiser(round_sigma=lambda s: (torch.round(s * 16) / 16).clip(min=0.25))
    sigmas = edm_grid(5, sigma_min=0.5, sigma_max=10)
    out = edm_sampler(net, latents_for([0]), sigmas)
    t = [max(round(s * 16) / 16, 0.25) for s in sigmas[:-1].tolist()]
    assert net.called_sigmas == [t[0], t[1], t[1], t[2], t[2], t[3], t[3], t[4], t[4]]

    # The last step is one Euler step to sigma = 0, which lands exactly on the denoised image.
    assert torch.allclose(out, net.last_denoised, rtol=1e-12, atol=0)

    net = GaussianDenoiser()
    edm_sampler(net, latents_for([0]), sigmas, solver='euler')
    assert net.called_sigmas == sigmas[:-1].tolist()


def test_churn_raises_sigma_by_gamma_within_s_min_s_max():
    sigmas = edm_grid(2, sigma_min=1, sigma_max=80)
    net = GaussianDenoiser()
    edm_sampler(net, latents_for([0]), sigmas, solver='euler', S_churn=0.2, S_max=50)
    assert net.called_sigmas == pytest.approx([80, 1.1], rel=1e-12)

    # gamma is capped at sqrt(2) - 1.
    net = GaussianDenoiser()
    edm_sampler(net, latents_for([0]), sigmas, solver='euler', S_churn=100)
    assert net.called_sigmas == pytest.approx([80 * math.sqrt(2), math.sqrt(2)], rel=1e-12)


def test_noise_is_drawn_every_step_even_without_churn():
    calls = []

    def counting_randn_like(x):
        calls.append(x.shape)
        return torch.randn_like(x)

    sigmas = edm_grid(7)
    latents = latents_for([0, 1])
    out = edm_sampler(GaussianDenoiser(), latents, sigmas, randn_like=counting_randn_like)
    assert len(calls) == 7
    assert torch.equal(out, edm_sampler(GaussianDenoiser(), latents, sigmas))


def test_stochastic_sampler_is_seed_exact_and_batch_independent():
    churn = dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
    sigmas = edm_grid(12)

    def sample(seeds):
        rnd = StackedRandomGenerator('cpu', seeds)
        latents = rnd.randn([len(seeds), 1, 4, 4], dtype=torch.float64)
        return edm_sampler(GaussianDenoiser(), latents, sigmas, randn_like=rnd.randn_like, **churn)

    batch = sample([3, 7, 11])
    assert torch.equal(batch, sample([3, 7, 11]))
    assert torch.equal(batch[1], sample([7])[0])
    assert torch.equal(batch[2], sample([11, 5])[0])

    # Churn changes the result: the test above would pass vacuously otherwise.
    deterministic = edm_sampler(GaussianDenoiser(), latents_for([3, 7, 11]), sigmas)
    assert relative_error(batch, deterministic) > 1e-3


def test_sampler_rejects_bad_grids_and_solvers():
    latents = latents_for([0])
    for grid in [torch.tensor([10.0, 1.0]), torch.tensor([1.0, 10.0, 0.0]), torch.tensor([0.0])]:
        with pytest.raises(ValueError):
            edm_sampler(GaussianDenoiser(), latents, grid)
    with pytest.raises(ValueError):
        edm_sampler(GaussianDenoiser(), latents, edm_grid(3), solver='rk4')


# ----------------------------------------------------------------------------------------------------------------
# Random generators.


def test_stacked_random_generator_uses_one_generator_per_seed():
    seeds = [0, 5, 2**32 + 5, 2**31 + 5]
    rnd = StackedRandomGenerator('cpu', seeds)
    draws = rnd.randn([4, 2, 3])
    labels = rnd.randint(10, size=[4])
    for k, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(seed % 2**32)
        assert torch.equal(draws[k], torch.randn([2, 3], generator=gen))
        assert torch.equal(labels[k], torch.randint(10, size=[], generator=gen))
    # Seeds are taken modulo 2^32.
    assert torch.equal(draws[1], draws[2])
    assert not torch.equal(draws[1], draws[3])
    assert rnd.randn_like(torch.zeros(4, 2, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError):
        rnd.randn([2, 3])


# ----------------------------------------------------------------------------------------------------------------
# Image output.


def test_uint8_conversion_is_edms():
    values = torch.tensor([-1.5, -1.0, -0.004, 0.0, 0.0039, 0.5, 1.0, 2.0]).reshape(1, 1, 1, 8)
    assert images_to_uint8(values).ravel().tolist() == [0, 0, 127, 128, 128, 191, 255, 255]


def test_tile_images_places_row_by_row_and_pads_black():
    images = np.arange(1, 4, dtype=np.uint8).reshape(3, 1, 1, 1).repeat(2, axis=1).repeat(2, axis=2)
    grid = tile_images(images, grid_w=2)[:, :, 0]
    assert grid.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 0, 0], [3, 3, 0, 0]]
    assert tile_images(np.zeros([5, 2, 3, 1], dtype=np.uint8)).shape == (4, 9, 1)


def test_tile_images_default_is_cell_by_cell_placement():
    # scale=1, pad=0 (the defaults) are the plain tiling: image i at row i // w, column i % w, nothing between.
    images = np.random.default_rng(0).integers(0, 256, [7, 3, 5, 3], dtype=np.uint8)
    grid = tile_images(images, grid_w=3)
    assert grid.shape == (9, 15, 3)
    for i, image in enumerate(images):
        assert np.array_equal(grid[i // 3 * 3 : i // 3 * 3 + 3, i % 3 * 5 : i % 3 * 5 + 5], image)
    assert np.array_equal(tile_images(images, 3, scale=1, pad=0), grid)
    assert not grid[6:, 5:].any()  # The two cells left over are black.


def test_tile_images_scales_by_repeating_pixels_and_pads_white():
    images = np.array([[[1, 2]], [[3, 4]], [[5, 6]]], dtype=np.uint8)[..., None]  # Three 1x2 images.
    grid = tile_images(images, grid_w=2, scale=2, pad=1)[:, :, 0]
    # Two rows of 2x4 cells: width 1 + 2 * (4 + 1) = 11, height 1 + 2 * (2 + 1) = 7.
    W, E = 255, 0  # White gaps and black empty cells.
    assert grid.tolist() == [
        [W, W, W, W, W, W, W, W, W, W, W],
        [W, 1, 1, 2, 2, W, 3, 3, 4, 4, W],
        [W, 1, 1, 2, 2, W, 3, 3, 4, 4, W],
        [W, W, W, W, W, W, W, W, W, W, W],
        [W, 5, 5, 6, 6, W, E, E, E, E, W],
        [W, 5, 5, 6, 6, W, E, E, E, E, W],
        [W, W, W, W, W, W, W, W, W, W, W],
    ]
    rgb = np.random.default_rng(1).integers(0, 256, [5, 4, 6, 3], dtype=np.uint8)
    grid = tile_images(rgb, grid_w=3, scale=3, pad=2)
    assert grid.shape == (2 + 2 * (12 + 2), 2 + 3 * (18 + 2), 3)
    # Image 4 is row 1, column 1: its top-left pixel becomes a 3x3 block at (2 + 14, 2 + 20).
    assert (grid[16:19, 22:25] == rgb[4, 0, 0]).all() and (grid[16:19, 25:28] == rgb[4, 0, 1]).all()
    assert np.array_equal(grid[16:28:3, 22:40:3], rgb[4])
    assert (grid[:2] == 255).all() and (grid[:, 20:22] == 255).all() and (grid[-2:] == 255).all()


@pytest.mark.parametrize(
    'kwargs, message', [(dict(scale=0), 'scale'), (dict(pad=-1), 'pad'), (dict(grid_w=-1), 'grid_w')]
)
def test_tile_images_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tile_images(np.zeros([2, 2, 2, 1], dtype=np.uint8), **kwargs)


@pytest.mark.parametrize('channels, mode', [(1, 'L'), (3, 'RGB')])
def test_save_image_grid_round_trips(tmp_path, channels, mode):
    images = torch.rand(5, channels, 4, 6) * 2 - 1
    path = tmp_path / 'grid.png'
    save_image_grid(images, path, grid_w=2)
    with PIL.Image.open(path) as image:
        assert image.mode == mode and image.size == (12, 12)
        pixels = np.array(image).reshape(12, 12, channels)
    expected = images_to_uint8(images)
    assert np.array_equal(pixels[4:8, 6:12], expected[3])
    assert np.array_equal(pixels[8:12, 0:6], expected[4])
    assert not pixels[8:12, 6:12].any()
