"""A real diffusers client (examples/diffusers_ddpm.py): InfoNoise draws the timesteps of diffusers' DDPMScheduler
through `DiscreteTimesteps`, a UNet2DModel trains on scikit-learn's digits, and diffusers' DDIMScheduler samples.
Skipped when diffusers is absent (it comes with requirements-extras.txt, which `make test` installs)."""

import math

import pytest
import torch

pytest.importorskip('diffusers')

from examples import diffusers_ddpm as client  # noqa: E402
from infonoise import sigma_from_alpha_bar  # noqa: E402
from tests.conftest import invoke  # noqa: E402

T = 1000
STEPS, BATCH = 240, 32
# Small durations in steps so that InfoNoise refreshes several times within STEPS; min_count=2 lets the intervals
# that hold a single timestep (the lowest σ) fill within the warm-up.
INFONOISE = dict(warmup_steps=60, refresh_steps=20, min_count=2)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One torch thread for this module: a 0.16 M-parameter UNet on 8x8 images gains nothing from more, and on
    shared CPUs they contend (this module: 15 s with one thread, 67 s with two on two cores busy with other work)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope='module')
def digits():
    return client.load_digits()


@pytest.fixture(scope='module')
def trained(digits):
    """The same loop twice: InfoNoise timesteps, and DDPM's uniform `torch.randint` (the baseline)."""
    images, _ = digits
    return {
        name: client.train(images, name, STEPS, BATCH, seed=0, **(INFONOISE if name == 'infonoise' else {}))
        for name in client.SCHEDULES
    }


def test_infonoise_reaches_every_timestep(trained):
    _, ddpm, steps = trained['infonoise']
    assert steps.sampler.refreshes >= 1  # The law below is a learned one, not the warm-up's.
    p = steps.probabilities()
    assert p.shape == (T,) and p.dtype == torch.float64
    assert math.isclose(float(p.sum()), 1.0, abs_tol=1e-9)
    # Every timestep can be drawn, t = 999 included: DDIM and ancestral sampling start there.
    assert bool((p > 0).all()), f'timesteps never drawn: {(p == 0).nonzero().flatten().tolist()}'
    assert torch.allclose(steps.sigmas, sigma_from_alpha_bar(ddpm.alphas_cumprod.double()))  # diffusers' own table.


def floor_part(steps) -> torch.Tensor:
    """[T] the floor's part of each timestep's probability: after a refresh the law is (1 − ε)·π_info + ε·(log-uniform
    on [σ_0, σ_{T−1}]) (docs/library.md, `build='continuous'`), and timestep i stands for the σ-interval between the
    geometric midpoints of its neighbours, cut to that range."""
    ln_edges = steps.edges.clamp(float(steps.sigmas[0]), float(steps.sigmas[-1])).log()
    return steps.sampler.floor * ln_edges.diff() / (ln_edges[-1] - ln_edges[0])


def test_the_floor_is_epsilon_of_the_draws(trained):
    _, _, steps = trained['infonoise']
    p, floor = steps.probabilities(), floor_part(steps)
    assert steps.sampler.floor == 0.05
    # π_info ≥ 0, so no timestep gets less than its floor part (up to float rounding of the table).
    assert bool((p >= floor * (1 - 1e-6)).all())
    # The lower half of the timesteps holds 60 % of ln σ's range, so at least 0.05 · 0.60 = 3 % of the draws. With
    # Algorithm 1's floor as written (build='paper': ε in the emphasis, then divided by w = 1/σ²) this very run drew
    # 0.5 % below t = 500 and never t ≥ 989.
    assert float(floor[:500].sum()) > 0.03 and float(p[:500].sum()) >= float(floor[:500].sum()) * (1 - 1e-6)


def test_draws_follow_the_probabilities(trained):
    _, _, steps = trained['infonoise']
    p, n = steps.probabilities(), 200_000
    torch.manual_seed(1)
    t = steps.sample(n)
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= T - 1
    share = torch.bincount(t, minlength=T).double() / n
    # Cumulative shares: by the DKW inequality P(sup |F_n − F| > 0.005) ≤ 2·exp(−2·n·0.005²) ≈ 1e-4.
    assert float((share.cumsum(0) - p.cumsum(0)).abs().max()) < 0.005
    # Each timestep: a binomial share has standard deviation √(p(1 − p)/n); 6 of them (a normal exceeds that with
    # chance 2e-9, so ~2e-6 over 1,000 timesteps), plus 1e-5 (2 draws) where p is too small for the normal.
    assert bool(((share - p).abs() <= 6 * (p * (1 - p) / n).sqrt() + 1e-5).all())
    # So the draws hold the floor too: below t = 500 at least its 3 %, less 5 binomial standard deviations (0.2 %).
    assert float(share[:500].sum()) >= float(floor_part(steps)[:500].sum()) - 0.002
    assert float(share[-1]) > 0  # t = 999 is drawn.


def test_ddim_through_diffusers_samples_the_trained_unet(trained):
    ema, ddpm, _ = trained['infonoise']
    for num_steps in (10, 7):  # 7 does not divide 1,000.
        ddim = client.make_ddim(ddpm, num_steps)
        assert len(ddim.timesteps) == num_steps and int(ddim.timesteps[0]) == T - 1  # 'trailing': from t = 999.
        x = client.ddim_sample(ema, ddpm, 16, num_steps)
        assert x.shape == (16, 1, 8, 8) and bool(torch.isfinite(x).all())


def test_uniform_baseline_and_held_out_eps_mse(trained, digits):
    _, held_out = digits
    triples = client.held_out_triples(held_out)
    assert all(torch.equal(a, b) for a, b in zip(triples, client.held_out_triples(held_out)))  # Fixed set.
    for name, (ema, ddpm, steps) in trained.items():
        assert (steps is None) == (name == 'uniform')
        mse = client.eps_mse(ema, ddpm, *triples)
        # Finite, and learned: an untrained ε-predictor that outputs 0 scores 1. Which schedule is lower is not
        # asserted (noise at this size; see the module docstring of the example).
        assert math.isfinite(mse) and mse < 1, (name, mse)


def test_cli_writes_one_grid_per_schedule(tmp_path):
    out = tmp_path / 'samples-{schedule}.png'
    result = invoke(client.main, '--steps=12', '--batch=8', '--warmup-steps=4', '--refresh-steps=4', '--min-count=1',
                    '--ddim-steps=3', f'--out={out}')  # fmt: skip
    assert result.exit_code == 0, result.output
    for name in client.SCHEDULES:
        assert (tmp_path / f'samples-{name}.png').is_file()
        assert f'{name:9s} held-out ε-MSE' in result.output
