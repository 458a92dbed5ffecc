"""FD-MNIST detector: the committed weights, the detector protocol on every input layout, and held-out accuracy."""

import re

import numpy as np
import pytest
import torch

from metrics.detectors import load_detector
from metrics.mnist_detector import (
    FEATURE_DIM,
    FORMAT,
    NUM_TRAIN,
    WEIGHTS_PATH,
    MNISTFeatureNet,
    augment,
    binarize,
    downsample,
    load_mnist_detector,
    mnist5k_split,
    to_net_input,
)
from metrics.trained_detector import TrainedDetector, train_and_save


@pytest.fixture(scope='module')
def detector():
    return load_mnist_detector()


@pytest.fixture(scope='module')
def split():
    return mnist5k_split()


def test_committed_weights_load(detector):
    assert isinstance(detector, TrainedDetector) and isinstance(load_detector('mnist', 'cpu'), TrainedDetector)
    assert detector.feature_dim == FEATURE_DIM == 128
    assert not detector.net.training
    assert not any(p.requires_grad for p in detector.parameters())
    meta = detector.meta
    # The command as it was run: before metrics/ existed, the module was training.mnist_detector.
    command = rf'python -m (training|metrics)\.mnist_detector --out \S+ --seed {meta["seed"]} --epochs {meta["epochs"]}'
    assert re.fullmatch(command, meta['command']), meta['command']


def test_parameter_count(detector):
    # Convs 1->32->64->128 (3x3, no bias) with batch norm (2 per channel), fc 128->128, classifier 128->10.
    expected = 9 * (32 + 32 * 64 + 64 * 128) + 2 * (32 + 64 + 128) + (128 * 128 + 128) + (128 * 10 + 10)
    assert expected == 110_698
    assert sum(p.numel() for p in MNISTFeatureNet().parameters()) == expected
    assert sum(p.numel() for p in detector.parameters()) == expected == detector.meta['num_params']


@pytest.mark.parametrize('resolution', [16, 28, 32])
def test_feature_shape_and_channels(detector, split, resolution):
    images = split[2][:8]
    if resolution != 32:
        images = downsample(images, resolution)
    features = detector(images)
    assert features.shape == (8, 128) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and features.abs().sum() > 0
    # Grayscale stored as RGB (three equal channels) gives exactly the same features.
    assert torch.equal(detector(images.repeat(1, 3, 1, 1)), features)


def test_features_deterministic(detector, split):
    images = split[2][:16]
    features = detector(images)
    assert torch.equal(detector(images), features)
    # Eval-mode batch norm: an image's features do not depend on the rest of the batch.
    torch.testing.assert_close(detector(images[3:4]), features[3:4], rtol=1e-5, atol=1e-5)
    # Different digits give different features.
    assert (features[0] - features[1]).abs().max() > 1e-3


