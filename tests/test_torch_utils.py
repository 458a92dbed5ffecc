"""Tests for torch_utils and dnnlib: InfiniteSampler, training_stats, misc helpers, distributed set-up (incl. a
2-process run), atomic writes, JSON reading and disk errors."""

import errno
import itertools
import json
import os
import subprocess
import sys

import click
import numpy as np
import psutil
import pytest
import torch

import dnnlib
from dnnlib import cli
from torch_utils import distributed as dist
from torch_utils import misc, training_stats

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


# ----------------------------------------------------------------------------------------------------------------------
# InfiniteSampler.


def test_sampler_visits_every_item_once_per_lap_and_laps_differ():
    n = 10
    stream = take(misc.InfiniteSampler(range(n), seed=3), 3 * n)
    laps = [stream[i * n : (i + 1) * n] for i in range(3)]
    for lap in laps:
        assert sorted(lap) == list(range(n))
    assert laps[0] != laps[1] and laps[1] != laps[2]
    assert all(isinstance(idx, int) for idx in stream)


def test_sampler_lap_order_is_the_documented_permutation():
    n = 7
    stream = take(misc.InfiniteSampler(range(n), seed=11), 2 * n)
    assert stream[:n] == np.random.RandomState([11, 0]).permutation(n).tolist()
    assert stream[n:] == np.random.RandomState([11, 1]).permutation(n).tolist()


def test_sampler_is_deterministic_by_seed():
    a = take(misc.InfiniteSampler(range(20), seed=5), 40)
    b = take(misc.InfiniteSampler(range(20), seed=5), 40)
    c = take(misc.InfiniteSampler(range(20), seed=6), 40)
    assert a == b
    assert a != c


def test_sampler_without_shuffle_is_the_identity():
    assert take(misc.InfiniteSampler(range(4), shuffle=False), 10) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_sampler_rank_streams_interleave_to_the_single_rank_stream():
    n, world, steps = 10, 3, 25
    single = take(misc.InfiniteSampler(range(n), seed=1), world * steps)
    for rank in range(world):
        assert take(misc.InfiniteSampler(range(n), rank=rank, num_replicas=world, seed=1), steps) == single[rank::world]


@pytest.mark.parametrize('start_idx, world', [(17, 1), (12, 3), (13, 2)])
def test_sampler_start_idx_continues_the_stream(start_idx, world):
    n = 10
    single = take(misc.InfiniteSampler(range(n), seed=2), 60)
    for rank in range(world):
        sampler = misc.InfiniteSampler(range(n), rank=rank, num_replicas=world, seed=2, start_idx=start_idx)
        # Rank r owns the positions i >= start_idx with i % world == r.
        first = start_idx + (rank - start_idx) % world
        expected = single[first::world]
        assert take(sampler, len(expected)) == expected


def test_sampler_feeds_a_data_loader():
    data = torch.arange(6) * 10
    loader = torch.utils.data.DataLoader(data, sampler=misc.InfiniteSampler(data, shuffle=False), batch_size=4)
    batches = list(itertools.islice(iter(loader), 2))
    assert batches[0].tolist() == [0, 10, 20, 30]
    assert batches[1].tolist() == [40, 50, 0, 10]


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match='non-empty'):
        misc.InfiniteSampler([])
    with pytest.raises(ValueError, match='rank'):
        misc.InfiniteSampler(range(3), rank=2, num_replicas=2)
    with pytest.raises(ValueError, match='start_idx'):
        misc.InfiniteSampler(range(3), start_idx=-1)


# ----------------------------------------------------------------------------------------------------------------------
# training_stats (single process).


def test_stats_moments_match_numpy():
    collector = training_stats.Collector(regex='Moments/.*')
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3.0, 2.0, size=s).astype(np.float32) for s in (100, 37, 1)]
    for chunk in chunks:
        value = torch.from_numpy(chunk)
        assert training_stats.report('Moments/x', value) is value
    training_stats.report('Moments/x', 1.5)
    training_stats.report('Moments/x', [])
    collector.update()
    values = np.concatenate(chunks + [np.array([1.5], np.float32)]).astype(np.float64)
    assert collector.num('Moments/x') == values.size
    assert collector.mean('Moments/x') == pytest.approx(values.mean(), rel=1e-12)
    assert collector['Moments/x'] == collector.mean('Moments/x')
    assert collector.std('Moments/x') == pytest.approx(values.std(), rel=1e-10)
    assert collector.as_dict() == {
        'Moments/x': {'num': values.size, 'mean': collector.mean('Moments/x'), 'std': collector.std('Moments/x')}
    }
    assert collector.as_dict()['Moments/x'].num == values.size


