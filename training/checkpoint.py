"""Checkpoints of a training run: network snapshots, training states, InfoNoise's information profiles and post-hoc EMA
profile files, written and read.

A snapshot (`network-snapshot-NNNNNN.pt`) holds the EMA network's constructor kwargs and weights and what generation
needs (loss, noise sampler, learned profile); a training state (`training-state-NNNNNN.pt`) holds everything an exact
resume needs. Both are plain data for `torch.load(weights_only=True)` and written atomically; NNNNNN is kimg done
(training/run_dir.py names the files). EDM's own files (`.pkl` snapshots, `training-state-*.pt` dumps) are read by
`torch_utils.persistence` without running the code they embed, and rebuilt here as our network classes.
"""

import json
import os
import pickle

import torch

import dnnlib
from infonoise import plots
from infonoise.profile import Profile
from torch_utils import distributed as dist
from torch_utils import persistence
from training import networks, networks_1d, run_dir  # noqa: F401 (networks_1d adds SequenceUNet to networks.MODEL_TYPES)

SNAPSHOT_FORMAT = 'infonoise-edm-snapshot'
STATE_FORMAT = 'infonoise-edm-training-state'
PHEMA_FORMAT = 'infonoise-edm-phema'
EDM_PICKLE_SOURCE = 'edm-pickle'


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


def build_network(network_kwargs: dict, state_dict: dict, device='cpu') -> torch.nn.Module:
    """The network class named in `network_kwargs`, built from its kwargs with the weights loaded strictly; in eval
    mode with requires_grad off, on `device`. ValueError for kwargs or weights that do not fit."""
    kwargs = dict(network_kwargs)
    cls = network_class(str(kwargs.pop('class_name', '')))
    try:
        net = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f'Cannot construct {cls.__name__} from the stored arguments: {e}') from None

    # Compare keys and shapes first, for a short message instead of PyTorch's long one.
    expected = net.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    reshaped = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or reshaped:
        problems = [
            f'{len(keys)} {what} (first "{keys[0]}")'
            for keys, what in [(missing, 'missing'), (unexpected, 'unexpected'), (reshaped, 'with a different shape')]
            if keys
        ]
        raise ValueError(f'Stored weights do not match {cls.__name__}: ' + ', '.join(problems))
    net.load_state_dict(state_dict)
    return net.eval().requires_grad_(False).to(device)


def _read_ours(f) -> dict:
    """Our snapshot or training state as plain data, its format and version checked; ValueError else."""
    try:
        data = torch.load(f, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            'Not a plain-data PyTorch file: it holds pickled objects (as EDM training states do)'
        ) from None
    except Exception as e:
        raise ValueError(f'Not a readable PyTorch file: {persistence.first_line(e)}') from None
    if not isinstance(data, dict) or data.get('format') not in (SNAPSHOT_FORMAT, STATE_FORMAT):
        raise ValueError('Not an InfoNoise-EDM network snapshot or training state')
    if data.get('version') != 1:
        raise ValueError(f'Unsupported {data["format"]} version {data.get("version")}, expected 1')
    if not isinstance(data.get('network_kwargs'), dict) or not isinstance(data.get('ema'), dict):
        raise ValueError(f'{data["format"]} file lacks network_kwargs or ema weights')
    return data


def load_network(path_or_url: str, device: torch.device | str = 'cpu') -> dnnlib.EasyDict:
    """Load the EMA network of our snapshot or training state, or of an official EDM `.pkl`, without running code.

    Returns EasyDict(net, network_kwargs, profile, noise_kwargs, kimg, dataset_kwargs, loss_kwargs, augment_kwargs,
    source): `net` is the preconditioned network in eval mode with requires_grad off, on `device`; `source` names the
    file kind (SNAPSHOT_FORMAT, STATE_FORMAT or EDM_PICKLE_SOURCE). Entries a file does not hold are None. Raises
    FileNotFoundError for a missing file and ValueError for anything it cannot read.
    """
    with dnnlib.util.open_url(path_or_url, verbose=False) as f:
        magic = f.read(2)
        f.seek(0)
        try:
            if magic == b'PK':  # torch.save's zip format.
                data = _read_ours(f)
                return dnnlib.EasyDict(
                    net=build_network(data['network_kwargs'], data['ema'], device),
                    network_kwargs=dict(data['network_kwargs']),
                    **{k: data.get(k) for k in ('profile', 'noise_kwargs', 'dataset_kwargs', 'loss_kwargs')},
                    augment_kwargs=data.get('augment_kwargs'),
                    kimg=data['kimg'] if 'kimg' in data else data.get('cur_nimg', 0) / 1000,
                    source=data['format'],
                )
            if magic[:1] == b'\x80':  # A binary pickle, as EDM writes.
                edm = persistence.read_edm_pickle(f)
                return dnnlib.EasyDict(
                    net=build_network(edm.network_kwargs, edm.state_dict, device),
                    network_kwargs=edm.network_kwargs, profile=None, noise_kwargs=None, kimg=None,
                    dataset_kwargs=edm.dataset_kwargs, loss_kwargs=edm.loss_kwargs,
                    augment_kwargs=edm.augment_kwargs, source=EDM_PICKLE_SOURCE,
                )  # fmt: skip
            raise ValueError('Neither a PyTorch file nor a pickle')
        except ValueError as e:
            raise ValueError(f'Cannot load network "{path_or_url}": {e}') from None


