"""A run one can trust to stop and start (issue 22): a finished run relaunched changes nothing, SIGTERM/SIGINT save a
training state and the relaunch ends bitwise where an uninterrupted run ends, two launches of one command never
train side by side, and the run directory's names and stats have one home (training/run_dir.py)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_NET_ARGS
from test_resume_auto import assert_equal, load_state, runs

from training import run_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1')


def command(outdir, data, kimg, *extra):
    return [
        sys.executable, 'train.py', f'--outdir={outdir}', f'--data={data}', '--device=cpu', '--workers=0',
        *TINY_NET_ARGS, '--batch=32', f'--duration={kimg / 1000}', '--tick=2', '--snap=1', '--dump=100',
        '--lr-rampup=0', '--sampler=infonoise', '--info-bins=8', '--info-refresh=1', '--info-warmup=1',
        '--info-nmin=2', '--seed=7', '--resume=auto', *extra,
    ]  # fmt: skip


def launch(cmd):
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f'train.py ended (exit {proc.wait()}) before the awaited moment: {proc.stderr.read()[-2000:]}')


def ticks(directory):
    """kimg of each stats.jsonl line."""
    return [json.loads(line)['Progress/kimg']['mean'] for line in open(os.path.join(directory, run_dir.STATS))]


def digest(directory):
    """Every file of a folder with its bytes' hash and its modification time."""
    return {
        name: (hashlib.sha256(open(os.path.join(directory, name), 'rb').read()).hexdigest(),
               os.stat(os.path.join(directory, name)).st_mtime_ns)
        for name in sorted(os.listdir(directory))
    }  # fmt: skip


@pytest.fixture(scope='module')
def straight(tmp_path_factory, digits_zip):
    """An uninterrupted 4-kimg run: the reference every stopped-and-relaunched run must end equal to."""
    out = tmp_path_factory.mktemp('straight')
    code, _, err = finish(launch(command(out, digits_zip, 4)))
    assert code == 0, err[-2000:]
    return out / runs(out)[0]


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_state_and_the_relaunch_ends_equal(tmp_path, digits_zip, straight, signum):
    # Stop mid-tick (ticks every 2 kimg): the state is saved at the step the signal arrived, exit status 128 + signal.
    out = tmp_path / 'out'
    proc = launch(command(out, digits_zip, 4))
    wait_for(lambda: any(run_dir.find(out / name, 'network-snapshot') for name in runs(out) if '-' in name), proc)
    time.sleep(0.5)
    proc.send_signal(signum)
    code, stdout, err = finish(proc)
    assert code == 128 + signum, err[-2000:]
    assert f'Received {signal.Signals(signum).name}' in stdout and 'training state saved' in stdout
    (directory,) = [out / name for name in runs(out)]
    (state,) = run_dir.find(directory, 'training-state').values()
    stopped = run_dir.state_nimg(state)
    assert 0 < stopped < 4000 and 'Traceback' not in err
    assert ticks(directory) == [t for t in ticks(straight) if t * 1000 <= stopped]  # Lines of finished ticks only.

    # The same command continues in place, inside the stopped tick, and ends where the uninterrupted run ends.
    code, stdout, err = finish(launch(command(out, digits_zip, 4)))
    assert code == 0, err[-2000:]
    assert f'Continuing {directory} in place' in stdout and 'Loading training state from' in stdout
    assert_equal(load_state(run_dir.newest(directory, 'training-state')), load_state(straight / os.path.basename(
        run_dir.newest(straight, 'training-state'))))  # fmt: skip
    for kimg, path in run_dir.find(straight, 'network-snapshot').items():  # Same ticks, same snapshots.
        assert_equal(torch.load(path, weights_only=True)['ema'],
                     torch.load(run_dir.path(directory, 'network-snapshot', kimg * 1000), weights_only=True)['ema'])  # fmt: skip
    assert ticks(directory) == ticks(straight)
    lines = [json.loads(line) for line in open(directory / run_dir.STATS)]
    assert [line['Progress/tick']['mean'] for line in lines] == [0, 1, 2]
    # Each tick's speed counts the images its launch trained: the resumed tick only those after the stop.
    ends = [round(line['Progress/kimg']['mean'] * 1000) for line in lines]
    for start, end, line in zip([0, *ends], ends, lines):
        trained = end - (stopped if start <= stopped < end else start)
        timed = line['Timing/img_per_sec']['mean'] * line['Timing/sec_per_tick']['mean']
        assert timed == pytest.approx(max(trained, 1), rel=1e-6), (start, end, stopped)


