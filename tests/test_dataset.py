"""training.dataset.ImageFolderDataset: exact pixels and labels from EDM-format zips and folders, max_size, xflip,
one-hot labels, pickling, DataLoader workers and clear errors."""

import os
import pickle
import re
import zipfile

import numpy as np
import pytest
import torch
from conftest import write_edm_dataset

from training.dataset import CorruptImageError, ImageFolderDataset


def random_images(n, res=8, channels=3, seed=0):
    shape = (n, res, res, channels) if channels != 1 else (n, res, res)
    return np.random.RandomState(seed).randint(0, 256, size=shape, dtype=np.uint8)


def chw(images):
    return images.transpose(0, 3, 1, 2) if images.ndim == 4 else images[:, np.newaxis]


@pytest.mark.parametrize('kind', ['data.zip', 'folder'])
@pytest.mark.parametrize('channels', [1, 3])
def test_pixels_labels_and_properties(tmp_path, kind, channels):
    images = random_images(7, channels=channels)
    labels = [2, 0, 4, 4, 1, 0, 2]
    ds = ImageFolderDataset(write_edm_dataset(tmp_path / kind, images, labels), use_labels=True)
    assert len(ds) == 7 and ds.name == kind.split('.')[0]
    assert (ds.image_shape, ds.num_channels, ds.resolution) == ([channels, 8, 8], channels, 8)
    assert (ds.label_shape, ds.label_dim, ds.has_labels, ds.has_onehot_labels) == ([5], 5, True, True)
    for i in range(7):
        image, label = ds[i]
        assert image.dtype == np.uint8 and label.dtype == np.float32
        np.testing.assert_array_equal(image, chw(images)[i])
        np.testing.assert_array_equal(label, np.eye(5, dtype=np.float32)[labels[i]])


def test_labels_off_by_default(tmp_path):
    ds = ImageFolderDataset(write_edm_dataset(tmp_path / 'd.zip', random_images(3), [1, 2, 3]))
    assert (ds.label_shape, ds.label_dim, ds.has_labels, ds.has_onehot_labels) == ([0], 0, False, False)
    assert ds[0][1].shape == (0,)


def test_vector_labels_are_kept_as_float(tmp_path):
    vectors = [[0.5, -1.0], [2.0, 0.25], [0.0, 1.5]]
    ds = ImageFolderDataset(write_edm_dataset(tmp_path / 'd.zip', random_images(3), vectors), use_labels=True)
    assert (ds.label_shape, ds.has_onehot_labels) == ([2], False)
    np.testing.assert_array_equal(np.stack([ds[i][1] for i in range(3)]), np.float32(vectors))


@pytest.mark.parametrize(
    'labels, message', [([[0.5, float('nan')], [1.0, 2.0]], 'non-finite'), ([0, 10**9], 'class label')]
)
def test_absurd_labels_are_refused(tmp_path, labels, message):
    # NaN conditioning vectors would train into NaN silently; a class index of 1e9 would ask for a 1e9-long one-hot.
    path = write_edm_dataset(tmp_path / 'd.zip', random_images(2), labels)
    with pytest.raises(ValueError, match=message):
        ImageFolderDataset(path, use_labels=True)


def test_xflip_appends_mirrored_copies(tmp_path):
    images = random_images(4)
    ds = ImageFolderDataset(write_edm_dataset(tmp_path / 'd.zip', images, [0, 1, 2, 3]), use_labels=True, xflip=True)
    assert len(ds) == 8
    for i in range(4):
        np.testing.assert_array_equal(ds[i][0], chw(images)[i])
        np.testing.assert_array_equal(ds[i + 4][0], chw(images)[i][:, :, ::-1])
        np.testing.assert_array_equal(ds[i + 4][1], ds[i][1])
        assert (ds.get_details(i + 4).raw_idx, ds.get_details(i + 4).xflip) == (i, True)


