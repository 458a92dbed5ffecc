"""Shared fixtures: small real image data sets in EDM's zip format and a tiny network config."""

import io
import json
import zipfile

import numpy as np
import pytest
import sklearn.datasets
from PIL import Image


def write_edm_zip(path, images: np.ndarray, labels=None) -> str:
    """Write uint8 images [N, H, W] or [N, H, W, C] (and int labels) in EDM's dataset zip layout."""
    names = [f'{i // 1000:05d}/img{i:08d}.png' for i in range(len(images))]
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
        for name, img in zip(names, images):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format='png', compress_level=0)
            z.writestr(name, buf.getvalue())
        meta = {'labels': None if labels is None else [[n, int(y)] for n, y in zip(names, labels)]}
        z.writestr('dataset.json', json.dumps(meta))
    return str(path)


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