def test_finished_run_relaunched_changes_no_byte(tmp_path, digits_zip, straight):
    out = straight.parent
    before = digest(straight), sorted(os.listdir(out))
    code, stdout, err = finish(launch(command(out, digits_zip, 4)))
    assert code == 0, err[-2000:]
    assert f'{straight} is already complete: 4 kimg of --duration=0.004 Mimg done.' in stdout
    assert (digest(straight), sorted(os.listdir(out))) == before
    # An explicit --resume of a state at the end of the duration says so too, and creates no run directory.
    state = run_dir.newest(straight, 'training-state')
    cmd = [a for a in command(tmp_path, digits_zip, 4) if a != '--resume=auto'] + [f'--resume={state}']
    code, stdout, err = finish(launch(cmd))
    assert code == 0 and 'is already complete' in stdout and os.listdir(tmp_path) == [], err[-2000:]


def test_two_launches_of_one_command_one_trains_the_other_refuses(tmp_path, digits_zip, straight):
    # A requeued job while the first still runs: the second says who holds the run and trains nothing.
    out = tmp_path / 'out'
    first = launch(command(out, digits_zip, 40))
    wait_for(lambda: any(run_dir.find(out / name, 'network-snapshot') for name in runs(out) if '-' in name), first)
    code, stdout, err = finish(launch(command(out, digits_zip, 40)))
    (directory,) = [out / name for name in runs(out)]
    assert code == 1 and f'is in use by pid {first.pid} on ' in err and err.count('\n') == 1, err
    assert first.poll() is None  # The second ended while the first still trains.
    first.send_signal(signal.SIGTERM)
    code, _, err = finish(first)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert sorted(set(ticks(directory))) == ticks(directory)  # Every tick once: the second launch wrote nothing.

    # Two fresh launches at once: one gets the command's lock and trains, the other refuses.
    out = tmp_path / 'fresh'
    procs = [launch(command(out, digits_zip, 8)) for _ in range(2)]
    results = sorted(finish(proc) for proc in procs)
    assert [code for code, _, _ in results] == [0, 1], results
    assert 'is in use by pid' in results[1][2] and len(runs(out)) == 1


def test_stats_line_is_written_before_the_state(tmp_path, digits_zip, monkeypatch):
    # A kill between a state's rename and its stats line would lose that tick's line: the line comes first.
    from click.testing import CliRunner

    import train
    from training import checkpoint

    saved, real_save = [], checkpoint.save_training_state

    def save(directory, nimg, *args, **kwargs):
        saved.append((nimg, ticks(directory)[-1]))
        real_save(directory, nimg, *args, **kwargs)

    monkeypatch.setattr(checkpoint, 'save_training_state', save)
    args = ['--outdir', tmp_path, '--data', digits_zip, '--device=cpu', '--workers=0', *TINY_NET_ARGS, '--batch=32']
    result = CliRunner().invoke(train.main, [str(a) for a in [*args, '--duration=0.002', '--tick=1', '--dump=1']])
    assert result.exit_code == 0, result.output
    # Ticks end at 32 (tick 0, no dump), 1056 and 2016 images.
    assert [(nimg, round(kimg * 1000)) for nimg, kimg in saved] == [(1056, 1056), (2016, 2016)]


