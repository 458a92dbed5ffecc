"""Reading EDM's pickled files without running their code (in place of EDM's torch_utils/persistence.py).

Official EDM `.pkl` snapshots (Karras et al. 2022) are pickles in which every network object carries the source
code of its module and is rebuilt by `torch_utils.persistence._reconstruct_persistent_obj`, which EDM implements by
executing that source. We never do: a restricted unpickler admits only the handful of globals an EDM snapshot uses
and turns each persistent object into its class name and state; `read_edm_pickle` returns the EMA network's
constructor kwargs and tensors, from which training.checkpoint builds our class of the same name. EDM's training
states (`training-state-*.pt`, a `torch.save` of the live network and the Adam state) are read by `torch.load`
through the same restricted unpickler. Our own snapshots and states are plain data: training/checkpoint.py.
"""

import collections
import dataclasses
import io
import pickle
import zipfile

import numpy as np
import torch

import dnnlib

_EDM_PRECONDS = ('EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond')
_EDM_PERSISTENCE_VERSION = 6


def _reconstruct_persistent_obj(meta):
    """The name EDM pickles call to rebuild their objects; reached only by a plain `pickle.load`, which we refuse."""
    raise RuntimeError(
        'EDM pickles embed source code; open them with training.checkpoint.load_network() (snapshots) or '
        'torch_utils.persistence.read_edm_state_dump(), which read their weights without executing it'
    )


@dataclasses.dataclass
class _PersistentObject:
    """What the restricted unpickler makes of an EDM persistent object: its class name and `__dict__`."""

    class_name: str
    state: dict


class _ModuleDictStub:
    """Stand-in for `torch.nn.ModuleDict` (EDM's `enc`/`dec`), which pickles as class + `__dict__`."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise ValueError('Malformed ModuleDict in EDM pickle')
        self.state = state


def _persistent_stub(meta) -> _PersistentObject:
    # The embedded module source is deliberately ignored.
    if not isinstance(meta, dict) or meta.get('type') != 'class' or not isinstance(meta.get('state'), dict):
        raise ValueError('Malformed persistent object in EDM pickle')
    if meta.get('version') != _EDM_PERSISTENCE_VERSION:
        raise ValueError(f'Unsupported EDM persistence version {meta.get("version")}, expected 6')
    return _PersistentObject(class_name=str(meta.get('class_name')), state=meta['state'])


def _load_storage_from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)


def _numpy_scalar(dtype: np.dtype, data: bytes = b''):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise ValueError('EDM pickle holds a NumPy scalar that is not plain numeric data')
    return np.frombuffer(data, dtype=dtype)[0]


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it to spell bytes (here: NumPy scalars), and for nothing else."""
    if not isinstance(text, str) or encoding != 'latin1':
        raise ValueError('EDM file encodes bytes in an unexpected way')
    return text.encode('latin1')


_ALLOWED_GLOBALS = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _persistent_stub,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): _load_storage_from_bytes,
    ('torch.nn.modules.container', 'ModuleDict'): _ModuleDictStub,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('numpy', 'dtype'): np.dtype,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
    # torch.save writes protocol 2, which spells sets and bytes as calls (EDM training states).
    ('__builtin__', 'set'): set,
    ('_codecs', 'encode'): _latin1_bytes,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of EDM's files; anything else is refused unexecuted."""

    def find_class(self, module, name):
        obj = _ALLOWED_GLOBALS.get((module, name))
        if obj is None:
            raise ValueError(f'Refusing to unpickle "{module}.{name}": not part of an EDM snapshot or training state')
        return obj


class _RestrictedPickleModule:
    """The `pickle_module` for torch.load: torch subclasses this Unpickler and reads the tensor storages itself."""

    Unpickler = _RestrictedUnpickler


def first_line(error: Exception) -> str:
    """The first line of an error's message (or its type name), for one-line messages."""
    return (str(error).splitlines() or [type(error).__name__])[0]


def _unpickle_edm(f, torch_zip: bool):
    """Unpickle an EDM snapshot (a plain pickle) or training state (a torch.save zip) with the restricted unpickler."""
    what = 'training state' if torch_zip else 'pickle'
    try:
        if not torch_zip:
            return _RestrictedUnpickler(f).load()
        # torch.load hands TorchScript archives to torch.jit.load, bypassing the unpickler.
        if any(name.rpartition('/')[2] == 'constants.pkl' for name in zipfile.ZipFile(f).namelist()):
            raise ValueError(f'Not an EDM {what}: a TorchScript archive')
        f.seek(0)
        return torch.load(f, map_location='cpu', weights_only=False, pickle_module=_RestrictedPickleModule)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f'Not a readable EDM {what}: {type(e).__name__}: {first_line(e)}') from None


