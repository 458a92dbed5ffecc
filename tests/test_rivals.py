"""The published rival noise samplers and the Min-SNR-γ weight: draws against closed-form CDFs (Kolmogorov-Smirnov),
their laws through the adapters, the curriculum's switch and resume, and their flags in train.py."""

import math

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_NET_ARGS, train_config

import train
from infonoise import (
    WEIGHTS,
    Curriculum,
    DiscreteTimesteps,
    FlowMatching,
    LaplaceLogSNR,
    LogitNormal,
    LogNormal,
    UniformT,
    min_snr_weight,
)

N = 100_000
KS_MAX = 0.01  # 100,000 draws: the 0.1 % critical value is 1.95/√N ≈ 0.006.


def ks(draws: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between the empirical law of `draws` and the closed-form `cdf`."""
    f = cdf(draws.to(torch.float64).sort().values)
    n = f.numel()
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    below = f - torch.arange(n, dtype=torch.float64) / n
    return float(torch.maximum(above, below).max())


def normal_cdf(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return 0.5 * torch.erfc(-(x - mean) / (std * math.sqrt(2)))


def laplace_cdf(x: torch.Tensor, mu: float, b: float) -> torch.Tensor:
    return torch.where(x < mu, 0.5 * torch.exp((x - mu) / b), 1 - 0.5 * torch.exp(-(x - mu) / b))


def rival_laws():
    """(sampler, closed-form CDF of σ) for every rival, written from its definition, not from its `cdf`."""
    logit_normal = lambda m, s: lambda sigma: normal_cdf(sigma.log(), m, s)  # noqa: E731  ln σ = logit t ~ N(m, s²)
    uniform_t = lambda sigma: ((sigma / (1 + sigma) - 1e-3) / (1 - 2e-3)).clamp(0, 1)  # noqa: E731
    return [
        (LogitNormal.sd3(), logit_normal(0.0, 1.0)),
        (LogitNormal.jit(), logit_normal(0.8, 0.8)),
        (LogitNormal(-0.3, 1.7), logit_normal(-0.3, 1.7)),
        (LaplaceLogSNR(), lambda sigma: 1 - laplace_cdf(-2 * sigma.log(), 0.0, 0.5)),
        (LaplaceLogSNR(1.5, 2.0), lambda sigma: 1 - laplace_cdf(-2 * sigma.log(), 1.5, 2.0)),
        (UniformT(), uniform_t),
        (Curriculum('sd3', 'uniform-t', 1.0), logit_normal(0.0, 1.0)),
    ]


@pytest.mark.parametrize('index', range(len(rival_laws())))
def test_draws_follow_the_closed_form_law(index):
    sampler, cdf = rival_laws()[index]
    torch.manual_seed(index)
    draws = sampler.sample(N)
    assert draws.dtype == torch.float32 and draws.shape == (N,) and bool((draws > 0).all())
    assert ks(draws, cdf) <= KS_MAX
    grid = torch.logspace(-3, 3, 61, dtype=torch.float64)
    assert torch.allclose(sampler.cdf(grid), cdf(grid), atol=1e-12)  # The sampler's own cdf is the same law.
    u = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    assert torch.allclose(sampler.cdf(sampler.icdf(u)), u, atol=1e-9)  # icdf inverts cdf.
    stats = sampler.describe()
    assert stats['ln_sigma_q10'] < stats['ln_sigma_q50'] < stats['ln_sigma_q90']


def test_logit_normal_is_logit_normal_in_flow_time():
    for sampler, (m, s) in [(LogitNormal.sd3(), (0.0, 1.0)), (LogitNormal.jit(), (0.8, 0.8))]:
        torch.manual_seed(1)
        t = FlowMatching(sampler=sampler).sample_t(N).to(torch.float64)
        assert bool(((t > 0) & (t < 1)).all())
        assert ks(torch.logit(t), lambda z, m=m, s=s: normal_cdf(z, m, s)) <= KS_MAX
    # JiT's own time runs the other way (t = 1 clean): 1 − t is logit-normal(−0.8, 0.8) there.
    assert ks(torch.logit(1 - t), lambda z: normal_cdf(z, -0.8, 0.8)) <= KS_MAX
    # σ = e^z: the same law as a log-normal in σ.
    grid = torch.logspace(-2, 2, 9, dtype=torch.float64)
    assert torch.allclose(LogitNormal(0.3, 1.4).cdf(grid), LogNormal(0.3, 1.4).cdf(grid), atol=1e-15)


def test_laplace_log_snr_draws():
    torch.manual_seed(2)
    lam = -2 * LaplaceLogSNR(0.5, 0.75).sample(N).to(torch.float64).log()
    assert ks(lam, lambda x: laplace_cdf(x, 0.5, 0.75)) <= KS_MAX
    assert abs(float(lam.median()) - 0.5) < 0.02


def test_every_rival_works_through_the_adapters():
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    for sampler, _ in rival_laws():
        steps = DiscreteTimesteps(alphas_cumprod, sampler=sampler)
        p = steps.probabilities()
        assert math.isclose(float(p.sum()), 1, abs_tol=1e-12) and bool((p >= 0).all())
        t = steps.sample(64)
        assert t.dtype == torch.int64 and bool(((t >= 0) & (t < 1000)).all())
        steps.observe(t, torch.rand(64, dtype=torch.float64))
        fm = FlowMatching(sampler=sampler)
        t = fm.sample_t(64)
        fm.observe(t, torch.rand(64))
        edges = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
        assert torch.allclose(fm.cdf_t(edges), sampler.cdf(edges / (1 - edges)))


def test_uniform_t_is_uniform_in_flow_time():
    torch.manual_seed(3)
    t = FlowMatching(sampler=UniformT(0.1, 0.8)).sample_t(N).to(torch.float64)
    assert ks(t, lambda x: ((x - 0.1) / 0.7).clamp(0, 1)) <= KS_MAX


def observe_images(sampler, n: int, batch: int = 64) -> None:
    """Feed `observe` n images of dummy losses, batch by batch."""
    for _ in range(n // batch):
        sigma = sampler.sample(batch)
        sampler.observe(sigma, torch.rand(batch))


def test_curriculum_switches_after_its_images_and_resumes_exactly():
    first, second = LogitNormal.sd3(), UniformT()
    events = []
    cur = Curriculum(first, second, switch_kimg=1.024)
    cur.callback = events.append
    torch.manual_seed(4)
    assert ks(cur.sample(N), first.cdf) <= KS_MAX and cur.table is first and cur.summary() == 'curriculum 1/2'
    observe_images(cur, 960)
    assert cur.nimg == 960 and cur.table is first and not events
    observe_images(cur, 64)  # 1,024 images: the switch.
    assert cur.table is second and cur.summary() == 'curriculum 2/2' and len(events) == 1 and '1024' in events[0]
    torch.manual_seed(5)
    assert ks(cur.sample(N), second.cdf) <= KS_MAX
    assert cur.describe() == second.describe()

    # A state taken before the switch continues identically: same draws, same switch.
    a = Curriculum('sd3', 'uniform-t', switch_kimg=1.024)
    observe_images(a, 512)
    b = Curriculum('sd3', 'uniform-t', switch_kimg=1.024)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() == dict(nimg=512, first={}, second={})
    for step in range(12):
        torch.manual_seed(100 + step)
        draws_a = a.sample(64)
        torch.manual_seed(100 + step)
        draws_b = b.sample(64)
        assert torch.equal(draws_a, draws_b)
        a.observe(draws_a, torch.rand(64))
        b.observe(draws_b, torch.rand(64))
        assert type(a.table) is type(b.table)
    assert a.nimg == b.nimg == 512 + 12 * 64 and isinstance(b.table, UniformT)
    b.load_state_dict(dict(nimg=0, first={}, second={}))
    assert isinstance(b.table, LogitNormal)


def test_curriculum_changes_the_timestep_probabilities_at_the_switch():
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    cur = Curriculum('sd3', 'uniform-t', switch_kimg=0.128)
    steps = DiscreteTimesteps(alphas_cumprod, sampler=cur)
    before = steps._on('cpu')['cumulative'].clone()
    expect_first = DiscreteTimesteps(alphas_cumprod, sampler=LogitNormal.sd3()).probabilities()
    assert torch.allclose(steps.probabilities(), expect_first)
    for _ in range(2):
        t = steps.sample(64)
        steps.observe(t, torch.rand(64))
    after = steps._on('cpu')['cumulative']
    expect_second = DiscreteTimesteps(alphas_cumprod, sampler=UniformT()).probabilities()
    assert torch.allclose(after, expect_second.cumsum(0)) and not torch.allclose(before, after)


def test_min_snr_weight():
    sigma = torch.tensor([0.05, 0.2, 1 / math.sqrt(5), 0.5, 1.0, 3.0], dtype=torch.float64)
    expected = torch.tensor([5.0, 5.0, 5.0, 4.0, 1.0, 1 / 9], dtype=torch.float64)
    assert torch.allclose(min_snr_weight(sigma), expected)
    assert torch.allclose(WEIGHTS['min-snr'](sigma, 0.5), torch.minimum(1 / sigma**2, torch.tensor(5.0)))
    assert torch.allclose(min_snr_weight(sigma, gamma=1.0), (1 / sigma**2).clamp(max=1))


@pytest.mark.parametrize(
    'build, message',
    [
        (lambda: LogitNormal(0.0, 0.0), 's must be a finite number > 0, got 0.0'),
        (lambda: LogitNormal(math.nan, 1.0), 'm must be a finite number'),
        (lambda: LaplaceLogSNR(0.0, -1.0), 'b must be a finite number > 0'),
        (lambda: LaplaceLogSNR('0', 0.5), 'mu must be a finite number'),
        (lambda: UniformT(0.0, 0.5), 'Need 0 < t_min < t_max < 1'),
        (lambda: UniformT(0.6, 0.5), 'Need 0 < t_min < t_max < 1'),
        (lambda: Curriculum('sd3', 'uniform-t', -1), 'switch_kimg must be a finite number >= 0'),
        (lambda: Curriculum('sd4', 'uniform-t', 1), 'first must be a NoiseSampler or one of'),
        (lambda: Curriculum('sd3', 'uniform-t', 1).load_state_dict({'nimg': 3}), 'Curriculum state needs keys'),
        (lambda: Curriculum('sd3', 'uniform-t', 1).load_state_dict(dict(nimg=-1, first={}, second={})), 'nimg'),
        (lambda: Curriculum('sd3', 'uniform-t', 1).observe(torch.zeros(4), torch.zeros(())), 'observe: mse'),
    ],
)
def test_invalid_arguments_are_one_line_value_errors(build, message):
    with pytest.raises(ValueError) as info:
        build()
    assert message in str(info.value) and '\n' not in str(info.value)


def cli_args(tmp_path, digits_zip):
    return ['--outdir', tmp_path / 'runs', '--data', digits_zip, '--device=cpu', '--workers=0', *TINY_NET_ARGS]


@pytest.mark.parametrize(
    'sampler, class_name', [('sd3', 'LogitNormal'), ('jit', 'LogitNormal'), ('laplace', 'LaplaceLogSNR'),
                            ('uniform-t', 'UniformT'), ('curriculum', 'Curriculum')],
)  # fmt: skip
def test_train_dry_run_accepts_each_rival(tmp_path, digits_zip, sampler, class_name):
    args = [*cli_args(tmp_path, digits_zip), f'--sampler={sampler}', '--weight=min-snr', '--duration=0.01']
    result = CliRunner().invoke(train.main, [str(a) for a in [*args, '--dry-run']])
    assert result.exit_code == 0, result.output
    assert f'infonoise.rivals.{class_name} (' in result.output and '(weight min-snr)' in result.output
    assert f'-edm-{sampler}-gpus1-' in result.output and not (tmp_path / 'runs').exists()
    config = train_config(*args)
    assert config['loss_kwargs']['weight'] == 'min-snr'
    if sampler == 'curriculum':
        assert config['noise_kwargs']['switch_kimg'] == 5.0  # Half of 10 kimg by default.
        assert 'Curriculum: LogitNormal until 5 kimg, then UniformT' in result.output
        assert train_config(*args, '--curriculum-switch=0.25')['noise_kwargs']['switch_kimg'] == 2.5


def test_curriculum_switch_without_curriculum_is_refused(tmp_path, digits_zip):
    for sampler in ('sd3', 'infonoise', 'auto'):
        args = [*cli_args(tmp_path, digits_zip), f'--sampler={sampler}', '--curriculum-switch=0.3', '--dry-run']
        result = CliRunner().invoke(train.main, [str(a) for a in args])
        errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
        assert result.exit_code != 0 and errors == [
            'Error: --curriculum-switch only applies to --sampler=curriculum'
        ], result.output
