"""Tests for generate.py end to end on tiny network snapshots: seeds, grids, profiles, outputs, ranks, errors."""

import errno
import json
import math
import os
import resource
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
from infonoise import grids
from torch_utils import distributed as dist
from training.checkpoint import load_network
from training.networks import EDMPrecond
from training.sampling import StackedRandomGenerator, ablation_sampler, edm_sampler, images_to_uint8

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gaussian_profile():
    """The exact profile of a Gaussian source with variances 0.25 and 0.01, as training writes profiles."""
    sigma = np.exp(np.linspace(math.log(0.002), math.log(80), 64))
    mse = 0.25 * sigma**2 / (0.25 + sigma**2) + 0.01 * sigma**2 / (0.01 + sigma**2)
    return dict(sigma=sigma.tolist(), mse=mse.tolist(), rate=(mse / sigma**3).tolist())


def save_tiny_snapshot(path, img_channels, label_dim, profile=None, noise_kwargs=None, kimg=0):
    network_kwargs = dict(
        class_name='training.networks.EDMPrecond',
        img_resolution=8,
        img_channels=img_channels,
        label_dim=label_dim,
        model_type='SongUNet',
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[],
    )
    torch.manual_seed(0)
    net = EDMPrecond(**{k: v for k, v in network_kwargs.items() if k != 'class_name'})
    snapshot = dict(
        format='infonoise-edm-snapshot',
        version=1,
        network_kwargs=network_kwargs,
        ema=net.state_dict(),
        loss_kwargs={},
        noise_kwargs=noise_kwargs or {},
        augment_kwargs=None,
        dataset_kwargs={},
        kimg=kimg,
        profile=profile,
    )
    torch.save(snapshot, path)
    return str(path)


@pytest.fixture(scope='module')
def cond_snapshot(tmp_path_factory):
    return save_tiny_snapshot(tmp_path_factory.mktemp('net') / 'network-snapshot-000000.pt', 1, 3)


def run_generate(*args):
    result = CliRunner().invoke(generate.main, [str(arg) for arg in args])
    return result


def test_parse_int_list_and_split_seeds():
    assert generate.parse_int_list('1,2,5-10') == [1, 2, 5, 6, 7, 8, 9, 10]
    with pytest.raises(ValueError, match='lists more than 10,000,000 values'):
        generate.parse_int_list('0-99999999999')  # Refused before building the list.
    for bad in ['a', '5-3', '-3', '1,,2']:
        with pytest.raises(ValueError):
            generate.parse_int_list(bad)

    # EDM: a multiple of world_size near-equal batches, rank r takes batches r, r + W, ...
    seeds = list(range(10))
    assert dist.split_batches(seeds, 4, rank=0, world_size=2) == [[0, 1, 2], [6, 7]]
    assert dist.split_batches(seeds, 4, rank=1, world_size=2) == [[3, 4, 5], [8, 9]]
    assert dist.split_batches(seeds, 64, rank=0, world_size=1) == [seeds]


