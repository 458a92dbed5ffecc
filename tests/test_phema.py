"""Post-hoc EMA (training/phema.py, reconstruct_ema.py): σ_rel <-> γ, the tracked profiles against the closed-form
power-function average, the reconstruction of tracked and untracked profiles, and a tiny train.py run with
--ema-profiles that stores profile files, resumes bitwise and feeds reconstruct_ema.py and generate.py."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import TINY_NET_ARGS, assert_equal, invoke, train_config

from training import phema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1')


def test_sigma_rel_gamma_round_trip():
    sigma_rel = np.array([1e-3, 0.01, 0.05, 0.08, 0.1, 0.2, 0.28])
    gamma = phema.sigma_rel_to_gamma(sigma_rel)
    assert np.all(gamma > 0) and np.all(np.diff(gamma) < 0)  # Narrower profiles average over fewer steps.
    np.testing.assert_allclose(phema.gamma_to_sigma_rel(gamma), sigma_rel, rtol=1e-12)
    gamma = np.array([0.5, 1.0, 6.94, 16.97, 100.0])
    np.testing.assert_allclose(phema.sigma_rel_to_gamma(phema.gamma_to_sigma_rel(gamma)), gamma, rtol=1e-9)
    assert phema.gamma_to_sigma_rel(0) == pytest.approx(phema.SIGMA_REL_MAX)
    for bad in (0, -0.1, phema.SIGMA_REL_MAX, 0.3):
        with pytest.raises(ValueError):
            phema.sigma_rel_to_gamma(bad)
    assert phema.parse_sigma_rels('0.1,0.05,0.1') == [0.05, 0.1]
    for bad in ('0.05,x', '0.05,0.3', '0'):
        with pytest.raises(ValueError):
            phema.parse_sigma_rels(bad)


class Trajectory(torch.nn.Module):
    """A 'network' whose parameter vector follows known functions of the step: θ_k(i) for step i = 1..n."""

    def __init__(self, dtype):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(5, dtype=dtype))
        self.register_buffer('step', torch.zeros([], dtype=torch.int64))

    @staticmethod
    def at(steps: np.ndarray, n: int) -> np.ndarray:
        """[len(steps), 5]: a constant, a line, an oscillation, a decay and a fixed random walk."""
        x = steps / n
        walk = np.cumsum(np.random.default_rng(0).normal(size=n + 1))[steps]
        return np.stack([np.ones_like(x), x, np.sin(6 * np.pi * x), np.exp(-5 * x), walk / np.sqrt(n)], axis=1)


def track(sigma_rels, n, batch, every, dtype):
    """Run PowerFunctionEMA over the trajectory; the profiles stored every `every` steps as (nimg, γ, state dict)."""
    net = Trajectory(dtype)
    ema = phema.PowerFunctionEMA(net, sigma_rels)
    theta, stored = Trajectory.at(np.arange(n + 1), n), []
    for i in range(1, n + 1):
        with torch.no_grad():
            net.theta.copy_(torch.as_tensor(theta[i], dtype=dtype))
            net.step.fill_(i)
        ema.update(net, i * batch, batch)
        if i % every == 0:
            stored += [(i * batch, p['gamma'], p['ema']) for p in ema.profiles()]
    return stored, theta


def reconstruct(stored, nimg, sigma_rels):
    stored = [s for s in stored if s[0] <= nimg]
    coefs = phema.solve_coefficients([s[0] for s in stored], [s[1] for s in stored], nimg,
                                     phema.sigma_rel_to_gamma(sigma_rels))  # fmt: skip
    return phema.combine(((c, s[2]) for c, s in zip(coefs, stored)), len(sigma_rels)), coefs, stored


def test_tracked_profile_is_the_power_function_average():
    """β of Eq. 127 after each step gives step i of n the weight (i^(γ+1) − (i−1)^(γ+1)) / n^(γ+1), exactly."""
    n, batch = 300, 4
    (stored, theta) = track([0.1], n, batch, n, torch.float64)
    gamma = stored[-1][1]
    i = np.arange(1, n + 1)
    weights = (i ** (gamma + 1) - (i - 1) ** (gamma + 1)) / n ** (gamma + 1)
    np.testing.assert_allclose(stored[-1][2]['theta'].numpy(), weights @ theta[1:], rtol=1e-12, atol=1e-13)
    assert int(stored[-1][2]['step']) == n  # Buffers follow the network's.


def test_reconstructing_a_tracked_profile_is_exact():
    """A tracked σ_rel at a stored time is that stored profile: coefficients a unit vector up to the float64 solve,
    weights equal in float32 up to rounding (a few ulp)."""
    stored, _ = track([0.05, 0.1], 400, 8, 25, torch.float32)
    nimg = 200 * 8  # A stored time in the middle: later files must not take part.
    (out,), coefs, used = reconstruct(stored, nimg, [0.05])
    target = next(k for k, s in enumerate(used) if s[0] == nimg and s[1] == phema.sigma_rel_to_gamma(0.05))
    assert np.abs(coefs[:, 0] - np.eye(len(used))[target]).max() < 1e-9
    want = used[target][2]['theta']
    assert out['theta'].dtype == torch.float32
    assert (out['theta'] - want).abs().max() <= 4 * torch.finfo(torch.float32).eps * want.abs().max()
    assert out['step'].dtype == torch.int64 and int(out['step']) == 200


@pytest.mark.parametrize('sigma_rel', [0.03, 0.08, 0.15])
def test_reconstructing_an_untracked_profile_matches_the_closed_form(sigma_rel):
    """σ_rel not tracked: the reconstruction against the closed-form power-function average of the trajectory.

    Tolerance: by Cauchy-Schwarz, |Σ x_i ⟨p_i, θ⟩ − ⟨p, θ⟩| ≤ ‖Σ x_i p_i − p‖₂ ‖θ‖₂, with the kernel residual in closed
    form (kernel_residual) and ‖θ‖₂ over [0, t] of the piecewise-constant trajectory; the stored averages are exact
    (test above), so this bound holds up to float64 rounding. It also has to be small: 1e-2 of the trajectory's
    scale, which the 2 profiles × 16 times achieve (EDM2 stores as few)."""
    n, batch = 1600, 2
    stored, theta = track([0.05, 0.1], n, batch, 100, torch.float64)
    (out,), coefs, used = reconstruct(stored, n * batch, [sigma_rel])
    gamma = phema.sigma_rel_to_gamma(sigma_rel)
    i = np.arange(1, n + 1)
    exact = (i ** (gamma + 1) - (i - 1) ** (gamma + 1)) / n ** (gamma + 1) @ theta[1:]
    error = np.abs(out['theta'].numpy() - exact)
    residual = phema.kernel_residual([s[0] for s in used], [s[1] for s in used], coefs, n * batch, [gamma])[0]
    bound = residual * np.sqrt(batch * np.sum(theta[1:] ** 2, axis=0))
    assert np.all(error <= bound * (1 + 1e-9) + 1e-12), (error, bound)
    assert error[0] < 1e-12  # Columns sum to 1: a constant is reproduced.
    assert np.all(error < 1e-2), error


def test_state_dict_round_trip_is_bitwise():
    net = Trajectory(torch.float32)
    a, b = phema.PowerFunctionEMA(net, [0.05, 0.1]), phema.PowerFunctionEMA(net, [0.05, 0.1])
    for i in range(1, 6):
        with torch.no_grad():
            net.theta.add_(torch.randn(5))
        a.update(net, i * 16, 16)
    b.load_state_dict(a.state_dict())
    for x, y in zip(a.state_dict()['emas'], b.state_dict()['emas']):
        assert all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(ValueError, match='σ_rel'):
        phema.PowerFunctionEMA(net, [0.05]).load_state_dict(a.state_dict())


def train_args(outdir, data, kimg, *extra):
    return [
        f'--outdir={outdir}', f'--data={data}', '--device=cpu', '--workers=0', *TINY_NET_ARGS, '--batch=32',
        f'--duration={kimg / 1000}', '--tick=1', '--snap=1', '--dump=1', '--lr-rampup=0', '--seed=1',
        '--ema-profiles=0.05,0.1', '--ema-profile-every=1', *extra,
    ]  # fmt: skip


@pytest.fixture(scope='module')
def phema_runs(tmp_path_factory, digits_zip):
    """A 3-kimg run straight through, and the same run stopped by SIGTERM after its first stored profiles (mid-tick)
    and continued by --resume=auto."""
    root = tmp_path_factory.mktemp('phema')
    cmd = [sys.executable, 'train.py', *train_args(root / 'resumed', digits_zip, 3, '--resume=auto')]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(root.glob('resumed/0*/phema-000001.pt')):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate()[0]
    assert proc.returncode == 128 + signal.SIGTERM and 'Stopped at' in output, output[-2000:]
    # Every part in a process of its own with one thread: train.py sizes its CPU threads by the free CPUs, and float
    # sums taken over another number of threads differ in the last bits.
    for args in (
        train_args(root / 'resumed', digits_zip, 3, '--resume=auto'),
        train_args(root / 'straight', digits_zip, 3),
    ):
        result = subprocess.run([sys.executable, 'train.py', *args], cwd=REPO, env=ENV, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (resumed,) = (root / 'resumed').glob('0*')
    (straight,) = (root / 'straight').glob('0*')
    return resumed, straight


def test_train_stores_profiles_and_resumes_bitwise(phema_runs):
    resumed, straight = phema_runs
    assert sorted(f.name for f in straight.glob('phema-*.pt')) == [f'phema-00000{k}.pt' for k in (1, 2, 3)]
    assert 'Loading training state from' in (resumed / 'log.txt').read_text()
    for k in (1, 2, 3):
        a = torch.load(resumed / f'phema-00000{k}.pt', weights_only=True)
        b = torch.load(straight / f'phema-00000{k}.pt', weights_only=True)
        assert_equal(a, b, f'phema-00000{k}.pt')
    assert a['nimg'] == 3008 and [p['sigma_rel'] for p in a['profiles']] == [0.05, 0.1]
    assert [p['gamma'] for p in a['profiles']] == pytest.approx(phema.sigma_rel_to_gamma([0.05, 0.1]), rel=1e-12)
    state = torch.load(straight / 'training-state-000003.pt', weights_only=True)
    assert_equal(torch.load(resumed / 'training-state-000003.pt', weights_only=True)['phema'], state['phema'])
    assert_equal(state['phema']['emas'], [p['ema'] for p in a['profiles']])


def test_reconstruct_ema_writes_snapshots_generate_reads(phema_runs, tmp_path):
    import generate
    import reconstruct_ema

    _, run = phema_runs
    out = tmp_path / 'out'
    result = invoke(reconstruct_ema.main, f'--run={run}', '--sigma-rel=0.08,0.05', '--at-kimg=2', f'--outdir={out}')
    assert result.exit_code == 0, result.output
    assert sorted(f.name for f in out.iterdir()) == [
        'network-snapshot-000002-0.050.pt',
        'network-snapshot-000002-0.080.pt',
    ]

    # The tracked σ_rel at a stored time is that stored profile, to float32 rounding.
    tracked = torch.load(out / 'network-snapshot-000002-0.050.pt', weights_only=True)
    stored = torch.load(run / 'phema-000002.pt', weights_only=True)['profiles'][0]['ema']
    for key, value in stored.items():
        assert (tracked['ema'][key] - value).abs().max() <= 1e-6 * max(value.abs().max(), 1), key
    snapshot = torch.load(run / 'network-snapshot-000002.pt', weights_only=True)
    assert tracked.keys() - {'phema'} == snapshot.keys()

    result = invoke(generate.main, f'--network={out / "network-snapshot-000002-0.080.pt"}', f'--outdir={tmp_path / "img"}',
                    '--seeds=0-1', '--steps=2', '--device=cpu')  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(f.name for f in (tmp_path / 'img').glob('*.png')) == ['000000.png', '000001.png']


@pytest.mark.parametrize(
    'args, message',
    [
        (['--sigma-rel=0.3'], '--sigma-rel: σ_rel 0.3 is out of range'),
        (['--sigma-rel=0.05,abc'], '--sigma-rel: "0.05,abc" is not a comma-separated list'),
        (['--sigma-rel=0.05', '--at-kimg=4'], '--at-kimg=4 is beyond the newest stored profiles (3 kimg)'),
        (['--sigma-rel=0.05', '--at-kimg=0'], '--at-kimg=0: no profiles stored then; stored at 1, 2, 3 kimg'),
        (['--sigma-rel=0.05', '--run=EMPTY'], 'holds no post-hoc EMA profiles (phema-*.pt); train with --ema-profiles'),
    ],
)
def test_reconstruct_ema_one_line_errors(phema_runs, tmp_path, args, message):
    import reconstruct_ema

    (tmp_path / 'empty').mkdir()
    run = [f'--run={phema_runs[1]}'] + [a.replace('EMPTY', str(tmp_path / 'empty')) for a in args]
    result = invoke(reconstruct_ema.main, *run, f'--outdir={tmp_path / "out"}')
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / 'out').exists()


def test_train_options(tmp_path, digits_zip):
    """Off by default (no config keys: EDM's configs and EMA unchanged); one-line errors for bad values."""
    import train

    base = [f'--outdir={tmp_path}', f'--data={digits_zip}', '--device=cpu', *TINY_NET_ARGS]
    assert 'ema_profiles' not in train_config(*base) and 'ema_profile_every' not in train_config(*base)
    config = train_config(*base, '--ema-profiles=0.1,0.05')
    assert config['ema_profiles'] == [0.05, 0.1] and config['ema_profile_every'] is None
    for args, message in [
        (['--ema-profiles=0.5'], 'σ_rel 0.5 is out of range'),
        (['--ema-profile-every=2'], '--ema-profile-every only applies with --ema-profiles'),
    ]:
        result = invoke(train.main, *base, *args, '--dry-run')
        assert result.exit_code != 0 and message in result.output, result.output
