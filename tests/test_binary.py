"""Binarised data end to end: dataset_tool.py --binarize (exact threshold rule, seeded Bernoulli draws), train.py
picking InfoNoise's discrete endpoint for such data, and generate.py --binarize writing only 0/255 pixels."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_NET_ARGS

import dataset_tool
import generate
import train
from training.dataset import ImageFolderDataset


def invoke(main, *args):
    return CliRunner().invoke(main, [str(a) for a in args])


def convert(*args):
    result = invoke(dataset_tool.main, *args)
    assert result.exit_code == 0, result.output
    return result


def read_back(path, use_labels=False):
    """All images as uint8 NCHW, and (with use_labels) the labels as class indices."""
    ds = ImageFolderDataset(str(path), use_labels=use_labels)
    images = np.stack([ds[i][0] for i in range(len(ds))])
    labels = np.array([ds[i][1].argmax() for i in range(len(ds))]) if use_labels else None
    return images, labels


def image_folder(folder, images):
    folder.mkdir()
    for i, img in enumerate(images):
        PIL.Image.fromarray(img).save(folder / f'{i:02d}.png')
    return folder


@pytest.fixture(scope='module')
def padded_mnist5k():
    images, labels = dataset_tool.mnist5k_digits()  # Cached, so the conversions below do not parse it again.
    return np.pad(images, [(0, 0), (2, 2), (2, 2)]), labels


@pytest.mark.parametrize('channels', [1, 3])
def test_threshold_rule_is_exact_on_a_folder(tmp_path, channels):
    shape = (6, 8, 8) if channels == 1 else (6, 8, 8, 3)
    images = np.random.RandomState(1).randint(0, 256, size=shape, dtype=np.uint8)
    images[0].flat[:4] = [127, 128, 0, 255]  # The boundary: 127 -> 0, 128 -> 255.
    convert('--source', image_folder(tmp_path / 'src', images), '--dest', tmp_path / 'b.zip', '--binarize=threshold')
    got, _ = read_back(tmp_path / 'b.zip')
    expected = np.where(images >= 128, 255, 0)
    np.testing.assert_array_equal(got, expected[:, None] if channels == 1 else expected.transpose(0, 3, 1, 2))


def test_bernoulli_is_seeded_and_has_mean_pixel_over_255(tmp_path):
    # Constant images, 2,048 pixels per value, so each value's fraction of 255s estimates its probability.
    values = np.array([0, 51, 128, 204, 255], dtype=np.uint8)
    images = np.repeat(values, 2)[:, None, None] * np.ones((1, 32, 32), dtype=np.uint8)
    source = image_folder(tmp_path / 'src', images)
    for name, seed in (('s1a', 1), ('s1b', 1), ('s2', 2)):
        convert('--source', source, '--dest', tmp_path / name, '--binarize=bernoulli', f'--seed={seed}')
    s1a, s1b, s2 = (read_back(tmp_path / name)[0] for name in ('s1a', 's1b', 's2'))
    np.testing.assert_array_equal(s1a, s1b)
    assert not np.array_equal(s1a, s2)
    assert set(np.unique(s1a).tolist()) == {0, 255}
    fractions = (s1a.reshape(len(values), -1) == 255).mean(axis=1)
    assert fractions[0] == 0 and fractions[-1] == 1  # p = 0 and p = 1 are certain.
    p = values / 255
    np.testing.assert_array_less(np.abs(fractions - p), 5 * np.sqrt(p * (1 - p) / 2048) + 1e-12)


def test_mnist5k_binarized(tmp_path, padded_mnist5k):
    digits, labels = padded_mnist5k
    convert('--source', 'mnist5k', '--dest', tmp_path / 't.zip', '--binarize=threshold', '--max-images', 40)
    got, got_labels = read_back(tmp_path / 't.zip', use_labels=True)
    np.testing.assert_array_equal(got[:, 0], np.where(digits[:40] >= 128, 255, 0))
    np.testing.assert_array_equal(got_labels, labels[:40])

    # mnist5k-binary is the same conversion; both binarise after resizing, so 16x16 output is still 0/255.
    args = ['--resolution=16x16', '--max-images', 40]
    convert('--source', 'mnist5k-binary', '--dest', tmp_path / 'alias.zip', *args)
    convert('--source', 'mnist5k', '--dest', tmp_path / 'flag.zip', '--binarize=threshold', *args)
    alias, flag = read_back(tmp_path / 'alias.zip')[0], read_back(tmp_path / 'flag.zip')[0]
    resized = np.stack([np.array(PIL.Image.fromarray(d).resize((16, 16), PIL.Image.LANCZOS)) for d in digits[:40]])
    np.testing.assert_array_equal(alias[:, 0], np.where(resized >= 128, 255, 0))
    np.testing.assert_array_equal(alias, flag)

    # Bernoulli over 500 digits (512,000 pixels): the fraction of 255s matches the mean of pixel/255.
    convert('--source', 'mnist5k', '--dest', tmp_path / 'b.zip', '--binarize=bernoulli', '--max-images', 500)
    bern = read_back(tmp_path / 'b.zip')[0][:, 0]
    source = digits[:500]
    assert np.all(bern[source == 0] == 0) and np.all(bern[source == 255] == 255)
    assert abs((bern == 255).mean() - (source / 255).mean()) < 2e-3


def test_meaningless_combinations_are_refused(tmp_path):
    for args, message in (
        (['--source=mnist5k', '--seed=3'], '--seed applies only to --binarize=bernoulli'),
        (['--source=mnist5k', '--binarize=threshold', '--seed=3'], '--seed applies only to --binarize=bernoulli'),
        (['--source=mnist5k-binary', '--binarize=bernoulli'], 'already thresholded'),
    ):
        result = invoke(dataset_tool.main, *args, '--dest', tmp_path / 'x.zip')
        assert result.exit_code != 0 and message in result.output
    assert list(tmp_path.iterdir()) == []


def test_train_picks_discrete_endpoint_and_generate_binarizes(tmp_path):
    # A tiny binarised data set: 32 smooth gray 8x8 blobs thresholded by dataset_tool.py.
    yy, xx = np.mgrid[:8, :8]
    centers = np.random.RandomState(0).uniform(2, 6, size=(32, 2))
    blobs = [255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6) for cy, cx in centers]
    source = image_folder(tmp_path / 'src', np.round(blobs).astype(np.uint8))
    data = tmp_path / 'bin.zip'
    convert('--source', source, '--dest', data, '--binarize=threshold')

    args = ['--outdir', tmp_path / 'run', '--nosubdir', '--data', data, '--device=cpu', '--workers=0', *TINY_NET_ARGS]
    args += ['--sampler=infonoise', '--weight=uniform', '--batch=16', '--duration=0.001', '--tick=1', '--seed=0']
    result = invoke(train.main, *args)
    assert result.exit_code == 0, result.output
    with open(tmp_path / 'run' / 'training_options.json') as f:
        assert json.load(f)['noise_kwargs']['endpoint'] == 'discrete'
    snapshot = tmp_path / 'run' / 'network-snapshot-000001.pt'
    assert torch.load(snapshot, weights_only=True)['noise_kwargs']['endpoint'] == 'discrete'

    # The same data without --binarize keeps gray levels, and InfoNoise stays continuous.
    convert('--source', source, '--dest', tmp_path / 'gray.zip')
    gray_args = [*args[:4], tmp_path / 'gray.zip', *args[5:], '--dry-run']
    result = invoke(train.main, *gray_args)
    assert result.exit_code == 0 and '"endpoint": "continuous"' in result.output

    # generate.py --binarize: 0/255 only, recorded in grid.json; without it, this barely trained net gives grays.
    common = ['--network', snapshot, '--seeds', '0-7', '--steps', 3, '--device', 'cpu']
    for flag, outdir in (('--binarize', 'bin'), (None, 'plain')):
        extra = [] if flag is None else [flag]
        result = invoke(
            generate.main, *common, *extra, '--outdir', tmp_path / outdir, '--npz', tmp_path / f'{outdir}.npz'
        )
        assert result.exit_code == 0, result.output
        with open(tmp_path / outdir / 'grid.json') as f:
            assert json.load(f)['binarize'] is (flag is not None)
    binarized, plain = np.load(tmp_path / 'bin.npz')['arr_0'], np.load(tmp_path / 'plain.npz')['arr_0']
    assert set(np.unique(binarized).tolist()) <= {0, 255} and len(np.unique(plain)) > 2
    np.testing.assert_array_equal(binarized, np.where(plain >= 128, 255, 0))
    pngs = np.stack([np.array(PIL.Image.open(p)) for p in sorted((tmp_path / 'bin').glob('*.png'))])
    np.testing.assert_array_equal(pngs, binarized[..., 0])
