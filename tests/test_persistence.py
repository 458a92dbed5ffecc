"""Tests for torch_utils.persistence: atomic saves, our snapshot/training-state formats, and code-free reading of EDM's
network pickles and training states."""

import collections
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from torch_utils import persistence
from training import checkpoint, networks

TINY_KWARGS = dict(
    img_resolution=8,
    img_channels=2,
    label_dim=3,
    model_type='SongUNet',
    model_channels=8,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    dropout=0,
    augment_dim=9,
    embedding_type='fourier',  # A random buffer (freqs) that must travel with the weights.
    encoder_type='residual',
    channel_mult_noise=2,
    resample_filter=[1, 3, 3, 1],
)
TINY_CLASSES = {'EDMPrecond': networks.EDMPrecond, 'VPPrecond': networks.VPPrecond}


def make_net(class_name='EDMPrecond', seed=0):
    """A tiny network with every parameter random, so that a missed or misplaced tensor changes the output."""
    torch.manual_seed(seed)
    net = TINY_CLASSES[class_name](**TINY_KWARGS)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return net.eval()


def net_output(net):
    generator = torch.Generator().manual_seed(123)
    x = torch.randn([4, 2, 8, 8], generator=generator)
    sigma = torch.tensor([0.01, 0.5, 3.0, 40.0])
    labels = torch.eye(3)[[0, 1, 2, 0]]
    with torch.no_grad():
        return net(x, sigma, labels)


def snapshot_dict(net, class_name='EDMPrecond'):
    return dict(
        format='infonoise-edm-snapshot',
        version=1,
        network_kwargs={'class_name': f'training.networks.{class_name}', **TINY_KWARGS},
        ema={k: v.detach().clone() for k, v in net.state_dict().items()},
        loss_kwargs={'class_name': 'training.loss.DenoisingLoss', 'weight': 'edm', 'sigma_data': 0.5},
        noise_kwargs={'class_name': 'infonoise.samplers.LogNormalSampler', 'P_mean': -1.2, 'P_std': 1.2},
        augment_kwargs=None,
        dataset_kwargs={'class_name': 'training.dataset.ImageFolderDataset', 'path': 'mnist.zip'},
        kimg=12,
        profile={'sigma': torch.linspace(0.002, 80, 5), 'mse': torch.ones(5)},
    )


def assert_same_weights(a, b):
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert list(sd_a) == list(sd_b)
    for name in sd_a:
        assert torch.equal(sd_a[name], sd_b[name]), name


# ----------------------------------------------------------------------------------------------------------------------
# Atomic saves.


def test_save_atomic_writes_the_file_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / 'a.pt'
    checkpoint.save_atomic({'x': torch.arange(3)}, str(path))
    checkpoint.save_atomic({'x': torch.arange(5)}, str(path))
    assert os.listdir(tmp_path) == ['a.pt']
    assert torch.equal(torch.load(path, weights_only=True)['x'], torch.arange(5))


def test_save_atomic_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / 'a.pt'
    checkpoint.save_atomic({'x': torch.arange(3)}, str(path))
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for an unpicklable object.
        checkpoint.save_atomic({'x': lambda: 0}, str(path))
    assert os.listdir(tmp_path) == ['a.pt']
    assert torch.equal(torch.load(path, weights_only=True)['x'], torch.arange(3))


# ----------------------------------------------------------------------------------------------------------------------
# Our snapshots and training states.


@pytest.mark.parametrize('class_name', ['EDMPrecond', 'VPPrecond'])
def test_snapshot_round_trip(tmp_path, class_name):
    net = make_net(class_name)
    snapshot = snapshot_dict(net, class_name)
    path = tmp_path / 'network-snapshot-000012.pt'
    checkpoint.save_atomic(snapshot, str(path))
    loaded = checkpoint.load_network(str(path))
    assert type(loaded.net) is TINY_CLASSES[class_name]
    assert not loaded.net.training and not any(p.requires_grad for p in loaded.net.parameters())
    assert_same_weights(loaded.net, net)
    assert torch.equal(net_output(loaded.net), net_output(net))
    assert loaded.network_kwargs == snapshot['network_kwargs']
    assert loaded.dataset_kwargs == snapshot['dataset_kwargs']
    assert loaded.loss_kwargs == snapshot['loss_kwargs']
    assert loaded.augment_kwargs is None
    assert torch.equal(loaded.profile['sigma'], snapshot['profile']['sigma'])
    assert loaded.source == 'infonoise-edm-snapshot'


