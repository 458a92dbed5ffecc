"""train.py --resume and --transfer from EDM's own files: EDM's state dump (training-state-NNNNNN.pt, a torch.save of the
live network and the Adam state) with the EMA of network-snapshot-NNNNNN.pkl, read without running embedded code."""

import io
import json
import os

import pytest
import torch
from click.testing import CliRunner
from test_persistence import booby_trapped_source, edm_pickle, edm_training_state

import dnnlib
import train
from training import checkpoint, networks

# A one-level DDPM++ (8x8, no attention) with EDM's default dropout and augmentation, both of which draw random numbers.
NET_ARGS = ['--cbase=8', '--cres=1', '--blocks=1']
COMMON = ['--device=cpu', '--workers=0', '--tick=1', '--lr-rampup=0', '--nosubdir']


def run(*args):
    return CliRunner().invoke(train.main, [str(a) for a in args])


def build(network_kwargs, state_dict=None):
    """Our EDMPrecond from constructor kwargs, with the given weights."""
    net = networks.EDMPrecond(**network_kwargs)
    if state_dict is not None:
        net.load_state_dict(state_dict)
    return net


@pytest.fixture(scope='module')
def edm_run(tmp_path_factory, digits_zip):
    """Two steps of 500 images with our pipeline, and the same run written as EDM's files after 1 kimg."""
    root = tmp_path_factory.mktemp('edm-resume')
    result = run('--outdir', root / 'ours', '--data', digits_zip, *NET_ARGS, *COMMON, '--batch=500', '--duration=0.001')
    assert result.exit_code == 0, result.output
    state = torch.load(root / 'ours' / 'training-state-000001.pt', map_location='cpu', weights_only=True)
    assert state['cur_nimg'] == 1000

    # EDM dumps the live training network; its snapshot holds the EMA. Executing either module source leaves a marker.
    kwargs = {k: v for k, v in state['network_kwargs'].items() if k != 'class_name'}
    net = build(kwargs, state['net']).train()
    ema = build(kwargs, state['ema']).eval().requires_grad_(False)
    marker = root / 'executed.txt'
    edm = root / 'edm'
    edm.mkdir()
    (edm / 'training-state-000001.pt').write_bytes(
        edm_training_state(net, state['optimizer'], booby_trapped_source(marker), kwargs)
    )
    (edm / 'network-snapshot-000001.pkl').write_bytes(edm_pickle(ema, booby_trapped_source(marker), kwargs))
    (edm / 'training-state-000000.pt').write_bytes(b'an older state that --resume=DIR must pass over')
    return dnnlib.EasyDict(root=root, edm=edm, marker=marker, kwargs=kwargs, state=state)


def test_resume_from_edm_files_equals_resume_from_ours(edm_run, digits_zip):
    # Two more steps from our own state and from EDM's files (given as the directory): same seed, same position
    # (1 kimg, from EDM's file name), so net, EMA and Adam state must agree bit for bit.
    args = ['--data', digits_zip, *NET_ARGS, *COMMON, '--batch=500', '--duration=0.002', '--seed=7']
    ours = run('--outdir', edm_run.root / 'from-ours', *args, '--resume', edm_run.root / 'ours')
    edm = run('--outdir', edm_run.root / 'from-edm', *args, '--resume', edm_run.edm)
    assert ours.exit_code == 0, ours.output
    assert edm.exit_code == 0, edm.output
    assert 'training-state-000001.pt' in edm.output and 'the noise sampler starts fresh' in edm.output
    assert 'the noise sampler starts fresh' not in ours.output
    assert not edm_run.marker.exists()

    a = torch.load(edm_run.root / 'from-ours' / 'training-state-000002.pt', weights_only=True)
    b = torch.load(edm_run.root / 'from-edm' / 'training-state-000002.pt', weights_only=True)
    assert a['cur_nimg'] == b['cur_nimg'] == 2000 and a['seed'] == b['seed'] == 7
    for key in ('net', 'ema'):
        assert list(a[key]) == list(b[key])
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
        # Control: the two steps moved the weights, so equality is not inherited from the common start.
        assert not all(torch.equal(a[key][k], edm_run.state[key][k]) for k in a[key]), key
    assert a['optimizer']['param_groups'] == b['optimizer']['param_groups']
    assert a['optimizer']['state'].keys() == b['optimizer']['state'].keys()
    for index, moments in a['optimizer']['state'].items():
        assert all(torch.equal(v, b['optimizer']['state'][index][k]) for k, v in moments.items()), index
    assert int(a['optimizer']['state'][0]['step']) == 4

    # Under EDM's EMA ramp-up the resumed EMA hardly outlives two steps, so compare what was loaded, too.
    loaded = checkpoint.load_training_state(
        str(edm_run.edm / 'training-state-000001.pt'), edm_run.state['network_kwargs']
    )
    assert (loaded['cur_nimg'], loaded['noise_sampler'], loaded['seed']) == (1000, None, None)
    for key in ('net', 'ema'):
        assert list(loaded[key]) == list(edm_run.state[key])
        assert all(torch.equal(v, edm_run.state[key][k]) for k, v in loaded[key].items()), key
    assert loaded['optimizer']['param_groups'] == edm_run.state['optimizer']['param_groups']
    for index, moments in edm_run.state['optimizer']['state'].items():
        assert all(torch.equal(v, loaded['optimizer']['state'][index][k]) for k, v in moments.items()), index


