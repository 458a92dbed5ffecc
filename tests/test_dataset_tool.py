"""dataset_tool.py: every source round-trips exactly through ImageFolderDataset, in EDM's layout, and errors leave
nothing behind."""

import errno
import gzip
import importlib.util
import io
import json
import os
import pickle
import resource
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zipfile

import click
import numpy as np
import PIL.Image
import pytest
from conftest import convert, edm_names, invoke, png_bytes, write_fasta

import dataset_tool
import dnnlib.dataset_writer
import dnnlib.util
from training import dataset, sequences
from training.dataset import ImageFolderDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(*args):
    return invoke(dataset_tool.main, *args)


def read_back(path):
    """All images (NHWC, or NHW for grayscale) and class indices (or None) through ImageFolderDataset."""
    ds = ImageFolderDataset(str(path), use_labels=has_labels(path))
    images = np.stack([ds[i][0] for i in range(len(ds))]).transpose(0, 2, 3, 1)
    if images.shape[3] == 1:
        images = images[..., 0]
    labels = np.array([ds[i][1].argmax() for i in range(len(ds))]) if ds.has_labels else None
    return images, labels


def has_labels(path):
    if str(path).endswith('.zip'):
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read('dataset.json'))['labels'] is not None
    with open(os.path.join(path, 'dataset.json')) as f:
        return json.load(f)['labels'] is not None


