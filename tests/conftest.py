"""Shared fixtures and helpers: small real image data sets in EDM's zip format, dataset writers (EDM layout, FASTA),
running click commands, and a tiny network config."""

import io
import json
import os
import zipfile

import numpy as np
import pytest
import sklearn.datasets
from click.testing import CliRunner, Result
from PIL import Image

# The CLIs measure how busy the CPUs are before they choose torch's threads (torch_utils.misc.set_cpu_threads), which
# takes half a second; the tests call them hundreds of times and say how many threads they want instead.
os.environ.setdefault('OMP_NUM_THREADS', str(os.cpu_count() or 1))


def invoke(main, *args) -> Result:
    """Run a click command in this process, its arguments turned into strings (so that paths may be Path objects)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def convert(*args) -> Result:
    """Run dataset_tool.py, which must succeed."""
    import dataset_tool  # Here, so that the test files that need no dataset_tool never import it.

    result = invoke(dataset_tool.main, *args)
    assert result.exit_code == 0, result.output
    return result


def edm_names(n: int) -> list[str]:
    """The names of EDM's first n dataset images: 00000/img00000000.png, ..."""
    return [f'{i // 1000:05d}/img{i:08d}.png' for i in range(n)]


def png_bytes(img: np.ndarray) -> bytes:
    """An uncompressed PNG of an HW or HWC uint8 image, as EDM stores them."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format='png', compress_level=0)
    return buf.getvalue()


def write_edm_dataset(path, images, labels=None, names=None, meta=None) -> str:
    """Write images (NHW or NHWC uint8) in EDM's layout into a zip (`path` ends in .zip) or a folder. dataset.json is
    `meta` if given, else built from `labels`; with neither, there is none."""
    names = names or edm_names(len(images))
    files = {name: png_bytes(img) for name, img in zip(names, images)}
    if meta is None and labels is not None:
        meta = {'labels': [[name, label] for name, label in zip(names, labels)]}
    if meta is not None:
        files['dataset.json'] = json.dumps(meta).encode()
    path = str(path)
    if path.endswith('.zip'):
        with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
            for name, data in files.items():
                z.writestr(name, data)
    else:
        for name, data in files.items():
            os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
            with open(os.path.join(path, name), 'wb') as f:
                f.write(data)
    return path


def write_edm_zip(path, images: np.ndarray, labels=None) -> str:
    """Write uint8 images [N, H, W] or [N, H, W, C] (and int labels) in EDM's dataset zip layout."""
    labels = None if labels is None else [int(y) for y in labels]
    return write_edm_dataset(path, images, labels, meta=None if labels is not None else {'labels': None})


def write_fasta(path, seqs, labels=None):
    """A FASTA file of `seqs`, each record spread over two lines, with a `label=` word when `labels` are given."""
    with open(path, 'w') as f:
        for i, s in enumerate(seqs):
            f.write(f'>r{i}' + ('' if labels is None else f' note=x label={labels[i]}') + '\n')
            f.write(s[: len(s) // 2] + '\n' + s[len(s) // 2 :] + '\n')  # Records may span lines.
    return path


@pytest.fixture(scope='session')
def digits8():
    """scikit-learn's 8x8 digits scaled to uint8: (images [N, 8, 8], labels [N])."""
    digits = sklearn.datasets.load_digits()
    images = np.round(digits.images[:64] * (255 / 16)).astype(np.uint8)
    return images, digits.target[:64]


@pytest.fixture(scope='session')
def digits_zip(tmp_path_factory, digits8):
    """A labelled 8x8 digits data set in EDM's zip format."""
    images, labels = digits8
    return write_edm_zip(tmp_path_factory.mktemp('data') / 'digits-8x8.zip', images, labels)


# A DDPM++ small enough for CPU tests (8x8 images, two levels, attention at 4x4).
TINY_NET_ARGS = ['--cbase=16', '--cres=1,2', '--blocks=1', '--attn=4']


def train_config(*args) -> dict:
    """The config train.py resolves from these command-line arguments (`setup_training_config`, presets applied), as
    plain JSON data; the seed is None unless --seed or a resumed state gives one."""
    import train

    ctx = train.main.make_context('train.py', [str(a) for a in args])
    opts, given = train.options_of(ctx)
    return json.loads(json.dumps(train.setup_training_config(opts, given)))


def assert_equal(a, b, where='state'):
    """Bitwise equality of nested dicts/lists/tuples of tensors and plain values; the message names the first
    difference's path (`where.key[i]`)."""
    import torch  # Here, not at the top: torch must not load before OMP_NUM_THREADS is set above.

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal(a[key], b[key], f'{where}.{key}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f'{where}[{i}]')
    else:
        assert a == b, where