@pytest.mark.parametrize('seed', [0, 7, 2**31 + 7])
def test_max_size_is_a_seeded_sorted_subset(tmp_path, seed):
    images = random_images(20)
    path = write_edm_dataset(tmp_path / 'd.zip', images)
    ds = ImageFolderDataset(path, max_size=6, random_seed=seed, xflip=True)
    order = np.arange(20)
    np.random.RandomState(seed % 2**31).shuffle(order)
    expected = np.sort(order[:6])
    assert len(ds) == 12
    assert [ds.get_details(i).raw_idx for i in range(12)] == list(expected) * 2
    np.testing.assert_array_equal(np.stack([ds[i][0] for i in range(6)]), chw(images)[expected])
    assert len(ImageFolderDataset(path, max_size=20)) == 20 and len(ImageFolderDataset(path, max_size=50)) == 20


def test_cache_serves_copies(tmp_path):
    images = random_images(2)
    ds = ImageFolderDataset(write_edm_dataset(tmp_path / 'd.zip', images), cache=True)
    ds[0][0][:] = 0  # Changing a returned image must not change the cache.
    os.remove(tmp_path / 'd.zip')
    ds.close()
    np.testing.assert_array_equal(ds[0][0], chw(images)[0])


def test_pickle_drops_zip_handle_and_labels(tmp_path):
    ds = ImageFolderDataset(write_edm_dataset(tmp_path / 'd.zip', random_images(3), [0, 2, 1]), use_labels=True)
    ds[0]
    state = ds.__getstate__()
    assert state['_zipfile'] is None and state['_raw_labels'] is None
    copy = pickle.loads(pickle.dumps(ds))
    for i in range(3):
        np.testing.assert_array_equal(copy[i][0], ds[i][0])
        np.testing.assert_array_equal(copy[i][1], ds[i][1])


def test_dataloader_workers_read_the_same_data(tmp_path):
    images = random_images(16)
    ds = ImageFolderDataset(write_edm_dataset(tmp_path / 'd.zip', images, list(range(16))), use_labels=True)
    ds[0]  # Open the zip in this process before the workers start.
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    np.testing.assert_array_equal(torch.cat([b[0] for b in batches]).numpy(), chw(images))
    np.testing.assert_array_equal(torch.cat([b[1] for b in batches]).numpy(), np.eye(16, dtype=np.float32))


def write_file(name, data):
    def make(tmp_path):
        (tmp_path / name).write_bytes(data)
        return str(tmp_path / name)

    return make


def dataset_of(images, **kwargs):
    return lambda tmp_path: write_edm_dataset(tmp_path / 'd.zip', images, **kwargs)


def deep_json_dataset(tmp_path):
    """A folder dataset whose dataset.json nests 100,000 lists (Python's parser raises RecursionError on it)."""
    path = write_edm_dataset(tmp_path / 'd', random_images(1))
    with open(os.path.join(path, 'dataset.json'), 'w') as f:
        f.write('{"labels": ' + '[' * 100_000 + ']' * 100_000 + '}')
    return path