def save_atomic(obj, path: str) -> None:
    """`torch.save(obj, path)` such that `path` holds either the old file or the complete new one, never a part."""
    with dnnlib.util.atomic_write(path) as f:
        torch.save(obj, f)


def cpu_state_dict(module: torch.nn.Module) -> dict:
    """A module's state dict as detached CPU tensors, for snapshots and training states."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def snapshot_record(nimg: int, net_kwargs: dict, ema: dict, profile: dict | None, **kwargs) -> dict:
    """The contents of a network snapshot: EMA weights `ema` (a state dict), the run's loss/noise/augment/dataset
    kwargs (`kwargs`) and the learned profile."""
    snapshot = dict(format=SNAPSHOT_FORMAT, version=1, network_kwargs=net_kwargs, ema=ema)
    snapshot.update({name: dict(value) if value is not None else None for name, value in kwargs.items()})
    snapshot.update(kimg=nimg // 1000, profile=profile)
    return snapshot


def save_snapshot(
    directory: str, nimg: int, net_kwargs: dict, ema: torch.nn.Module, profile: dict | None, **kwargs
) -> None:
    """network-snapshot-NNNNNN.pt: the EMA network and the run's loss/noise/augment/dataset kwargs (`kwargs`), and the
    learned profile, also as profile-NNNNNN.json (what `generate.py --profile` reads) and .png."""
    snapshot = snapshot_record(nimg, net_kwargs, cpu_state_dict(ema), profile, **kwargs)
    save_atomic(snapshot, run_dir.path(directory, 'network-snapshot', nimg))
    if profile is not None:
        save_profile(profile, run_dir.path(directory, 'profile', nimg))


def save_phema(directory: str, nimg: int, net_kwargs: dict, profiles: list[dict], profile: dict | None, **kwargs):
    """phema-NNNNNN.pt: the post-hoc EMA profiles at `nimg` images (each σ_rel, γ and EMA weights, from
    PowerFunctionEMA.profiles) with what a network snapshot holds besides its weights, so that reconstruct_ema.py
    writes complete snapshots from these files alone."""
    record = snapshot_record(nimg, net_kwargs, None, profile, **kwargs)
    record.update(format=PHEMA_FORMAT, nimg=nimg, profiles=profiles)
    del record['ema']
    save_atomic(record, run_dir.path(directory, 'phema', nimg))


def load_phema(path: str, mmap: bool = False) -> dict:
    """A phema-NNNNNN.pt file as plain data, its format checked (`mmap`: tensors read only when used); ValueError
    (one line) else."""
    try:
        data = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as e:
        raise ValueError(f'Cannot read "{path}": {persistence.first_line(e)}') from None
    if not isinstance(data, dict) or data.get('format') != PHEMA_FORMAT or data.get('version') != 1:
        raise ValueError(f'"{path}" is not a post-hoc EMA profile file (version 1)')
    return data


def save_profile(profile: dict, json_path: str) -> None:
    """The profile as JSON (atomically: a reader sees the old file or the whole new one) and its plot beside it."""
    plots.save_profile_plot(Profile.from_dict(profile), os.path.splitext(json_path)[0] + '.png')
    with dnnlib.util.atomic_write(json_path, 'w', encoding='utf-8') as f:
        json.dump(profile, f)


def save_training_state(directory: str, nimg: int, net, ema, optimizer, noise_sampler, **fields) -> None:
    """training-state-NNNNNN.pt: everything a bit-exact resume needs. `fields`: the run's config groups
    (network_kwargs, noise_kwargs, loss_kwargs, dataset_kwargs, ...), its seed, where the tick stands and, in a
    multi-rank run, every rank's noise sampler state (`noise_sampler_ranks`; `noise_sampler` is rank 0's)."""
    state = dict(format=STATE_FORMAT, version=1, net=cpu_state_dict(net), ema=cpu_state_dict(ema),
                 optimizer=optimizer.state_dict(), noise_sampler=noise_sampler.state_dict(), cur_nimg=nimg)  # fmt: skip
    state.update({k: dict(v) if isinstance(v, dict) else v for k, v in fields.items()})
    save_atomic(state, run_dir.path(directory, 'training-state', nimg))


def _load_edm_resume(path: str, network_kwargs: dict | None) -> dict:
    """EDM's state dump plus the EMA of the snapshot beside it, as the fields of our training state (EDM's resume)."""
    edm = persistence.read_edm_state_dump(path)
    kimg = run_dir.kimg_of(path, 'training-state')
    if kimg is None:
        raise ValueError(f'EDM training state "{path}" must be named training-state-<kimg>.pt (EDM resumes there)')
    snapshot_path = run_dir.path(os.path.dirname(path), 'network-snapshot', kimg * 1000, 'pkl')
    if not os.path.isfile(snapshot_path):
        raise ValueError(f'EDM training state "{path}" needs its EMA from "{snapshot_path}", which does not exist')
    snapshot = load_network(snapshot_path)
    if snapshot.network_kwargs != edm.network_kwargs:
        raise ValueError(f'EDM snapshot "{snapshot_path}" was written for a different network than "{path}"')
    if network_kwargs is not None and edm.network_kwargs != network_kwargs:
        raise ValueError(f'EDM training state "{path}" was written for a different network: {edm.network_kwargs}')
    return dict(
        network_kwargs=edm.network_kwargs, net=edm.net, ema=cpu_state_dict(snapshot.net),
        optimizer=edm.optimizer_state, noise_sampler=None, cur_nimg=kimg * 1000, seed=None,
    )  # fmt: skip


def nonfinite_tensors(tree, where: str = '') -> list[str]:
    """The names of the floating-point tensors in a nested dict/list that hold NaN or ±inf."""
    if isinstance(tree, torch.Tensor):
        return [where] if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    return [name for key, value in items for name in nonfinite_tensors(value, f'{where}.{key}' if where else str(key))]


def load_training_state(path: str, network_kwargs: dict | None) -> dict:
    """Read our training state, or EDM's, and check that it holds finite numbers and was written for this network
    (unless `network_kwargs` is None: the caller compares).

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
        raise ValueError(f'Cannot read training state "{path}": {persistence.first_line(e)}') from None
    if state is None:
        state = _load_edm_resume(path, network_kwargs)
    elif not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
        raise ValueError(f'"{path}" is not an InfoNoise-EDM training state')
    elif network_kwargs is not None and state['network_kwargs'] != network_kwargs:
        raise ValueError(f'Training state "{path}" was written for a different network: {state["network_kwargs"]}')
    if bad := nonfinite_tensors({k: state[k] for k in ('net', 'ema', 'optimizer')}):
        raise ValueError(f'Training state "{path}" holds NaN or infinite values ({bad[0]}, {len(bad)} tensors in all)')
    sampler = state.get('noise_sampler')
    if 'noise_kwargs' in state and isinstance(sampler, dict) and 'frozen' not in sampler:  # Before `build` existed.
        state['noise_kwargs'] = run_dir.upgrade_noise_kwargs(state['noise_kwargs'])
    return state