def test_stats_single_value_and_empty_statistic():
    collector = training_stats.Collector(regex='Single/.*')
    training_stats.report('Single/one', torch.tensor(4.0))
    training_stats.report('Single/none', [])
    collector.update()
    assert (collector.num('Single/one'), collector.mean('Single/one'), collector.std('Single/one')) == (1, 4.0, 0.0)
    assert collector.num('Single/none') == 0
    assert np.isnan(collector.mean('Single/none')) and np.isnan(collector.std('Single/none'))


def test_stats_collector_counts_only_its_period():
    training_stats.report('Period/x', 100.0)
    collector = training_stats.Collector(regex='Period/.*', keep_previous=False)
    training_stats.report('Period/x', [1.0, 3.0])
    collector.update()
    assert (collector.num('Period/x'), collector.mean('Period/x')) == (2, 2.0)
    training_stats.report('Period/x', 6.0)
    collector.update()
    assert (collector.num('Period/x'), collector.mean('Period/x')) == (1, 6.0)
    collector.update()
    assert collector.num('Period/x') == 0


def test_stats_keep_previous():
    keeper = training_stats.Collector(regex='Keep/.*', keep_previous=True)
    forgetter = training_stats.Collector(regex='Keep/.*', keep_previous=False)
    training_stats.report('Keep/x', [2.0, 4.0])
    keeper.update()
    forgetter.update()
    keeper.update()
    forgetter.update()
    assert (keeper.num('Keep/x'), keeper.mean('Keep/x')) == (2, 3.0)
    assert forgetter.num('Keep/x') == 0


def test_stats_report0_counts_rank0_only(monkeypatch):
    collector = training_stats.Collector(regex='Rank0/.*')
    training_stats.report0('Rank0/x', 7.0)
    monkeypatch.setattr(training_stats, '_rank', 1)
    assert training_stats.report0('Rank0/x', 100.0) == 100.0
    training_stats.report0('Rank0/only_other', 1.0)
    collector.update()
    assert (collector.num('Rank0/x'), collector.mean('Rank0/x')) == (1, 7.0)
    assert 'Rank0/only_other' in collector.names() and collector.num('Rank0/only_other') == 0


def test_stats_regex_selects_names():
    collector = training_stats.Collector(regex='Regex/a.*')
    training_stats.report('Regex/a1', 1.0)
    training_stats.report('Regex/b1', 2.0)
    training_stats.report('Regex/a2', 3.0)
    collector.update()
    assert collector.names() == ['Regex/a1', 'Regex/a2']
    assert list(collector.as_dict()) == ['Regex/a1', 'Regex/a2']
    with pytest.raises(KeyError, match='regex'):
        collector.mean('Regex/b1')


# ----------------------------------------------------------------------------------------------------------------------
# misc.


def make_module(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))


def test_copy_params_and_buffers():
    src, dst = make_module(0), make_module(1)
    with torch.no_grad():
        src[1].running_mean.fill_(0.25)
    misc.copy_params_and_buffers(src, dst, require_all=True)
    for (name, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), name


def test_copy_params_and_buffers_missing_and_mismatched():
    src = torch.nn.Sequential(torch.nn.Linear(4, 3))
    dst = make_module(1)
    before = dst[2].weight.clone()
    misc.copy_params_and_buffers(src, dst)
    assert torch.equal(dst[0].weight, src[0].weight) and torch.equal(dst[2].weight, before)
    with pytest.raises(ValueError, match='no tensor "1.weight"'):
        misc.copy_params_and_buffers(src, dst, require_all=True)
    with pytest.raises(ValueError, match='Shape mismatch'):
        misc.copy_params_and_buffers(torch.nn.Sequential(torch.nn.Linear(5, 3)), dst)