NAMES = ['00000/img00000000.png', '00000/img00000001.png']
ERROR_CASES = {
    'missing path': (lambda tmp_path: str(tmp_path / 'nope.zip'), {}, 'Dataset not found'),
    'not zip or folder': (write_file('d.txt', b'hello'), {}, 'must be a zip archive or a folder'),
    'corrupt zip': (write_file('d.zip', b'not a zip' * 20), {}, 'Corrupt zip archive'),
    'empty zip': (dataset_of([], meta={'labels': None}), {}, 'No images found'),
    'empty folder': (lambda tmp_path: str(tmp_path), {}, 'No images found'),
    'not square': (dataset_of([np.zeros([8, 4], np.uint8)]), {}, 'must be square, got 4x8'),
    'not power of two': (dataset_of(random_images(1, res=12)), {}, 'power of two, got 12x12'),
    'resolution mismatch': (dataset_of(random_images(1)), {'resolution': 16}, 'are 8x8, but resolution=16'),
    'no dataset.json': (dataset_of(random_images(2)), {'use_labels': True}, 'has no labels in dataset.json'),
    'null labels': (dataset_of(random_images(2), meta={'labels': None}), {'use_labels': True}, 'has no labels'),
    'too few labels': (
        dataset_of(random_images(2), meta={'labels': [[NAMES[0], 1]]}),
        {'use_labels': True},
        '1 labels for 2 images (none for 00000/img00000001.png)',
    ),
    'too many labels': (
        dataset_of(random_images(2), meta={'labels': [[NAMES[0], 1], [NAMES[1], 0], ['x.png', 2]]}),
        {'use_labels': True},
        '3 labels for 2 images',
    ),
    'negative label': (dataset_of(random_images(2), labels=[1, -1]), {'use_labels': True}, 'class indices >= 0'),
    'malformed json': (
        dataset_of(random_images(1), meta={'labls': []}),
        {'use_labels': True},
        'Malformed dataset.json',
    ),
    'bad max_size': (dataset_of(random_images(1)), {'max_size': 0}, 'max_size must be at least 1'),
    'too deep json': (deep_json_dataset, {'use_labels': True}, 'dataset.json in '),
}


@pytest.mark.parametrize('case', list(ERROR_CASES))
def test_errors(tmp_path, case):
    make, kwargs, message = ERROR_CASES[case]
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        ImageFolderDataset(make(tmp_path), **kwargs)
    assert '\n' not in str(error.value)  # One line.
    if case == 'too deep json':
        assert str(error.value) == f'dataset.json in {tmp_path / "d"} nests JSON too deeply to read'


def test_image_of_another_size_fails_on_access(tmp_path):
    images = [np.zeros([8, 8], np.uint8), np.zeros([16, 16], np.uint8)]
    ds = ImageFolderDataset(write_edm_dataset(tmp_path / 'd.zip', images))
    assert ds[0][0].shape == (1, 8, 8)
    with pytest.raises(ValueError, match=r'00000/img00000001.png .* has shape \[1, 16, 16\], expected \[1, 8, 8\]'):
        ds[1]


def truncated(png):
    return png[: len(png) // 2]


def bad_chunk_length(png):
    # A wrong IDAT length (byte 36 is its low byte) puts the next chunk header mid-data: PIL raises SyntaxError.
    return png[:36] + bytes([png[36] ^ 0xFF]) + png[37:]


@pytest.mark.parametrize('corrupt', [truncated, bad_chunk_length])
def test_corrupt_image_mid_dataset_names_the_file(tmp_path, corrupt):
    images = random_images(5)
    path = write_edm_dataset(tmp_path / 'd.zip', images)
    name = '00000/img00000002.png'
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    files[name] = corrupt(files[name])
    with zipfile.ZipFile(path, 'w') as z:
        for n, data in files.items():
            z.writestr(n, data)

    ds = ImageFolderDataset(path)
    np.testing.assert_array_equal(ds[1][0], chw(images)[1])
    with pytest.raises(CorruptImageError) as info:
        ds[2]
    message = str(info.value)
    assert message.startswith(f'Cannot decode image "{name}" in {path}: ') and '\n' not in message
    assert isinstance(info.value, ValueError)

    # A DataLoader worker's error comes back as the same class (it is rebuilt from one message string).
    with pytest.raises(CorruptImageError, match=re.escape(name)):
        list(torch.utils.data.DataLoader(ds, batch_size=5, num_workers=1))


def test_corrupt_first_image_and_unidentifiable_bytes(tmp_path):
    path = write_edm_dataset(tmp_path / 'd', random_images(2))
    with open(os.path.join(path, '00000', 'img00000000.png'), 'wb') as f:
        f.write(b'not a png at all')
    message = f'Cannot decode image "00000/img00000000.png" in {path}: not an image file PIL can identify'
    with pytest.raises(CorruptImageError, match=f'^{re.escape(message)}$'):
        ImageFolderDataset(path)