def test_snapshot_loads_from_file_url(tmp_path):
    net = make_net()
    path = tmp_path / 'snap.pt'
    checkpoint.save_atomic(snapshot_dict(net), str(path))
    loaded = checkpoint.load_network(path.as_uri())
    assert torch.equal(net_output(loaded.net), net_output(net))


def test_training_state_loads_the_ema(tmp_path):
    net, ema = make_net(seed=0), make_net(seed=1)
    state = dict(
        format='infonoise-edm-training-state',
        version=1,
        network_kwargs={'class_name': 'training.networks.EDMPrecond', **TINY_KWARGS},
        net=net.state_dict(),
        ema=ema.state_dict(),
        optimizer={'state': {}, 'param_groups': []},
        noise_sampler={},
        cur_nimg=12000,
        rng={},
    )
    path = tmp_path / 'training-state-000012.pt'
    checkpoint.save_atomic(state, str(path))
    loaded = checkpoint.load_network(str(path))
    assert_same_weights(loaded.net, ema)
    assert not torch.equal(net_output(loaded.net), net_output(net))
    assert loaded.source == 'infonoise-edm-training-state'
    assert loaded.profile is None and loaded.loss_kwargs is None


def test_snapshot_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        checkpoint.load_network(str(tmp_path / 'missing.pt'))

    text = tmp_path / 'notes.txt'
    text.write_text('hello')
    with pytest.raises(ValueError, match='Neither a PyTorch file nor a pickle'):
        checkpoint.load_network(str(text))

    archive = tmp_path / 'dataset.zip'
    with zipfile.ZipFile(archive, 'w') as z:
        z.writestr('dataset.json', '{}')
    with pytest.raises(ValueError, match='Not a readable PyTorch file'):
        checkpoint.load_network(str(archive))

    edm_state = tmp_path / 'training-state-000100.pt'
    torch.save(dict(net=torch.nn.Linear(2, 2), optimizer_state={}), edm_state)
    with pytest.raises(ValueError, match='Not a plain-data PyTorch file'):
        checkpoint.load_network(str(edm_state))

    net = make_net()
    cases = {
        'other': (dict(snapshot_dict(net), format='something-else'), 'Not an InfoNoise-EDM'),
        'version': (dict(snapshot_dict(net), version=2), 'version 2'),
        'class': (dict(snapshot_dict(net), network_kwargs={'class_name': 'os.system'}), 'Unknown network class'),
        'private': (
            dict(snapshot_dict(net), network_kwargs={'class_name': 'training.networks._Precond'}),
            'Unknown network class',
        ),
        'kwargs': (
            dict(snapshot_dict(net), network_kwargs={'class_name': 'training.networks.EDMPrecond', 'bogus': 1}),
            'Cannot construct EDMPrecond',
        ),
    }
    snapshot = snapshot_dict(net)
    del snapshot['ema']['model.map_noise.freqs']
    snapshot['ema']['model.extra'] = torch.zeros(1)
    cases['missing'] = (snapshot, '1 missing .*freqs.*1 unexpected')
    snapshot = snapshot_dict(net)
    snapshot['ema']['model.map_layer0.bias'] = torch.zeros(3)
    cases['shape'] = (snapshot, '1 with a different shape')
    for name, (data, message) in cases.items():
        path = tmp_path / f'{name}.pt'
        checkpoint.save_atomic(data, str(path))
        with pytest.raises(ValueError, match=message):
            checkpoint.load_network(str(path))


