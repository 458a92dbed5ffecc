"""KingmaGao (Kingma & Gao 2023, adaptive noise schedule) against its exact construction: bin masses Q_k·g_k after a planted loss
profile, draws that follow its own CDF, importance weights that keep the reference objective, a bit-exact resume, the
adapters' discrete and flow-matching ratios, and two ranks that build one law."""

import math
import os
import subprocess
import sys

import pytest
import torch

from infonoise import DiscreteTimesteps, FlowMatching, LogNormal, LogUniform
from infonoise.conversions import flow_sigma_from_t
from infonoise.kingma_gao import KingmaGao, proposal_factors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def planted(noise: KingmaGao, loss: torch.Tensor) -> None:
    """One observation per bin, at its centre, with weighted loss `loss[k]`: a refresh sets L = loss exactly."""
    sigma = noise.grid.centers
    noise.observe(sigma.to(torch.float32), (loss / noise.weight_fn(sigma)).to(torch.float32))


def masses(noise: KingmaGao) -> torch.Tensor:
    """The current law's mass in each bin (the end bins reaching to 0 and ∞), from its cdf."""
    inner = noise.cdf(noise.grid.edges[1:-1])
    return torch.cat([inner[:1], inner[1:] - inner[:-1], 1 - inner[-1:]])


PROFILE = torch.tensor([0.1, 2.0, 5.0, 1.0, 0.5, 0.2, 0.0, 3.0], dtype=torch.float64)


def test_protocol_default_is_no_importance():
    assert LogNormal().importance(torch.ones(3)) is None and LogUniform().importance(torch.ones(3)) is None


def test_planted_profile_gives_exact_masses_and_draws():
    noise = KingmaGao(weight='uniform', num_bins=8, sigma_min=0.01, sigma_max=50, refresh_steps=1, warmup_steps=0)
    torch.manual_seed(0)
    before = noise.sample(1000)
    torch.manual_seed(0)
    assert torch.equal(before, LogNormal(-1.2, 1.2).sample(1000)) and noise.importance(before) is None
    loss = PROFILE.to(torch.float32).to(torch.float64)  # As observe sees it (float32 mse).
    planted(noise, loss)
    assert noise.refreshes == 1
    Q = noise.bin_mass
    g = (1 - 0.05) * loss / (Q * loss).sum() + 0.05
    torch.testing.assert_close(noise.factors, g, rtol=1e-12, atol=0)
    torch.testing.assert_close(masses(noise), Q * g, rtol=1e-9, atol=1e-15)
    assert abs(float((Q * g).sum()) - 1) < 1e-12 and noise.factors.min() == pytest.approx(0.05)

    # 100k draws follow the law's own CDF (Kolmogorov-Smirnov distance) and fill the bins as Q·g says.
    torch.manual_seed(1)
    x = noise.sample(100_000).to(torch.float64).sort().values
    n = x.numel()
    F = noise.cdf(x)
    ks = torch.maximum(torch.arange(1, n + 1) / n - F, F - torch.arange(n) / n).max()
    assert float(ks) <= 0.01
    counts = torch.bincount(noise.grid.bin_index(x), minlength=8).double() / n
    assert torch.allclose(counts, Q * g, atol=4e-3)
    # importance = q/p = 1/g_k of σ's bin.
    torch.testing.assert_close(noise.importance(x[:1000]), (1 / g[noise.grid.bin_index(x[:1000])]).float())