def test_resume_from_edm_files_draws_a_seed(edm_run, digits_zip, tmp_path):
    # EDM keeps no seed: without --seed a random one is drawn, as EDM does.
    result = run('--outdir', tmp_path, '--data', digits_zip, *NET_ARGS, *COMMON, '--resume', edm_run.edm, '--dry-run')
    assert result.exit_code == 0, result.output
    config = json.loads(result.output.split('Training options:')[1].split('\n\n')[0])
    assert isinstance(config['seed'], int) and config['resume_state'].endswith('training-state-000001.pt')
    assert not edm_run.marker.exists()


def test_edm_resume_refusals(edm_run, digits_zip, tmp_path):
    state = (edm_run.edm / 'training-state-000001.pt').read_bytes()
    snapshot = (edm_run.edm / 'network-snapshot-000001.pkl').read_bytes()
    marker = tmp_path / 'pwned.txt'

    class Payload:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)

    payload = io.BytesIO()
    torch.save({'net': Payload(), 'optimizer_state': {}}, payload)
    wider_kwargs = dict(edm_run.kwargs, model_channels=16)
    wider = edm_pickle(build(wider_kwargs).eval(), '', wider_kwargs)

    def edm_dir(name, files):
        path = tmp_path / name
        path.mkdir()
        for file_name, data in files.items():
            (path / file_name).write_bytes(data)
        return path

    cases = [
        (
            edm_dir(
                'payload', {'training-state-000001.pt': payload.getvalue(), 'network-snapshot-000001.pkl': snapshot}
            ),
            NET_ARGS,
            f'Refusing to unpickle "{os.system.__module__}.system"',
        ),
        (edm_dir('no-snapshot', {'training-state-000001.pt': state}), NET_ARGS, 'needs its EMA from'),
        (
            edm_dir('no-kimg', {'edm-state.pt': state, 'network-snapshot-000001.pkl': snapshot}) / 'edm-state.pt',
            NET_ARGS,
            'must be named training-state-<kimg>.pt',
        ),
        (edm_run.edm, ['--cbase=16', '--cres=1', '--blocks=1'], '--cbase: 8 (now 16; network_kwargs.model_channels)'),
        (
            edm_dir('other-snapshot', {'training-state-000001.pt': state, 'network-snapshot-000001.pkl': wider}),
            NET_ARGS,
            'network-snapshot-000001.pkl" was written for a different network',
        ),
    ]
    out = tmp_path / 'runs'
    for resume, net_args, message in cases:
        result = run('--outdir', out, '--data', digits_zip, *net_args, *COMMON, '--resume', resume)
        assert result.exit_code != 0, (resume, result.output)
        error_lines = [line for line in result.output.splitlines() if line.startswith('Error:')]
        assert len(error_lines) == 1 and message in error_lines[0], (resume, result.output)
        assert not out.exists(), resume
    assert not marker.exists() and not edm_run.marker.exists()


def test_transfer_from_edm_pickle(edm_run, digits_zip, tmp_path):
    # One step of 1000 images at the first step's learning rate, 0: the EMA is exactly the transferred network.
    result = run(
        *['--outdir', tmp_path, '--data', digits_zip, *NET_ARGS, *COMMON, '--batch=1000', '--duration=0.001'],
        *['--seed=3', '--transfer', edm_run.edm / 'network-snapshot-000001.pkl'],
    )
    assert result.exit_code == 0, result.output
    ema = torch.load(tmp_path / 'network-snapshot-000001.pt', weights_only=True)['ema']
    assert list(ema) == list(edm_run.state['ema'])
    assert all(torch.equal(v, edm_run.state['ema'][k]) for k, v in ema.items())
    assert not edm_run.marker.exists()