# ----------------------------------------------------------------------------------------------------------------------
# EDM pickles, written here the way EDM's persistence writes them.


class EDMPersistent:
    """Pickles like an object of a class decorated with EDM's @persistence.persistent_class."""

    def __init__(self, class_name, state, module_src):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self):
        meta = dict(type='class', version=6, module_src=self.module_src, class_name=self.class_name, state=self.state)
        return persistence._reconstruct_persistent_obj, (meta,), None


def as_edm(module, module_src, init_kwargs=None):
    """Mirror a module as EDM pickles it: persistent objects whose `_modules` hold persistent children, except
    `enc`/`dec`, which are plain ModuleDicts."""
    children = collections.OrderedDict(
        (name, as_edm(child, module_src) if child is not None else None) for name, child in module._modules.items()
    )
    if isinstance(module, torch.nn.ModuleDict):
        mirror = torch.nn.ModuleDict()
        mirror.__dict__['_modules'] = children
        return mirror
    state = module.__getstate__()
    state['_modules'] = children
    state['_init_args'] = ()
    state['_init_kwargs'] = dict(init_kwargs or {})
    return EDMPersistent(type(module).__name__, state, module_src)


def edm_pickle(net, module_src, init_kwargs=TINY_KWARGS):
    """EDM's network snapshot: `pickle.dump` of the EMA network, loss, augment pipe and dataset kwargs."""
    loss = EDMPersistent(
        'EDMLoss',
        dict(P_mean=-1.2, P_std=np.float64(1.2), sigma_data=0.5, _init_args=(), _init_kwargs={}),
        module_src,
    )
    augment = EDMPersistent(
        'AugmentPipe', dict(p=0.12, _init_args=(), _init_kwargs=dict(p=0.12, xflip=1e8, yflip=1, scale=1)), module_src
    )
    data = dict(
        ema=as_edm(net, module_src, init_kwargs=init_kwargs),
        loss_fn=loss,
        augment_pipe=augment,
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='cifar10.zip', xflip=False),
    )
    return pickle.dumps(data, protocol=4)


def edm_training_state(net, optimizer_state, module_src, init_kwargs=TINY_KWARGS):
    """EDM's state dump: `torch.save` (pickle protocol 2) of the live network and the optimizer state."""
    f = io.BytesIO()
    torch.save(dict(net=as_edm(net, module_src, init_kwargs=init_kwargs), optimizer_state=optimizer_state), f)
    return f.getvalue()


def booby_trapped_source(marker):
    """Module source that leaves a file behind and aborts if anyone executes it."""
    return f'open({str(marker)!r}, "w").write("executed")\nraise SystemExit("module_src was executed")\n'


@pytest.mark.parametrize('class_name', ['EDMPrecond', 'VPPrecond'])
def test_edm_pickle_loads_without_executing_code(tmp_path, class_name):
    net = make_net(class_name)
    marker = tmp_path / 'executed.txt'
    path = tmp_path / 'edm-snapshot.pkl'
    path.write_bytes(edm_pickle(net, booby_trapped_source(marker)))
    loaded = checkpoint.load_network(str(path))
    assert not marker.exists()
    assert type(loaded.net) is TINY_CLASSES[class_name]
    assert not loaded.net.training and not any(p.requires_grad for p in loaded.net.parameters())
    assert_same_weights(loaded.net, net)
    assert torch.equal(net_output(loaded.net), net_output(net))
    assert loaded.network_kwargs == {'class_name': f'training.networks.{class_name}', **TINY_KWARGS}
    assert loaded.loss_kwargs == {'class_name': 'EDMLoss', 'P_mean': -1.2, 'P_std': 1.2, 'sigma_data': 0.5}
    assert loaded.augment_kwargs == {
        'class_name': 'training.augment.AugmentPipe',
        'p': 0.12,
        'xflip': 1e8,
        'yflip': 1,
        'scale': 1,
    }
    assert loaded.dataset_kwargs['path'] == 'cifar10.zip'
    assert loaded.profile is None and loaded.source == 'edm-pickle'