def cli(*args):
    from click.testing import CliRunner

    import train

    return CliRunner().invoke(train.main, [str(a) for a in args])


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert result.exit_code == 1 and len(lines) == 1 and 'Traceback' not in result.output, result.output
    return lines[0]


def test_broken_runs_are_refused_in_one_line_and_left_as_they_are(tmp_path, digits_zip):
    args = ['--data', digits_zip, '--device=cpu', '--workers=0', *TINY_NET_ARGS, '--batch=32', '--duration=0.002',
            '--tick=1', '--seed=3', '--resume=auto', '--nosubdir']  # fmt: skip
    cases = {
        'corrupt': (lambda d: (d / run_dir.OPTIONS).write_text('{"seed": 3,'), 'training_options.json" is not valid JSON'),
        'list': (lambda d: (d / run_dir.OPTIONS).write_text('[1, 2]'), 'must hold a JSON object of training options'),
        'deep': (lambda d: (d / run_dir.OPTIONS).write_text('[' * 100_000 + ']' * 100_000), 'nests JSON too deeply'),
        'deleted': (lambda d: (d / run_dir.OPTIONS).unlink(), 'holds a run but no training_options.json; restore it'),
    }  # fmt: skip
    for name, (damage, message) in cases.items():
        out = tmp_path / name
        assert cli('--outdir', out, *args).exit_code == 0
        damage(out)
        before = digest(out)
        assert message in one_error_line(cli('--outdir', out, *args, '--duration=0.003')), name
        assert digest(out) == before, name
    # Another explicit --seed is another run, not this one continued.
    out = tmp_path / 'seed'
    assert cli('--outdir', out, *args).exit_code == 0
    before = digest(out)
    assert '--seed: 3 (now 4)' in one_error_line(cli('--outdir', out, *args, '--seed=4', '--duration=0.003'))
    assert digest(out) == before


def test_state_holding_nan_is_refused(tmp_path, digits_zip):
    args = ['--outdir', tmp_path / 'runs', '--data', digits_zip, '--device=cpu', '--workers=0', *TINY_NET_ARGS,
            '--batch=32', '--duration=0.001', '--tick=1']  # fmt: skip
    assert cli(*args).exit_code == 0
    state_path = run_dir.newest(tmp_path / 'runs' / runs(tmp_path / 'runs')[0], 'training-state')
    state = torch.load(state_path, weights_only=True)
    state['ema']['model.map_layer0.weight'][0, 0] = float('nan')
    torch.save(state, state_path)
    message = one_error_line(cli(*args, f'--resume={state_path}', '--duration=0.002'))
    assert 'holds NaN or infinite values (ema.model.map_layer0.weight, 1 tensors in all)' in message
    assert len(runs(tmp_path / 'runs')) == 1


@pytest.mark.parametrize('code', ['ENOSPC', 'EFBIG'])
def test_full_disk_while_writing_the_options_leaves_no_run_directory(tmp_path, digits_zip, monkeypatch, code):
    import errno

    import train

    def no_space(*args, **kwargs):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(train.json, 'dump', no_space)
    out = tmp_path / 'runs'
    message = one_error_line(cli('--outdir', out, '--data', digits_zip, '--device=cpu', *TINY_NET_ARGS))
    assert message.startswith(('Error: No space left on the device while writing into', 'Error: File size limit'))
    assert runs(out) == []


def test_file_size_limit_while_training_is_one_line(tmp_path, digits_zip):
    # ulimit -f: Python ignores SIGXFSZ, so the first write past the limit (a snapshot) fails with EFBIG.
    import resource

    limit = 64 * 1024
    proc = subprocess.run(
        [a for a in command(tmp_path, digits_zip, 1) if a != '--resume=auto'], cwd=REPO, env=ENV,
        capture_output=True, text=True, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )  # fmt: skip
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    assert (
        proc.stderr.startswith('Error: File size limit exceeded while writing into ') and proc.stderr.count('\n') == 1
    )