def test_input_checks(detector):
    with pytest.raises(ValueError, match='uint8'):
        detector(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match='1 or 3'):
        detector(torch.zeros(2, 2, 32, 32, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match='python -m metrics.mnist_detector'):
        load_mnist_detector(path='/nonexistent/mnist_detector.pt')


def test_split(split):
    train_images, train_labels, test_images, test_labels = split
    assert train_images.shape == (NUM_TRAIN, 1, 32, 32) and test_images.shape == (1000, 1, 32, 32)
    assert train_images.dtype == torch.uint8
    # MNIST-5k has 500 digits of each class; padding leaves a 2-pixel black border.
    assert (torch.bincount(train_labels, minlength=10) + torch.bincount(test_labels, minlength=10) == 500).all()
    assert test_images[:, :, :2].max() == 0 and test_images[:, :, :, 30:].max() == 0


def predict(detector, images):
    with torch.no_grad():
        return detector.net(to_net_input(images)).argmax(dim=1)


def test_held_out_accuracy(detector, split):
    _, _, test_images, test_labels = split
    meta = detector.meta
    acc = (predict(detector, test_images) == test_labels).double().mean().item()
    acc_binary = (predict(detector, binarize(test_images)) == test_labels).double().mean().item()
    acc_16 = (predict(detector, downsample(test_images, 16)) == test_labels).double().mean().item()
    assert acc == meta['test_accuracy'] and acc > 0.98
    assert acc_binary == meta['test_accuracy_binary'] and acc_binary > 0.97
    assert acc_16 == meta['test_accuracy_16x16'] and acc_16 > 0.97
    # Unpadded 28x28 digits (resized to 32x32, so drawn 1.14x larger) are recognised too.
    acc_28 = (predict(detector, test_images[:, :, 2:30, 2:30]) == test_labels).double().mean().item()
    assert acc_28 > 0.97


def test_binarize_threshold():
    images = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    out = binarize(images).flatten()
    assert out.dtype == torch.uint8
    assert (out[:128] == 0).all() and (out[128:] == 255).all()


def test_augment_deterministic_and_binarises_half(split):
    x = split[0][:200].to(torch.float32) / 127.5 - 1
    a = augment(x.clone(), torch.Generator().manual_seed(1))
    assert torch.equal(a, augment(x.clone(), torch.Generator().manual_seed(1)))
    assert a.shape == x.shape and not torch.equal(a, x)
    assert a.min() >= -1 - 1e-5 and a.max() <= 1 + 1e-5
    # Images binarised at 32x32 keep exactly two values; about half are binarised, a third of them left at 32x32.
    two_valued = sum(bool(((img == 1) | (img == -1)).all()) for img in a)
    assert 15 <= two_valued <= 55


def test_features_match_recorded_values(detector):
    # Recorded with the weights file as it was before it gained `kwargs` (commit 7927a08): the features, hence every
    # FD-MNIST number, are unchanged. The inputs are uint8 noise from numpy's legacy RandomState (stable streams).
    images = torch.from_numpy(np.random.RandomState(0).randint(0, 256, size=(4, 1, 32, 32)).astype(np.uint8))
    features = detector(images).double()
    expected = [-5.42250394821167, -5.7902302742004395, -6.008815288543701, -5.62540864944458]
    np.testing.assert_allclose(features[:, 0].numpy(), expected, rtol=1e-5)
    assert features.square().mean().item() == pytest.approx(12.7895691340229, rel=1e-5)
    assert features.sum().item() == pytest.approx(423.61223786883056, rel=1e-5)


def test_weights_file_is_a_plain_state_dict(detector):
    data = torch.load(WEIGHTS_PATH, map_location='cpu', weights_only=True)  # No code: no TorchScript, no pickles.
    assert set(data) == {'format', 'kwargs', 'state_dict', 'meta'} and data['format'] == FORMAT
    assert data['kwargs'] == MNISTFeatureNet().kwargs == dict(channels=[32, 64, 128], feature_dim=128, num_classes=10)
    assert data['meta'] == detector.meta


def test_training_script_writes_what_the_loader_reads(tmp_path):
    # Non-default channels: the loader must build the network from the file's kwargs to take its state dict.
    def train(seed, epochs):
        torch.manual_seed(seed)
        return MNISTFeatureNet(channels=(4, 8, 16)).eval(), dict(test_accuracy=0.5)

    out = str(tmp_path / 'sub' / 'weights.pt')
    deterministic = torch.are_deterministic_algorithms_enabled()
    train_and_save('metrics.mnist_detector', train, out, 3, 1, FORMAT, split_seed=0)
    assert torch.are_deterministic_algorithms_enabled() == deterministic  # Restored for the rest of the process.
    loaded = load_mnist_detector(path=out)
    assert loaded.net.kwargs['channels'] == [4, 8, 16]
    assert loaded.meta['command'] == f'python -m metrics.mnist_detector --out {out} --seed 3 --epochs 1'
    assert loaded.meta['test_accuracy'] == 0.5 and loaded.meta['num_params'] == sum(
        p.numel() for p in loaded.parameters()
    )
    torch.manual_seed(3)
    reference = MNISTFeatureNet(channels=(4, 8, 16)).eval()
    images = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    assert torch.equal(loaded(images), reference.features(to_net_input(images)))


def test_files_without_kwargs_are_refused(tmp_path):
    path = tmp_path / 'old.pt'
    torch.save(dict(format=FORMAT, state_dict=MNISTFeatureNet().state_dict(), meta={}), path)
    with pytest.raises(ValueError, match='not an FD-MNIST weights file'):
        load_mnist_detector(path=str(path))
