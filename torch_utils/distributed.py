"""Process-group set-up for single-process and `torchrun` runs (EDM's torch_utils/distributed.py, made portable).

A plain `python train.py` runs as rank 0 of 1 without any process group. Under `torchrun` (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment) every process joins one group: NCCL when it trains on
CUDA, Gloo otherwise, so that the same code runs multi-process on CPU-only machines.
"""

import os
import signal
import threading
import time

import torch

from . import training_stats

_rank = 0
_local_rank = 0
_world_size = 1
_device = torch.device('cpu')


def _resolve_device(device: str | torch.device | None, local_rank: int, launched: bool) -> torch.device:
    """The device this process works on: auto picks CUDA when present; torchrun ranks get cuda:LOCAL_RANK."""
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(device)
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise RuntimeError('Device "cuda" was requested, but CUDA is not available on this machine')
        if launched:
            device = torch.device('cuda', local_rank)
        elif device.index is None:
            device = torch.device('cuda', torch.cuda.current_device())
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f'Device "{device}" does not exist; this machine has {torch.cuda.device_count()} GPUs')
    return device


def init(device: str | torch.device | None = None) -> torch.device:
    """Join the torchrun process group if there is one, pick this process's device and return it.

    `device=None` means CUDA if available, else CPU. Safe to call more than once in a process.
    """
    global _rank, _local_rank, _world_size, _device
    launched = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    device = _resolve_device(device, local_rank, launched)

    # Join the group that torchrun described in the environment.
    if launched and not torch.distributed.is_initialized():
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        torch.distributed.init_process_group(backend=backend, init_method='env://')
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        world_size = torch.distributed.get_world_size()

    _rank, _local_rank, _world_size, _device = rank, local_rank, world_size, device
    training_stats.init_multiprocessing(rank=rank, sync_device=device if world_size > 1 else None)
    return device


def get_rank() -> int:
    return _rank


def get_local_rank() -> int:
    return _local_rank


def get_world_size() -> int:
    return _world_size


def is_main() -> bool:
    """True on the process that writes files and prints (rank 0)."""
    return _rank == 0


def print0(*args, **kwargs) -> None:
    """`print` on rank 0 only."""
    if _rank == 0:
        print(*args, **kwargs)


def barrier() -> None:
    """Wait for all ranks; a no-op in a single process."""
    if _world_size > 1:
        if _device.type == 'cuda':
            torch.distributed.barrier(device_ids=[_device.index])
        else:
            torch.distributed.barrier()


def broadcast_object(obj, src: int = 0):
    """Return rank `src`'s `obj` on every rank (any picklable object, e.g. a seed drawn on rank 0)."""
    if _world_size == 1:
        return obj
    objects = [obj]
    torch.distributed.broadcast_object_list(objects, src=src, device=_device)
    return objects[0]


def split_batches(
    items: list, max_batch_size: int, rank: int | None = None, world_size: int | None = None
) -> list[list]:
    """This rank's batches of `items`, split as EDM's generate.py splits seeds: a multiple of world_size near-equal
    batches of at most max_batch_size, rank r taking batches r, r + W, ... (some may be empty). The rank and world
    size default to this process's."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    num_batches = ((len(items) - 1) // (max_batch_size * world_size) + 1) * world_size
    bounds = torch.arange(len(items)).tensor_split(num_batches)
    return [[items[i] for i in batch.tolist()] for batch in bounds[rank::world_size]]


def rank0_first(load):
    """`load()` on rank 0 before the other ranks, e.g. so that a download lands in the cache once; its result."""
    if _rank != 0:
        barrier()
    try:
        return load()
    finally:
        if _rank == 0:
            barrier()


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (any picklable object)."""
    if _world_size == 1:
        return [obj]
    objects = [None] * _world_size
    torch.distributed.all_gather_object(objects, obj)
    return objects


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    global _rank, _local_rank, _world_size
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _rank, _local_rank, _world_size = 0, 0, 1
    training_stats.init_multiprocessing(rank=0, sync_device=None)


class StopSignals:
    """SIGTERM and SIGINT ask a loop to stop cleanly instead of killing it: within the `with` block a signal only sets
    a flag, and `poll()`, called once per step on every rank, says when to stop. Ranks agree: each step's poll
    starts an all-reduce (max) of this rank's flag over a CPU (Gloo) group and acts on the previous step's result,
    so every rank stops after the same step, at most one step after the first signal, with no device sync per step.
    Cluster schedulers send SIGTERM some time before they kill; torchrun forwards the signal its workers got too, so
    repeats are the same request, except a SIGINT more than 2 s after the first (Ctrl-C again), which stops at once
    (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self.first = 0.0  # time.monotonic() of the first signal.
        self.previous: dict = {}
        self.pending = None  # (flag tensor, all-reduce work) started by the last poll.
        self.group = None

    def _handle(self, signum, frame) -> None:
        if self.signum:
            if signum == signal.SIGINT and time.monotonic() - self.first > 2:
                raise KeyboardInterrupt
            return
        self.signum, self.first = signum, time.monotonic()
        print0(f'Received {signal.Signals(signum).name}: stopping after this step (Ctrl-C again to stop at once)')

    def __enter__(self) -> 'StopSignals':
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only.
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        if _world_size > 1:
            nccl = torch.distributed.get_backend() != 'gloo'
            self.group = torch.distributed.new_group(backend='gloo') if nccl else torch.distributed.group.WORLD
        return self

    def __exit__(self, *exc) -> None:
        if self.pending is not None and exc[0] is None:
            self.pending[1].wait()  # Leave no collective in flight.
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def poll(self) -> int:
        """0 to go on; else the signal number on which every rank stops now."""
        if _world_size == 1:
            return self.signum
        decided = 0
        if self.pending is not None:
            self.pending[1].wait()
            decided = int(self.pending[0])  # A CPU tensor: no device sync.
        if not decided:
            flag = torch.tensor(self.signum, dtype=torch.int64)
            work = torch.distributed.all_reduce(
                flag, op=torch.distributed.ReduceOp.MAX, group=self.group, async_op=True
            )
            self.pending = (flag, work)
        return decided