def test_sigterm_to_a_torchrun_job_stops_every_rank_after_one_step(tmp_path, digits_zip):
    # A scheduler signals the whole job (torchrun and its two Gloo ranks; torchrun forwards the signal once more):
    # both ranks stop after the same step, rank 0 saves the state, and the relaunch ends where an uninterrupted
    # two-rank run ends.
    def torchrun(outdir):
        args = [a for a in command(outdir, digits_zip, 3)[2:] if a != '--seed=7'] + ['--seed=11']
        return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py', *args]

    out = tmp_path / 'out'
    proc = subprocess.Popen(torchrun(out), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    wait_for(lambda: any(run_dir.find(out / name, 'network-snapshot') for name in runs(out) if '-' in name), proc)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, err = proc.communicate(timeout=120)
    (directory,) = [out / name for name in runs(out)]
    assert 'training state saved' in stdout, stdout[-2000:] + err[-2000:]
    (state,) = run_dir.find(directory, 'training-state').values()
    assert 0 < run_dir.state_nimg(state) < 3000

    code, _, err = finish(launch(torchrun(out)))
    assert code == 0, err[-2000:]
    straight = tmp_path / 'straight'
    code, _, err = finish(launch(torchrun(straight)))
    assert code == 0, err[-2000:]
    (straight_dir,) = [straight / name for name in runs(straight)]
    final = os.path.basename(run_dir.newest(straight_dir, 'training-state'))
    assert_equal(load_state(directory / final), load_state(straight_dir / final))
    assert ticks(directory) == ticks(straight_dir)


def test_resume_auto_continues_a_run_started_on_another_number_of_gpus(tmp_path, digits_zip):
    # A preempted job requeued on fewer GPUs: the run directory named gpus2 is the same command's run.
    out = tmp_path / 'out'
    args = ['--outdir', out, '--data', digits_zip, '--device=cpu', '--workers=0', *TINY_NET_ARGS, '--batch=32',
            '--tick=1', '--seed=3', '--resume=auto']  # fmt: skip
    assert cli(*args, '--duration=0.001').exit_code == 0
    (name,) = runs(out)
    os.rename(out / name, out / name.replace('-gpus1-', '-gpus2-'))
    result = cli(*args, '--duration=0.002')
    assert result.exit_code == 0 and f'Continuing {out / name.replace("-gpus1-", "-gpus2-")} in place' in result.output
    assert runs(out) == [name.replace('-gpus1-', '-gpus2-')]
    assert run_dir.newest_of(str(out), name.replace('00000-', '').replace('gpus1', 'gpus*')) == str(out / runs(out)[0])
    assert run_dir.newest_of(str(out), name.replace('00000-', '').replace('gpus1', 'gpus1')) is None


def test_runs_from_before_the_build_option_continue_with_the_papers_law():
    from training import options, resume

    old = dict(noise_kwargs=dict(class_name='infonoise.InfoNoise', weight='edm', floor=0.05))
    upgraded = dict(noise_kwargs=run_dir.upgrade_noise_kwargs(old['noise_kwargs']))
    assert upgraded['noise_kwargs']['build'] == 'paper' and 'build' not in old['noise_kwargs']
    new = dict(noise_kwargs=dict(old['noise_kwargs'], build='continuous'))
    assert resume.differences(upgraded, new, ['noise_kwargs'], options.CONFIG_FLAGS) == [
        '--info-build: "paper" (now "continuous"; noise_kwargs.build)'
    ]
    assert resume.differences(upgraded, dict(noise_kwargs=dict(new['noise_kwargs'], build='paper')), ['noise_kwargs'],
                              options.CONFIG_FLAGS) == []  # fmt: skip
    lognormal = dict(class_name='infonoise.samplers.LogNormal', P_mean=-1.2, P_std=1.2)
    assert run_dir.upgrade_noise_kwargs(lognormal) == lognormal and run_dir.upgrade_noise_kwargs(None) is None
