"""Small PyTorch helpers used by the training loop (EDM's torch_utils/misc.py, rewritten).

`InfiniteSampler` differs from EDM's on purpose: EDM reshuffles a sliding window as it goes, so the data order at
image n can only be reached by replaying the first n draws. Ours is random-access (see its docstring), which lets
a resumed run continue the exact data order of the uninterrupted run.
"""

import contextlib
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np
import psutil
import torch

import dnnlib


class InfiniteSampler(torch.utils.data.Sampler):
    """The data order: an endless, random-access stream of dataset indices, split over ranks.

    Global positions i = start_idx, start_idx + 1, ... map to dataset items: with N = len(dataset) and lap L = i // N,
    position i holds perm_L[i % N], where perm_L is the permutation drawn by `np.random.RandomState([seed, L])` (the
    identity when `shuffle=False`). Every lap therefore visits every item exactly once, and each lap has its own order.
    Rank r yields the positions with i % num_replicas == r, so the ranks together consume the positions in order. After
    the whole job has consumed `cur_nimg` images (all ranks together, a multiple of num_replicas), an InfiniteSampler
    built with `start_idx=cur_nimg` continues exactly where the uninterrupted run would have gone on.
    """

    def __init__(
        self, dataset, rank: int = 0, num_replicas: int = 1, shuffle: bool = True, seed: int = 0, start_idx: int = 0
    ):
        if len(dataset) == 0:
            raise ValueError('InfiniteSampler needs a non-empty dataset')
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f'Invalid rank {rank} for {num_replicas} replicas')
        if start_idx < 0:
            raise ValueError(f'start_idx must be non-negative, got {start_idx}')
        self.dataset = dataset
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.start_idx = start_idx

    def permutation(self, lap: int) -> np.ndarray:
        """The item order of lap `lap`."""
        size = len(self.dataset)
        if not self.shuffle:
            return np.arange(size)
        return np.random.RandomState([self.seed % (1 << 32), lap]).permutation(size)

    def __iter__(self) -> Iterator[int]:
        size = len(self.dataset)
        idx = self.start_idx + (self.rank - self.start_idx) % self.num_replicas
        lap, order = None, None
        while True:
            if idx // size != lap:
                lap = idx // size
                order = self.permutation(lap)
            yield int(order[idx % size])
            idx += self.num_replicas


def named_params_and_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(src_module: torch.nn.Module, dst_module: torch.nn.Module, require_all: bool = False):
    """Copy parameters and buffers from `src_module` into the same-named tensors of `dst_module`.

    Names missing from the source are left alone unless `require_all`, which makes them an error.
    """
    src_tensors = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        if name not in src_tensors:
            if require_all:
                raise ValueError(f'Source network has no tensor "{name}"')
            continue
        if src_tensors[name].shape != tensor.shape:
            raise ValueError(f'Shape mismatch for "{name}": {list(src_tensors[name].shape)} vs {list(tensor.shape)}')
        tensor.copy_(src_tensors[name])