def check_edm_zip(path, labels):
    """Entry names, ZIP_STORED, uncompressed PNGs and dataset.json text exactly as EDM writes them."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        names = [info.filename for info in infos]
        assert names == edm_names(len(names) - 1) + ['dataset.json']
        assert all(info.compress_type == zipfile.ZIP_STORED for info in infos)
        png = z.read(names[0])
        buf = io.BytesIO()
        PIL.Image.open(io.BytesIO(png)).save(buf, format='png', compress_level=0, optimize=False)
        assert png == buf.getvalue()
        meta = z.read('dataset.json').decode()
    expected = None if labels is None else [[name, int(label)] for name, label in zip(names[:-1], labels)]
    assert meta == json.dumps({'labels': expected})


def random_images(n, h, w, c=None, seed=0):
    shape = (n, h, w) if c is None else (n, h, w, c)
    return np.random.RandomState(seed).randint(0, 256, size=shape, dtype=np.uint8)


def save_images(folder, names, images):
    for name, img in zip(names, images):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(img).save(path)


def tree(path):
    return sorted(
        os.path.relpath(os.path.join(root, f), path) for root, dirs, files in os.walk(path) for f in dirs + files
    )


# Sources.


def make_cifar_tarball(path, per_batch=3):
    images = random_images(5 * per_batch, 32, 32, 3, seed=1)
    images[0, 0, 0] = 0  # EDM's tarball spans 0..255.
    labels = np.arange(5 * per_batch) % 10
    with tarfile.open(path, 'w:gz') as tar:
        for batch in range(5):
            sl = slice(batch * per_batch, (batch + 1) * per_batch)
            data = {
                'batch_label': f'training batch {batch + 1} of 5',
                'labels': [int(x) for x in labels[sl]],
                'data': images[sl].transpose(0, 3, 1, 2).reshape(per_batch, 3072),  # Rows of R, G, B planes.
                'filenames': [f'img_{i}.png' for i in range(per_batch)],
            }
            blob = pickle.dumps(data, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{batch + 1}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return images, labels


def test_cifar10_round_trip(tmp_path):
    images, labels = make_cifar_tarball(tmp_path / 'cifar-10-python.tar.gz')
    convert('--source', tmp_path / 'cifar-10-python.tar.gz', '--dest', tmp_path / 'out' / 'cifar.zip')
    got_images, got_labels = read_back(tmp_path / 'out' / 'cifar.zip')
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    check_edm_zip(tmp_path / 'out' / 'cifar.zip', labels)


def write_idx(path, array, ndim):
    data = bytes([0, 0, 8, ndim]) + struct.pack(f'>{ndim}I', *array.shape) + array.tobytes()
    with (gzip.open if str(path).endswith('.gz') else open)(path, 'wb') as f:
        f.write(data)


@pytest.mark.parametrize(
    'images_name, labels_name, pass_folder',
    [
        ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', False),
        ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', False),
        ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', True),
        ('fashion-train-images-idx3-ubyte', 'fashion-train-labels-idx1-ubyte.gz', True),
    ],
)
def test_mnist_idx_round_trip(tmp_path, images_name, labels_name, pass_folder):
    src = tmp_path / 'fashion-mnist'
    src.mkdir()
    digits = random_images(4, 28, 28, seed=2)
    labels = np.array([7, 0, 9, 3], dtype=np.uint8)
    write_idx(src / images_name, digits, 3)
    write_idx(src / labels_name, labels, 1)
    convert('--source', src if pass_folder else src / images_name, '--dest', tmp_path / 'mnist.zip')
    got_images, got_labels = read_back(tmp_path / 'mnist.zip')
    np.testing.assert_array_equal(got_images, np.pad(digits, [(0, 0), (2, 2), (2, 2)]))
    np.testing.assert_array_equal(got_labels, labels)
    check_edm_zip(tmp_path / 'mnist.zip', labels)


def test_image_folder_with_class_subfolders_to_folder(tmp_path):
    images = random_images(5, 8, 8, 3, seed=3)
    names = ['dog/b.png', 'cat/z.bmp', 'dog/a.png', 'cat/a.png', 'cat/sub/c.png']
    save_images(tmp_path / 'src', names, images)
    convert('--source', tmp_path / 'src', '--dest', tmp_path / 'out')
    order = np.argsort(names)  # Sorted paths: cat/a, cat/sub/c, cat/z, dog/a, dog/b.
    got_images, got_labels = read_back(tmp_path / 'out')
    np.testing.assert_array_equal(got_images, images[order])
    np.testing.assert_array_equal(got_labels, [0, 0, 0, 1, 1])
    assert tree(tmp_path / 'out') == ['00000'] + edm_names(5) + ['dataset.json']


def test_image_folder_labels_from_dataset_json_and_missing_labels(tmp_path):
    images = random_images(3, 4, 4, seed=4)
    save_images(tmp_path / 'src', ['x.png', 'y.png', 'z.png'], images)
    meta = {'labels': [['x.png', 5], ['y.png', 2], ['z.png', 5]]}
    (tmp_path / 'src' / 'dataset.json').write_text(json.dumps(meta))
    convert('--source', tmp_path / 'src', '--dest', tmp_path / 'a.zip')
    got_images, got_labels = read_back(tmp_path / 'a.zip')
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, [5, 2, 5])
    check_edm_zip(tmp_path / 'a.zip', [5, 2, 5])

    # One unlabelled image => no labels at all.
    meta['labels'].pop()
    (tmp_path / 'src' / 'dataset.json').write_text(json.dumps(meta))
    convert('--source', tmp_path / 'src', '--dest', tmp_path / 'b.zip')
    check_edm_zip(tmp_path / 'b.zip', None)


def test_zip_source_round_trip_with_max_images(tmp_path):
    images = random_images(6, 16, 16, 3, seed=5)
    labels = [3, 1, 4, 1, 5, 9]
    with zipfile.ZipFile(tmp_path / 'src.zip', 'w') as z:
        for i, img in enumerate(images):
            buf = io.BytesIO()
            PIL.Image.fromarray(img).save(buf, format='png')
            z.writestr(f'imgs/{i:02d}.png', buf.getvalue())
        z.writestr('dataset.json', json.dumps({'labels': [[f'imgs/{i:02d}.png', y] for i, y in enumerate(labels)]}))
    convert('--source', tmp_path / 'src.zip', '--dest', tmp_path / 'out.zip', '--max-images', 4)
    got_images, got_labels = read_back(tmp_path / 'out.zip')
    np.testing.assert_array_equal(got_images, images[:4])
    np.testing.assert_array_equal(got_labels, labels[:4])
    check_edm_zip(tmp_path / 'out.zip', labels[:4])

    # Our own output converts back to itself.
    convert('--source', tmp_path / 'out.zip', '--dest', tmp_path / 'again.zip')
    np.testing.assert_array_equal(read_back(tmp_path / 'again.zip')[0], images[:4])


@pytest.fixture(scope='module')
def mnist5k():
    return dataset.mnist5k_digits()


def test_mnist5k(tmp_path, mnist5k):
    convert('--source', 'mnist5k', '--dest', tmp_path / 'm.zip')
    ds = ImageFolderDataset(str(tmp_path / 'm.zip'), use_labels=True)
    assert (len(ds), ds.image_shape, ds.label_dim) == (5000, [1, 32, 32], 10)
    labels = np.array([ds.get_label(i).argmax() for i in range(len(ds))])
    np.testing.assert_array_equal(np.bincount(labels), [500] * 10)
    np.testing.assert_array_equal(labels, mnist5k[1])
    np.testing.assert_array_equal(ds[0][0][0], np.pad(mnist5k[0][0], 2))
    np.testing.assert_array_equal(ds[4999][0][0], np.pad(mnist5k[0][4999], 2))
    check_edm_zip(tmp_path / 'm.zip', labels)


def test_mnist5k_resized(tmp_path, mnist5k):
    convert('--source', 'mnist5k', '--dest', tmp_path / 'm16.zip', '--resolution', '16x16', '--max-images', 20)
    got_images, got_labels = read_back(tmp_path / 'm16.zip')
    expected = [
        np.array(PIL.Image.fromarray(np.pad(d, 2)).resize((16, 16), PIL.Image.LANCZOS)) for d in mnist5k[0][:20]
    ]
    np.testing.assert_array_equal(got_images, np.stack(expected))
    np.testing.assert_array_equal(got_labels, mnist5k[1][:20])


def test_mnist5k_binary(tmp_path, mnist5k):
    convert('--source', 'mnist5k-binary', '--dest', tmp_path / 'b', '--max-images', 50)
    got_images, got_labels = read_back(tmp_path / 'b')
    assert set(np.unique(got_images)) == {0, 255}
    np.testing.assert_array_equal(got_images, np.where(np.pad(mnist5k[0][:50], [(0, 0), (2, 2), (2, 2)]) > 127, 255, 0))
    np.testing.assert_array_equal(got_labels, mnist5k[1][:50])


# Options and transforms.


def test_parse_resolution():
    assert dataset_tool.parse_resolution(None, None, '512x256') == (512, 256)
    assert dataset_tool.parse_resolution(None, None, '16,16') == (16, 16)
    assert dataset_tool.parse_resolution(None, None, None) is None
    for absurd in ('0x0', '64x0', '99999x99999'):
        with pytest.raises(click.BadParameter, match='between 1 and 16384'):
            dataset_tool.parse_resolution(None, None, absurd)


def test_center_crop_makes_rgb_square(tmp_path):
    img = random_images(1, 12, 20, seed=6)[0]  # 20 wide, 12 high, grayscale.
    save_images(tmp_path / 'src', ['a.png'], [img])
    convert(
        '--source', tmp_path / 'src', '--dest', tmp_path / 'o.zip', '--transform', 'center-crop', '--resolution', '8x8'
    )
    crop = np.repeat(img[:, 4:16, np.newaxis], 3, axis=2)
    expected = np.array(PIL.Image.fromarray(crop).resize((8, 8), PIL.Image.LANCZOS))
    np.testing.assert_array_equal(read_back(tmp_path / 'o.zip')[0][0], expected)


def test_center_crop_wide_letterboxes_and_skips_small(tmp_path):
    wide = random_images(1, 10, 16, 3, seed=7)[0]
    save_images(tmp_path / 'src', ['a.png', 'b.png'], [wide, wide[:4, :4]])  # b is too small and is skipped.
    convert(
        '--source',
        tmp_path / 'src',
        '--dest',
        tmp_path / 'o.zip',
        '--transform',
        'center-crop-wide',
        '--resolution',
        '8x4',
    )
    got = read_back(tmp_path / 'o.zip')[0]
    expected = np.zeros([8, 8, 3], dtype=np.uint8)
    expected[2:6] = np.array(PIL.Image.fromarray(wide[2:7]).resize((8, 4), PIL.Image.LANCZOS))  # Rows 16:10 = 8:5.
    assert got.shape == (1, 8, 8, 3)
    np.testing.assert_array_equal(got[0], expected)


# Errors: a clear message, a non-zero exit and no output left behind.


def write_bytes(name, data=b'this is not an archive' * 10):
    def make(src):
        (src / name).write_bytes(data)
        return src / name

    return make


def folder_of(images):
    def make(src):
        (src / 'imgs').mkdir()
        save_images(src / 'imgs', [f'{i}.png' for i in range(len(images))], images)
        return src / 'imgs'

    return make


def broken_png(src):
    # A wrong IDAT length (byte 36 of an uncompressed 8x8 RGB PNG) makes PIL raise SyntaxError, not OSError.
    png = png_bytes(random_images(1, 8, 8, 3)[0])
    (src / 'imgs').mkdir()
    (src / 'imgs' / 'a.png').write_bytes(png[:36] + bytes([png[36] ^ 0xFF]) + png[37:])
    return src / 'imgs'


def truncated_idx(src):
    write_idx(src / 'train-images-idx3-ubyte', random_images(3, 28, 28), 3)
    write_idx(src / 'train-labels-idx1-ubyte', np.zeros(3, np.uint8), 1)
    data = (src / 'train-images-idx3-ubyte').read_bytes()
    (src / 'train-images-idx3-ubyte').write_bytes(data[:-5])
    return src / 'train-images-idx3-ubyte'


def corrupt_gzip_idx(src):
    write_idx(src / 'train-labels-idx1-ubyte.gz', np.zeros(3, np.uint8), 1)
    return write_bytes('train-images-idx3-ubyte.gz')(src)


def deep_json(name):
    """A source whose dataset.json nests 100,000 lists (Python's parser raises RecursionError on it)."""
    deep = '{"labels": ' + '[' * 100_000 + ']' * 100_000 + '}'

    def make(src):
        if name.endswith('.zip'):
            with zipfile.ZipFile(src / name, 'w') as z:
                z.writestr('a.png', png_bytes(random_images(1, 4, 4)[0]))
                z.writestr('dataset.json', deep)
            return src / name
        folder_of(random_images(1, 4, 4))(src)
        (src / 'imgs' / 'dataset.json').write_text(deep)
        return src / 'imgs'

    return make


ERROR_CASES = {
    'missing source': (lambda src: src / 'nope', [], 'Missing input file or directory'),
    'unknown source': (write_bytes('a.dat', b'hello'), [], 'Unknown source type'),
    'corrupt zip': (write_bytes('data.zip'), [], 'Corrupt zip archive'),
    'corrupt tarball': (write_bytes('cifar-10-python.tar.gz'), [], 'Corrupt CIFAR-10 tarball'),
    'corrupt gzip idx': (corrupt_gzip_idx, [], 'Cannot read'),
    'missing idx labels': (
        write_bytes('train-images-idx3-ubyte'),
        [],
        'Missing labels file train-labels-idx1-ubyte[.gz]',
    ),
    'truncated idx': (truncated_idx, [], 'Corrupt idx file'),
    'not square': (folder_of(random_images(1, 8, 4)), [], 'must be square, got 4x8'),
    'not power of two': (folder_of(random_images(1, 12, 12)), [], 'power of two, got 12x12'),
    'resolution not square': (folder_of(random_images(1, 8, 8)), ['--resolution', '8x4'], 'must be square'),
    'four channels': (folder_of(random_images(1, 8, 8, 4)), [], 'got 4 channels'),
    'differing sizes': (
        folder_of([*random_images(2, 8, 8), random_images(1, 16, 16)[0]]),
        [],
        'equal size and channels',
    ),
    'differing channels': (folder_of([random_images(1, 8, 8)[0], random_images(1, 8, 8, 3)[0]]), [], 'equal size and'),
    'transform without resolution': (
        folder_of(random_images(1, 8, 8)),
        ['--transform', 'center-crop'],
        'requires --res',
    ),
    'bad resolution': (folder_of(random_images(1, 8, 8)), ['--resolution', '8by8'], 'expected WxH or W,H'),
    'empty folder': (folder_of([]), [], 'No images to write'),
    'broken png': (broken_png, [], 'Cannot decode image a.png: broken PNG file'),
    'deep dataset.json in a folder': (deep_json('imgs'), [], 'imgs/dataset.json nests JSON too deeply to read'),
    'deep dataset.json in a zip': (deep_json('src.zip'), [], 'src.zip/dataset.json nests JSON too deeply to read'),
}


@pytest.mark.parametrize('dest', ['deep/new/out.zip', 'deep/new/out'])
@pytest.mark.parametrize('case', list(ERROR_CASES))
def test_errors_leave_nothing_behind(tmp_path, case, dest):
    make_source, extra, message = ERROR_CASES[case]
    source = make_source(tmp_path)
    before = tree(tmp_path)
    result = run_tool('--source', source, '--dest', tmp_path / dest, *extra)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)  # A click error, no traceback.
    assert message in result.output
    assert tree(tmp_path) == before


