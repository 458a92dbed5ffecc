"""Training loop: a real smoke run, exact resume equality, checkpoint formats, the loop's arithmetic against closed
forms (batch split, EMA, learning-rate ramp-up, gradient sanitising, EDM's loss scaling), and 2-process gloo DDP
against one process, also across a resume onto another rank count."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TINY_NET_ARGS, train_config
from loop_probe import adam_step, construct_network, edm_gradients, record_restore, record_steps

import dnnlib
from infonoise.grids import infogrid
from training import checkpoint, options
from training import training_loop as tl
from training.loss import DenoisingLoss

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
    r0, r1 = torchrun(out, '--outdir', out, '--data', digits_zip, *train_args, *TINY_NET_ARGS)
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


# The loop's arithmetic against closed forms. ---------------------------------------------------------------------


@pytest.mark.parametrize(
    'batch, batch_gpu, world, expected',
    [
        (512, None, 8, (64, 64, 1)),  # EDM's CIFAR-10 run on 8 GPUs, no per-pass limit.
        (512, 16, 8, (64, 16, 4)),  # 16 images per pass: 4 accumulation rounds.
        (512, 1000, 8, (64, 64, 1)),  # A limit above the per-rank batch limits nothing.
        (4096, 32, 32, (128, 32, 4)),  # EDM's ImageNet-64 run on 32 GPUs.
        (16, 4, 2, (8, 4, 2)),
        (7, None, 1, (7, 7, 1)),
    ],
)
def test_split_batch(batch, batch_gpu, world, expected):
    assert tl.split_batch(batch, batch_gpu, world) == expected


@pytest.mark.parametrize('batch, batch_gpu, world', [(10, None, 3), (48, 5, 2), (12, 8, 1), (64, 24, 2)])
def test_split_batch_refuses(batch, batch_gpu, world):
    # 10 = 3 × 3 + 1; 48 = 2 ranks × 24 but 24 is no multiple of 5; 12 images in passes of 8; 32 in passes of 24.
    with pytest.raises(ValueError, match=f'^Batch size {batch} is not divisible by {world} ranks'):
        tl.split_batch(batch, batch_gpu, world)


def test_split_batch_refuses_fewer_images_than_ranks():
    for batch, world in [(2, 4), (0, 1)]:
        with pytest.raises(ValueError, match='fewer images than ranks'):
            tl.split_batch(batch, None, world)


@pytest.mark.parametrize(
    'cur_nimg, batch, halflife_kimg, ratio, halflife_nimg',
    [
        (10_000, 16, 0.5, None, 500),  # No ramp-up: the half-life is 500 images.
        (2_000, 16, 0.5, 0.05, 100),  # Ramp-up: 5 % of the 2,000 images seen.
        (20_000, 16, 0.5, 0.05, 500),  # Ramp-up over: 5 % of 20,000 exceeds 500.
        (1_000_000, 512, 500, 0.05, 50_000),  # EDM's CIFAR-10 run after 1 Mimg.
        (20_000_000, 512, 500, 0.05, 500_000),  # ... after 20 Mimg: EDM's steady β = 0.5^(512/500,000) ≈ 0.99929.
    ],
)
def test_update_ema_closed_form(cur_nimg, batch, halflife_kimg, ratio, halflife_nimg):
    # EDM's EMA: β = 0.5^(batch / half-life in images), the half-life ramped up to `ratio` × images seen;
    # ema ← β·ema + (1 − β)·net.
    torch.manual_seed(0)
    net, ema = torch.nn.Linear(5, 4), torch.nn.Linear(5, 4)
    old = [p.detach().double().clone() for p in ema.parameters()]
    tl.update_ema(ema, net, cur_nimg, batch, halflife_kimg, ratio)
    beta = 0.5 ** (batch / halflife_nimg)
    for p_ema, p_old, p_net in zip(ema.parameters(), old, net.parameters(), strict=True):
        torch.testing.assert_close(p_ema.double(), beta * p_old + (1 - beta) * p_net.double(), rtol=0, atol=1e-7)


def test_update_ema_half_life():
    # After one half-life of images (4 steps of 16 images, half-life 64 images) the old EMA weighs exactly one half.
    torch.manual_seed(0)
    net, ema = torch.nn.Linear(5, 4), torch.nn.Linear(5, 4)
    old = [p.detach().double().clone() for p in ema.parameters()]
    for _ in range(4):
        tl.update_ema(ema, net, 10**6, 16, 0.064, None)
    for p_ema, p_old, p_net in zip(ema.parameters(), old, net.parameters(), strict=True):
        torch.testing.assert_close(p_ema.double(), (p_old + p_net.double()) / 2, rtol=0, atol=1e-7)
    # β = 0 (the EMA is the network itself) at a ramped-up run's first step (0 images seen) and for half-life 0.
    for cur_nimg, halflife_kimg, ratio in [(0, 0.5, 0.05), (10**6, 0, None)]:
        ema = torch.nn.Linear(5, 4)
        tl.update_ema(ema, net, cur_nimg, 16, halflife_kimg, ratio)
        assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), net.parameters(), strict=True))


@pytest.mark.parametrize(
    'rampup_kimg, factors',
    [
        (0.02, [0, 0.4, 0.8, 1, 1]),  # base · min(images seen / 20, 1) at 0, 8, 16, 24, 32 images seen.
        (0, [0, 1, 1, 1, 1]),  # No ramp-up; the first step still has lr 0 (0 images seen), as in EDM.
    ],
)
def test_learning_rate_rampup(tmp_path, digits_zip, rampup_kimg, factors):
    c = tiny_config(digits_zip, tmp_path, batch_size=8, batch_gpu=8, total_kimg=0.04, lr_rampup_kimg=rampup_kimg,
                    kimg_per_tick=1, snapshot_ticks=None, state_dump_ticks=None)  # fmt: skip
    with record_steps(limit=5) as steps:
        tl.training_loop(**c)
    assert [step['lr'] for step in steps] == pytest.approx([1e-3 * f for f in factors], rel=1e-12, abs=0)


def test_nonfinite_gradients_sanitised(tmp_path, digits_zip, monkeypatch):
    # NaN, +inf and −inf written into the first entries of one weight's gradient at each step reach Adam as 0, 1e5
    # and −1e5 (EDM's nan_to_num), the rest unchanged; the weight then takes Adam's hand-computed steps, so after the
    # second step (lr 1e-3 · 8/16) the NaN entry has not moved and the ±inf entries have moved by ∓lr.
    raw, which = [], []
    loss_call = DenoisingLoss.__call__

    def inject(grad):
        raw.append(grad.clone())
        grad = grad.clone()
        grad.view(-1)[:3] = torch.tensor([math.nan, math.inf, -math.inf])
        return grad

    def call(self, net, *args, **kwargs):
        if not which:
            which.append(next(i for i, p in enumerate(net.parameters()) if p.ndim == 4))  # The first conv weight.
            list(net.parameters())[which[0]].register_hook(inject)
        return loss_call(self, net, *args, **kwargs)

    monkeypatch.setattr(DenoisingLoss, '__call__', call)
    c = tiny_config(digits_zip, tmp_path, batch_size=8, batch_gpu=8, total_kimg=0.016, snapshot_ticks=None,
                    state_dump_ticks=None)  # fmt: skip
    with record_steps() as steps:
        tl.training_loop(**c)
    k, lr = which[0], 1e-3 * 8 / 16
    assert len(raw) == len(steps) == 2 and [step['lr'] for step in steps] == [0, lr]
    for step, r in zip(steps, raw):
        g = step['grad'][k].flatten()
        assert g[:3].tolist() == [0, 1e5, -1e5]
        assert torch.equal(g[3:], r.flatten()[3:]) and all(torch.isfinite(x).all() for x in step['grad'])
    p0, zero = steps[0]['before'][k], torch.zeros_like(steps[0]['before'][k])
    p1, m, v = adam_step(p0, steps[0]['grad'][k], zero, zero, 1, 0)
    p2, m, v = adam_step(p1, steps[1]['grad'][k], m, v, 2, lr)
    after = steps[1]['after'][k].double()
    torch.testing.assert_close(after, p2, rtol=0, atol=1e-3 * lr)
    start, end = p0.flatten()[:3].tolist(), after.flatten()[:3].tolist()
    assert end[0] == start[0] and end[1:] == pytest.approx([start[1] - lr, start[2] + lr], abs=1e-7)


def assert_gradients(actual, expected, what):
    """Each gradient tensor within 1e-5 of its largest entry (float32 sums taken in another order differ by about
    2e-7 of it; a gradient of the wrong scale by its whole size)."""
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        err, size = (a.double() - e.double()).abs().max().item(), e.abs().max().item()
        assert err <= 1e-5 * size, f'{what}: gradient {i} off by {err:.3g} (largest entry {size:.3g})'


def check_steps(c, steps, world, nimg, m=None, v=None, t=0, sampler_state=None):
    """Check recorded optimizer steps of a `world`-rank run, the first taken after `nimg` images, against the oracle:
    the gradient of EDM's loss over the global batch (`edm_gradients`), the learning rate base · min(images seen /
    ramp-up images, 1), and Adam's step from moments (m, v) after t steps, taken with the gradient the optimizer got
    (checked against the oracle first; Adam divides by √v, so entries with tiny gradients would turn the oracle's
    float32 summation differences into visible steps): parameters within 1e-3 · lr (each entry moves by about lr),
    moments within 1e-5 of their largest entry. `sampler_state` is the noise sampler's at the first step (InfoNoise's
    table); later steps draw from a fresh sampler."""
    m = m or [torch.zeros_like(p) for p in steps[0]['before']]
    v = v or [torch.zeros_like(p) for p in steps[0]['before']]
    for k, step in enumerate(steps):
        n = nimg + k * c['batch_size']
        grads = edm_gradients(c, step['before'], world, n, sampler_state if k == 0 else None)
        assert_gradients(step['grad'], grads, f'step after {n} images')
        lr = c['optimizer_kwargs']['lr'] * min(n / (c['lr_rampup_kimg'] * 1000), 1)
        assert step['lr'] == pytest.approx(lr, rel=1e-12, abs=0)
        for i, (p, g) in enumerate(zip(step['before'], step['grad'])):
            p, m[i], v[i] = adam_step(p, g.double(), m[i], v[i], t + k + 1, lr)
            assert (step['after'][i].double() - p).abs().max() <= 1e-3 * lr, f'parameter {i} after {n} images'
            for name, expected in (('exp_avg', m[i]), ('exp_avg_sq', v[i])):
                err = (step[name][i].double() - expected).abs().max()
                assert err <= 1e-5 * expected.abs().max(), f'{name} {i} after {n} images'


def test_gradient_is_edm_loss(tmp_path, digits_zip):
    # One process, 16 images per step in 4 accumulation rounds, with dropout and augmentation: the gradient Adam sees
    # is that of EDM's loss recomputed in one backward pass over the 16 images (sum over pixels, mean over images),
    # and two steps are Adam's (lr 0 at the first, as in EDM; then 1e-3 · 16/16).
    c = tiny_config(digits_zip, tmp_path, batch_size=16, batch_gpu=4, total_kimg=0.032, snapshot_ticks=None,
                    state_dump_ticks=None)  # fmt: skip
    with record_steps() as steps:
        tl.training_loop(**c)
    assert len(steps) == 2
    check_steps(c, steps, world=1, nimg=0)


# Distributed data parallel: 2 gloo ranks against 1 process. -------------------------------------------------------


def ddp_config(data, run_dir, *args, **overrides) -> dict:
    """The loop's config as train.py builds it from these options for the tiny network (class-conditional, 16 images
    per step in passes of 4, seed 1), with ticks of 2 steps and no snapshots (train.py counts whole kimg)."""
    c = train_config('--outdir', run_dir, '--data', data, '--cond=1', '--batch=16', '--batch-gpu=4', '--seed=1',
                     '--workers=0', '--device=cpu', *args, *TINY_NET_ARGS)  # fmt: skip
    c.update(run_dir=str(run_dir), kimg_per_tick=0.032, snapshot_ticks=None, state_dump_ticks=100, **overrides)
    os.makedirs(run_dir, exist_ok=True)
    return c


def torchrun(out, *args) -> list[dict]:
    """tests/ddp_worker.py OUT ARGS in 2 gloo ranks (one thread each); each rank's results."""
    worker = os.path.join(REPO, 'tests', 'ddp_worker.py')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', worker, str(out)]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    proc = subprocess.run(cmd + [str(a) for a in args], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(os.path.join(out, f'rank{rank}.pt'), weights_only=True) for rank in range(2)]