def _collect_state_dict(obj, prefix: str = '', out: dict | None = None) -> dict:
    """Flatten a persistent module (or ModuleDict) into state-dict order: own parameters, buffers, then children."""
    out = {} if out is None else out
    if not isinstance(obj, (_PersistentObject, _ModuleDictStub)):
        raise ValueError(f'Unexpected object of type {type(obj).__name__} at "{prefix}" in EDM pickle')
    state = obj.state
    non_persistent = state.get('_non_persistent_buffers_set') or set()
    tensors = list(state.get('_parameters', {}).items())
    tensors += [(name, t) for name, t in state.get('_buffers', {}).items() if name not in non_persistent]
    for name, tensor in tensors:
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f'"{prefix}{name}" in EDM pickle is not a tensor')
        out[prefix + name] = tensor.detach()
    for name, child in state.get('_modules', {}).items():
        if child is not None:
            _collect_state_dict(child, f'{prefix}{name}.', out)
    return out


def _plain_attributes(state: dict) -> dict:
    """Public number/string attributes of an EDM object (e.g. EDMLoss: P_mean, P_std, sigma_data)."""
    attrs = {}
    for name, value in state.items():
        if isinstance(value, np.generic):
            value = value.item()
        if not name.startswith('_') and isinstance(value, (bool, int, float, str)):
            attrs[name] = value
    return attrs


def _init_kwargs(obj: _PersistentObject) -> dict:
    if obj.state.get('_init_args'):
        raise ValueError(f'EDM pickle built {obj.class_name} with positional arguments, which cannot be mapped')
    kwargs = obj.state.get('_init_kwargs')
    if not isinstance(kwargs, dict):
        raise ValueError(f'EDM pickle lacks the constructor arguments of {obj.class_name}')
    return dict(kwargs)


def _edm_network_kwargs(net: _PersistentObject) -> dict:
    """Our network kwargs for an EDM preconditioned network: the class of the same name and its constructor kwargs."""
    if net.class_name not in _EDM_PRECONDS:
        raise ValueError(f'Unknown EDM network class "{net.class_name}", expected one of {", ".join(_EDM_PRECONDS)}')
    return {'class_name': f'training.networks.{net.class_name}', **_init_kwargs(net)}


def read_edm_pickle(f) -> dnnlib.EasyDict:
    """Read an official EDM network pickle (an open binary file) without running the code it embeds.

    Returns EasyDict(network_kwargs, state_dict, loss_kwargs, augment_kwargs, dataset_kwargs): the EMA network as our
    class of the same name ('training.networks.EDMPrecond', ...) with its constructor kwargs and its tensors in
    state-dict order, EDM's loss as its class name and hyperparameters, and the augment pipe's kwargs (ours takes
    EDM's unchanged); entries the file lacks are None. Raises ValueError for anything else.
    """
    data = _unpickle_edm(f, torch_zip=False)
    if not isinstance(data, dict) or not isinstance(data.get('ema'), _PersistentObject):
        raise ValueError('Not an EDM network pickle (no "ema" network)')
    loss, augment, dataset_kwargs = data.get('loss_fn'), data.get('augment_pipe'), data.get('dataset_kwargs')
    return dnnlib.EasyDict(
        network_kwargs=_edm_network_kwargs(data['ema']),
        state_dict=_collect_state_dict(data['ema']),
        loss_kwargs={'class_name': loss.class_name, **_plain_attributes(loss.state)}
        if isinstance(loss, _PersistentObject)
        else None,
        augment_kwargs={'class_name': f'training.augment.{augment.class_name}', **_init_kwargs(augment)}
        if isinstance(augment, _PersistentObject)
        else None,
        dataset_kwargs=dict(dataset_kwargs) if isinstance(dataset_kwargs, dict) else None,
    )


def read_edm_state_dump(path: str) -> dnnlib.EasyDict:
    """Read EDM's `training-state-*.pt` without running code: `torch.save(dict(net=<live network>, optimizer_state))`.

    Returns EasyDict(network_kwargs, net=<state dict of the training network>, optimizer_state=<Adam state dict>);
    EDM keeps the EMA in the snapshot beside it and the position only in the file name. Raises ValueError for a file
    that is not such a state, or that holds anything but EDM's objects.
    """
    try:
        with open(path, 'rb') as f:
            if f.read(2) != b'PK':
                raise ValueError('Not an EDM training state: not a PyTorch zip file')
            f.seek(0)
            data = _unpickle_edm(f, torch_zip=True)
        if not isinstance(data, dict) or not isinstance(data.get('optimizer_state'), dict):
            raise ValueError('Not an EDM training state (no "optimizer_state")')
        if not isinstance(data.get('net'), _PersistentObject):
            raise ValueError('Not an EDM training state (no EDM "net")')
        return dnnlib.EasyDict(
            network_kwargs=_edm_network_kwargs(data['net']),
            net=_collect_state_dict(data['net']),
            optimizer_state=data['optimizer_state'],
        )
    except ValueError as e:
        raise ValueError(f'Cannot read EDM training state "{path}": {e}') from None