def test_generate_writes_seed_exact_images_and_grid(tmp_path, cond_snapshot):
    common = ['--network', cond_snapshot, '--seeds', '0-3', '--steps', 4, '--device', 'cpu']
    result = run_generate(*common, '--outdir', tmp_path / 'a', '--batch', 2, '--grid-png', tmp_path / 'grid.png')
    assert result.exit_code == 0, result.output
    result = run_generate(*common, '--outdir', tmp_path / 'b', '--batch', 4)
    assert result.exit_code == 0, result.output

    for seed in range(4):
        name = f'{seed:06d}.png'
        with PIL.Image.open(tmp_path / 'a' / name) as image:
            assert image.mode == 'L' and image.size == (8, 8)
        # Same seed, different batch composition: the same file.
        assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes()
    with PIL.Image.open(tmp_path / 'grid.png') as grid:
        assert grid.mode == 'L' and grid.size == (16, 16)
        grid = np.array(grid)
    with PIL.Image.open(tmp_path / 'a' / '000003.png') as image:
        assert np.array_equal(grid[8:, 8:], np.array(image))

    # The CLI draws latents and labels per seed and samples on EDM's 4-step grid.
    net = load_network(cond_snapshot).net
    rnd = StackedRandomGenerator('cpu', [2, 3])
    latents = rnd.randn([2, 1, 8, 8])
    labels = torch.eye(3)[rnd.randint(3, size=[2])]
    images = images_to_uint8(edm_sampler(net, latents, grids.edm_grid(4), labels, randn_like=rnd.randn_like))
    for seed, expected in zip([2, 3], images):
        with PIL.Image.open(tmp_path / 'a' / f'{seed:06d}.png') as image:
            assert np.array_equal(np.array(image), expected[:, :, 0])

    # --grid-scale and --grid-pad: each image enlarged 3 times, 2 white pixels between and around them.
    scaled = tmp_path / 'scaled.png'
    argv = [*common, '--outdir', tmp_path / 'a', '--grid-png', scaled, '--grid-scale=3', '--grid-pad=2']
    assert run_generate(*argv).exit_code == 0
    with PIL.Image.open(scaled) as big:
        big = np.array(big)
    assert big.shape == (2 + 2 * (24 + 2), 2 + 2 * (24 + 2)) and (big[:2] == 255).all() and (big[:, 26:28] == 255).all()
    assert np.array_equal(big[28:52:3, 28:52:3], grid[8:, 8:]) and np.array_equal(big[29:52:3, 30:52:3], grid[8:, 8:])


def test_generate_class_and_subdirs(tmp_path, cond_snapshot):
    common = ['--network', cond_snapshot, '--steps', 2, '--device', 'cpu', '--outdir', tmp_path]
    result = run_generate(*common, '--seeds', '999-1000', '--subdirs', '--class', 2)
    assert result.exit_code == 0, result.output
    assert (tmp_path / '000000' / '000999.png').is_file() and (tmp_path / '001000' / '001000.png').is_file()

    result = run_generate(*common, '--seeds', '0', '--class', 3)
    assert result.exit_code != 0 and 'out of range' in result.output

    rgb_uncond = save_tiny_snapshot(tmp_path / 'uncond.pt', 3, 0)
    result = run_generate(*common[2:], '--network', rgb_uncond, '--seeds', '0', '--class', 0)
    assert result.exit_code != 0 and 'unconditional' in result.output
    result = run_generate(*common[2:], '--network', rgb_uncond, '--seeds', '5')
    assert result.exit_code == 0, result.output
    with PIL.Image.open(tmp_path / '000005.png') as image:
        assert image.mode == 'RGB' and image.size == (8, 8)

    result = run_generate(*common[2:], '--network', tmp_path / 'missing.pt')
    assert result.exit_code != 0 and 'missing.pt' in result.output


@pytest.fixture(scope='module')
def info_snapshot(tmp_path_factory):
    return save_tiny_snapshot(tmp_path_factory.mktemp('net') / 'info.pt', 1, 0, profile=gaussian_profile())


def read_png(path):
    with PIL.Image.open(path) as image:
        return np.array(image)


