"""Shared pieces of the benchmark scripts (the paper's claims at CPU scale, docs/results.md): run records, strict
JSON, Markdown tables, the datasets, and Fréchet distances of generated samples.

FD-MNIST is the Fréchet distance between the features of the small MNIST CNN (`metrics/mnist_detector.py`) of
generated images and of all images of the training set, as `fid.py ref/calc --detector=mnist` compute it; the
samples come from EDM's Heun solver (Karras et al. 2022, Algorithm 2) with one generator per seed and are thresholded
for binarized data exactly as `generate.py --binarize` does. FD-ARS is the same for DNA: the features of the ARS
sequence CNN (`metrics/dna_detector.py`) of generated sequences, each decoded to its nearest one-hot sequence as
generate.py writes it, against all training sequences.
"""

import datetime
import json
import math
import os
import shlex
import subprocess
import sys
import time

import click
import numpy as np
import torch

import fid
from metrics.detectors import load_detector
from metrics.frechet import FeatureStats, frechet_distance, load_stats, save_stats
from training import sequences
from training.networks_1d import SequenceUNet
from training.sampling import generate_images, images_to_uint8

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join('datasets', 'mnist5k-16x16.zip')
DEFAULT_BDATA = os.path.join('datasets', 'bmnist5k-16x16.zip')
DEFAULT_DNA = os.path.join('datasets', 'ars-128-train20k.npz')
# How dataset_tool.py builds each default data set.
DATASET_SOURCES = {
    'mnist': ('--source=mnist5k', '--resolution=16x16'),
    'bmnist': ('--source=mnist5k', '--resolution=16x16', '--binarize=threshold'),
    # The ARS yeast sequences' centre 128 nt, 20,000 of the training split (the detector's held-out rows excluded).
    'dna': ('--source=ars', '--length=128', '--split=train', '--max-images=20000'),
}
GENERATE_BATCH = 250  # Images per solver call and per detector batch.


def parse_nfe(ctx, param, value: str) -> list[int]:
    """--nfe: comma-separated network-evaluation budgets, sorted and unique; `num_steps_for` checks each per solver."""
    try:
        nfe = sorted({int(v) for v in value.split(',') if v.strip()})
    except ValueError:
        raise click.BadParameter(f'expected comma-separated integers, got "{value}"') from None
    if not nfe or nfe[0] < 1:
        raise click.BadParameter('need at least one NFE, all positive')
    return nfe


def apply_quick(ctx: click.Context, opts: dict, quick_values: dict) -> None:
    """With --quick, replace the defaults of the options the user did not set by their quick values."""
    for name, value in quick_values.items():
        if ctx.get_parameter_source(name) == click.core.ParameterSource.DEFAULT:
            opts[name] = value


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall-clock timings cover it."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(['git', *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def run_record(module: str, start_time: float, device: torch.device) -> dict:
    """Date, git commit (and whether the tree had local changes), command line, wall time and machine of a run."""
    commit = _git('rev-parse', 'HEAD')
    status = _git('status', '--porcelain', '--untracked-files=no')
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        git_commit=commit.strip() if commit else None,
        git_dirty=bool(status.strip()) if status is not None else None,
        command=shlex.join(['python', '-m', module, *sys.argv[1:]]),
        wall_seconds=time.time() - start_time,
        device=str(device),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpus=os.cpu_count(),
    )