@contextlib.contextmanager
def ddp_sync(module: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce inside the block when `sync` is False (for gradient accumulation)."""
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield


def check_ddp_consistency(module: torch.nn.Module, ignore_regex: str | None = None) -> None:
    """Check that every parameter and buffer equals rank 0's copy; raise RuntimeError on every rank if not.

    NaN counts as equal to NaN. Names are '<ModuleClass>.<tensor name>'; those matching `ignore_regex` are skipped.
    A collective call: all ranks must make it. A no-op without a process group.
    """
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    names, mismatches = [], []
    for name, tensor in named_params_and_buffers(module):
        fullname = f'{type(module).__name__}.{name}'
        if ignore_regex is not None and re.fullmatch(ignore_regex, fullname):
            continue
        tensor = tensor.detach()
        other = tensor.clone()
        torch.distributed.broadcast(tensor=other, src=0)
        equal = tensor == other
        if tensor.is_floating_point():
            equal |= tensor.isnan() & other.isnan()
        names.append(fullname)
        mismatches.append(~equal.all())
    if not names:
        return

    # Let every rank learn which tensors differ on any rank, so that all of them raise together.
    mismatches = torch.stack(mismatches).to(torch.int32)
    torch.distributed.all_reduce(mismatches, op=torch.distributed.ReduceOp.MAX)
    bad = [name for name, flag in zip(names, mismatches.tolist()) if flag]
    if bad:
        raise RuntimeError(f'DDP consistency check failed: {len(bad)} tensors differ across ranks, first "{bad[0]}"')


def assert_shape(tensor: torch.Tensor, ref_shape: Sequence[int | None]) -> None:
    """Raise AssertionError unless `tensor.shape` matches `ref_shape` (None matches any size)."""
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}')
    for idx, (size, ref_size) in enumerate(zip(tensor.shape, ref_shape)):
        if ref_size is not None and size != ref_size:
            raise AssertionError(f'Wrong size for dimension {idx}: got {size}, expected {ref_size}')


def print_module_summary(module: torch.nn.Module, inputs: Sequence, max_nesting: int = 3, skip_redundant: bool = True):
    """Run `module(*inputs)` once and print a table of submodules: parameters, buffers, output shape and dtype.

    Submodules deeper than `max_nesting` are folded into their parents; with `skip_redundant`, rows that add no
    new parameters, buffers or outputs are left out. Returns the module's outputs.
    """
    # Record every call that returns at a nesting depth we print.
    entries = []
    depth = [0]

    def pre_hook(_mod, _inputs):
        depth[0] += 1

    def post_hook(mod, _inputs, outputs):
        depth[0] -= 1
        if depth[0] <= max_nesting:
            outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            entries.append(dnnlib.EasyDict(mod=mod, outputs=[t for t in outputs if isinstance(t, torch.Tensor)]))

    hooks = [mod.register_forward_pre_hook(pre_hook) for mod in module.modules()]
    hooks += [mod.register_forward_hook(post_hook) for mod in module.modules()]
    try:
        outputs = module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()

    # Attribute each tensor to the first (innermost) entry that owns it.
    seen = set()
    for e in entries:
        e.params = [t for t in e.mod.parameters() if id(t) not in seen]
        e.buffers = [t for t in e.mod.buffers() if id(t) not in seen]
        e.new_outputs = [t for t in e.outputs if id(t) not in seen]
        seen |= {id(t) for t in e.params + e.buffers + e.new_outputs}
    if skip_redundant:
        entries = [e for e in entries if e.params or e.buffers or e.new_outputs]

    # Build the table.
    names = {mod: name for name, mod in module.named_modules()}
    rows = [[type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype'], ['---'] * 5]
    param_total = buffer_total = 0
    for e in entries:
        name = '<top-level>' if e.mod is module else names[e.mod]
        num_params = sum(t.numel() for t in e.params)
        num_buffers = sum(t.numel() for t in e.buffers)
        shapes = [str(list(t.shape)) for t in e.outputs] or ['-']
        dtypes = [str(t.dtype).split('.')[-1] for t in e.outputs] or ['-']
        suffix = ':0' if len(e.outputs) >= 2 else ''
        rows.append([name + suffix, str(num_params or '-'), str(num_buffers or '-'), shapes[0], dtypes[0]])
        rows += [[f'{name}:{idx}', '-', '-', shapes[idx], dtypes[idx]] for idx in range(1, len(e.outputs))]
        param_total += num_params
        buffer_total += num_buffers
    rows += [['---'] * 5, ['Total', str(param_total), str(buffer_total), '-', '-']]

    widths = [max(len(cell) for cell in column) for column in zip(*rows)]
    print()
    for row in rows:
        print('  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print()
    return outputs


def set_cpu_threads(local_processes: int | None = None, window: float = 0.5) -> str:
    """Set torch's CPU threads for this process and say how they were chosen. OMP_NUM_THREADS, if set, decides.
    Otherwise: the CPUs this process may run on, shared among the `local_processes` of this machine (default:
    torchrun's LOCAL_WORLD_SIZE, else 1), less the CPUs other programs keep busy (measured over `window` seconds).
    torch's default, one thread per core, makes every operation wait for its slowest thread, and on a busy machine
    some thread is always descheduled: on 2 cores with another job running, training ran 4-6x slower with 2 threads
    than with 1 (bench/threads.py measures it)."""
    if os.environ.get('OMP_NUM_THREADS'):
        return f'{torch.get_num_threads()} (OMP_NUM_THREADS)'
    local_processes = local_processes or int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else list(range(os.cpu_count() or 1))
    percent = psutil.cpu_percent(interval=window, percpu=True)
    busy = sum(percent[i] for i in cpus if i < len(percent)) / 100
    threads = max(1, min(len(cpus) // local_processes, round(len(cpus) - busy) // local_processes))
    torch.set_num_threads(threads)
    return (
        f'{threads} ({len(cpus)} CPUs, {busy:.1f} busy, {local_processes} process(es); set OMP_NUM_THREADS to choose)'
    )