def test_every_grid_generates_and_records_the_grid_it_used(tmp_path, info_snapshot):
    common = ['--network', info_snapshot, '--seeds', '0-2', '--steps', 5, '--device', 'cpu']
    expected = {
        'edm': grids.edm_grid(5),
        'infogrid': grids.infogrid(5, gaussian_profile()['sigma'], gaussian_profile()['rate'], 0.002, 80),
        'tangent': grids.tangent_grid(5, [0.25]),  # EDMPrecond's sigma_data = 0.5 is the default scale.
        'loguniform': grids.loguniform_grid(5),
        'vp': grids.vp_grid(5, *grids.DEFAULT_RANGES['vp']),
        've': grids.loguniform_grid(5, *grids.DEFAULT_RANGES['ve']),
        'iddpm': grids.iddpm_grid(5, *grids.DEFAULT_RANGES['iddpm']),
    }
    outputs = {}
    for name, grid in expected.items():
        result = run_generate(*common, '--grid', name, '--outdir', tmp_path / name)
        assert result.exit_code == 0, result.output
        record = json.loads((tmp_path / name / 'grid.json').read_text())
        assert record['grid'] == name and record['num_steps'] == 5 and record['nfe'] == 9
        assert record['S_max'] == 'inf' and 'Infinity' not in (tmp_path / name / 'grid.json').read_text()
        assert torch.equal(torch.tensor(record['sigmas'], dtype=torch.float64), grid), name
        outputs[name] = read_png(tmp_path / name / '000001.png')
    assert not np.array_equal(outputs['edm'], outputs['infogrid'])

    # The recorded grid reproduces the images exactly; --steps must agree with the file if given.
    grid_file = tmp_path / 'infogrid' / 'grid.json'
    result = run_generate(*common[:4], '--device', 'cpu', '--grid', grid_file, '--outdir', tmp_path / 'again')
    assert result.exit_code == 0, result.output
    assert np.array_equal(read_png(tmp_path / 'again' / '000001.png'), outputs['infogrid'])
    result = run_generate(*common, '--grid', grid_file, '--outdir', tmp_path / 'again')
    assert result.exit_code == 0, result.output
    result = run_generate(*common[:4], '--steps', 7, '--grid', grid_file, '--outdir', tmp_path / 'again')
    assert result.exit_code != 0 and 'has 5 steps' in result.output

    # The CLI's images are the sampler's on that grid.
    net = load_network(info_snapshot).net
    rnd = StackedRandomGenerator('cpu', [1])
    images = edm_sampler(net, rnd.randn([1, 1, 8, 8]), expected['infogrid'], randn_like=rnd.randn_like)
    assert np.array_equal(images_to_uint8(images)[0, :, :, 0], outputs['infogrid'])


def test_infogrid_profile_sources(tmp_path, info_snapshot, cond_snapshot):
    common = ['--seeds', '0', '--steps', 4, '--device', 'cpu', '--grid', 'infogrid']
    reference = grids.infogrid(4, gaussian_profile()['sigma'], gaussian_profile()['rate'])

    # A network without a profile needs --profile, which may be JSON (rate or mse) or a snapshot with a profile.
    # The error says why it has none: not trained with InfoNoise, or InfoNoise had not refreshed yet.
    result = run_generate(*common, '--network', cond_snapshot, '--outdir', tmp_path / 'none')
    assert result.exit_code != 0 and 'needs an information profile' in result.output
    assert 'it was not trained with InfoNoise' in result.output
    noise = dict(class_name='infonoise.InfoNoise', warmup_kimg=10, refresh_kimg=2)
    early = save_tiny_snapshot(tmp_path / 'early.pt', 1, 3, noise_kwargs=noise, kimg=4)
    result = run_generate(*common, '--network', early, '--outdir', tmp_path / 'none')
    assert result.exit_code != 0 and 'not trained' not in result.output
    assert 'InfoNoise trained this network but had not refreshed yet at 4 kimg (warm-up 10 kimg' in result.output
    profile = gaussian_profile()
    (tmp_path / 'rate.json').write_text(json.dumps(profile))
    (tmp_path / 'mse.json').write_text(json.dumps(dict(sigma=profile['sigma'], mse=profile['mse'])))
    for source in ('rate.json', 'mse.json', info_snapshot):
        outdir = tmp_path / f'out-{os.path.basename(source)}'
        result = run_generate(*common, '--network', cond_snapshot, '--profile', tmp_path / source, '--outdir', outdir)
        assert result.exit_code == 0, result.output
        sigmas = torch.tensor(json.loads((outdir / 'grid.json').read_text())['sigmas'], dtype=torch.float64)
        assert torch.allclose(sigmas, reference, rtol=1e-9, atol=0), source

    # Tangent: --variances is a scale, or a file with a variances list (or a bare list).
    (tmp_path / 'variances.json').write_text(json.dumps({'variances': [0.25, 0.01]}))
    (tmp_path / 'list.json').write_text(json.dumps([0.25, 0.01]))
    specs = (('0.1', [0.01]), (tmp_path / 'variances.json', [0.25, 0.01]), (tmp_path / 'list.json', [0.25, 0.01]))
    for spec, variances in specs:
        outdir = tmp_path / 'tangent'
        result = run_generate(
            *common[:-1], 'tangent', '--network', cond_snapshot, '--variances', spec, '--outdir', outdir
        )
        assert result.exit_code == 0, result.output
        sigmas = torch.tensor(json.loads((outdir / 'grid.json').read_text())['sigmas'], dtype=torch.float64)
        assert torch.equal(sigmas, grids.tangent_grid(4, variances))


