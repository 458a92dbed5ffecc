"""Two torchrun ranks feed InfoNoise different (σ, ℓ) streams; rank 0 also replays both in one process.

The buffers are large enough never to evict, so pooling across ranks must equal one process seeing everything.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 infonoise_dist_worker.py OUT
"""

import os
import sys

import torch

from infonoise.info_noise import InfoNoise
from torch_utils import distributed as dist

KWARGS = dict(
    weight='edm',
    num_bins=16,
    buffer_size=4096,
    refresh_kimg=0.256,
    warmup_kimg=0.256,
    min_count=4,
    base='loguniform',
    floor=0.1,
)


def stream(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    sigma = torch.exp(torch.empty(32).uniform_(-6, 4, generator=gen))
    mse = sigma**2 / (0.25 + sigma**2) * (1 + 0.1 * torch.rand(32, generator=gen))
    return sigma, mse


def summary(s: InfoNoise) -> dict:
    return dict(cdf=s.table.cdf.cpu(), pivot=s.pivot, refreshes=s.refreshes)


if __name__ == '__main__':
    out = sys.argv[1]
    dist.init('cpu')
    rank = dist.get_rank()
    s = InfoNoise(**KWARGS)
    for step in range(40):
        s.observe(*stream(rank, step))
    torch.save(summary(s), os.path.join(out, f'rank{rank}.pt'))
    dist.shutdown()
    if rank == 0:
        # One process seeing both ranks' samples step by step (as one batch of 64) builds the same table.
        single = InfoNoise(**KWARGS)
        for step in range(40):
            (s0, m0), (s1, m1) = stream(0, step), stream(1, step)
            single.observe(torch.cat([s0, s1]), torch.cat([m0, m1]))
        torch.save(summary(single), os.path.join(out, 'single.pt'))
