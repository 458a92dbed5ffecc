"""--resume=auto: a run killed twice and relaunched with the same command ends in exactly the state of an uninterrupted
run (CPU, bitwise), continuing its own run directory; and the snapshot sample grid is what generate.py draws."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_NET_ARGS, assert_equal

import train
from training.run_dir import state_nimg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1')  # A tiny network gains nothing from threads, which a busy machine stalls.
KIMG = 6  # Long enough that each launch is killed before the end.


def command(outdir, data, *extra):
    return [
        sys.executable, 'train.py', f'--outdir={outdir}', f'--data={data}', '--device=cpu', '--workers=0',
        *TINY_NET_ARGS, '--batch=32', f'--duration={KIMG / 1000}', '--tick=1', '--snap=100', '--dump=1',
        '--lr-rampup=0', '--sampler=infonoise', '--info-bins=8', '--info-refresh=1', '--info-warmup=1',
        '--info-nmin=2', *extra,
    ]  # fmt: skip


def runs(outdir):
    """The run directories in OUTDIR (not the hidden lock files of --resume=auto)."""
    return sorted(name for name in os.listdir(outdir) if not name.startswith('.')) if os.path.isdir(outdir) else []


def states(run_dir):
    names = [f for f in os.listdir(run_dir) if f.startswith('training-state-')] if os.path.isdir(run_dir) else []
    return sorted(int(f[15:-3]) for f in names)


def launch_and_kill(cmd, outdir, past_kimg):
    """Start train.py and SIGKILL it once its run directory holds a training state past `past_kimg`."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        names = os.listdir(outdir) if os.path.isdir(outdir) else []
        if any(k > past_kimg for run in names for k in states(os.path.join(outdir, run))):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f'train.py ended before it was killed (exit {proc.wait()}): {proc.stderr.read().decode()[-2000:]}')


def load_state(path):
    state = torch.load(path, map_location='cpu', weights_only=True)
    state.pop('dataset_kwargs', None)
    return state


def test_resume_auto_killed_twice_equals_uninterrupted(tmp_path, digits_zip):
    out = tmp_path / 'auto'
    launch_and_kill(command(out, digits_zip, '--resume=auto'), out, 1)
    launch_and_kill(command(out, digits_zip, '--resume=auto'), out, max(states(out / runs(out)[0])) + 1)
    result = subprocess.run(
        command(out, digits_zip, '--resume=auto'), cwd=REPO, env=ENV, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = [out / name for name in runs(out)]  # Every launch continued the same run directory.
    seed = json.load(open(run_dir / 'training_options.json'))['seed']  # Drawn by the first launch, then the state's.

    straight = tmp_path / 'straight'
    result = subprocess.run(
        command(straight, digits_zip, f'--seed={seed}'), cwd=REPO, env=ENV, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (straight_dir,) = [straight / name for name in runs(straight)]
    assert os.path.basename(run_dir) == os.path.basename(straight_dir)
    final = f'training-state-{KIMG:06d}.pt'
    assert_equal(load_state(run_dir / final), load_state(straight_dir / final))
    assert_equal(
        torch.load(run_dir / f'network-snapshot-{KIMG:06d}.pt', weights_only=True)['ema'],
        torch.load(straight_dir / f'network-snapshot-{KIMG:06d}.pt', weights_only=True)['ema'],
    )

    # One log across the three launches; stats.jsonl holds each tick once, in order; no temporary files are left.
    log = open(run_dir / 'log.txt').read()
    assert log.count('Loading dataset...') == 3 and log.count('Loading training state from') == 2
    nimg = [round(json.loads(line)['Progress/kimg']['mean'] * 1000) for line in open(run_dir / 'stats.jsonl')]
    assert nimg == sorted(set(nimg)) and nimg[-1] == state_nimg(run_dir / final)
    resumed = re.findall(r'Loading training state from "([^"]+)"', log)
    assert all(state_nimg(path) in nimg for path in resumed)  # The tick each state was saved at is kept.
    assert not [f for f in os.listdir(run_dir) if f.endswith('.tmp')]


def test_resume_auto_starts_a_run_and_refuses_other_options(tmp_path, digits_zip):
    out = tmp_path / 'runs'
    args = ['--outdir', out, '--data', digits_zip, '--device=cpu', '--workers=0', *TINY_NET_ARGS]
    args += ['--batch=16', '--duration=0.001', '--tick=1', '--resume=auto']
    result = CliRunner().invoke(train.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    (run,) = runs(out)
    # The same command continues it; other options are refused before anything is written.
    result = CliRunner().invoke(train.main, [str(a) for a in [*args, '--lr=0.002']])
    assert (
        result.exit_code != 0
        and '--resume=auto:' in result.output
        and '--lr: 0.001 (now 0.002; optimizer_kwargs.lr)' in result.output
    )
    assert runs(out) == [run]
    # A longer duration (and other reporting) is a continuation: it resumes from the newest state in place.
    result = CliRunner().invoke(train.main, [str(a) for a in [*args, '--duration=0.002', '--snap=2', '--dump=3']])
    assert result.exit_code == 0, result.output
    assert runs(out) == [run] and 'training-state-000002.pt' in os.listdir(out / run)
    # Another --desc is another run.
    result = CliRunner().invoke(train.main, [str(a) for a in [*args, '--desc=other']])
    assert result.exit_code == 0 and len(runs(out)) == 2, result.output


def test_snapshot_grid_is_what_generate_draws(tmp_path, digits_zip):
    out = tmp_path / 'run'
    args = ['--outdir', out, '--nosubdir', '--data', digits_zip, '--device=cpu', '--workers=0', *TINY_NET_ARGS]
    result = CliRunner().invoke(
        train.main, [str(a) for a in [*args, '--batch=16', '--duration=0.001', '--snap-grid=9']]
    )
    assert result.exit_code == 0, result.output
    assert sorted(f for f in os.listdir(out) if f.startswith('samples-')) == [
        'samples-000000.png',
        'samples-000001.png',
    ]
    import generate

    png = tmp_path / 'grid.png'
    argv = ['--network', out / 'network-snapshot-000001.pt', '--outdir', tmp_path / 'images', '--seeds=0-8',
            '--grid-png', png, '--device=cpu']  # fmt: skip
    result = CliRunner().invoke(generate.main, [str(a) for a in argv])
    assert result.exit_code == 0, result.output
    grid = np.array(PIL.Image.open(out / 'samples-000001.png'))
    assert grid.shape == (24, 24) and np.array_equal(grid, np.array(PIL.Image.open(png)))