def test_edm_pickle_mirror_uses_exactly_edms_globals():
    # The pickles written here reference the globals measured on real EDM snapshots, so the tests are faithful.
    recorded = set()

    class Recorder(persistence._RestrictedUnpickler):
        def find_class(self, module, name):
            recorded.add(f'{module}.{name}')
            return super().find_class(module, name)

    Recorder(io.BytesIO(edm_pickle(make_net(), 'raise SystemExit'))).load()
    assert recorded == {
        'torch_utils.persistence._reconstruct_persistent_obj',
        'torch._utils._rebuild_tensor_v2',
        'torch._utils._rebuild_parameter',
        'torch.storage._load_from_bytes',
        'torch.nn.modules.container.ModuleDict',
        'collections.OrderedDict',
        'numpy.dtype',
        f'{np.float64(0).__reduce__()[0].__module__}.scalar',  # numpy.core or numpy._core, by NumPy version.
    }


def test_booby_trap_is_armed(tmp_path):
    marker = tmp_path / 'executed.txt'
    with pytest.raises(SystemExit):
        exec(booby_trapped_source(marker), {})
    assert marker.exists()


def test_plain_pickle_load_of_edm_pickle_is_refused(tmp_path):
    marker = tmp_path / 'executed.txt'
    with pytest.raises(RuntimeError, match='load_network'):
        pickle.loads(edm_pickle(make_net(), booby_trapped_source(marker)))
    assert not marker.exists()


def test_forbidden_globals_are_refused_unexecuted(tmp_path):
    marker = tmp_path / 'pwned.txt'

    class Payload:
        def __init__(self, func, arg):
            self.func, self.arg = func, arg

        def __reduce__(self):
            return self.func, (self.arg,)

    payloads = {
        'system': Payload(os.system, f'touch {marker}'),
        'exec': Payload(exec, f'open({str(marker)!r}, "w")'),
    }
    for name, payload in payloads.items():
        path = tmp_path / f'{name}.pkl'
        path.write_bytes(pickle.dumps({'ema': payload}, protocol=4))
        with pytest.raises(ValueError, match=f'Refusing to unpickle ".*{name}"'):
            checkpoint.load_network(str(path))
        assert not marker.exists()


