"""Training loop: a real smoke run, exact resume equality, checkpoint formats, and 2-process gloo DDP."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY_NET_ARGS

from infonoise.grids import infogrid
from training import checkpoint, options
from training import training_loop as tl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data, run_dir, **overrides):
    """A config as train.py builds it, for a tiny DDPM++ with dropout and augmentation (both use the RNG)."""
    c = dict(
        run_dir=str(run_dir),
        dataset_kwargs=dict(
            class_name='training.dataset.ImageFolderDataset', path=data, use_labels=True, xflip=False, cache=True
        ),
        data_loader_kwargs=dict(num_workers=0),
        network_kwargs=dict(
            options.ARCH_KWARGS['ddpmpp'],
            class_name='training.networks.EDMPrecond',
            model_channels=16,
            channel_mult=[1, 2],
            num_blocks=1,
            attn_resolutions=[4],
            augment_dim=9,
            dropout=0.1,
            use_fp16=False,
        ),
        loss_kwargs=dict(class_name='training.loss.DenoisingLoss', weight='edm', sigma_data=0.5),
        noise_kwargs=dict(class_name='infonoise.samplers.LogNormal', P_mean=-1.2, P_std=1.2),
        optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3, betas=[0.9, 0.999], eps=1e-8),
        augment_kwargs=dict(
            class_name='training.augment.AugmentPipe',
            p=0.5,
            xflip=1e8,
            yflip=1,
            scale=1,
            rotate_frac=1,
            aniso=1,
            translate_frac=1,
        ),
        seed=3,
        batch_size=8,
        batch_gpu=4,
        total_kimg=0.032,
        ema_halflife_kimg=0.5,
        ema_rampup_ratio=0.05,
        lr_rampup_kimg=0.016,
        kimg_per_tick=0.008,
        snapshot_ticks=2,
        state_dump_ticks=1,
        device=torch.device('cpu'),
    )
    c.update(overrides)
    os.makedirs(run_dir, exist_ok=True)
    return c


def test_smoke_three_steps(tmp_path, digits_zip):
    result = tl.training_loop(**tiny_config(digits_zip, tmp_path, total_kimg=0.024))
    assert result.cur_nimg == 24
    # Weights moved and stayed finite; EMA differs from the raw weights.
    net, ema = result.net.state_dict(), result.ema.state_dict()
    assert all(torch.isfinite(v).all() for v in net.values())
    assert any(not torch.equal(net[k], ema[k]) for k in net)
    # One stats line per tick (3 ticks), each with the loss over the tick's 8 images.
    lines = [json.loads(line) for line in open(tmp_path / 'stats.jsonl')]
    assert len(lines) == 3 and lines[-1]['Loss/loss']['num'] == 8
    assert lines[-1]['Progress/kimg']['mean'] == pytest.approx(0.024)
    assert 'log.txt' not in os.listdir(tmp_path)  # The logger belongs to train.py.


def test_checkpoints_load_weights_only(tmp_path, digits_zip):
    result = tl.training_loop(**tiny_config(digits_zip, tmp_path, total_kimg=0.016))
    snap = torch.load(tmp_path / 'network-snapshot-000000.pt', map_location='cpu', weights_only=True)
    assert snap['format'] == checkpoint.SNAPSHOT_FORMAT and snap['network_kwargs']['img_resolution'] == 8
    assert all(torch.equal(snap['ema'][k], v) for k, v in result.ema.state_dict().items())
    state = torch.load(tmp_path / 'training-state-000000.pt', map_location='cpu', weights_only=True)
    assert state['cur_nimg'] == 16 and state['seed'] == 3 and state['noise_sampler'] == {}
    loaded = checkpoint.load_network(str(tmp_path / 'network-snapshot-000000.pt'))
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 3.0])
    labels = torch.eye(10)[:2]
    with torch.no_grad():
        assert torch.equal(loaded.net(x, sigma, labels), result.ema.eval()(x, sigma, labels))
    assert not [f for f in os.listdir(tmp_path) if f.startswith('.') or f.endswith('.tmp')]


INFONOISE = dict(class_name='infonoise.InfoNoise', weight='edm', num_bins=4, buffer_size=16,
                 base='loguniform', refresh_kimg=0.008, warmup_kimg=0.008, min_count=1, floor=0.5)  # fmt: skip


@pytest.mark.parametrize('sampler', ['lognormal', 'infonoise'])
def test_resume_equality(tmp_path, digits_zip, sampler):
    # N steps straight vs N/2 steps, then resume for the other N/2: identical weights, EMA and optimizer (and, for
    # InfoNoise, identical buffers and table, refreshing at every step after the first).
    extra = dict(noise_kwargs=INFONOISE) if sampler == 'infonoise' else {}
    straight = tl.training_loop(**tiny_config(digits_zip, tmp_path / 'a', **extra))
    tl.training_loop(**tiny_config(digits_zip, tmp_path / 'b', total_kimg=0.016, **extra))
    resumed = tl.training_loop(
        **tiny_config(
            digits_zip, tmp_path / 'c', resume_state=str(tmp_path / 'b' / 'training-state-000000.pt'), **extra
        )
    )
    assert straight.cur_nimg == resumed.cur_nimg == 32
    state_a = torch.load(tmp_path / 'a' / 'training-state-000000.pt', weights_only=True)['noise_sampler']
    state_c = torch.load(tmp_path / 'c' / 'training-state-000000.pt', weights_only=True)['noise_sampler']
    assert state_a.keys() == state_c.keys()
    if sampler == 'infonoise':
        assert state_a['refreshes'] == state_c['refreshes'] == 3
        assert torch.equal(state_a['buffer'], state_c['buffer']) and torch.equal(
            state_a['table']['cdf'], state_c['table']['cdf']
        )
    for a, b in [(straight.net, resumed.net), (straight.ema, resumed.ema)]:
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(pa, pb), name
    sa = torch.load(tmp_path / 'a' / 'training-state-000000.pt', weights_only=True)['optimizer']
    sc = torch.load(tmp_path / 'c' / 'training-state-000000.pt', weights_only=True)['optimizer']
    for k in sa['state']:
        assert all(torch.equal(sa['state'][k][m], sc['state'][k][m]) for m in sa['state'][k])
    # Control: a different seed gives different weights, so the comparison above can fail.
    other = tl.training_loop(**tiny_config(digits_zip, tmp_path / 'd', seed=4, **extra))
    assert not all(torch.equal(p, q) for p, q in zip(straight.net.parameters(), other.net.parameters()))


def test_resume_rejects_other_network(tmp_path, digits_zip):
    tl.training_loop(**tiny_config(digits_zip, tmp_path / 'b', total_kimg=0.008, state_dump_ticks=None))
    tl.training_loop(**tiny_config(digits_zip, tmp_path / 'b', total_kimg=0.016))
    c = tiny_config(digits_zip, tmp_path / 'c', resume_state=str(tmp_path / 'b' / 'training-state-000000.pt'))
    c['network_kwargs'] = dict(c['network_kwargs'], model_channels=8)
    with pytest.raises(ValueError, match='different network'):
        tl.training_loop(**c)


def test_ddp_two_gloo_ranks(tmp_path, digits_zip):
    # Real torchrun with 2 CPU processes training with InfoNoise: identical net, EMA and InfoNoise table on both
    # ranks (each rank bins only its own losses), loss reduced across ranks.
    out = tmp_path / 'ddp'
    train_args = (
        '--cond=1 --batch=16 --batch-gpu=4 --duration=0.001 --tick=1 --snap=1 --dump=1 --lr-rampup=0 --seed=1 '
        '--workers=0 --device=cpu --sampler=infonoise --info-bins=8 --info-refresh=0.128 --info-warmup=0.256 '
        '--info-nmin=1 --info-floor=0.5 --info-base=loguniform'
    ).split()
    worker = os.path.join(REPO, 'tests', 'ddp_worker.py')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', worker, str(out)]
    cmd += ['--outdir', str(out), '--data', digits_zip, *train_args, *TINY_NET_ARGS]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(out / 'rank0.pt', weights_only=True)
    r1 = torch.load(out / 'rank1.pt', weights_only=True)
    assert r0['cur_nimg'] == r1['cur_nimg'] == 1008
    for key in ('net', 'ema'):
        assert r0[key].keys() == r1[key].keys()
        assert all(torch.equal(r0[key][k], r1[key][k]) for k in r0[key]), key
    n0, n1 = r0['noise_sampler'], r1['noise_sampler']
    assert n0['refreshes'] == n1['refreshes'] >= 5 and n0['pivot'] == n1['pivot']
    assert torch.equal(n0['table']['cdf'], n1['table']['cdf']) and torch.equal(n0['mse'], n1['mse'])
    assert not torch.equal(n0['buffer'], n1['buffer'])  # The ranks saw different losses.
    run_dir = next(p for p in out.iterdir() if p.is_dir())
    assert 'gpus2-batch16' in run_dir.name
    lines = [json.loads(line) for line in open(run_dir / 'stats.jsonl')]
    # Tick 0 is the first step: 16 losses, 8 from each rank.
    assert lines[0]['Loss/loss']['num'] == 16
    assert sum(line['Loss/loss']['num'] for line in lines) == 1008
    assert (run_dir / 'training-state-000001.pt').exists() and (run_dir / 'log.txt').exists()


def test_infonoise_run_writes_profile(tmp_path, digits_zip):
    tl.training_loop(**tiny_config(digits_zip, tmp_path, noise_kwargs=INFONOISE))
    snap = torch.load(tmp_path / 'network-snapshot-000000.pt', weights_only=True)
    profile = snap['profile']
    assert profile is not None and profile['refreshes'] == 3
    assert set(profile) >= {'sigma', 'mse', 'rate', 'gated', 'rho', 'u', 'pi', 'phi', 'pivot'}
    assert (tmp_path / 'profile-000000.png').exists()
    # The same profile as JSON, from which generate.py builds InfoGrid.
    assert json.loads((tmp_path / 'profile-000000.json').read_text()) == profile
    grid = infogrid(6, profile['sigma'], profile['rate'])
    assert grid.shape == (7,) and (grid[1:] < grid[:-1]).all()
    lines = [json.loads(line) for line in open(tmp_path / 'stats.jsonl')]
    # Tick 0 is still warm-up: no pivot reported yet (the name may be known to the collector from earlier runs).
    assert lines[0].get('Noise/pivot', {'num': 0})['num'] == 0 and lines[0]['Noise/refreshes']['mean'] == 0
    assert lines[-1]['Noise/refreshes']['mean'] == 3 and lines[-1]['Noise/pivot']['mean'] > 0
    assert {'Noise/ln_sigma_mean', 'Noise/ln_sigma_q10', 'Noise/ln_sigma_q50', 'Noise/ln_sigma_q90'} <= set(lines[-1])


def test_transfer_initialises_from_a_snapshot(tmp_path, digits_zip):
    tl.training_loop(**tiny_config(digits_zip, tmp_path / 'a', total_kimg=0.016))
    snapshot = str(tmp_path / 'a' / 'network-snapshot-000000.pt')
    # One step at learning rate 0 (the first step of the ramp-up): the weights are exactly the transferred EMA.
    result = tl.training_loop(
        **tiny_config(digits_zip, tmp_path / 'b', seed=9, total_kimg=0.008, transfer=snapshot, ema_rampup_ratio=None)
    )
    source = torch.load(snapshot, weights_only=True)['ema']
    for name, value in result.net.state_dict().items():
        assert torch.equal(value, source[name]), name
    assert all(torch.equal(v, source[k]) for k, v in result.ema.state_dict().items())