def torchrun_loop(out, c: dict) -> list[dict]:
    """training_loop(**c) in 2 gloo ranks; each rank's results."""
    path = os.path.join(out, 'config.json')
    with open(path, 'w') as f:
        json.dump(c, f)
    return torchrun(out, path)


def state_params(c: dict, net_state: dict) -> list:
    """The parameters of a network state dict, in the order of net.parameters() (the optimizer's)."""
    net = construct_network(c, dnnlib.util.construct_class_by_name(**c['dataset_kwargs']))
    net.load_state_dict(net_state)
    return [p.detach() for p in net.parameters()]


def test_ddp_equals_one_process(tmp_path, digits_zip):
    # 2 ranks × 8 images against ONE process × 16: at both steps each rank's optimizer sees the gradient of EDM's loss
    # over all 16 images (rank r's images, σ and noise drawn as its loop draws them; one backward pass of the pixel
    # sum averaged over the 16), and takes Adam's step (lr 0, then 1e-3 · 16/32). Fixed log-normal σ, no dropout or
    # augmentation.
    c = ddp_config(digits_zip, tmp_path / 'run', '--sampler=lognormal', '--dropout=0', '--augment=0',
                   '--lr-rampup=0.032', total_kimg=0.032)  # fmt: skip
    ranks = torchrun_loop(tmp_path, c)
    for rank in ranks:
        assert rank['cur_nimg'] == 32 and len(rank['steps']) == 2
        check_steps(c, rank['steps'], world=2, nimg=0)
    for key in ('net', 'ema'):
        assert all(torch.equal(ranks[0][key][k], ranks[1][key][k]) for k in ranks[0][key]), key
    # EMA: β = 0 after the first step (0 images seen), β = 0.5^(16 / (0.05 · 16)) after the second.
    steps, beta = ranks[0]['steps'], 0.5 ** (16 / (0.05 * 16))
    ema = state_params(c, ranks[0]['ema'])
    for p_ema, p0, p2 in zip(ema, steps[0]['before'], steps[1]['after'], strict=True):
        torch.testing.assert_close(p_ema, p2 + beta * (p0 - p2), rtol=0, atol=1e-9)