def test_npz_holds_every_image_seed_and_label(tmp_path, cond_snapshot):
    npz = tmp_path / 'samples.npz'
    args = ['--network', cond_snapshot, '--seeds', '3-7', '--steps', 2, '--batch', 2, '--device', 'cpu']
    result = run_generate(*args, '--outdir', tmp_path / 'out', '--npz', npz)
    assert result.exit_code == 0, result.output
    data = np.load(npz)
    assert data['arr_0'].dtype == np.uint8 and data['arr_0'].shape == (5, 8, 8, 1)
    assert data['seeds'].tolist() == [3, 4, 5, 6, 7]
    for i, seed in enumerate(range(3, 8)):
        assert np.array_equal(data['arr_0'][i, :, :, 0], read_png(tmp_path / 'out' / f'{seed:06d}.png'))
    rnd = StackedRandomGenerator('cpu', list(range(3, 8)))
    rnd.randn([5, 1, 8, 8])
    assert data['labels'].tolist() == rnd.randint(3, size=[5]).tolist()

    result = run_generate(*args, '--outdir', tmp_path / 'c', '--npz', tmp_path / 'c.npz', '--class', 2)
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / 'c.npz')['labels'].tolist() == [2] * 5


def test_ablation_options_use_edms_ablation_sampler(tmp_path, info_snapshot):
    args = ['--network', info_snapshot, '--seeds', '4', '--steps', 4, '--device', 'cpu', '--outdir', tmp_path]
    result = run_generate(*args, '--disc', 'vp', '--schedule', 'vp', '--scaling', 'vp', '--solver', 'euler')
    assert result.exit_code == 0, result.output
    net = load_network(info_snapshot).net
    rnd = StackedRandomGenerator('cpu', [4])
    sigmas = grids.vp_grid(4, *grids.DEFAULT_RANGES['vp'])
    images = ablation_sampler(
        net, rnd.randn([1, 1, 8, 8]), sigmas, randn_like=rnd.randn_like, solver='euler', schedule='vp', scaling='vp'
    )
    assert np.array_equal(images_to_uint8(images)[0, :, :, 0], read_png(tmp_path / '000004.png'))
    record = json.loads((tmp_path / 'grid.json').read_text())
    assert (record['grid'], record['schedule'], record['scaling'], record['nfe']) == ('vp', 'vp', 'vp', 4)