def test_non_empty_dest_folder_is_refused_and_untouched(tmp_path):
    source = folder_of(random_images(1, 4, 4))(tmp_path)
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'keep.txt').write_text('precious')
    before = tree(tmp_path)
    result = run_tool('--source', source, '--dest', tmp_path / 'out')
    assert result.exit_code != 0 and '--dest folder must be empty' in result.output
    assert tree(tmp_path) == before and (tmp_path / 'out' / 'keep.txt').read_text() == 'precious'


def test_empty_dest_folder_is_filled(tmp_path):
    source = folder_of(random_images(1, 4, 4))(tmp_path)
    (tmp_path / 'out').mkdir()
    convert('--source', source, '--dest', tmp_path / 'out')
    assert tree(tmp_path / 'out') == ['00000', '00000/img00000000.png', 'dataset.json']


def test_existing_dest_needs_overwrite(tmp_path):
    source = folder_of(random_images(2, 4, 4))(tmp_path)
    (tmp_path / 'out.zip').write_bytes(b'precious')
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'keep.txt').write_text('precious')
    before = tree(tmp_path)
    for dest, message in [('out.zip', '--dest exists'), ('out', '--dest folder must be empty')]:
        result = run_tool('--source', source, '--dest', tmp_path / dest)
        assert result.exit_code == 1 and result.output.splitlines() == [
            f'Error: {message} (add --overwrite to replace it): {tmp_path / dest}'
        ]
    assert tree(tmp_path) == before and (tmp_path / 'out.zip').read_bytes() == b'precious'

    # --overwrite replaces either, whole, and leaves no temporary file or old folder beside it.
    convert('--source', source, '--dest', tmp_path / 'out.zip', '--overwrite')
    convert('--source', source, '--dest', tmp_path / 'out', '--overwrite')
    assert tree(tmp_path / 'out') == ['00000'] + edm_names(2) + ['dataset.json']
    np.testing.assert_array_equal(read_back(tmp_path / 'out.zip')[0], random_images(2, 4, 4))
    assert sorted(os.listdir(tmp_path)) == ['imgs', 'out', 'out.zip']

    # --overwrite does not turn a file into a folder or back.
    (tmp_path / 'folder.zip').mkdir()
    result = run_tool('--source', source, '--dest', tmp_path / 'folder.zip', '--overwrite')
    assert result.exit_code == 1 and '--dest names a zip archive but is a folder' in result.output
    (tmp_path / 'file').write_text('x')
    result = run_tool('--source', source, '--dest', tmp_path / 'file', '--overwrite')
    assert result.exit_code == 1 and '--dest exists and is not a folder' in result.output