def finite_or_none(obj):
    """`obj` with every NaN or infinity replaced by None (strict JSON has neither), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(key): finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(value) for value in obj]
    return obj


def write_json(path: str, obj) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(finite_or_none(obj), f, indent=2, allow_nan=False)


def read_json(path: str, default):
    """The JSON in `path`, or `default` when the file is missing or unreadable (a cache that starts over)."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return default


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
    lines += ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]
    return '\n'.join(lines)


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with `digits` significant digits (all integer digits of a larger one), or an em dash if missing."""
    if value is None or not math.isfinite(value):
        return '—'
    return f'{value:.0f}' if abs(value) >= 10**digits else f'{value:.{digits}g}'


def ensure_dataset(path: str, source_args: tuple[str, ...]) -> None:
    """Build a data set with `dataset_tool.py SOURCE_ARGS --dest=PATH` (DATASET_SOURCES), unless `path` exists."""
    if os.path.exists(path):
        return
    command = [sys.executable, 'dataset_tool.py', *source_args, f'--dest={os.path.abspath(path)}']
    click.echo(f'Building {path}: {shlex.join(command[1:])}')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip() or 'no output').splitlines()[-1]
        raise click.ClickException(f'dataset_tool.py failed to build {path}: {last}')


def generate_uint8(
    net, seeds: list[int], sigmas: torch.Tensor, solver: str, binarize: bool, device: torch.device
) -> torch.Tensor:
    """uint8 NCHW images of `seeds` from EDM's deterministic Heun solver on the σ-grid `sigmas`, drawn by generate.py's
    `generate_images`; for a sequence network, one-hot sequences uint8 [N, 4, 1, L] (255 at the nearest base, as
    generate.py decodes)."""
    if net.label_dim:
        raise ValueError('The benchmarks evaluate unconditional networks only')
    is_sequence = isinstance(net.model, SequenceUNet)
    batches = []
    for _, images, _ in generate_images(net, seeds, sigmas, device, GENERATE_BATCH, progress=False, solver=solver,
                                        binarize=binarize and not is_sequence):  # fmt: skip
        if is_sequence:
            batches.append(torch.from_numpy(sequences.one_hot(sequences.to_tokens(images))))
        else:
            batches.append(torch.from_numpy(images_to_uint8(images)).permute(0, 3, 1, 2))
    return torch.cat(batches)


class FrechetScore:
    """The Fréchet distance of a detector's features against those of a fixed reference set (all training images or
    sequences), whose statistics are cached in an npz file."""

    def __init__(self, detector, reference: torch.Tensor, source: str, cache_path: str, device: torch.device):
        self.device, self.detector, self.reference = device, detector, reference
        if not os.path.isfile(cache_path) or os.path.getmtime(cache_path) < os.path.getmtime(source):
            save_stats(cache_path, *self.stats(reference))
        self.ref = load_stats(cache_path)

    def stats(self, samples: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (float64) of the detector features of uint8 samples, as fid.py."""
        stats = FeatureStats()
        for chunk in samples.split(GENERATE_BATCH):
            stats.append(self.detector(chunk.to(self.device)))
        return stats.mu, stats.sigma

    def __call__(self, samples: torch.Tensor) -> float:
        """The Fréchet distance of uint8 samples (NCHW images, or one-hot sequences [N, 4, 1, L])."""
        return frechet_distance(*self.stats(samples), *self.ref)

    def real_floor(self, num_samples: int, seed: int = 0) -> float:
        """The score of `num_samples` random reference samples: what a perfect generator scores at that size."""
        order = np.random.RandomState(seed).permutation(len(self.reference))[:num_samples]
        return self(self.reference[torch.from_numpy(order)])


def fd_mnist_score(data: str, cache_path: str, device: torch.device) -> FrechetScore:
    """FD-MNIST against all images of an image data set (zip or folder)."""
    dataset = fid.open_images(data)
    images = torch.from_numpy(np.stack([dataset[i][0] for i in range(len(dataset))]))
    return FrechetScore(load_detector('mnist', device), images, data, cache_path, device)


def ars_held_out(length: int, num: int) -> np.ndarray:
    """Base indices [num, length] of the first `num` sequences of the ARS test split (dataset_tool.py --source=ars
    --split=test --length=LENGTH --max-images=NUM): real sequences the benchmark networks never train on."""
    _, seqs, _ = sequences.read_ars()
    rows = sequences.split_indices(len(seqs), 'test')[:num]
    return sequences.encode([seqs[i] for i in rows], length=length)


def fd_ars_score(data: str, cache_path: str, device: torch.device) -> FrechetScore:
    """FD-ARS against all sequences of a sequence data set (.npz)."""
    tokens = sequences.load_npz(data)[0]
    detector = load_detector('ars', device, sequence_length=tokens.shape[1])
    return FrechetScore(detector, torch.from_numpy(sequences.one_hot(tokens)), data, cache_path, device)
