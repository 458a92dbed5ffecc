"""FD-MNIST: the Fréchet distance in the features of the small MNIST CNN (metrics/mnist_detector.py).

Prints, for a digit dataset (e.g. `make demo`'s datasets/mnist5k-16x16.zip):
- the FD between two random halves of the dataset (the floor a perfect generator would reach at that size);
- with --images (a folder, zip or generate.py --npz), the FD of those images against the whole dataset, as
  `fid.py calc --detector=mnist` computes it against `fid.py ref --detector=mnist`, next to the FD of as many
  real images (the floor at that sample size);
- the wall time of one FD evaluation of --eval-size images: features of the images, their statistics, and the
  distance to precomputed reference statistics (what a training-time evaluation costs).

    python -m bench.fd_mnist --data=datasets/mnist5k-16x16.zip --images=runs/demo/.../samples.npz
"""

import time

import click
import numpy as np
import torch

import fid
from metrics.detectors import load_detector
from metrics.frechet import frechet_distance


def stats_of(dataset, detector, batch: int):
    return fid.calc_stats(dataset, detector, max_batch_size=batch, num_workers=0, device=torch.device('cpu'))


@click.command()
@click.option('--data', help='Digit dataset (folder or zip)', metavar='PATH', required=True)
@click.option('--images', help='Generated images to score (folder, zip or npz)', metavar='PATH')
@click.option('--detector', 'detector_spec', help='Feature detector', default='mnist', show_default=True)
@click.option(
    '--eval-size', help='Images in the timed evaluation', type=click.IntRange(min=2), default=1000, show_default=True
)
@click.option('--batch', help='Batch size', type=click.IntRange(min=1), default=250, show_default=True)
@click.option('--seed', help='Seed of the half split', type=int, default=0, show_default=True)
def main(data, images, detector_spec, eval_size, batch, seed):
    """FD-MNIST: half vs half of the data, generated images vs the data, and the time of one evaluation."""
    detector = load_detector(detector_spec, torch.device('cpu'))
    dataset = fid.load_images(data)
    order = np.random.RandomState(seed).permutation(len(dataset))
    half = len(dataset) // 2
    halves = [torch.utils.data.Subset(dataset, order[:half]), torch.utils.data.Subset(dataset, order[half : 2 * half])]
    fd_halves = frechet_distance(*stats_of(halves[0], detector, batch), *stats_of(halves[1], detector, batch))
    print(f'{dataset.name}: {len(dataset)} images, detector {detector_spec} ({detector.feature_dim} features)')
    print(f'FD half vs half ({half} vs {half}, split seed {seed}): {fd_halves:.4f}')

    ref = stats_of(dataset, detector, batch)
    if images is not None:
        generated = fid.load_images(images)
        value = frechet_distance(*stats_of(generated, detector, batch), *ref)
        print(f'FD {images} ({len(generated)} images) vs all data: {value:.4f}')
        same_size = torch.utils.data.Subset(dataset, order[: len(generated)])
        value = frechet_distance(*stats_of(same_size, detector, batch), *ref)
        print(f'FD of {len(same_size)} data images vs all data (the floor at that size): {value:.4f}')

    # One evaluation: features and statistics of eval_size images, and the distance to the reference.
    subset = torch.utils.data.Subset(dataset, order[:eval_size])
    start = time.perf_counter()
    value = frechet_distance(*stats_of(subset, detector, batch), *ref)
    seconds = time.perf_counter() - start
    print(
        f'One FD evaluation of {len(subset)} images: {seconds:.2f} s (FD of that data subset vs all data: {value:.4f})'
    )


if __name__ == '__main__':
    main()