def test_print_module_summary(capsys):
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    x = torch.randn(5, 4)
    out = misc.print_module_summary(net.eval(), [x])
    assert torch.equal(out, net(x))
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.strip()}
    assert rows['Sequential'][1:] == ['Parameters', 'Buffers', 'Output', 'shape', 'Datatype']
    assert rows['0'][1:] == ['15', '-', '[5,', '3]', 'float32']
    assert rows['2'][1:3] == ['6', '7']  # BatchNorm: weight+bias; running mean, var and num_batches_tracked.
    assert rows['Total'][1:3] == [str(15 + 6 + 8), '7']


def test_assert_shape():
    misc.assert_shape(torch.zeros(2, 3), [2, None])
    with pytest.raises(AssertionError, match='dimensions'):
        misc.assert_shape(torch.zeros(2, 3), [2])
    with pytest.raises(AssertionError, match='dimension 1'):
        misc.assert_shape(torch.zeros(2, 3), [2, 4])


def test_single_process_helpers_need_no_process_group(monkeypatch, capsys):
    for name in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'):
        monkeypatch.delenv(name, raising=False)
    assert dist.init('cpu') == torch.device('cpu')
    assert not torch.distributed.is_initialized()
    assert (dist.get_rank(), dist.get_world_size(), dist.get_local_rank(), dist.is_main()) == (0, 1, 0, True)
    assert dist.broadcast_object({'a': 1}) == {'a': 1}
    dist.barrier()
    misc.check_ddp_consistency(make_module(0))
    dist.print0('hello from rank 0')
    assert capsys.readouterr().out == 'hello from rank 0\n'
    with misc.ddp_sync(make_module(0), sync=False):
        pass
    dist.shutdown()


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_init_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    with pytest.raises(RuntimeError, match='CUDA is not available'):
        dist.init('cuda')


# ----------------------------------------------------------------------------------------------------------------------
# Two real processes (torchrun, Gloo on CPU).


def test_two_process_gloo(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS='1')
    for name in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(name, None)
    worker = os.path.join(REPO_ROOT, 'tests', 'dist_stats_worker.py')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', worker, str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]

    all_values = np.array([1.0, 2.0, 3.0, 10.0, 20.0])
    for rank, result in enumerate(results):
        assert (result['rank'], result['world'], result['local_rank']) == (rank, 2, rank)
        assert (result['device'], result['process_group']) == ('cpu', 'gloo')
        stats = result['stats']
        assert stats['Test/values']['num'] == 5
        assert stats['Test/values']['mean'] == pytest.approx(all_values.mean(), rel=1e-12)
        assert stats['Test/values']['std'] == pytest.approx(all_values.std(), rel=1e-12)
        assert stats['Test/rank0_only'] == {'num': 1, 'mean': 5.0, 'std': 0.0}
        assert result['broadcast'] == {'seed': 1234}
        assert result['consistent'] is None  # NaN equals NaN.
        assert 'Sequential.0.bias' in result['mismatch']  # Raised on both ranks, naming the tensor.
        assert result['mismatch_ignored'] is None
        assert result['grad_sync_False'] == [rank + 1.0, rank + 1.0]  # Local gradient: d(w·x)/dw = x.
        assert result['grad_sync_True'] == [1.5, 1.5]  # Averaged over ranks.


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    from dnnlib.util import atomic_write

    path = tmp_path / 'profile.json'
    with atomic_write(str(path), 'w', encoding='utf-8') as f:
        f.write('{"old": 1}')
    assert path.read_text() == '{"old": 1}'
    with pytest.raises(RuntimeError), atomic_write(str(path), 'w', encoding='utf-8') as f:
        f.write('{"new": ')
        raise RuntimeError('killed mid-write')
    assert path.read_text() == '{"old": 1}' and os.listdir(tmp_path) == ['profile.json']
    with atomic_write(str(path)) as f:
        f.write(b'new')
    assert path.read_bytes() == b'new' and os.listdir(tmp_path) == ['profile.json']


