"""What the three examples share and is not the point of any of them: data, network size, EMA, saving samples."""

import os
import sys

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repository's packages.
from training.dataset import ImageFolderDataset  # noqa: E402

# A 0.75 M-parameter DDPM++ (EDM's SongUNet) for 16x16 images: the CPU demo's network.
UNET_KWARGS = dict(
    model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0, resample_filter=[1, 1]
)


def load_images(path: str) -> torch.Tensor:
    """All images of a dataset_tool.py zip or folder as float [N, C, H, W] in [-1, 1]."""
    if not os.path.exists(path):
        raise SystemExit(f'--data: no such file "{path}" (make it: python dataset_tool.py --source=mnist5k '
                         '--dest=datasets/mnist5k-16x16.zip --resolution=16x16)')  # fmt: skip
    dataset = ImageFolderDataset(path)
    images = np.stack([dataset[i][0] for i in range(len(dataset))])
    return torch.from_numpy(images).to(torch.float32) / 127.5 - 1


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, batch: int, half_life_kimg: float = 5.0) -> None:
    """EMA of the weights with a half-life in images, as EDM's ema_halflife_kimg."""
    beta = 0.5 ** (batch / (half_life_kimg * 1000))
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p.detach(), 1 - beta)


# Command-line options the examples share, by name.
OPTIONS = {
    'data': click.option('--data', help='MNIST-5k 16x16 (dataset_tool.py zip)', default='datasets/mnist5k-16x16.zip'),
    'steps': click.option('--steps', help='Training steps', type=click.IntRange(min=1), default=1500),
    'batch': click.option('--batch', help='Batch size', type=click.IntRange(min=1), default=64),
    'warmup_steps': click.option('--warmup-steps', help='InfoNoise: steps under the base noise sampler', type=click.IntRange(min=0), default=150),
    'refresh_steps': click.option('--refresh-steps', help='InfoNoise: steps between refreshes', type=click.IntRange(min=1), default=30),
    'bins': click.option('--bins', help='InfoNoise: intervals K', type=click.IntRange(min=2), default=32),
    'min_count': click.option('--min-count', help='InfoNoise: losses per interval before a refresh', type=click.IntRange(min=1), default=8),
}  # fmt: skip


def with_options(*names: str):
    """Decorate a click command with the shared options `names`, in that order."""

    def decorate(function):
        for name in reversed(names):
            function = OPTIONS[name](function)
        return function

    return decorate
