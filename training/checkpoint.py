"""Checkpoints of a training run: network snapshots, training states and InfoNoise profiles, written and read.

A snapshot (`network-snapshot-NNNNNN.pt`) holds the EMA network's constructor kwargs and weights and what generation
needs (loss, noise sampler, learned profile); a training state (`training-state-NNNNNN.pt`) holds everything an exact
resume needs. Both are plain data for `torch.load(weights_only=True)` and written atomically; NNNNNN is kimg done.
EDM's own files (`.pkl` snapshots, `training-state-*.pt` dumps) are read by `torch_utils.persistence` without running
the code they embed; the network classes come from `training.networks` (`network_class`).
"""

import json
import os
import pickle
import re

import torch

import dnnlib
from infonoise import plots
from infonoise.profile import Profile
from torch_utils import distributed as dist
from torch_utils import persistence
from torch_utils.persistence import SNAPSHOT_FORMAT, STATE_FORMAT, save_atomic
from training import networks, networks_1d  # noqa: F401 (networks_1d adds SequenceUNet to networks.MODEL_TYPES)

__all__ = ['SNAPSHOT_FORMAT', 'STATE_FORMAT', 'save_atomic']


def network_class(class_name: str) -> type:
    """The class of `training.networks` a stored 'training.networks.NAME' (or bare 'NAME') names; ValueError else."""
    module_name, _, short_name = class_name.rpartition('.')
    cls = getattr(networks, short_name, None)
    if (
        module_name not in ('', 'training.networks')
        or short_name.startswith('_')
        or not (isinstance(cls, type) and issubclass(cls, torch.nn.Module))
    ):
        raise ValueError(f'Unknown network class "{class_name}"')
    return cls


def load_network(path_or_url: str, device: torch.device | str = 'cpu') -> dnnlib.EasyDict:
    """The EMA network of our snapshot or training state, or of an EDM `.pkl` (`torch_utils.persistence.load_network`,
    with our network classes): EasyDict(net, network_kwargs, profile, noise_kwargs, kimg, ..., source)."""
    return persistence.load_network(path_or_url, network_class, device)


def cpu_state_dict(module: torch.nn.Module) -> dict:
    """A module's state dict as detached CPU tensors, for snapshots and training states."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _path(run_dir: str, kind: str, nimg: int, ext: str) -> str:
    return os.path.join(run_dir, f'{kind}-{nimg // 1000:06d}.{ext}')


def save_snapshot(
    run_dir: str, nimg: int, net_kwargs: dict, ema: torch.nn.Module, profile: dict | None, **kwargs
) -> None:
    """network-snapshot-NNNNNN.pt: the EMA network and the run's loss/noise/augment/dataset kwargs (`kwargs`), and the
    learned profile, also as profile-NNNNNN.json (what `generate.py --profile` reads) and .png."""
    snapshot = dict(format=SNAPSHOT_FORMAT, version=1, network_kwargs=net_kwargs, ema=cpu_state_dict(ema))
    snapshot.update({name: dict(value) if value is not None else None for name, value in kwargs.items()})
    snapshot.update(kimg=nimg // 1000, profile=profile)
    save_atomic(snapshot, _path(run_dir, 'network-snapshot', nimg, 'pt'))
    if profile is not None:
        save_profile(profile, _path(run_dir, 'profile', nimg, 'json'))


def save_profile(profile: dict, json_path: str) -> None:
    """The profile as JSON (atomically: a reader sees the old file or the whole new one) and its plot beside it."""
    plots.save_profile_plot(Profile.from_dict(profile), os.path.splitext(json_path)[0] + '.png')
    with dnnlib.util.atomic_write(json_path, 'w', encoding='utf-8') as f:
        json.dump(profile, f)


def save_training_state(run_dir: str, nimg: int, net_kwargs: dict, net, ema, optimizer, noise_kwargs: dict,
                        noise_sampler, seed: int, dataset_kwargs: dict) -> None:  # fmt: skip
    """training-state-NNNNNN.pt: everything a bit-exact resume needs."""
    state = dict(
        format=STATE_FORMAT, version=1, network_kwargs=net_kwargs, net=cpu_state_dict(net), ema=cpu_state_dict(ema),
        optimizer=optimizer.state_dict(), noise_kwargs=dict(noise_kwargs), noise_sampler=noise_sampler.state_dict(),
        cur_nimg=nimg, seed=seed, dataset_kwargs=dict(dataset_kwargs),
    )  # fmt: skip
    save_atomic(state, _path(run_dir, 'training-state', nimg, 'pt'))


def _load_edm_resume(path: str, network_kwargs: dict) -> dict:
    """EDM's state dump plus the EMA of the snapshot beside it, as the fields of our training state (EDM's resume)."""
    edm = persistence.read_edm_state_dump(path)
    match = re.fullmatch(r'training-state-(\d+)\.pt', os.path.basename(path))
    if match is None:
        raise ValueError(f'EDM training state "{path}" must be named training-state-<kimg>.pt (EDM resumes there)')
    snapshot_path = os.path.join(os.path.dirname(path), f'network-snapshot-{match.group(1)}.pkl')
    if not os.path.isfile(snapshot_path):
        raise ValueError(f'EDM training state "{path}" needs its EMA from "{snapshot_path}", which does not exist')
    snapshot = load_network(snapshot_path)
    written = {
        f'EDM training state "{path}"': edm.network_kwargs,
        f'EDM snapshot "{snapshot_path}"': snapshot.network_kwargs,
    }
    for name, kwargs in written.items():
        if kwargs != network_kwargs:
            raise ValueError(f'{name} was written for a different network: {kwargs}')
    return dict(
        network_kwargs=edm.network_kwargs, net=edm.net, ema=cpu_state_dict(snapshot.net),
        optimizer=edm.optimizer_state, noise_sampler=None, cur_nimg=int(match.group(1)) * 1000, seed=None,
    )  # fmt: skip


def load_training_state(path: str, network_kwargs: dict, noise_kwargs: dict) -> dict:
    """Read our training state, or EDM's, and check that it was written for this network (and noise sampler).

    EDM's states give `noise_sampler=None` and `seed=None`: it saves neither.
    """
    with open(path, 'rb') as f:
        if f.read(2) != b'PK':
            raise ValueError(f'"{path}" is not a training state (not a file written by torch.save)')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        state = None  # Pickled objects, as in EDM's state dumps.
    except Exception as e:
        raise ValueError(f'Cannot read training state "{path}": {e}') from None
    if state is None:
        return _load_edm_resume(path, network_kwargs)
    if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
        raise ValueError(f'"{path}" is not an InfoNoise-EDM training state')
    if state['network_kwargs'] != network_kwargs:
        raise ValueError(f'Training state "{path}" was written for a different network: {state["network_kwargs"]}')
    if state['noise_kwargs']['class_name'] != noise_kwargs['class_name']:
        raise ValueError(
            f'Training state "{path}" was written with the noise sampler {state["noise_kwargs"]["class_name"]}'
        )
    return state


def restore(path: str, net_kwargs: dict, noise_kwargs: dict, net, ema, optimizer, noise_sampler) -> int:
    """Load a training state (ours or EDM's) into the live objects; returns the images done."""
    state = load_training_state(path, net_kwargs, noise_kwargs)
    net.load_state_dict(state['net'])
    ema.load_state_dict(state['ema'])
    optimizer.load_state_dict(state['optimizer'])
    if state['noise_sampler'] is not None:
        noise_sampler.load_state_dict(state['noise_sampler'])
    else:
        dist.print0('The training state holds no noise sampler state (EDM saves none); the sampler starts fresh.')
    return int(state['cur_nimg'])
