"""InfoNoise sampler against closed-form oracles, plus its engineering contract: cadence, state, ranks, robustness."""

import contextlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch
from torch.overrides import TorchFunctionMode

from infonoise import oracles
from infonoise.info_noise import InfoNoise
from infonoise.pivot import onset_pivot
from infonoise.profile import gate, normalize_density

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAM = torch.logspace(-2, 0, 64, dtype=torch.float64)  # Per-pixel variances of a Gaussian source.


def gaussian_losses(sigma: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample mean-over-pixels squared error of the exact Bayes denoiser of N(0, diag λ)."""
    x0 = torch.randn(len(sigma), len(LAM), generator=gen, dtype=torch.float64) * LAM.sqrt()
    x = x0 + sigma[:, None].double() * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    return (oracles.gaussian_denoiser(x, sigma[:, None].double(), LAM) - x0).square().mean(1).float()


def two_point_losses(sigma: torch.Tensor, gen: torch.Generator, a: float = 1.0) -> torch.Tensor:
    """The exact Bayes denoiser's conditional error E[(x0 − D)² | x] = a² − D(x)² for data ±a.

    Its mean is mmse(σ), like the per-sample squared error, but its variance is far smaller where the two-point
    mmse falls steeply (a squared error there is almost always 0 and rarely ≈ 4a²)."""
    x0 = a * (2 * (torch.rand(len(sigma), generator=gen, dtype=torch.float64) < 0.5).double() - 1)
    x = x0 + sigma.double() * torch.randn(len(sigma), generator=gen, dtype=torch.float64)
    return (a**2 - oracles.two_point_denoiser(x, sigma.double(), a).square()).float()


def feed(sampler: InfoNoise, losses, steps: int, batch: int = 256, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        sigma = sampler.sample(batch, 'cpu')
        sampler.observe(sigma, losses(sigma, gen))


def oracle_sampler(**kwargs) -> InfoNoise:
    # β = 1 makes the estimate the buffer mean; floor 0 and no smoothing leave the closed form untouched.
    args = dict(
        weight='uniform',
        num_bins=48,
        buffer_size=512,
        ema_rate=1.0,
        refresh_kimg=1.024,
        warmup_kimg=0,
        min_count=256,
        smoothing=0,
        base='loguniform',
        floor=0.0,
    )
    return InfoNoise(**dict(args, **kwargs))


@pytest.mark.parametrize('source', ['gaussian', 'two-point'])
def test_rate_and_density_match_closed_form(source):
    torch.manual_seed(0)
    s = oracle_sampler()
    losses = gaussian_losses if source == 'gaussian' else two_point_losses
    feed(s, losses, steps=160)
    prof = s.profile()
    assert prof is not None and s.refreshes >= 1
    sigma = prof.sigma
    # Each interval's buffer averages mmse over the σ drawn in it (Gauss–Legendre over σ in [e_k, e_k+1]).
    nodes, weights = (torch.from_numpy(v) for v in np.polynomial.legendre.leggauss(16))
    lo, hi = s.grid.edges[:-1, None], s.grid.edges[1:, None]
    points = lo + (hi - lo) * (nodes + 1) / 2
    if source == 'gaussian':
        values = oracles.gaussian_mmse(points.flatten(), LAM, mean=True).reshape(points.shape)
    else:
        values = oracles.two_point_mmse(points.flatten(), 1.0).reshape(points.shape)
    mmse = (values * weights).sum(1) / 2
    rate = mmse / sigma**3
    # r̂ = mse/σ³ within 8% (Monte-Carlo error) across the grid. For the two-point source only from σ = 0.7a up:
    # below, its mmse falls super-exponentially, so an interval's average depends on how σ was drawn inside the
    # interval (the binned estimator's resolution), and the comparison is left to the density check below.
    measurable = torch.ones_like(sigma, dtype=torch.bool) if source == 'gaussian' else sigma >= 0.7
    assert torch.allclose(prof.rate[measurable], rate[measurable], rtol=0.08), (prof.rate / rate).tolist()
    # The gated, normalised density from the estimate matches the one computed directly from the closed form.
    c = onset_pivot(sigma, rate, 0.002)
    rho = normalize_density(rate * gate(sigma, c, 3), s.grid.widths)
    assert prof.pivot == pytest.approx(c, rel=0.25)
    assert (prof.rho - rho).abs().max() < 0.1 * rho.max()
    # With w ≡ 1 the sampling density is ρ itself (Eq. 16), and the emphasis φ equals π.
    assert torch.allclose(prof.pi, prof.rho, rtol=1e-9) and torch.allclose(prof.phi, prof.pi, rtol=1e-9)


def test_edm_weight_is_divided_out():
    s = oracle_sampler(weight='edm')
    feed(s, gaussian_losses, steps=160)
    prof = s.profile()
    w = (prof.sigma**2 + 0.25) / (prof.sigma * 0.5) ** 2
    assert torch.allclose(prof.weight, w)
    assert torch.allclose(prof.pi, normalize_density(prof.gated / w, s.grid.widths), rtol=1e-9)
    assert torch.allclose(prof.phi, prof.rho, rtol=1e-9)  # φ = π·w follows ρ.


def test_paper_build_draws_follow_the_table_and_the_floor_lives_in_the_emphasis():
    s = oracle_sampler(weight='edm', floor=0.1, build='paper')
    feed(s, gaussian_losses, steps=160)
    prof = s.profile()
    # φ = (1 − ε)·ρ + ε·log-uniform and π ∝ φ/w: the realised emphasis stays within ε of the target.
    log_uniform = normalize_density(1 / prof.sigma, s.grid.widths)
    assert torch.allclose(prof.phi, 0.9 * prof.rho + 0.1 * log_uniform, rtol=1e-9)
    assert torch.allclose(prof.pi, normalize_density(prof.phi / prof.weight, s.grid.widths), rtol=1e-9)
    torch.manual_seed(1)
    draws = s.sample(100_000, 'cpu').double()
    assert scipy.stats.kstest(draws.numpy(), lambda x: s.table.cdf_at(torch.as_tensor(x)).numpy()).pvalue > 1e-3
    assert len(torch.unique(draws)) > 99_000  # Continuous σ, not bin centres.


def test_warmup_draws_mix_base_and_floor():
    s = InfoNoise(floor=0.2, warmup_kimg=1000)
    torch.manual_seed(0)
    ln_sigma = s.sample(200_000).double().log().numpy()
    lo, hi = math.log(0.002), math.log(80)

    def mixture_cdf(x):  # 0.8·N(−1.2, 1.2²) + 0.2·U[ln 0.002, ln 80] in ln σ, written out independently.
        return 0.8 * scipy.stats.norm.cdf(x, -1.2, 1.2) + 0.2 * np.clip((x - lo) / (hi - lo), 0, 1)

    assert scipy.stats.kstest(ln_sigma, mixture_cdf).pvalue > 1e-3
    # The sampler's own cdf is that law, so strata and grids built from its icdf describe what is drawn.
    x = np.linspace(-8, 6, 57)
    np.testing.assert_allclose(s.cdf(torch.from_numpy(np.exp(x))).numpy(), mixture_cdf(x), rtol=0, atol=1e-12)
    assert scipy.stats.kstest(ln_sigma, lambda v: s.cdf(torch.from_numpy(np.exp(v))).numpy()).pvalue > 1e-3
    stats = s.describe()
    assert stats['refreshes'] == 0 and 'pivot' not in stats


def test_warmup_icdf_is_what_sample_draws():
    # During warm-up `sample` used to mix base and floor with a second uniform while `icdf` was the base's alone.
    s = InfoNoise(floor=0.2)
    torch.manual_seed(3)
    drawn = s.sample(50_000)
    torch.manual_seed(3)
    u = torch.rand(50_000, dtype=torch.float64).clamp(min=2.0**-40)
    assert torch.equal(drawn, s.icdf(u).float())
    # icdf inverts the mixture's CDF to float64 precision and is monotone, ends included.
    grid = torch.linspace(0, 1, 100_001, dtype=torch.float64)[1:-1]
    sigma = s.icdf(grid)
    assert (sigma[1:] >= sigma[:-1]).all() and (s.cdf(sigma) - grid).abs().max() < 1e-13
    assert s.icdf(torch.tensor([0.0], dtype=torch.float64)) == 0
    # With no floor the warm-up law is the base itself, exactly.
    assert torch.equal(InfoNoise(floor=0.0).icdf(grid), s.base.icdf(grid))


def test_warmup_min_count_and_refresh_cadence():
    # Refresh checks every 1,024 images; none during the 4,096-image warm-up.
    s = InfoNoise(
        weight='uniform', num_bins=16, refresh_kimg=1.024, warmup_kimg=4.096, min_count=8, base='loguniform', floor=0.0
    )
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(40):  # 40 steps of 256 images.
        sigma = s.sample(256, 'cpu')
        s.observe(sigma, gaussian_losses(sigma, gen))
        history.append(s.refreshes)
    # Steps 1..16 cover 4,096 images (no refresh: warm-up); then a refresh every 4 steps.
    assert history[15] == 0 and history[19] == 1 and history[23] == 2 and history[39] == 6
    assert all(history[i] == history[i - 1] for i in range(1, 40) if (i + 1) % 4 != 0)

    # N_min gates refreshes: with a base that never reaches the top interval, nothing refreshes.
    s = InfoNoise(weight='uniform', num_bins=16, refresh_kimg=1.024, warmup_kimg=0, min_count=8, floor=0.0)
    feed(s, gaussian_losses, steps=12)
    assert s.refreshes == 0 and s.table is None
    # The log-uniform floor populates every interval, so refreshes start.
    s = InfoNoise(weight='uniform', num_bins=16, refresh_kimg=1.024, warmup_kimg=0, min_count=8, floor=0.3)
    feed(s, gaussian_losses, steps=12)
    assert s.refreshes >= 1


def test_fifo_buffer_keeps_the_newest_losses():
    s = InfoNoise(num_bins=4, buffer_size=3, sigma_min=1, sigma_max=16, refresh_kimg=1000)
    sigma = torch.tensor([1.5, 1.5, 1.5, 1.5, 1.5, 9.0])  # Five losses for interval 0, one for interval 3.
    s.observe(sigma, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 7.0]))
    assert s.count.tolist() == [3, 0, 0, 1]
    assert sorted(s.buffer[0, :3].tolist()) == [3.0, 4.0, 5.0] and s.buffer[3, 0] == 7.0
    s.observe(torch.tensor([1.5]), torch.tensor([6.0]))  # Evicts the oldest (3).
    assert sorted(s.buffer[0, :3].tolist()) == [4.0, 5.0, 6.0] and s.count[0] == 3


def test_nonfinite_losses_are_ignored_and_counted():
    s = InfoNoise(num_bins=4, buffer_size=8, sigma_min=1, sigma_max=16, refresh_kimg=1000)
    s.observe(torch.tensor([1.5, 1.5, 1.5, 9.0]), torch.tensor([1.0, float('nan'), float('inf'), 2.0]))
    assert s.count.tolist() == [1, 0, 0, 1] and s.buffer[0, 0] == 1.0 and int(s.nonfinite) == 2
    assert s.describe()['nonfinite'] == 2


def test_degenerate_profile_keeps_previous_table():
    s = oracle_sampler(num_bins=16, min_count=8, buffer_size=16)
    feed(s, gaussian_losses, steps=8)
    table, refreshes = s.table, s.refreshes
    assert table is not None
    checks = []
    s.callback = checks.append
    every_bin = s.grid.centers.float().repeat(16)
    for poison in ('zero', 'nan'):
        s.observe(every_bin, torch.zeros_like(every_bin))  # Every buffer now holds only zeros.
        if poison == 'nan':
            s.mse.fill_(float('nan'))
        assert not s.refresh()
        assert s.table is table and s.refreshes == refreshes
        assert not checks[-1].refreshed and 'degenerate profile' in checks[-1].reason
        assert 'skipped: degenerate profile' in str(checks[-1])


def test_every_refresh_check_is_reported():
    # Warm-up 1,024 images, a check every 512, N_min = 8 in 16 intervals, draws from a log-normal base with a 5 %
    # floor: the first checks are skipped (the top intervals lack losses) and say which interval and how many; the
    # first refresh says the pivot, the peak of ρ and the quantiles of ln σ, and later ones the time since the last.
    s = InfoNoise(weight='uniform', num_bins=16, refresh_kimg=0.512, warmup_kimg=1.024, min_count=8, floor=0.05)
    checks = []
    s.callback = checks.append
    feed(s, gaussian_losses, steps=100, batch=64)
    assert [c.nimg for c in checks] == list(range(1536, 100 * 64 + 1, 512))  # One report per check, none in warm-up.
    skipped = [c for c in checks if not c.refreshed]
    refreshed = [c for c in checks if c.refreshed]
    assert skipped and refreshed and checks[0] is skipped[0]
    first = skipped[0]
    counts = s._pooled_buffer_stats()[2]  # Counts only grow, so the short interval of then is still identifiable.
    assert 'of N_min = 8 losses' in first.reason and str(first).startswith(
        'InfoNoise check at 1.536 kimg (step 24) skipped: '
    )
    # Before the first refresh the line says nothing about a time since one.
    assert first.since_nimg is None and str(first).endswith('short)') and 'refresh yet' not in str(first)
    assert int(first.reason.split('interval ')[1].split(' ')[0]) - 1 in range(16) and counts.min() >= 8
    r0, r1 = refreshed[0], refreshed[1]
    assert r0.refreshes == 1 and r1.refreshes == 2 and r1.since_nimg == r1.nimg - r0.nimg
    assert 'since' not in str(r0) and str(r1).endswith(' s) since the last refresh')
    assert r1.since_seconds is not None and r1.since_seconds >= 0
    assert r1.pivot > 0 and r1.pivot_rule == 'onset' and len(r1.ln_sigma_quantiles) == 3
    text = str(r1)
    assert text.startswith('InfoNoise refresh 2 at ') and 'pivot c = ' in text and 'ρ peaks at σ = ' in text
    assert s.last_check is checks[-1]
    assert s.profile().nimg == refreshed[-1].nimg  # The profile says when it was built.


def test_profile_records_counts_and_standard_errors():
    # Four losses per interval, known values: the counts, and each buffer mean's relative standard error
    # std/(√n·mean) carried to the scale of the EMA estimate (half the mean after one refresh at β = 0.5).
    s = InfoNoise(weight='uniform', num_bins=4, sigma_min=1, sigma_max=16, buffer_size=8, ema_rate=0.5,
                  refresh_kimg=0.016, warmup_kimg=0, min_count=4, smoothing=0)  # fmt: skip
    sigma = s.grid.centers.float().repeat_interleave(4)
    losses = torch.tensor([1.0, 2.0, 3.0, 6.0] * 4) * sigma**3  # Interval k holds 1, 2, 3, 6 times σ_k³.
    s.observe(sigma, losses)
    profile = s.profile()
    assert profile is not None and profile.count.tolist() == [4.0] * 4
    values = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    rel = values.std() / (2 * values.mean())
    torch.testing.assert_close(profile.stderr / profile.mse, torch.full((4,), rel.item(), dtype=torch.float64))
    torch.testing.assert_close(
        profile.mse, 0.5 * values.mean() * s.grid.centers.float().double() ** 3, rtol=1e-6, atol=0
    )


def test_schedule_report_warns_when_the_run_cannot_adapt():
    # The demo network's sampler: 32 intervals, N_min = 8, batch 64.
    demo = dict(num_bins=32, refresh_kimg=2, warmup_kimg=10, min_count=8)
    lines = InfoNoise(**demo).schedule_report(120_000, 64)
    assert not any(line.startswith('Warning') for line in lines) and 'first refresh expected at 10 kimg' in lines[-1]
    # Warm-up as long as the run: EDM plus a floor.
    lines = InfoNoise(**dict(demo, warmup_kimg=1000)).schedule_report(10_000, 64)
    assert any(line.startswith('Warning: InfoNoise will not adapt: its warm-up') for line in lines)
    # The short run of issue 13: 8 kimg, warm-up 2 kimg, checks every 1 kimg.
    lines = InfoNoise(**dict(demo, warmup_kimg=2, refresh_kimg=1)).schedule_report(8_000, 64)
    assert any(line.startswith('Warning: InfoNoise may not adapt: the chance') for line in lines)
    # Buffers too small for N_min, and a refresh period shorter than one step.
    lines = InfoNoise(**dict(demo, buffer_size=4)).schedule_report(120_000, 64)
    assert any('forever' in line for line in lines) and any(line.startswith('Warning') for line in lines)
    lines = InfoNoise(**dict(demo, refresh_kimg=0.01)).schedule_report(120_000, 64)
    assert lines[-1].startswith('Warning: the InfoNoise refresh period (10 images) is shorter than one step')


def test_schedule_report_chance_matches_simulation():
    # The report's chance that every interval holds N_min losses by the last check, against simulated warm-ups of
    # the sampler alone: the fraction of 60 runs whose last check refreshes.
    kwargs = dict(weight='uniform', num_bins=32, refresh_kimg=1, warmup_kimg=2, min_count=8)
    line = next(line for line in InfoNoise(**kwargs).schedule_report(8_000, 64) if 'the chance' in line)
    predicted = float(line.split(' losses by the last refresh check (8 kimg) is ')[1].split('%')[0]) / 100
    refreshed = 0
    for seed in range(60):
        s = InfoNoise(**kwargs)
        torch.manual_seed(seed)
        for _ in range(125):  # 8,000 images.
            s.observe(s.sample(64), torch.rand(64))
        refreshed += s.refreshes > 0
    assert abs(refreshed / 60 - predicted) < 0.2, (refreshed, predicted)


# Tensor operations that copy a value to the host: a device synchronisation on an accelerator.
HOST_READS = {'item', 'tolist', 'cpu', 'numpy', '__bool__', '__float__', '__int__', '__index__'}


class HostReads(TorchFunctionMode):
    """Records every host read (HOST_READS, and .to() from an accelerator onto the CPU) made inside the block."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, '__name__', str(func))
        target = kwargs.get('device', args[1] if name == 'to' and len(args) > 1 else None)
        to_cpu = name == 'to' and isinstance(target, str | torch.device) and torch.device(target).type == 'cpu'
        if name in HOST_READS or (to_cpu and args[0].device.type != 'cpu'):
            self.reads.append(name)
        return func(*args, **kwargs)


def test_host_reads_are_counted():
    # The counter itself: each kind of read is seen, tensor arithmetic is not.
    x = torch.ones(3)
    with HostReads() as mode:
        x.sum(), x * 2, torch.where(x > 0, x, 0.0)
        assert mode.reads == []
        x[0].item(), float(x[0]), int(x[0]), bool(x[0] > 0), x.tolist(), x.cpu(), x.numpy()
        if x[1] > 0:
            pass
    assert mode.reads == ['item', '__float__', '__int__', '__bool__', 'tolist', 'cpu', 'numpy', '__bool__']


@contextlib.contextmanager
def counted(device: str, strict: bool):
    """HostReads over the block; on CUDA with `strict`, also torch's sync debug mode, which raises on any
    synchronising call."""
    with HostReads() as mode:
        if device == 'cuda' and strict:
            torch.cuda.set_sync_debug_mode('error')
        try:
            yield mode
        finally:
            if device == 'cuda':
                torch.cuda.set_sync_debug_mode('default')


@pytest.mark.parametrize('device', ['cpu', *(['cuda'] if torch.cuda.is_available() else [])])
def test_no_host_sync_in_per_step_path(device):
    # 40 steps in steps: warm-up 10, a check every 5. Steps 5 and 10 are checks in the warm-up (they read the count
    # of invalid inputs), 15, 20, ... refresh. Every other step samples (from the warm-up mixture until step 15,
    # then from the table) and observes without a single host read. The checks do read, which shows that the
    # counter sees what a read in the per-step path would be.
    s = InfoNoise(num_bins=8, min_count=2, buffer_size=32, refresh_steps=5, warmup_steps=10, floor=0.5)
    checks = []
    s.callback = checks.append
    gen = torch.Generator().manual_seed(0)
    reads = {}
    for step in range(1, 41):
        noise = torch.rand(64, generator=gen).to(device)  # The test's own data, outside the counted blocks.
        with counted(device, strict=step % 5 != 0) as drawing:
            sigma = s.sample(64, device)
        losses = sigma**2 / (0.25 + sigma**2) * (0.5 + noise)  # A Gaussian source's mmse, with noise.
        with counted(device, strict=step % 5 != 0) as observing:
            s.observe(sigma, losses)
        reads[step] = drawing.reads + observing.reads
    assert {step: r for step, r in reads.items() if r and step % 5} == {}  # No read on a per-step step.
    assert all(reads[step] for step in range(5, 41, 5))
    assert [c.step for c in checks] == list(range(15, 41, 5)) and s.refreshes >= 3 and s.table is not None


def test_state_round_trip_continues_identically():
    a = oracle_sampler(num_bins=16, min_count=8)
    feed(a, gaussian_losses, steps=10, seed=1)
    b = oracle_sampler(num_bins=16, min_count=8)
    b.load_state_dict(torch.load(save_to_bytes(a.state_dict()), weights_only=True))
    for sampler in (a, b):
        torch.manual_seed(7)
        feed(sampler, gaussian_losses, steps=10, seed=2)
    assert a.refreshes == b.refreshes > 0 and a.pivot == b.pivot and a.raw_pivots == b.raw_pivots
    assert torch.equal(a.table.cdf, b.table.cdf) and torch.equal(a.buffer, b.buffer)
    torch.manual_seed(5)
    x = a.sample(1000)
    torch.manual_seed(5)
    assert torch.equal(x, b.sample(1000))
    with pytest.raises(ValueError):
        InfoNoise(num_bins=8).load_state_dict(a.state_dict())


def save_to_bytes(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_two_ranks_build_the_pooled_table(tmp_path):
    # Each rank observes its own stream; after every refresh both hold the table a single process builds from both.
    cmd = [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--standalone',
        '--nproc_per_node=2',
        os.path.join(REPO, 'tests', 'infonoise_dist_worker.py'),
        str(tmp_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    assert r0['refreshes'] == r1['refreshes'] > 0
    assert torch.equal(r0['cdf'], r1['cdf']) and r0['pivot'] == r1['pivot']
    # The same observations pooled in one process give the same table.
    single = torch.load(tmp_path / 'single.pt', weights_only=True)
    assert torch.allclose(r0['cdf'], single['cdf'], rtol=1e-12, atol=1e-12) and r0['refreshes'] == single['refreshes']


def test_bad_arguments():
    cases = {
        'Unknown loss weight': [dict(weight='nope')],
        'endpoint must be': [dict(endpoint='x')],
        'Unknown base sampler': [dict(base='x')],
        'num_bins must be an integer >= 2': [dict(num_bins=1), dict(num_bins=2.5), dict(num_bins=True)],
        'buffer_size must be an integer >= 1': [dict(buffer_size=0)],
        'min_count must be an integer >= 1': [dict(min_count=0)],
        'floor must be a number in': [dict(floor=2), dict(floor=math.nan)],
        'ema_rate must be a number in': [dict(ema_rate=0), dict(ema_rate=math.nan)],
        'refresh_kimg must be a finite number > 0': [dict(refresh_kimg=0), dict(refresh_kimg=math.inf)],
        'warmup_kimg must be a finite number >= 0': [dict(warmup_kimg=math.nan), dict(warmup_kimg=-1)],
        'refresh_steps must be an integer >= 1': [dict(refresh_steps=0, warmup_steps=0)],
        'warmup_steps must be an integer >= 0': [dict(refresh_steps=1, warmup_steps=1.5)],
        'pivot must be a finite number > 0': [dict(pivot=-1), dict(pivot=math.nan)],
        'Need 0 < sigma_min < sigma_max < inf': [
            dict(sigma_max=math.inf),
            dict(sigma_max=0.001),
            dict(sigma_min=math.nan),
            dict(sigma_min=-1),
        ],
        'sigma_data must be a finite number > 0': [dict(sigma_data=math.inf)],
        'gate_n must be a finite number > 0': [dict(gate_n=math.inf)],
        'onset_p must be a number in': [dict(onset_p=1)],
        'smoothing must be a finite number >= 0': [dict(smoothing=-1)],
    }
    for message, kwargs_list in cases.items():
        for kwargs in kwargs_list:
            with pytest.raises(ValueError, match=message):
                InfoNoise(**kwargs)


def test_observe_refuses_invalid_inputs_at_the_next_check():
    # Negative or NaN σ and negative losses cannot be binned. Reading them per step would sync the host, so they
    # are counted on the device and refused at the next refresh check, which reads the device anyway.
    for sigma, mse, what in (
        (torch.tensor([0.5, -0.5]), torch.ones(2), '1 σ that are not positive and finite'),
        (torch.tensor([0.5, math.nan]), torch.ones(2), '1 σ that are not positive and finite'),
        (torch.tensor([0.5, 0.0]), torch.ones(2), '1 σ that are not positive and finite'),
        (torch.tensor([0.5, 1.0]), torch.tensor([1.0, -1.0]), 'and 1 negative losses'),
    ):
        s = InfoNoise(num_bins=4, refresh_steps=3, warmup_steps=100)  # The check at step 3 is still in warm-up.
        s.observe(sigma, mse)
        s.observe(torch.ones(2), torch.ones(2))  # Step 2: no check, no error.
        assert int(s.count.sum()) == 3  # The invalid entry was not binned.
        with pytest.raises(ValueError, match=f'InfoNoise.observe got .*{what}.* by step 3'):
            s.observe(torch.ones(2), torch.ones(2))
    # The loss of a whole batch instead of per-sample losses is refused at once, naming both shapes.
    with pytest.raises(ValueError, match=r'mse has shape \(\) but sigma \(2,\); pass the per-sample MSE'):
        InfoNoise().observe(torch.ones(2), torch.ones(2).mean())


def refreshed_state() -> dict:
    s = oracle_sampler(num_bins=8, min_count=4, buffer_size=16)
    feed(s, gaussian_losses, steps=6)
    assert s.refreshes > 0
    return s.state_dict()


def test_load_state_dict_refuses_broken_states():
    good = refreshed_state()
    fresh = lambda: oracle_sampler(num_bins=8, min_count=4, buffer_size=16)  # noqa: E731
    fresh().load_state_dict(good)
    table = good['table']
    broken = {
        'lacks ptr': dict(ptr=None),
        r'has buffers \(8, 9\), expected \(8, 17\)': dict(buffer=torch.zeros(8, 9)),
        'buffer holds non-finite losses': dict(
            buffer=good['buffer'].clone().index_fill_(1, torch.tensor([0]), math.nan)
        ),
        r'ptr must lie in \[0, 16\)': dict(ptr=torch.full((8,), 16)),
        'ptr must be a torch.int64 tensor of shape': dict(ptr=good['ptr'].float()),
        r'count must lie in \[0, 16\]': dict(count=torch.full((8,), -1)),
        'mse must be finite and >= 0': dict(mse=torch.full((8,), math.nan, dtype=torch.float64)),
        'table.cdf must be a CDF': dict(table=dict(table, cdf=table['cdf'].flip(0))),
        'table.log_sigma must be finite, strictly increasing': dict(table=dict(table, log_sigma=-table['log_sigma'])),
        'table.density must be finite and >= 0': dict(table=dict(table, density=-table['density'])),
        r"table must be None or a dict of log_sigma, density, cdf \(build='continuous'; the state holds \['cdf', 'sigma'\]": dict(
            table=dict(sigma=table['log_sigma'][1:-1].exp(), cdf=table['cdf'][1:-1])
        ),
        'table and profile must be present exactly when refreshes > 0': dict(table=None),
        'pivot must be a finite number > 0 after a refresh': dict(pivot=math.nan),
        r'next_check \(0\) must lie after the images': dict(next_check=0),
        'nimg must be an integer >= 0': dict(nimg=-5),
        'refreshes must be an integer >= 0': dict(refreshes=1.5),
        'profile is not a profile': dict(profile=dict(good['profile'], rho=None)),
        'raw_pivots must be a list of at most 5 positive numbers': dict(raw_pivots=[0.1] * 6),
    }
    for message, change in broken.items():
        state = {k: v for k, v in dict(good, **change).items() if v is not None or k in ('table', 'profile')}
        if 'lacks' in message:
            state.pop('ptr', None)
        with pytest.raises(ValueError, match=message):
            fresh().load_state_dict(state)
    with pytest.raises(ValueError, match='InfoNoise state must be a dict, got list'):
        fresh().load_state_dict([])


def test_grid_matches_sampler_range():
    # K = 8 log-spaced intervals over [0.01, 10] span 3 decades: edge k is 10^(-2 + 3k/8), centre k is
    # 10^(-2 + 3(k + 1/2)/8). The numbers are written out, not recomputed by the grid's own code.
    s = InfoNoise(sigma_min=0.01, sigma_max=10, num_bins=8)
    edges = [0.01, 0.023713737056616554, 0.05623413251903491, 0.1333521432163324, 0.31622776601683794,
             0.7498942093324559, 1.7782794100389228, 4.216965034285822, 10.0]  # fmt: skip
    torch.testing.assert_close(s.grid.edges, torch.tensor(edges, dtype=torch.float64), rtol=1e-14, atol=0)
    assert s.grid.edges[0].item() == 0.01 and s.grid.edges[-1].item() == 10.0  # The ends are pinned exactly.
    centres = [0.015399265260594916, 0.03651741272548377, 0.08659643233600653, 0.2053525026457146,
               0.4869675251658631, 1.1547819846894583, 2.7384196342643614, 6.493816315762113]  # fmt: skip
    torch.testing.assert_close(s.grid.centers, torch.tensor(centres, dtype=torch.float64), rtol=1e-14, atol=0)
    # A σ on an edge belongs to the interval above it; values outside the range go to the end intervals.
    sigma = torch.tensor([0.001, 0.01, 0.0237, 0.0238, s.grid.edges[4], 9.99, 10.0, 1e3], dtype=torch.float64)
    assert s.grid.bin_index(sigma).tolist() == [0, 0, 0, 1, 4, 7, 7, 7]