def test_importance_keeps_the_objective():
    noise = KingmaGao(weight='edm', num_bins=16, refresh_steps=1, warmup_steps=0, floor=0.1)
    planted(noise, torch.rand(16, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 4)

    def f(sigma):  # A toy per-σ loss.
        return sigma**2 / (sigma**2 + 0.25) + 0.3 * torch.sin(sigma.log())

    # Quadrature over fine strata of u: E_p[importance·f] = ∫ f(p⁻¹(u)) / g du = ∫ f(q⁻¹(v)) dv = E_q[f].
    u = (torch.arange(400_000, dtype=torch.float64) + 0.5) / 400_000
    sigma_p, sigma_q = noise.icdf(u), noise.base.icdf(u)
    expected = float(f(sigma_q).mean())
    got = float((noise.importance(sigma_p).double() * f(sigma_p)).mean())
    assert got == pytest.approx(expected, rel=1e-4)
    # Monte Carlo, within 4 standard errors.
    torch.manual_seed(3)
    s = noise.sample(200_000).double()
    terms = noise.importance(s).double() * f(s)
    assert abs(float(terms.mean()) - expected) < 4 * float(terms.std()) / math.sqrt(s.numel())
    # The proposal is not q: the same mean without the weights is far off.
    assert abs(float(f(s).mean()) - expected) > 10 * float(terms.std()) / math.sqrt(s.numel())


def test_proposal_factors():
    Q = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    torch.testing.assert_close(
        proposal_factors(Q, torch.tensor([1.0, 1, 1], dtype=torch.float64), 0.1), torch.ones(3, dtype=torch.float64)
    )
    torch.testing.assert_close(
        proposal_factors(Q, torch.zeros(3, dtype=torch.float64), 0.1), torch.ones(3, dtype=torch.float64)
    )
    g = proposal_factors(Q, torch.tensor([0.0, 1, 3], dtype=torch.float64), 0.2)
    torch.testing.assert_close(g, torch.tensor([0.2, 0.8 / 1.25 + 0.2, 2.4 / 1.25 + 0.2], dtype=torch.float64))
    assert float((Q * g).sum()) == pytest.approx(1)


def stream(step: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """σ over e^-3..e^2: the end bins of a grid over [0.002, 80] get no losses."""
    gen = torch.Generator().manual_seed(step)
    sigma = torch.exp(torch.empty(n).uniform_(-3, 2, generator=gen))
    return sigma, sigma**2 / (0.25 + sigma**2) * (1 + 0.5 * torch.rand(n, generator=gen))


def test_state_round_trip(tmp_path):
    kwargs = dict(num_bins=12, refresh_kimg=0.064, warmup_kimg=0.064)
    a = KingmaGao(**kwargs)
    for step in range(7):
        a.observe(*stream(step))
    assert a.refreshes == 2 and a.loss.isnan().any()  # Some bins are not observed yet.
    torch.save(a.state_dict(), tmp_path / 'state.pt')
    b = KingmaGao(**kwargs)
    b.load_state_dict(torch.load(tmp_path / 'state.pt', weights_only=True))
    for step in range(7, 12):
        torch.manual_seed(step)
        sa = a.sample(64)
        torch.manual_seed(step)
        assert torch.equal(sa, b.sample(64))
        a.observe(*stream(step))
        b.observe(*stream(step))
    assert a.refreshes == b.refreshes == 5 and torch.equal(a.table.g, b.table.g)
    assert torch.equal(a.loss.nan_to_num(-1), b.loss.nan_to_num(-1))
    with pytest.raises(ValueError, match='must have keys'):
        b.load_state_dict({})
    with pytest.raises(ValueError, match='sums must be'):
        KingmaGao(num_bins=5).load_state_dict(a.state_dict())
    s = b.describe()
    assert s['refreshes'] == 5 and math.isfinite(s['ln_sigma_q50']) and b.summary().startswith('refreshes 5')


def test_table_object_is_replaced_at_each_refresh():
    noise = KingmaGao(num_bins=8, refresh_steps=1, warmup_steps=1)
    noise.observe(*stream(0))
    assert noise.table is None  # Warm-up.
    tables = []
    for step in range(1, 4):
        noise.observe(*stream(step))
        tables.append(noise.table)
    assert len({id(t) for t in tables}) == 3 and noise.refreshes == 3


def test_flow_matching_importance():
    fm = FlowMatching(builds=KingmaGao, refresh_steps=1, warmup_steps=0, num_bins=16)
    noise = fm.sampler
    assert isinstance(noise, KingmaGao) and noise.base.P_mean == 0 and noise.base.P_std == 1
    t0 = torch.tensor([0.3])
    assert fm.importance_t(t0) is None
    t = fm.sample_t(256)
    fm.observe(t, torch.rand(256, generator=torch.Generator().manual_seed(0)) * (1 + 3 * t))
    assert noise.refreshes == 1
    # At t, q/p is the ratio of the two laws' probabilities of a small t-interval inside its bin.
    t = torch.linspace(0.013, 0.987, 36, dtype=torch.float64)  # No bin edge within 1e-7.
    a, b = flow_sigma_from_t(t * (1 - 1e-7)), flow_sigma_from_t(t * (1 + 1e-7))
    ratio = (noise.base.cdf(b) - noise.base.cdf(a)) / (noise.cdf(b) - noise.cdf(a))
    torch.testing.assert_close(fm.importance_t(t).double(), ratio, rtol=1e-5, atol=0)


def test_discrete_timesteps_importance():
    alphas = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    steps = DiscreteTimesteps(alphas, builds=KingmaGao, refresh_steps=1, warmup_steps=0)
    assert isinstance(steps.sampler, KingmaGao) and steps.importance(torch.tensor([3])) is None
    torch.manual_seed(0)
    t = steps.sample(512)
    steps.observe(t, torch.rand(512, generator=torch.Generator().manual_seed(1)))
    assert steps.sampler.refreshes == 1
    p = steps.probabilities()
    all_t = torch.arange(1000)
    ratio = steps.importance(all_t).double()
    torch.testing.assert_close(ratio, (1 / 1000) / p, rtol=1e-6, atol=0)
    # The expected objective is uniform timesteps': Σ_i p_i·ratio_i·f_i = mean f.
    f = torch.sin(all_t / 50.0).double() + 2
    assert float((p * ratio * f).sum()) == pytest.approx(float(f.mean()), rel=1e-6)
    assert not torch.allclose(p, torch.full_like(p, 1e-3), rtol=0.05)


def test_bad_arguments():
    for kwargs, match in [
        (dict(floor=0), 'floor must be'),
        (dict(base='x'), 'Unknown base'),
        (dict(refresh_steps=1), 'together'),
        (dict(ema_rate=0), 'ema_rate'),
    ]:
        with pytest.raises(ValueError, match=match):
            KingmaGao(**kwargs)


def test_two_gloo_ranks_build_one_law(tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(REPO, 'tests', 'kingma_gao_dist_worker.py'), str(tmp_path)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1, single = (torch.load(tmp_path / f'{name}.pt', weights_only=True) for name in ('rank0', 'rank1', 'single'))
    assert r0['refreshes'] == r1['refreshes'] == single['refreshes'] > 0
    assert torch.equal(r0['g'], r1['g'])
    torch.testing.assert_close(r0['g'], single['g'], rtol=1e-12, atol=0)
