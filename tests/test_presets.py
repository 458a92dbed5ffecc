"""Every preset in configs/ resolved by `train.py --dry-run`: the network it builds (parameter counts of EDM's
configurations, EDM facts table 3.1), batch, learning rate, duration, dropout, augmentation, noise sampler and loss
weight (EDM README presets; InfoNoise paper Table 1 and App. D), and `--sampler` overriding every preset."""

import os

import numpy as np
import pytest
import torch
from conftest import train_config, write_edm_zip

import dnnlib
import train
from training.sequences import save_npz

LOGNORMAL, LOGUNIFORM, VP, INFONOISE = (
    'infonoise.samplers.LogNormal',
    'infonoise.samplers.LogUniform',
    'infonoise.samplers.VPSampler',
    'infonoise.InfoNoise',
)
SAMPLER_CLASS = {'auto': LOGNORMAL, 'lognormal': LOGNORMAL, 'loguniform': LOGUNIFORM, 'vp': VP, 'infonoise': INFONOISE}

# Fake data per dataset: (resolution, channels, classes, binary pixels).
CIFAR10, IMG64, IMAGENET64 = (32, 3, 10, False), (64, 3, 0, False), (64, 3, 1000, False)
MNIST, BMNIST, MNIST16, BMNIST16 = (32, 1, 10, False), (32, 1, 10, True), (16, 1, 10, False), (16, 1, 10, True)
DNA = (200, 4, 4, True)  # 200-bp one-hot sequences (a sequence .npz), 4 cell types.
ARS128 = (128, 4, 0, True)  # The ARS yeast sequences' centre 128 nt, unlabelled.

# Parameter counts: EDM's from the facts (table 3.1); MNIST (1,1,1) and the demo measured here (the demo's matches
# docs/results.md's 748,737).
P_CIFAR_COND_DDPMPP, P_CIFAR_UNCOND_DDPMPP = 55_735_299, 55_733_891
P_CIFAR_COND_NCSNPP, P_CIFAR_UNCOND_NCSNPP = 56_400_643, 56_397_827
P_64_DDPMPP, P_64_NCSNPP, P_IMAGENET_ADM = 61_805_571, 62_761_091, 295_899_267
P_MNIST_111, P_DEMO = 15_429_889, 748_737
P_DNA = 12_567_556  # Our SequenceUNet at the preset's size, measured here.
P_ARS = 577_604  # The CPU DNA benchmark's SequenceUNet, measured here.

# Resolved options: data, params, batch, lr, total kimg, dropout, augment p (None = off), sampler, weight.
CIFAR = dict(batch=512, lr=1e-3, kimg=200_000, dropout=0.13, augment=0.12)
FACES = dict(batch=256, lr=2e-4, kimg=200_000, augment=0.15)
IMAGENET = dict(batch=4096, lr=1e-4, kimg=2_500_000, dropout=0.10, augment=None)
EDM_OBJECTIVE = dict(sampler=LOGNORMAL, weight='edm')
INFO_EDM = dict(sampler=INFONOISE, weight='edm')
INFO_UNIFORM = dict(sampler=INFONOISE, weight='uniform')
EXPECTED = {
    'cifar10-cond-ddpmpp': dict(data=CIFAR10, params=P_CIFAR_COND_DDPMPP, **CIFAR, **EDM_OBJECTIVE),
    'cifar10-cond-ncsnpp': dict(data=CIFAR10, params=P_CIFAR_COND_NCSNPP, **CIFAR, **EDM_OBJECTIVE),
    'cifar10-uncond-ddpmpp': dict(data=CIFAR10, params=P_CIFAR_UNCOND_DDPMPP, **CIFAR, **EDM_OBJECTIVE),
    'cifar10-uncond-ncsnpp': dict(data=CIFAR10, params=P_CIFAR_UNCOND_NCSNPP, **CIFAR, **EDM_OBJECTIVE),
    'ffhq64-ddpmpp': dict(data=IMG64, params=P_64_DDPMPP, dropout=0.05, **FACES, **EDM_OBJECTIVE),
    'ffhq64-ncsnpp': dict(data=IMG64, params=P_64_NCSNPP, dropout=0.05, **FACES, **EDM_OBJECTIVE),
    'afhqv2-64-ddpmpp': dict(data=IMG64, params=P_64_DDPMPP, dropout=0.25, **FACES, **EDM_OBJECTIVE),
    'afhqv2-64-ncsnpp': dict(data=IMG64, params=P_64_NCSNPP, dropout=0.25, **FACES, **EDM_OBJECTIVE),
    'imagenet64-adm': dict(data=IMAGENET64, params=P_IMAGENET_ADM, **IMAGENET, **EDM_OBJECTIVE),
    'cifar10-cond-infonoise': dict(data=CIFAR10, params=P_CIFAR_COND_DDPMPP, **CIFAR, **INFO_EDM),
    'cifar10-uncond-infonoise': dict(data=CIFAR10, params=P_CIFAR_UNCOND_DDPMPP, **CIFAR, **INFO_EDM),
    'ffhq64-infonoise': dict(data=IMG64, params=P_64_DDPMPP, dropout=0.05, **FACES, **INFO_EDM),
    'imagenet64-infonoise': dict(data=IMAGENET64, params=P_IMAGENET_ADM, **IMAGENET, **INFO_EDM),
    'mnist-infonoise': dict(data=MNIST, params=P_MNIST_111, **CIFAR, **INFO_EDM),
    'fashionmnist-infonoise': dict(data=MNIST, params=P_MNIST_111, **CIFAR, **INFO_EDM),
    'bmnist-infonoise': dict(data=BMNIST, params=P_MNIST_111, **CIFAR, **INFO_UNIFORM),
    'bfashionmnist-infonoise': dict(data=BMNIST, params=P_MNIST_111, **CIFAR, **INFO_UNIFORM),
    'demo-mnist16': dict(
        data=MNIST16, params=P_DEMO, batch=64, lr=1e-3, kimg=120, dropout=0.0, augment=None, **INFO_EDM
    ),
    'dna-infonoise': dict(
        data=DNA, params=P_DNA, batch=256, lr=2e-4, kimg=20_000, dropout=0.1, augment=None, **INFO_UNIFORM
    ),
    'demo-bmnist16': dict(
        data=BMNIST16, params=P_DEMO, batch=64, lr=1e-3, kimg=60, dropout=0.0, augment=None, **INFO_UNIFORM
    ),
    'demo-ars128': dict(
        data=ARS128, params=P_ARS, batch=64, lr=1e-3, kimg=80, dropout=0.0, augment=None, **INFO_UNIFORM
    ),
}