def test_bad_generate_inputs_give_clear_errors(tmp_path, info_snapshot, cond_snapshot):
    common = ['--network', info_snapshot, '--seeds', '0', '--device', 'cpu', '--outdir', tmp_path / 'out']
    (tmp_path / 'bad.txt').write_text('80 40 oops')
    (tmp_path / 'ascending.json').write_text('[0.1, 1, 10]')
    (tmp_path / 'wide.json').write_text('[200, 1, 0.01]')
    (tmp_path / 'junk.json').write_text('{"hello": 1}')
    (tmp_path / 'deep.json').write_text('[' * 100_000 + ']' * 100_000)
    cases = [
        (['--grid', 'ddim'], 'neither one of edm'),
        (['--grid', tmp_path / 'bad.txt'], 'neither JSON nor a list of numbers'),
        (['--grid', tmp_path / 'ascending.json'], 'strictly descending'),
        (['--steps', 1], "Invalid value for '--steps'"),
        (
            ['--grid', 'edm', '--profile', tmp_path / 'junk.json'],
            '--profile is used by --grid=infogrid, not --grid=edm',
        ),
        (['--grid', 'tangent', '--profile', tmp_path / 'junk.json'], '--profile is used by --grid=infogrid'),
        (['--grid', 'infogrid', '--variances', '0.5'], '--variances is used by --grid=tangent, not --grid=infogrid'),
        (['--grid', 'infogrid', '--profile', tmp_path / 'junk.json'], 'holds no profile'),
        (['--grid', 'infogrid', '--profile', tmp_path / 'bad.txt'], 'is neither JSON nor a torch file'),
        (['--grid', 'infogrid', '--profile', tmp_path / 'missing.json'], 'no such file'),
        (['--grid', 'tangent', '--variances', '-1'], 'positive finite number'),
        (['--grid', 'tangent', '--variances', 'nan'], 'positive finite number'),
        (['--grid', 'tangent', '--variances', tmp_path / 'junk.json'], 'holds no JSON list of variances'),
        (['--grid', 'tangent', '--variances', tmp_path / 'missing.json'], 'is neither a number nor a file'),
        # 100,000-deep JSON: a one-line error from every JSON reader, not a RecursionError traceback.
        (['--grid', tmp_path / 'deep.json'], 'nests JSON too deeply'),
        (['--grid', 'infogrid', '--profile', tmp_path / 'deep.json'], 'nests JSON too deeply'),
        (['--grid', 'tangent', '--variances', tmp_path / 'deep.json'], 'nests JSON too deeply'),
        (['--grid', 'edm', '--disc', 'vp'], 'contradicts'),
        (['--grid', 'iddpm', '--steps', 5000], 'iDDPM noise levels'),
        (['--sigma_min', 100], 'Empty noise range'),
        (['--grid-png', tmp_path / 'out' / 'grid.png'], 'is inside --outdir, whose images fid.py reads'),
    ]
    for args, message in cases:
        result = run_generate(*common, *args)
        errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
        assert result.exit_code != 0 and len(errors) == 1 and message in errors[0], (args, result.output)
        assert 'Traceback' not in result.output
    assert not (tmp_path / 'out').exists()
    ve = save_tiny_snapshot(tmp_path / 've.pt', 1, 0)
    snapshot = torch.load(ve, weights_only=True)
    snapshot['network_kwargs']['class_name'] = 'training.networks.VEPrecond'
    torch.save(snapshot, ve)
    result = run_generate(*common[2:], '--network', ve, '--grid', tmp_path / 'wide.json')
    assert result.exit_code != 0 and "outside the network's noise range" in result.output


def test_full_disk_and_file_size_limit_are_one_line(tmp_path, cond_snapshot, monkeypatch):
    common = ['--network', cond_snapshot, '--seeds', '0-1', '--steps', 2, '--device', 'cpu']

    def full_disk(outdir, seeds, images, subdirs):
        raise OSError(errno.ENOSPC, 'No space left on device', os.path.join(outdir, '000000.png'))

    monkeypatch.setattr(generate, 'write_images', full_disk)
    result = run_generate(*common, '--outdir', tmp_path / 'full')
    errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert result.exit_code != 0 and 'Traceback' not in result.output, result.output
    assert errors == [f'Error: No space left on the device while writing the images in "{tmp_path / "full"}": '
                      f'{tmp_path / "full" / "000000.png"}']  # fmt: skip
    # A real file size limit (`ulimit -f`): grid.json, the first file written, is larger than 64 bytes.
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO, PYTHONDONTWRITEBYTECODE='1')
    cmd = [sys.executable, 'generate.py', *map(str, common), '--outdir', str(tmp_path / 'limit')]
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))  # noqa: E731
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180, preexec_fn=limit)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith('Error: File size limit exceeded while writing "'), (
        proc.stderr
    )
    assert 'grid.json' in proc.stderr


def test_two_ranks_write_the_same_images_as_one(tmp_path, cond_snapshot):
    args = ['--network', cond_snapshot, '--seeds', '0-6', '--steps', 3, '--batch', 2, '--device', 'cpu']
    result = run_generate(*args, '--outdir', tmp_path / 'one', '--npz', tmp_path / 'one.npz')
    assert result.exit_code == 0, result.output
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    for name in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(name, None)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'generate.py']
    cmd += [str(a) for a in args] + ['--outdir', str(tmp_path / 'two'), '--npz', str(tmp_path / 'two.npz')]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = np.load(tmp_path / 'one.npz'), np.load(tmp_path / 'two.npz')
    for key in ('arr_0', 'seeds', 'labels'):
        assert np.array_equal(one[key], two[key]), key