def dead_pid() -> int:
    """The pid of a process that has surely exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, '-c', 'pass'])
    child.wait()
    return child.pid


def test_remove_stale_temp_files_removes_only_dead_writers_temp_files(tmp_path, monkeypatch):
    from dnnlib.util import TEMP_NAME, remove_stale_temp_files, temp_path

    dead, me = dead_pid(), os.getpid()
    assert TEMP_NAME.fullmatch(os.path.basename(temp_path(str(tmp_path / 'state.pt'))))
    stale = [f'.state.pt.{dead}.0123abcd.tmp', f'.data.zip.{dead}.deadbeef.tmp']
    kept = [
        f'.state.pt.{me}.0123abcd.tmp',  # This process is alive.
        '.state.pt.1.0123abcd.tmp',  # init is alive (EPERM when not root, which must count as alive).
        'state.pt',
        f'state.pt.{dead}.0123abcd.tmp',  # No leading dot.
        f'.state.pt.{dead}.0123ABCD.tmp',  # Not temp_path's lower-case hex.
        f'.state.pt.{dead}.0123abc.tmp',  # Seven hex digits.
        f'.state.pt.{dead}.0123abcd.tmp.bak',
        f'.{dead}.0123abcd.tmp',  # No base name.
        '.state.pt.99999999999.0123abcd.tmp',  # Beyond any pid.
    ]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b'x')
    (tmp_path / stale[1]).unlink()
    (tmp_path / stale[1] / '00000').mkdir(parents=True)  # dataset_tool.py's folder output is a temporary folder.
    (tmp_path / stale[1] / '00000' / 'img00000000.png').write_bytes(b'x')
    kill = os.kill

    def kill_as_non_root(pid, sig):
        if pid == 1:
            raise PermissionError(1, 'Operation not permitted')
        return kill(pid, sig)

    monkeypatch.setattr(os, 'kill', kill_as_non_root)
    assert remove_stale_temp_files(str(tmp_path)) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    assert remove_stale_temp_files(str(tmp_path)) == []
    # A caller that writes nothing there now: a file with its own pid is a dead writer's (a reused pid).
    assert remove_stale_temp_files(str(tmp_path), own_pid_is_stale=True) == [f'.state.pt.{me}.0123abcd.tmp']


def test_load_json_refuses_invalid_and_too_deep_json_in_one_line(tmp_path):
    assert dnnlib.util.load_json('{"a": [1, 2]}', 'x') == {'a': [1, 2]}
    with pytest.raises(ValueError, match=r'^"f" is not valid JSON \('):
        dnnlib.util.load_json('{"a": ', '"f"')
    with pytest.raises(ValueError, match=r'^"f" nests JSON too deeply to read$'):
        dnnlib.util.load_json('[' * 100_000 + ']' * 100_000, '"f"')
    path = tmp_path / 'deep.json'
    path.write_bytes(b'{"k": ' * 100_000 + b'1' + b'}' * 100_000)
    with pytest.raises(ValueError, match='nests JSON too deeply'):
        dnnlib.util.read_json(str(path))
    path.write_bytes(b'\xff\xfe not utf-8')
    with pytest.raises(ValueError, match='is not valid JSON'):
        dnnlib.util.read_json(str(path))


@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS])
def test_disk_errors_become_one_line(code):
    with pytest.raises(click.ClickException) as info, cli.disk_errors('the images'):
        raise OSError(code, os.strerror(code), 'out/x.png')
    assert info.value.message == f'{cli.DISK_ERRORS[code]} while writing the images: out/x.png'
    with pytest.raises(PermissionError), cli.disk_errors('the images'):  # Not the machine's: passes unchanged.
        raise PermissionError(errno.EACCES, 'denied')


@pytest.mark.parametrize(
    'cpus, load, local, expected', [(2, 0.1, 1, 2), (2, 1.9, 1, 1), (2, 0.0, 2, 1), (16, 4.4, 1, 12), (16, 3.0, 4, 3)]
)
def test_cpu_threads_leave_busy_cores_alone(monkeypatch, cpus, load, local, expected):
    # Free CPUs (the busy CPUs measured, of those this process may use), shared among this machine's ranks, at least
    # one; CPUs outside the affinity (busy at 100 % here) do not count.
    before = torch.get_num_threads()
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(cpus)))
    monkeypatch.setattr(psutil, 'cpu_percent', lambda interval, percpu: [100 * load / cpus] * cpus + [100.0] * 4)
    try:
        said = misc.set_cpu_threads(local)
        assert torch.get_num_threads() == expected and said.startswith(f'{expected} ({cpus} CPUs, {load:.1f} busy')
        monkeypatch.setenv('OMP_NUM_THREADS', '3')  # The user's choice wins and is left alone.
        assert misc.set_cpu_threads(local) == f'{expected} (OMP_NUM_THREADS)'
    finally:
        torch.set_num_threads(before)