# InfoNoise presets whose only difference from an EDM preset is the training sampler (paper Sec. 6, App. D).
TWINS = {
    'cifar10-cond-infonoise': 'cifar10-cond-ddpmpp',
    'cifar10-uncond-infonoise': 'cifar10-uncond-ddpmpp',
    'ffhq64-infonoise': 'ffhq64-ddpmpp',
    'imagenet64-infonoise': 'imagenet64-adm',
}


@pytest.fixture(scope='module')
def datasets(tmp_path_factory):
    """Tiny fake data sets in EDM's zip format, one per (resolution, channels, classes, binary); 4 channels make
    a sequence .npz of that length instead."""
    root, made = tmp_path_factory.mktemp('preset-data'), {}

    def get(spec):
        if spec not in made:
            resolution, channels, classes, binary = spec
            rng = np.random.default_rng(0)
            if channels == 4:
                made[spec] = str(root / f'data-{len(made)}.npz')
                labels = [0, classes - 1, 1, 2] if classes else None
                save_npz(made[spec], rng.integers(0, 4, [4, resolution]), labels=labels)
                return made[spec]
            shape = [4, resolution, resolution] + ([channels] if channels > 1 else [])
            images = rng.integers(0, 256, shape, dtype=np.uint8)
            if binary:
                images = np.where(images >= 128, 255, 0).astype(np.uint8)
            labels = [0, classes - 1, 1, 2] if classes else None  # The largest label fixes label_dim.
            made[spec] = write_edm_zip(root / f'data-{len(made)}.zip', images, labels)
        return made[spec]

    return get


def dry_run(tmp_path, data, name, *args):
    """The config `train.py --preset=NAME` resolves (`setup_training_config`, what --dry-run prints)."""
    return train_config('--outdir', tmp_path, '--data', data, '--device=cpu', '--seed=0', f'--preset={name}', *args)


def build_on_meta(config):
    """The network training_loop would build for this config, on the meta device (no memory, no time)."""
    dataset = dnnlib.util.construct_class_by_name(**config['dataset_kwargs'])
    with torch.device('meta'):
        return dnnlib.util.construct_class_by_name(
            **config['network_kwargs'],
            img_resolution=dataset.resolution,
            img_channels=dataset.num_channels,
            label_dim=dataset.label_dim,
        )


def test_every_preset_has_a_row():
    assert {name[:-5] for name in os.listdir(train.CONFIGS_DIR) if name.endswith('.json')} == set(EXPECTED)


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_preset_resolves(tmp_path, datasets, name):
    want = EXPECTED[name]
    config = dry_run(tmp_path, datasets(want['data']), name)
    net = build_on_meta(config)
    assert sum(p.numel() for p in net.parameters()) == want['params']
    assert config['batch_size'] == want['batch'] and config['optimizer_kwargs']['lr'] == want['lr']
    assert config['total_kimg'] == want['kimg'] and config['network_kwargs']['dropout'] == want['dropout']
    assert config.get('augment_kwargs', {}).get('p') == want['augment']
    assert config['noise_kwargs']['class_name'] == want['sampler'] and config['loss_kwargs']['weight'] == want['weight']
    if want['sampler'] == INFONOISE:
        endpoint = 'discrete' if want['data'][3] else 'continuous'
        assert config['noise_kwargs']['endpoint'] == endpoint and config['noise_kwargs']['weight'] == want['weight']


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_sampler_option_overrides_preset(tmp_path, datasets, name):
    data = datasets(EXPECTED[name]['data'])
    base = dry_run(tmp_path, data, name)
    for sampler, class_name in SAMPLER_CLASS.items():
        config = dry_run(tmp_path, data, name, f'--sampler={sampler}')
        assert config['noise_kwargs']['class_name'] == class_name, sampler
        # Nothing else changes: the loss weight stays the preset's.
        assert {k: v for k, v in config.items() if k != 'noise_kwargs'} == {
            k: v for k, v in base.items() if k != 'noise_kwargs'
        }
    # --weight overrides the preset too (the paper's EDM transfer baseline on binarised data).
    config = dry_run(tmp_path, data, name, '--sampler=lognormal', '--weight=edm')
    assert config['loss_kwargs']['weight'] == 'edm' and config['noise_kwargs']['class_name'] == LOGNORMAL


@pytest.mark.parametrize('name', sorted(TWINS))
def test_infonoise_preset_differs_from_edm_only_in_sampler(tmp_path, datasets, name):
    data = datasets(EXPECTED[name]['data'])
    assert dry_run(tmp_path, data, name, '--sampler=lognormal') == dry_run(tmp_path, data, TWINS[name])