def test_edm_pickle_errors(tmp_path):
    net = make_net()
    unknown = as_edm(net, '', init_kwargs=TINY_KWARGS)
    unknown.class_name = 'MyPrecond'
    positional = as_edm(net, '', init_kwargs=TINY_KWARGS)
    positional.state['_init_args'] = (8, 2)
    mismatched = as_edm(net, '', init_kwargs=TINY_KWARGS)
    mismatched.state['_modules']['model'].state['_modules']['map_noise'].state['_buffers']['freqs'] = None
    cases = {
        'no_ema': ({'loss_fn': 1}, 'no "ema" network'),
        'unknown': ({'ema': unknown}, 'Unknown EDM network class "MyPrecond"'),
        'positional': ({'ema': positional}, 'positional arguments'),
        'mismatched': ({'ema': mismatched}, '1 missing \\(first "model.map_noise.freqs"\\)'),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f'{name}.pkl'
        path.write_bytes(pickle.dumps(data, protocol=4))
        with pytest.raises(ValueError, match=message):
            checkpoint.load_network(str(path))

    # A pickle cut short is an error, not a crash.
    path = tmp_path / 'truncated.pkl'
    path.write_bytes(edm_pickle(net, '')[:5000])
    with pytest.raises(ValueError, match='Not a readable EDM pickle'):
        checkpoint.load_network(str(path))


# ----------------------------------------------------------------------------------------------------------------------
# EDM training states, written here the way EDM's training loop dumps them.


def trained_net_and_adam_state():
    """A tiny network in training mode after one Adam step, so that the optimizer state holds real moments."""
    net = make_net().train().requires_grad_(True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, sigma, labels = torch.randn([2, 2, 8, 8]), torch.tensor([0.5, 3.0]), torch.eye(3)[:2]
    net(x, sigma, labels).square().mean().backward()
    optimizer.step()
    return net, optimizer.state_dict()


def test_edm_training_state_loads_without_executing_code(tmp_path):
    net, optimizer_state = trained_net_and_adam_state()
    marker = tmp_path / 'executed.txt'
    path = tmp_path / 'training-state-000100.pt'
    path.write_bytes(edm_training_state(net, optimizer_state, booby_trapped_source(marker)))
    loaded = persistence.read_edm_state_dump(str(path))
    assert not marker.exists()
    assert loaded.network_kwargs == {'class_name': 'training.networks.EDMPrecond', **TINY_KWARGS}
    expected = net.state_dict()
    assert list(loaded.net) == list(expected)
    assert all(torch.equal(loaded.net[k], v) and not loaded.net[k].requires_grad for k, v in expected.items())

    # The Adam state restores into an optimizer over a fresh network of the same architecture.
    optimizer = torch.optim.Adam(make_net(seed=1).parameters(), lr=1e-3)
    optimizer.load_state_dict(loaded.optimizer_state)
    restored = optimizer.state_dict()
    assert restored['param_groups'] == optimizer_state['param_groups']
    assert len(restored['state']) == len(optimizer_state['state']) == sum(p.grad is not None for p in net.parameters())
    for index, moments in optimizer_state['state'].items():
        assert all(torch.equal(restored['state'][index][k], v) for k, v in moments.items()), index


def test_edm_training_state_mirror_uses_exactly_these_globals():
    # Protocol 2 adds two globals to those of a snapshot: sets (`_non_persistent_buffers_set`) and the bytes of
    # NumPy scalars (UNetBlock.skip_scale) are spelled as calls. Storages are resolved by torch.load itself.
    recorded = set()

    class Recorder(persistence._RestrictedUnpickler):
        def find_class(self, module, name):
            recorded.add(f'{module}.{name}')
            return super().find_class(module, name)

    class RecordingPickleModule:
        Unpickler = Recorder

    net, optimizer_state = trained_net_and_adam_state()
    data = edm_training_state(net, optimizer_state, 'raise SystemExit')
    torch.load(io.BytesIO(data), map_location='cpu', weights_only=False, pickle_module=RecordingPickleModule)
    assert recorded == {
        'torch_utils.persistence._reconstruct_persistent_obj',
        'torch._utils._rebuild_tensor_v2',
        'torch._utils._rebuild_parameter',
        'torch.nn.modules.container.ModuleDict',
        'collections.OrderedDict',
        'numpy.dtype',
        f'{np.float64(0).__reduce__()[0].__module__}.scalar',
        '__builtin__.set',
        '_codecs.encode',
    }


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # torch.jit, used here to write a TorchScript archive.
def test_edm_training_state_errors(tmp_path):
    marker = tmp_path / 'pwned.txt'

    class Payload:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)

    def saved(obj):
        f = io.BytesIO()
        torch.save(obj, f)
        return f.getvalue()

    script = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)
    net, optimizer_state = trained_net_and_adam_state()
    cases = {
        'payload': (saved({'net': Payload(), 'optimizer_state': {}}), 'Refusing to unpickle ".*system"'),
        'torchscript': (script.getvalue(), 'TorchScript archive'),
        'pickle': (edm_pickle(net, ''), 'not a PyTorch zip file'),
        'ours': (saved({'format': 'infonoise-edm-training-state'}), 'no "optimizer_state"'),
        'no_net': (saved({'net': {}, 'optimizer_state': {}}), 'no EDM "net"'),
        'truncated': (edm_training_state(net, optimizer_state, '')[:5000], 'Not a readable EDM training state'),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f'{name}.pt'
        path.write_bytes(data)
        with pytest.raises(ValueError, match=f'Cannot read EDM training state ".*{name}.pt": .*{message}'):
            persistence.read_edm_state_dump(str(path))
    assert not marker.exists()
