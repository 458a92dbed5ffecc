"""Live training curves: the loss per σ-interval (into training_stats, hence stats.jsonl) and, with train.py
--tensorboard, every tick's statistics as TensorBoard scalars plus InfoNoise's learned profile as a figure at each
refresh (torch.utils.tensorboard; the `tensorboard` package is optional, see requirements-extras.txt).
"""

import importlib.util
import math

import torch

from torch_utils import distributed as dist
from torch_utils import training_stats

TENSORBOARD_PIN = 'tensorboard==2.20.0'
SIGMA_BIN_EDGES = (0.002, 0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0)  # Reported intervals of σ (EDM's range).


def tensorboard_missing() -> str | None:
    """The one-line error for --tensorboard without the package; None if it is installed."""
    if importlib.util.find_spec('tensorboard') is None:
        return (
            f'--tensorboard needs the tensorboard package: pip install {TENSORBOARD_PIN} (see requirements-extras.txt)'
        )
    return None


def sigma_bin_name(lo: float, hi: float) -> str:
    return f'Loss/sigma/{lo:g}-{hi:g}'


class SigmaBinLoss:
    """The training loss summed and counted per interval of σ on the device (no host sync per step); `report()`
    all-reduces the sums once per tick and reports each interval's mean loss to training_stats. σ outside
    [0.002, 80] counts in the first or last interval."""

    def __init__(self, device: torch.device, edges: tuple[float, ...] = SIGMA_BIN_EDGES):
        self.edges = edges
        self.inner = torch.tensor(edges[1:-1], dtype=torch.float32, device=device)
        self.sums = torch.zeros([2, len(edges) - 1], dtype=torch.float64, device=device)  # [loss sum, count].

    def add(self, sigma: torch.Tensor, loss: torch.Tensor) -> None:
        """Per-sample σ [N] and the per-sample loss (any shape [N, ...], averaged over the rest)."""
        idx = torch.bucketize(sigma.detach().to(torch.float32).flatten(), self.inner)
        per_sample = loss.detach().reshape(loss.shape[0], -1).mean(1).to(torch.float64)
        self.sums[0].scatter_add_(0, idx, per_sample)
        self.sums[1].scatter_add_(0, idx, torch.ones_like(per_sample))

    def report(self) -> None:
        """Report each interval's mean over the tick on every rank alike (empty intervals: none), then reset."""
        sums = self.sums.clone()
        if dist.get_world_size() > 1:
            torch.distributed.all_reduce(sums)
        sums = sums.cpu()
        for k, (total, count) in enumerate(zip(sums[0].tolist(), sums[1].tolist())):
            if count > 0:
                training_stats.report0(sigma_bin_name(self.edges[k], self.edges[k + 1]), total / count)
        self.sums.zero_()


class TensorBoardLog:
    """Rank 0's SummaryWriter in the run directory; the x axis is images seen."""

    def __init__(self, run_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=run_dir)

    def tick(self, stats: dict, nimg: int, events: list, noise_sampler) -> None:
        """Each statistic's mean of this tick as a scalar; the learned profile as a figure if the table was rebuilt."""
        for name, moments in stats.items():
            if isinstance(moments, dict) and isinstance(moments.get('mean'), float) and math.isfinite(moments['mean']):
                self.writer.add_scalar(name, moments['mean'], global_step=nimg)
        if any(getattr(event, 'refreshed', False) for event in events):
            self.profile_figure(noise_sampler.profile(), nimg)
        self.writer.flush()

    def profile_figure(self, profile, nimg: int) -> None:
        from infonoise.profile import Profile

        if not isinstance(profile, Profile) or importlib.util.find_spec('matplotlib') is None:
            return
        from infonoise.plots import profile_figure

        self.writer.add_figure('Noise/profile', profile_figure(profile), global_step=nimg, close=False)

    def close(self) -> None:
        self.writer.close()