def differences(a, b, where='state') -> list[str]:
    """Where two nested states differ: tensors bitwise (NaN equal to NaN, dtype too), numbers (NaN equal to NaN),
    lists, dicts and None."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [f'{where}: keys']
        return [d for k in a for d in differences(a[k], b[k], f'{where}.{k}')]
    if isinstance(a, list | tuple):
        if not isinstance(b, list | tuple) or len(a) != len(b):
            return [f'{where}: length']
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f'{where}[{i}]')]
    if isinstance(a, torch.Tensor):
        ok = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        return [] if ok and torch.equal(a.nan_to_num(), b.nan_to_num()) else [where]
    if isinstance(a, float) and math.isnan(a):
        return [] if isinstance(b, float) and math.isnan(b) else [where]
    return [] if a == b else [f'{where}: {a!r} != {b!r}']


def test_resume_onto_other_rank_counts(tmp_path, digits_zip):
    # One run directory continued in place, InfoNoise with dropout and augmentation: 4 steps (64 images) in 1 process,
    # resumed for 4 steps in 2 gloo ranks, resumed from their state for 4 steps in 1 process.
    run = tmp_path / 'run'
    c = ddp_config(digits_zip, run, '--sampler=infonoise', '--info-bins=8', '--info-refresh=0.032',
                   '--info-warmup=0.032', '--info-nmin=1', '--info-floor=0.5', '--info-base=loguniform',
                   '--lr-rampup=0.016', '--dropout=0.1', '--augment=0.5')  # fmt: skip
    cpu = torch.device('cpu')
    tl.training_loop(**dict(c, total_kimg=0.064), device=cpu)
    shutil.copy(run / 'training-state-000000.pt', tmp_path / 'state-64.pt')
    ranks = torchrun_loop(tmp_path, dict(c, total_kimg=0.128, resume_state=str(tmp_path / 'state-64.pt')))
    shutil.copy(run / 'training-state-000000.pt', tmp_path / 'state-128.pt')
    with record_steps(limit=1) as steps, record_restore() as restored:
        result = tl.training_loop(**dict(c, total_kimg=0.192, resume_state=str(tmp_path / 'state-128.pt')), device=cpu)
    s64, s128, s192 = (torch.load(p, weights_only=True) for p in (tmp_path / 'state-64.pt', tmp_path / 'state-128.pt',
                                                                   run / 'training-state-000000.pt'))  # fmt: skip
    assert [s['cur_nimg'] for s in (s64, s128, s192)] == [64, 128, 192] and result.cur_nimg == 192

    # Each resumed part starts from its state: the noise sampler state as saved (InfoNoise's table included), the
    # weights, and a first step that is EDM's step for its ranks at the state's global data position, from the
    # state's Adam moments (`edm_gradients` in one process).
    parts = [(s64, 2, rank['steps'], rank['restored_noise_sampler']) for rank in ranks]
    parts.append((s128, 1, steps, restored['noise_sampler']))
    for state, world, part_steps, loaded in parts:
        assert not differences(loaded, state['noise_sampler'])
        assert all(torch.equal(a, b) for a, b in zip(part_steps[0]['before'], state_params(c, state['net'])))
        adam = [state['optimizer']['state'][i] for i in range(len(part_steps[0]['before']))]
        m, v = [s['exp_avg'] for s in adam], [s['exp_avg_sq'] for s in adam]
        check_steps(c, part_steps[:1], world, state['cur_nimg'], m, v, int(adam[0]['step']), state['noise_sampler'])
    for key in ('net', 'ema'):
        assert all(torch.equal(ranks[0][key][k], ranks[1][key][k]) for k in ranks[0][key]), key
    own = ('buffer', 'ptr', 'count')  # Each rank bins its own losses.
    assert not differences(*({k: v for k, v in rank['noise_sampler'].items() if k not in own} for rank in ranks))
    assert int(s192['optimizer']['state'][0]['step']) == 12

    # One tick line per tick, continuing across the resumes: ticks 0-6, every image counted once.
    lines = [json.loads(line) for line in open(run / 'stats.jsonl')]
    assert [line['Progress/tick']['mean'] for line in lines] == [0, 1, 2, 3, 4, 5, 6]
    kimg = [line['Progress/kimg']['mean'] * 1000 for line in lines]
    assert kimg == pytest.approx([16, 48, 64, 96, 128, 160, 192], rel=1e-6)
    assert [line['Loss/loss']['num'] for line in lines] == [16, 32, 16, 32, 32, 32, 32]
    # InfoNoise's clock counts the images of all ranks: checks every 32 images after the 32-image warm-up, each
    # refreshing, the count continuing across the resumes.
    events = [event for line in lines for event in line.get('Noise/events', [])]
    assert [(e['nimg'], e['refreshed'], e['refreshes']) for e in events] == [
        (64, True, 1), (96, True, 2), (128, True, 3), (160, True, 4), (192, True, 5)
    ]  # fmt: skip
    assert [s['noise_sampler']['nimg'] for s in (s64, s128, s192)] == [64, 128, 192]
    assert [s['noise_sampler']['refreshes'] for s in (s64, s128, s192)] == [1, 3, 5]
