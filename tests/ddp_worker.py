"""One torchrun rank of a training test; saves what this rank ended with to OUT/rank<RANK>.pt.

    ddp_worker.py OUT CONFIG.json       training_loop(**CONFIG) on the CPU (CONFIG: the loop's keyword arguments)
    ddp_worker.py OUT [train.py args]   train.py's command line

The file holds the rank's final net, EMA and noise sampler state and cur_nimg, its first two optimizer steps as the
optimizer saw them (`loop_probe.record_steps`) and, for a resumed run, the noise sampler state just after loading.
"""

import json
import os
import sys

import torch
from loop_probe import record_restore, record_steps

import dnnlib
import train
from torch_utils import distributed as dist
from training import training_loop

if __name__ == '__main__':
    out, args = sys.argv[1], sys.argv[2:]
    result = dnnlib.EasyDict()
    loop = training_loop.training_loop

    def capture(**kwargs):
        result.update(loop(**kwargs))
        return result

    with record_steps() as steps, record_restore() as restored:
        if args[0].endswith('.json'):
            device = dist.init('cpu')
            with open(args[0]) as f:
                capture(**json.load(f), device=device)
            dist.shutdown()
        else:
            training_loop.training_loop = capture
            train.main(args, standalone_mode=False)
    net, ema, sampler = result['net'].state_dict(), result['ema'].state_dict(), result['noise_sampler'].state_dict()
    state = dict(net=net, ema=ema, noise_sampler=sampler, cur_nimg=result['cur_nimg'], steps=steps)
    state.update(restored_noise_sampler=restored.get('noise_sampler'))
    torch.save(state, os.path.join(out, f'rank{os.environ["RANK"]}.pt'))
