"""Worker for tests/test_torch_utils.py: two CPU processes under torchrun (Gloo) exercise the cross-rank helpers.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_stats_worker.py OUT_DIR
Each rank writes OUT_DIR/rank<r>.json with what it observed; the test checks the numbers.
"""

import gc
import json
import os
import sys

import torch

from torch_utils import distributed as dist
from torch_utils import misc, training_stats

# Values each rank reports; the test knows them too.
RANK_VALUES = {0: [1.0, 2.0, 3.0], 1: [10.0, 20.0]}


def check_consistency(module, **kwargs) -> str | None:
    """Run check_ddp_consistency and return its error message, or None if it passed."""
    try:
        misc.check_ddp_consistency(module, **kwargs)
    except RuntimeError as e:
        return str(e)
    return None


def main(out_dir: str) -> None:
    device = dist.init('cpu')
    rank = dist.get_rank()
    result = dict(rank=rank, world=dist.get_world_size(), local_rank=dist.get_local_rank(), device=str(device))
    result['process_group'] = torch.distributed.is_initialized() and torch.distributed.get_backend()

    # Statistics reduced over both ranks (a collector counts what is reported after its construction).
    collector = training_stats.Collector(regex='Test/.*')
    training_stats.report('Test/values', torch.tensor(RANK_VALUES[rank]))
    training_stats.report0('Test/rank0_only', 5.0 + rank)
    collector.update()
    result['stats'] = collector.as_dict()

    # Rank 0's object reaches every rank.
    result['broadcast'] = dist.broadcast_object({'seed': 1234} if rank == 0 else None)

    # Consistency: equal modules pass, a deliberate mismatch on rank 1 fails on both ranks.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        net[0].weight[0, 0] = float('nan')
    result['consistent'] = check_consistency(net)
    with torch.no_grad():
        if rank == 1:
            net[0].bias[1] += 1
    result['mismatch'] = check_consistency(net)
    result['mismatch_ignored'] = check_consistency(net, ignore_regex=r'.*\.0\.bias')

    # DDP gradient sync only when asked: local gradients inside no_sync, averaged ones otherwise.
    torch.manual_seed(0)
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1, bias=False))
    x = torch.full([1, 2], float(rank + 1))
    for sync in (False, True):
        ddp.zero_grad(set_to_none=True)
        with misc.ddp_sync(ddp, sync):
            ddp(x).sum().backward()
        result[f'grad_sync_{sync}'] = ddp.module.weight.grad.flatten().tolist()

    # Release DDP (its reducer holds Gloo work and tensors) before leaving the group: torn down at interpreter exit
    # after the group, it occasionally aborted rank 1 with "terminate called without an active exception".
    del ddp
    gc.collect()
    dist.barrier()
    with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump(result, f)
    dist.shutdown()


if __name__ == '__main__':
    main(sys.argv[1])