def restore(path: str, net_kwargs: dict, noise_kwargs: dict, net, ema, optimizer, noise_sampler) -> dict:
    """Load a training state (ours or EDM's) into the live objects; returns the state's other fields (cur_nimg,
    seed, cur_tick, ...). The noise sampler continues only if the state holds its state for the same settings: each
    rank its own when the state was written by as many ranks, else the first rank's."""
    state = load_training_state(path, net_kwargs)
    net.load_state_dict(state.pop('net'))
    ema.load_state_dict(state.pop('ema'))
    optimizer.load_state_dict(state.pop('optimizer'))
    sampler_state, rank_states = state.pop('noise_sampler'), state.pop('noise_sampler_ranks', None)
    if rank_states is not None and len(rank_states) == dist.get_world_size():
        sampler_state = rank_states[dist.get_rank()]  # Each rank continues from its own loss buffers.
    elif rank_states is not None:
        dist.print0(f'The training state was written by {len(rank_states)} ranks: every rank continues from the noise '
                    "sampler state of the first (InfoNoise's loss buffers are per rank; the rest is shared).")  # fmt: skip
    if sampler_state is None:
        dist.print0('The training state holds no noise sampler state (EDM saves none); the noise sampler starts fresh.')
    elif not run_dir.same_config(state.get('noise_kwargs'), noise_kwargs):
        dist.print0('The training state was written with other noise sampler settings; the noise sampler starts fresh.')
    else:
        noise_sampler.load_state_dict(sampler_state)
    return state
