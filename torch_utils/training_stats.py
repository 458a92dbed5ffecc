"""Cheap reporting of scalar training statistics, collected across devices and processes (EDM's training_stats).

`report(name, value)` can be called anywhere (loss, network, loop): it only adds the float64 moments
[count, sum, sum of squares] of `value` to a counter on the value's own device, so it never waits for the GPU.
A `Collector` turns the counters into means and standard deviations over the period between two `update()` calls;
`update()` is the only place that copies to the host and, with several processes, all-reduces the moments.

Every process must report each name at least once, in the same order (an empty list counts), because the
all-reduce sums one row per name; `report0` does exactly that on ranks other than 0.
"""

import math
import re

import torch

import dnnlib

_num_moments = 3  # [count, sum, sum of squares].
_counter_dtype = torch.float64
_rank = 0  # Rank of this process.
_sync_device = None  # Device for the cross-process all-reduce; None = single process.
_counters = dict()  # name => device => moments accumulated since the last sync.
_cumulative = dict()  # name => moments on the CPU, summed over all devices and processes since the start.


def init_multiprocessing(rank: int, sync_device: torch.device | None) -> None:
    """Set this process's rank and the device used for all-reduce (None = no cross-process collection).

    Call after `torch.distributed.init_process_group()`; the sync device must suit the backend (CUDA for NCCL,
    CPU for Gloo).
    """
    global _rank, _sync_device
    _rank = rank
    _sync_device = sync_device


def report(name: str, value):
    """Add the scalars in `value` (tensor, array, list or number) to statistic `name`; return `value` unchanged."""
    if name not in _counters:
        _counters[name] = dict()
    elems = torch.as_tensor(value)
    if elems.numel() == 0:
        return value

    # Reduce on the value's device; nothing here waits for the device.
    elems = elems.detach().flatten().to(_counter_dtype)
    moments = torch.stack([elems.new_full([], elems.numel()), elems.sum(), elems.square().sum()])
    counters = _counters[name]
    if moments.device not in counters:
        counters[moments.device] = torch.zeros_like(moments)
    counters[moments.device].add_(moments)
    return value


def report0(name: str, value):
    """Like `report`, but only rank 0's scalars count (other ranks report an empty set)."""
    report(name, value if _rank == 0 else [])
    return value


def _sync(names: list[str]) -> list[tuple[str, torch.Tensor]]:
    """Move the per-device counters of `names` into the global cumulative moments and return those."""
    if len(names) == 0:
        return []

    # Sum this process's devices, resetting their counters.
    device = _sync_device if _sync_device is not None else torch.device('cpu')
    deltas = []
    for name in names:
        delta = torch.zeros([_num_moments], dtype=_counter_dtype, device=device)
        for counter in _counters[name].values():
            delta.add_(counter.to(device))
            counter.zero_()
        deltas.append(delta)
    deltas = torch.stack(deltas)

    # Sum over processes.
    if _sync_device is not None:
        torch.distributed.all_reduce(deltas)

    deltas = deltas.cpu()
    for idx, name in enumerate(names):
        if name not in _cumulative:
            _cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        _cumulative[name].add_(deltas[idx])
    return [(name, _cumulative[name]) for name in names]


class Collector:
    """Means and standard deviations of the reported statistics matching `regex`, between the last two updates.

    With `keep_previous=True` a statistic that received nothing since the previous `update()` keeps its old values;
    otherwise it reads as empty (num 0, mean and std NaN). Constructing a collector calls `update()`, so with several
    processes every rank must construct it.
    """

    def __init__(self, regex: str = '.*', keep_previous: bool = True):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._cumulative = dict()
        self._moments = dict()

        # Start counting from now: absorb what was reported before this collector existed.
        self.update()
        self._moments.clear()

    def names(self) -> list[str]:
        """Names of all statistics reported so far that match the regex, in first-report order."""
        return [name for name in _counters if self._regex.fullmatch(name)]

    def update(self) -> None:
        """Take the moments reported since the previous call (all devices and processes) as the visible values.

        With several processes this is a collective call: every rank must call it.
        """
        if not self._keep_previous:
            self._moments.clear()
        for name, cumulative in _sync(self.names()):
            if name not in self._cumulative:
                self._cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
            delta = cumulative - self._cumulative[name]
            self._cumulative[name].copy_(cumulative)
            if float(delta[0]) != 0:
                self._moments[name] = delta

    def _delta(self, name: str) -> torch.Tensor:
        if not self._regex.fullmatch(name):
            raise KeyError(f'Statistic "{name}" does not match this collector\'s regex "{self._regex.pattern}"')
        return self._moments.get(name, torch.zeros([_num_moments], dtype=_counter_dtype))

    def num(self, name: str) -> int:
        """Number of scalars collected for `name` (0 if none)."""
        return int(self._delta(name)[0])

    def mean(self, name: str) -> float:
        """Mean of the scalars collected for `name` (NaN if none)."""
        count, total, _ = self._delta(name).tolist()
        return total / count if count else float('nan')

    def std(self, name: str) -> float:
        """Population standard deviation √max(E[x²] − E[x]², 0) of the scalars for `name` (NaN if none)."""
        count, total, total_sq = self._delta(name).tolist()
        if count == 0 or not math.isfinite(total):
            return float('nan')
        if count == 1:
            return 0.0
        mean = total / count
        return math.sqrt(max(total_sq / count - mean**2, 0))

    def as_dict(self) -> dnnlib.EasyDict:
        """{name: {num, mean, std}} for every matching statistic, ready for a stats.jsonl line."""
        return dnnlib.EasyDict(
            {
                name: dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
                for name in self.names()
            }
        )

    def __getitem__(self, name: str) -> float:
        """`collector[name]` is `collector.mean(name)`."""
        return self.mean(name)


default_collector = Collector(regex='.*', keep_previous=False)
