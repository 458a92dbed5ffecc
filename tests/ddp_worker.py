"""Run train.py's CLI in one torchrun rank and save that rank's final weights: ddp_worker.py OUT [train.py args]."""

import os
import sys

import torch

import dnnlib
import train
from training import training_loop

if __name__ == '__main__':
    out, args = sys.argv[1], sys.argv[2:]
    result = dnnlib.EasyDict()
    loop = training_loop.training_loop

    def capture(**kwargs):
        result.update(loop(**kwargs))
        return result

    training_loop.training_loop = capture
    train.main(args, standalone_mode=False)
    net, ema, sampler = result['net'].state_dict(), result['ema'].state_dict(), result['noise_sampler'].state_dict()
    state = dict(net=net, ema=ema, noise_sampler=sampler, cur_nimg=result['cur_nimg'])
    torch.save(state, os.path.join(out, f'rank{os.environ["RANK"]}.pt'))
