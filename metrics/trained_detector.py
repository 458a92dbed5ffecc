"""Feature detectors trained here (FD-MNIST, FD-ARS; docs/evaluation.md has their model cards): the one wrapper that
gives a trained feature network the detector protocol of metrics/detectors.py, and what their training scripts
share, the click command, training and saving, and loading the saved weights.

The registry (metrics/detectors.py) imports the detector modules, and they import this file: the imports run one way.
"""

import datetime
import os
import time
from collections.abc import Callable

import click
import torch

import dnnlib
from dnnlib import cli


class TrainedDetector(torch.nn.Module):
    """The detector protocol around a trained feature network: `detector(x)` is `net.features(to_input(x))` as
    float32 [N, feature_dim], in eval mode without gradients. `meta` is what the weights file records of its
    training run (the command, the held-out results)."""

    def __init__(
        self, net: torch.nn.Module, to_input: Callable[[torch.Tensor], torch.Tensor], meta: dict | None = None
    ):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.to_input = to_input
        self.meta = meta or {}
        self.feature_dim = int(net.kwargs['feature_dim'])

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        return self.net.features(self.to_input(x.to(device))).to(torch.float32)


def load_weights(path: str, fmt: str, name: str, module: str, net_class: type) -> tuple[torch.nn.Module, dict]:
    """The network and `meta` of a detector trained here, from the file `train_and_save` writes: a dict with
    `format` == `fmt`, the network's constructor `kwargs`, its `state_dict` and `meta`, read with weights_only=True
    (no code runs); the network is `net_class(**kwargs)` with those weights."""
    if not os.path.isfile(path):
        raise RuntimeError(f'No {name} weights at {path}; train them: python -m {module} --out {path}')
    data = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(data, dict) or data.get('format') != fmt or not {'kwargs', 'state_dict', 'meta'} <= data.keys():
        raise ValueError(f'{path} is not an {name} weights file (format "{fmt}" with kwargs, state_dict and meta)')
    net = net_class(**data['kwargs'])
    net.load_state_dict(data['state_dict'])
    return net, data['meta']


def training_command(seed_help: str, epochs: int) -> Callable:
    """The click command of a detector's training script: `--out PT --seed INT --epochs INT`."""

    def decorate(main: Callable) -> click.Command:
        main = click.option('--epochs', help='Training epochs', metavar='INT', type=click.IntRange(min=1),
                            default=epochs, show_default=True)(main)  # fmt: skip
        main = click.option('--seed', help=seed_help, metavar='INT', type=click.IntRange(min=0), default=0,
                            show_default=True)(main)  # fmt: skip
        main = click.option('--out', help='Where to save the weights', metavar='PT', type=str, required=True)(main)
        return click.command()(main)

    return decorate


def train_and_save(
    module: str, train: Callable[..., tuple[torch.nn.Module, dict]], out: str, seed: int, epochs: int, fmt: str, **meta
) -> tuple[torch.nn.Module, dict]:
    """`python -m MODULE --out OUT --seed SEED --epochs EPOCHS` of a detector trained here (FD-MNIST, FD-ARS):
    train deterministically, print the held-out results, and save (atomically) the network's constructor kwargs
    (its `kwargs` attribute) and weights with a `meta` dict that records the command, the run and the results.
    Returns the network and the results; torch's deterministic-algorithms setting is restored afterwards."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    start = time.time()
    try:
        net, results = train(seed=seed, epochs=epochs)
    except (RuntimeError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        torch.use_deterministic_algorithms(deterministic)
    seconds = time.time() - start
    for name, value in results.items():
        print(f'{name}: {value:.4f}')
    print(f'Trained in {seconds:.0f} s on {torch.get_num_threads()} threads')
    meta = dict(
        command=f'python -m {module} --out {out} --seed {seed} --epochs {epochs}',
        seed=seed,
        epochs=epochs,
        **meta,
        num_params=sum(p.numel() for p in net.parameters()),
        torch_version=str(torch.__version__),
        num_threads=torch.get_num_threads(),
        seconds=round(seconds, 1),
        date=datetime.date.today().isoformat(),
        **results,
    )
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    with cli.disk_errors(f'the weights "{out}"'), dnnlib.util.atomic_write(out) as f:
        torch.save(dict(format=fmt, kwargs=dict(net.kwargs), state_dict=net.state_dict(), meta=meta), f)
    print(f'Saved {out}')
    return net, results
