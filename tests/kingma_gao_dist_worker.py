"""Two torchrun ranks feed KingmaGao different (σ, ℓ) streams; rank 0 also replays both in one process.

Refreshes all-reduce the per-bin sums and counts, so both ranks build the same law, and it is the law of one process
that saw everything.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 kingma_gao_dist_worker.py OUT
"""

import os
import sys

import torch

from infonoise.kingma_gao import KingmaGao
from torch_utils import distributed as dist

KWARGS = dict(weight='edm', num_bins=16, refresh_kimg=0.256, warmup_kimg=0.256, base='loguniform')


def stream(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    sigma = torch.exp(torch.empty(32).uniform_(-6, 4, generator=gen))
    return sigma, sigma**2 / (0.25 + sigma**2) * (1 + 0.1 * torch.rand(32, generator=gen))


def summary(s: KingmaGao) -> dict:
    return dict(g=s.table.g.clone(), refreshes=s.refreshes)


if __name__ == '__main__':
    out = sys.argv[1]
    dist.init('cpu')
    rank = dist.get_rank()
    s = KingmaGao(**KWARGS)
    for step in range(40):
        s.observe(*stream(rank, step))
    torch.save(summary(s), os.path.join(out, f'rank{rank}.pt'))
    dist.shutdown()
    if rank == 0:
        single = KingmaGao(**KWARGS)
        for step in range(40):
            (s0, m0), (s1, m1) = stream(0, step), stream(1, step)
            single.observe(torch.cat([s0, s1]), torch.cat([m0, m1]))
        torch.save(summary(single), os.path.join(out, 'single.pt'))