def test_existing_npz_needs_overwrite(tmp_path):
    source = write_fasta(tmp_path / 'x.fa', ['ACGT', 'TTGA'], ['a', 'b'])
    (tmp_path / 'x.npz').write_bytes(b'precious')
    result = run_tool('--source', source, '--dest', tmp_path / 'x.npz')
    assert result.exit_code == 1 and result.output.splitlines() == [
        f'Error: --dest exists (add --overwrite to replace it): {tmp_path / "x.npz"}'
    ]
    assert (tmp_path / 'x.npz').read_bytes() == b'precious'
    convert('--source', source, '--dest', tmp_path / 'x.npz', '--overwrite')
    assert sequences.decode(sequences.load_npz(str(tmp_path / 'x.npz'))[0]) == ['ACGT', 'TTGA']
    assert sorted(os.listdir(tmp_path)) == ['x.fa', 'x.npz']


def no_space_left(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fill_disk_after(monkeypatch, num_writes):
    """Simulate a disk that fills up: the first `num_writes` files of the output go through, the next write fails
    half way, and so does a close of the zip after them (its central directory no longer fits)."""
    calls = []
    writestr, close, real_open = zipfile.ZipFile.writestr, zipfile.ZipFile.close, open

    def full_writestr(self, name, data, *args, **kwargs):
        calls.append(name)
        if len(calls) > num_writes:
            writestr(self, name, data[: len(data) // 2], *args, **kwargs)
            no_space_left()
        writestr(self, name, data, *args, **kwargs)

    def full_close(self):
        writing = self.fp is not None and self.mode != 'r'
        close(self)  # The real close releases the file even when the central directory fails to go out.
        if writing and len(calls) >= num_writes:
            no_space_left()

    class HalfFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            no_space_left()

    def full_open(path, mode='r', *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if 'w' in mode:
            calls.append(path)
            if len(calls) > num_writes:
                return HalfFile(f)
        return f

    monkeypatch.setattr(zipfile.ZipFile, 'writestr', full_writestr)
    monkeypatch.setattr(zipfile.ZipFile, 'close', full_close)
    monkeypatch.setattr(dnnlib.dataset_writer, 'open', full_open, raising=False)  # The folder writer's open.


FULL_DISK_CASES = [
    *[(dest, n) for dest in ('out.zip', 'deep/new/out.zip', 'out', 'deep/new/out') for n in (0, 3, 5)],
    *[(dest, 6) for dest in ('out.zip', 'deep/new/out.zip')],  # Five images and dataset.json fit; the zip's end not.
]


@pytest.mark.parametrize('dest, num_writes', FULL_DISK_CASES)
def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, dest, num_writes):
    source = folder_of(random_images(5, 4, 4))(tmp_path)
    before = tree(tmp_path)
    fill_disk_after(monkeypatch, num_writes)
    result = run_tool('--source', source, '--dest', tmp_path / dest)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output  # No traceback.
    message = f'Error: Cannot write --dest {tmp_path / dest}: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}'
    assert result.output.splitlines()[-1] == message
    assert tree(tmp_path) == before


@pytest.mark.parametrize('dest', ['out.zip', 'out'])
def test_dataset_tool_temp_output_is_found_by_remove_stale_temp_files(tmp_path, dest):
    # A dataset_tool.py killed mid-write (os._exit skips all cleanup) leaves its temporary output, under the naming
    # of dnnlib.util.temp_path, which remove_stale_temp_files then removes.
    code = (
        'import os, sys\n'
        'from dnnlib.dataset_writer import DatasetWriter, check_dest\n'
        'writer = DatasetWriter(sys.argv[1], check_dest(sys.argv[1], False))\n'
        'writer.write("00000/img00000000.png", b"x")\n'
        'os._exit(0)\n'
    )
    subprocess.run([sys.executable, '-c', code, str(tmp_path / dest)], cwd=ROOT, check=True)
    (leftover,) = os.listdir(tmp_path)
    assert dnnlib.util.TEMP_NAME.fullmatch(leftover) and leftover.startswith(f'.{dest}.')
    assert dnnlib.util.remove_stale_temp_files(str(tmp_path)) == [leftover] and os.listdir(tmp_path) == []


def test_the_next_conversion_removes_a_killed_conversions_temp_output(tmp_path):
    # A SIGKILL cannot be caught: the next conversion to the same --dest removes what the killed one left (its writer
    # process is gone), and nothing of other destinations or of live writers.
    code = 'import os, sys\nfrom dnnlib.dataset_writer import DatasetWriter\nDatasetWriter(sys.argv[1], sys.argv[2])\nos._exit(0)\n'
    for dest, kind in [('out.zip', 'zip'), ('other.zip', 'zip'), ('out', 'folder')]:
        subprocess.run([sys.executable, '-c', code, str(tmp_path / dest), kind], cwd=ROOT, check=True)
    (killed,) = [name for name in os.listdir(tmp_path) if name.startswith('.out.zip.')]
    live = os.path.basename(dnnlib.util.temp_path(str(tmp_path / 'out.zip')))  # This process's: a live writer's.
    (tmp_path / live).write_bytes(b'')
    others = set(os.listdir(tmp_path)) - {killed}
    convert('--source', folder_of(random_images(2, 4, 4))(tmp_path), '--dest', tmp_path / 'out.zip')
    assert set(os.listdir(tmp_path)) == others | {'imgs', 'out.zip'}


# A conversion slowed to 10 ms per image, so that a signal surely arrives while it writes.
SLOW_CONVERSION = (
    'import time\n'
    'import dataset_tool\n'
    'encode_png = dataset_tool.encode_png\n'
    'dataset_tool.encode_png = lambda img: time.sleep(0.01) or encode_png(img)\n'
    'dataset_tool.main()\n'
)


def images_written(tmp_path, dest):
    """How many images the temporary output beside `dest` holds so far (0 before it exists)."""
    temps = [name for name in os.listdir(tmp_path) if dnnlib.util.TEMP_NAME.fullmatch(name)]
    if not temps:
        return 0
    path = tmp_path / temps[0]
    if dest.endswith('.zip'):
        return path.stat().st_size // 1000  # About 1 kB per 32x32 PNG.
    return len(os.listdir(path / '00000')) if (path / '00000').is_dir() else 0


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize('dest', ['out.zip', 'out'])
def test_a_signal_mid_conversion_removes_the_temporary_output(tmp_path, dest, signum):
    # Cluster schedulers send SIGTERM before they kill, Ctrl-C sends SIGINT: a real dataset_tool.py process gets one
    # while it writes images, and leaves nothing behind.
    args = [sys.executable, '-c', SLOW_CONVERSION, '--source=mnist5k', f'--dest={tmp_path / dest}']
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while images_written(tmp_path, dest) < 5 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    # SIGTERM ends it with the shell's status for that signal (128 + 15); SIGINT with click's "Aborted!".
    assert proc.returncode == (128 + signum if signum == signal.SIGTERM else 1), err
    assert 'Traceback' not in err
    assert os.listdir(tmp_path) == []


def test_a_signal_during_the_final_rename_waits_for_it(tmp_path, monkeypatch):
    # Replacing a folder takes two renames (old one aside, new one in). A SIGTERM that arrives between them is raised
    # only once the new dataset is in place, so the old one is never lost half moved.
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'old.txt').write_text('old')
    rename = os.rename

    def rename_then_signal(src, dst):
        rename(src, dst)
        os.kill(os.getpid(), signal.SIGTERM)  # Handled by the writer's handler before the next rename.

    with pytest.raises(SystemExit) as exit_info:
        with dnnlib.dataset_writer.DatasetWriter(str(tmp_path / 'out'), 'folder') as writer:
            writer.write('new.txt', b'new')
            monkeypatch.setattr(os, 'rename', rename_then_signal)
    monkeypatch.undo()
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert os.listdir(tmp_path) == ['out'] and os.listdir(tmp_path / 'out') == ['new.txt']
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # The writer's handler is gone again.


def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # `ulimit -f 128` (blocks of 512 bytes).


@pytest.mark.parametrize('dest', ['out.zip', 'deep/new/out.zip', 'out.npz'])
def test_file_size_limit_is_one_line_and_leaves_nothing(tmp_path, dest):
    # Python ignores SIGXFSZ, so a write beyond `ulimit -f` fails with EFBIG: one line, no traceback, no output.
    if dest.endswith('.npz'):
        rng = np.random.default_rng(0)
        source = write_fasta(tmp_path / 'x.fa', [''.join(rng.choice(list('ACGT'), 200)) for _ in range(2000)], None)
    else:
        source = folder_of(random_images(300, 16, 16, 3))(tmp_path)
    before = tree(tmp_path)
    args = [sys.executable, 'dataset_tool.py', f'--source={source}', f'--dest={tmp_path / dest}']
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, preexec_fn=limit_file_size)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
    message = f'Error: Cannot write --dest {tmp_path / dest}: [Errno {errno.EFBIG}] {os.strerror(errno.EFBIG)}'
    assert result.stderr.splitlines()[-1] == message
    assert tree(tmp_path) == before


def test_help_matches_committed_docs():
    env = dict(os.environ, COLUMNS='80')
    out = subprocess.run(
        [sys.executable, 'dataset_tool.py', '--help'], cwd=ROOT, env=env, capture_output=True, text=True
    )
    with open(os.path.join(ROOT, 'docs', 'dataset_tool-help.txt')) as f:
        assert out.stdout == f.read()


# Sequences: the fixed train/test split of every sequence source, and the built-in ars set of real yeast DNA.

needs_logomaker = pytest.mark.skipif(
    importlib.util.find_spec('logomaker') is None, reason='the ars source ships in the logomaker wheel'
)


def test_sequence_splits_are_disjoint_fixed_and_cover_the_file(tmp_path):
    rng = np.random.default_rng(0)
    seqs = [''.join(rng.choice(list('ACGT'), size=8)) for _ in range(20)]
    labels = ['b', 'a'] * 10
    source = write_fasta(tmp_path / 'x.fa', seqs, labels)
    got = {}
    for split in ('train', 'test'):
        convert('--source', source, '--dest', tmp_path / f'{split}.npz', f'--split={split}', '--test-fraction=0.25')
        tokens, ids, names = sequences.load_npz(str(tmp_path / f'{split}.npz'))
        rows = sequences.split_indices(20, split, 0.25)
        assert sequences.decode(tokens) == [seqs[i] for i in rows]
        assert names == ['a', 'b'] and ids.tolist() == [1 - i % 2 for i in rows]
        got[split] = rows
    assert (len(got['test']), len(got['train'])) == (5, 15)  # round(0.25 * 20) rows are held out.
    assert sorted(got['train'].tolist() + got['test'].tolist()) == list(range(20))

    # --max-images takes the first rows of the split's (shuffled) order; --split=all keeps the file's order.
    convert(
        '--source', source, '--dest', tmp_path / 'few.npz', '--split=train', '--test-fraction=0.25', '--max-images=4'
    )
    assert sequences.decode(sequences.load_npz(str(tmp_path / 'few.npz'))[0]) == [seqs[i] for i in got['train'][:4]]
    assert got['train'][:4].tolist() != sorted(got['train'][:4].tolist())
    convert('--source', source, '--dest', tmp_path / 'all.npz', '--split=all', '--max-images=4')
    assert sequences.decode(sequences.load_npz(str(tmp_path / 'all.npz'))[0]) == seqs[:4]


@pytest.mark.parametrize(
    'args, message',
    [
        (['--split=test', '--test-fraction=0.01'], 'The test split of 20 sequences at --test-fraction=0.01 is empty'),
        (['--test-fraction=0.2'], '--test-fraction applies to --split=train or --split=test'),
        (['--split=all', '--test-fraction=0.2'], '--test-fraction applies to --split=train or --split=test'),
        (['--split=train', '--test-fraction=0'], '0<x<1'),
        (['--split=train', '--test-fraction=1'], '0<x<1'),
        (['--split=valid'], "'valid' is not one of 'all', 'train', 'test'"),
    ],
)
def test_sequence_split_errors(tmp_path, args, message):
    source = write_fasta(tmp_path / 'x.fa', ['ACGT'] * 20, ['a'] * 20)
    result = run_tool('--source', source, '--dest', tmp_path / 'x.npz', *args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert not (tmp_path / 'x.npz').exists()


@pytest.mark.parametrize('args', [['--split=train'], ['--test-fraction=0.2'], ['--seq-column=seq']])
def test_sequence_options_refused_for_images(tmp_path, args):
    source = folder_of(random_images(1, 4, 4))(tmp_path)
    result = run_tool('--source', source, '--dest', tmp_path / 'out.zip', *args)
    assert result.exit_code != 0 and 'applies to sequence sources (FASTA, TSV, ars or ecoli)' in result.output
    assert not (tmp_path / 'out.zip').exists()


@pytest.fixture(scope='module')
def ars():
    names, seqs, labels = sequences.read_ars()
    assert len(seqs) == 603_569 and {len(s) for s in seqs[:1000]} == {150} and set(labels) == {'library', 'selected'}
    return seqs, labels


@needs_logomaker
def test_ars_round_trip_is_reproducible(tmp_path, ars):
    seqs, labels = ars
    args = ['--source=ars', '--max-images=200', '--length=128']
    convert(*args, '--split=train', '--dest', tmp_path / 'a.npz')
    tokens, ids, names = sequences.load_npz(str(tmp_path / 'a.npz'))
    rows = sequences.split_indices(len(seqs), 'train')[:200]
    np.testing.assert_array_equal(tokens, sequences.encode([seqs[i][11:139] for i in rows]))  # 150 -> 128 nt.
    assert names == ['library', 'selected'] and ids.tolist() == [int(labels[i] == 'selected') for i in rows]
    assert 0 < ids.sum() < 200  # Both classes in a random subset (56% of the rows are 'selected').

    convert(*args, '--split=train', '--dest', tmp_path / 'b.npz')
    assert (tmp_path / 'a.npz').read_bytes() == (tmp_path / 'b.npz').read_bytes()

    convert(*args, '--split=test', '--dest', tmp_path / 'test.npz')
    test_rows = sequences.split_indices(len(seqs), 'test')[:200]
    np.testing.assert_array_equal(
        sequences.load_npz(str(tmp_path / 'test.npz'))[0], sequences.encode([seqs[i][11:139] for i in test_rows])
    )
    train_all, test_all = sequences.split_indices(len(seqs), 'train'), sequences.split_indices(len(seqs), 'test')
    assert len(test_all) == 60_357 and not np.intersect1d(train_all, test_all).size


def test_ars_errors(tmp_path, monkeypatch):
    result = run_tool('--source=ars', '--dest', tmp_path / 'a.npz', '--label-column=TAG')
    assert result.exit_code != 0 and '--label-column applies to TSV; the ars table has fixed columns' in result.output
    result = run_tool('--source=ars', '--dest', tmp_path / 'a.zip')
    assert result.exit_code != 0 and 'Sequences are written to one .npz' in result.output

    # Without logomaker: one line saying how to install it, and no output.
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, 'find_spec', lambda name, *a: None if name == 'logomaker' else find_spec(name, *a)
    )
    result = run_tool('--source=ars', '--dest', tmp_path / 'a.npz')
    assert result.exit_code != 0 and result.output.strip().splitlines() == [
        'Error: The ARS sequences need the logomaker package: pip install --no-deps logomaker==0.8.7'
    ]
    assert list(tmp_path.iterdir()) == []
