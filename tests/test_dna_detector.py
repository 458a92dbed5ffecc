"""FD-ARS detector: the committed weights, the detector protocol, held-out accuracy and the real floor."""

import importlib.util
import os
import re

import numpy as np
import pytest
import torch

from metrics.detectors import load_detector
from metrics.dna_detector import (
    FEATURE_DIM,
    FLOOR_SIZE,
    FORMAT,
    NUM_TEST,
    NUM_TRAIN,
    SEQUENCE_LENGTH,
    WEIGHTS_PATH,
    DNAFeatureNet,
    accuracy,
    ars_split,
    corrupt,
    frechet_between,
    load_dna_detector,
    real_floor,
    tokens_to_net_input,
)
from metrics.trained_detector import TrainedDetector, train_and_save
from training.sequences import one_hot, save_npz


@pytest.fixture(scope='module')
def detector():
    return load_dna_detector()


@pytest.fixture(scope='module')
def split():
    if importlib.util.find_spec('logomaker') is None:
        pytest.skip('The ARS sequences need logomaker: pip install --no-deps logomaker==0.8.7')
    return ars_split()


@pytest.fixture(scope='module')
def held_out(split):
    return split[3], split[4]


def random_tokens(n: int, length: int = SEQUENCE_LENGTH, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 4, size=(n, length)).astype(np.uint8)


def test_committed_weights_load(detector):
    assert detector.feature_dim == FEATURE_DIM == 128
    assert not detector.net.training
    assert not any(p.requires_grad for p in detector.parameters())
    assert os.path.getsize(WEIGHTS_PATH) < 2 * 2**20
    meta = detector.meta
    # The command as it was run: before metrics/ existed, the module was training.dna_detector.
    command = rf'python -m (training|metrics)\.dna_detector --out \S+ --seed {meta["seed"]} --epochs {meta["epochs"]}'
    assert re.fullmatch(command, meta['command']), meta['command']
    assert meta['num_train'] == 3 * NUM_TRAIN and meta['num_test'] == 3 * NUM_TEST


def test_parameter_count(detector):
    # Convs 4->64 (k 9), 64->64 (k 5), 64->64 (k 5), no bias, with batch norm (2 per channel); fc over the 64 x 16
    # map after three 2x poolings -> 128; classifier 128 -> 3.
    expected = 4 * 64 * 9 + 2 * 64 * 64 * 5 + 3 * 2 * 64 + (64 * 16 * 128 + 128) + (128 * 3 + 3)
    assert expected == 175_235
    assert sum(p.numel() for p in DNAFeatureNet().parameters()) == expected
    assert sum(p.numel() for p in detector.parameters()) == expected == detector.meta['num_params']


def test_feature_shape_and_input_layouts(detector):
    tokens = random_tokens(8)
    features = detector(torch.from_numpy(one_hot(tokens)))
    assert features.shape == (8, 128) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    # The dataset's uint8 [N, 4, 1, L] (255 at each base) and float one-hot [N, 4, L] are the same input.
    assert torch.equal(detector(tokens_to_net_input(tokens)), features)
    assert torch.equal(detector(tokens_to_net_input(tokens).double()), features)


def test_features_deterministic(detector):
    seqs = torch.from_numpy(one_hot(random_tokens(16, seed=1)))
    features = detector(seqs)
    assert torch.equal(detector(seqs), features)
    # Eval-mode batch norm: a sequence's features do not depend on the rest of the batch.
    torch.testing.assert_close(detector(seqs[3:4]), features[3:4], rtol=1e-5, atol=1e-5)
    assert (features[0] - features[1]).abs().max() > 1e-3


def test_input_checks(detector):
    with pytest.raises(ValueError, match='length 128, got 150'):
        detector(torch.from_numpy(one_hot(random_tokens(2, length=150))))
    with pytest.raises(ValueError, match='length 128, got 64'):
        detector(torch.zeros(2, 4, 64))
    with pytest.raises(ValueError, match=r'uint8 \[N, 4, 1, L\] or float \[N, 4, L\]'):
        detector(torch.zeros(2, 4, 1, 128))  # Float with a height axis: not a layout we take.
    with pytest.raises(ValueError, match=r'uint8 \[N, 4, 1, L\]'):
        detector(torch.zeros(2, 3, 1, 128, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match='python -m metrics.dna_detector'):
        load_dna_detector(path='/nonexistent/dna_detector.pt')


def test_ars_spec(detector):
    ars = load_detector('ars', 'cpu', sequence_length=128)
    assert isinstance(ars, TrainedDetector) and ars.feature_dim == 128
    seqs = torch.from_numpy(one_hot(random_tokens(4, seed=2)))
    assert torch.equal(ars(seqs), detector(seqs))
    with pytest.raises(ValueError, match='length 128, not 150'):
        load_detector('ars', 'cpu', sequence_length=150)
    with pytest.raises(ValueError, match='takes DNA sequences'):
        load_detector('ars', 'cpu')


def test_fid_statistics_through_sequence_dataset(tmp_path, detector, held_out):
    # fid.py's path: a sequence .npz served by SequenceDataset in batches to the 'ars' detector.
    import fid

    tokens = held_out[0][:300]
    save_npz(tmp_path / 'seqs.npz', tokens)
    dataset = fid.open_images(str(tmp_path / 'seqs.npz'))
    mu, sigma = fid.calc_stats(dataset, load_detector('ars', 'cpu', sequence_length=128), 64, 0, torch.device('cpu'))
    features = detector(tokens_to_net_input(tokens)).double().numpy()
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-5, atol=1e-5)


def test_split(split):
    train_real, train_labels, sources, test_tokens, test_labels = split
    assert train_real.shape == (2 * NUM_TRAIN, 128) and sources.shape == (NUM_TRAIN, 128)
    assert test_tokens.shape == (3 * NUM_TEST, 128) and train_real.dtype == np.uint8
    assert (np.bincount(train_labels) == NUM_TRAIN).all() and (np.bincount(test_labels) == NUM_TEST).all()
    # The library is aligned: its first 11 positions are left unmutated (the same in 99.4% of the held-out real
    # sequences), and corruption breaks them in most corrupted ones.
    real, corrupted = test_tokens[test_labels < 2], test_tokens[test_labels == 2]
    flank = np.stack([np.bincount(column, minlength=4) for column in real[:, :11].T]).argmax(axis=1)
    assert (real[:, :11] == flank).all(axis=1).mean() > 0.99
    assert (corrupted[:, :11] == flank).all(axis=1).mean() < 0.2


def test_held_out_accuracy(detector, held_out):
    # The same 18,000 held-out sequences as at training time, so the accuracies match meta exactly (the smallest gap
    # between the two largest logits is 1.8e-4, far above the rounding differences between thread counts).
    results = accuracy(detector.net, *held_out)
    for name, value in results.items():
        assert value == detector.meta[name], name
    assert results['test_accuracy'] > 0.85  # Chance is 1/3.
    assert results['test_accuracy_library'] > 0.7 and results['test_accuracy_selected'] > 0.8
    assert results['test_accuracy_corrupted'] > 0.95


def test_real_floor_and_sensitivity(detector, held_out):
    test_tokens, test_labels = held_out
    floor = real_floor(detector, test_tokens, test_labels)
    assert floor == pytest.approx(detector.meta['real_floor'], rel=1e-6)
    real = test_tokens[test_labels < 2]
    reference, other = real[:FLOOR_SIZE], real[-FLOOR_SIZE:]
    # 5% of positions resampled uniformly (3.75% changed) moves FD-ARS far above the floor.
    rng = np.random.RandomState(3)
    noisy = other.copy()
    mask = rng.rand(*noisy.shape) < 0.05
    noisy[mask] = rng.randint(0, 4, size=int(mask.sum()))
    assert frechet_between(detector, reference, noisy) > 50 * floor
    assert frechet_between(detector, reference, random_tokens(FLOOR_SIZE)) > 1000 * floor


def test_corrupt():
    tokens = np.tile(random_tokens(1, seed=4), (400, 1))
    a = corrupt(tokens, np.random.RandomState(5))
    assert np.array_equal(a, corrupt(tokens, np.random.RandomState(5)))
    assert a.dtype == np.uint8 and a.shape == tokens.shape
    # Shuffles keep each sequence's bases (a permutation); resampling changes 3/4 of 10-30% of positions.
    same_counts = (np.sort(a, axis=1) == np.sort(tokens, axis=1)).all(axis=1)
    changed = (a != tokens).mean(axis=1)
    assert 150 <= same_counts.sum() <= 250
    resampled = changed[~same_counts]
    assert resampled.min() > 0.01 and resampled.max() < 0.4 and 0.12 < resampled.mean() < 0.18


def test_features_match_recorded_values(detector):
    # Recorded with the weights file as it was before it gained `kwargs` (commit 7927a08): the features, hence every
    # FD-ARS number, are unchanged. The inputs are random bases from numpy's legacy RandomState (stable streams).
    features = detector(tokens_to_net_input(random_tokens(4, seed=0))).double()
    expected = [3.22750186920166, 4.26075553894043, 2.198464870452881, 4.335428237915039]
    np.testing.assert_allclose(features[:, 0].numpy(), expected, rtol=1e-5)
    assert features.square().mean().item() == pytest.approx(113.74701159159413, rel=1e-5)
    assert features.sum().item() == pytest.approx(-573.1733739033807, rel=1e-5)


def test_weights_file_is_a_plain_state_dict(detector):
    data = torch.load(WEIGHTS_PATH, map_location='cpu', weights_only=True)  # No code: no TorchScript, no pickles.
    assert set(data) == {'format', 'kwargs', 'state_dict', 'meta'} and data['format'] == FORMAT
    expected = dict(channels=[64, 64, 64], kernels=[9, 5, 5], feature_dim=128, num_classes=3)
    assert data['kwargs'] == DNAFeatureNet().kwargs == expected
    assert data['meta'] == detector.meta


def test_training_script_writes_what_the_loader_reads(tmp_path):
    # Non-default layers: the loader must build the network from the file's kwargs to take its state dict.
    def train(seed, epochs):
        torch.manual_seed(seed)
        return DNAFeatureNet(channels=(8, 8, 8), kernels=(3, 3, 3)).eval(), dict(test_accuracy=0.5)

    out = str(tmp_path / 'weights.pt')
    deterministic = torch.are_deterministic_algorithms_enabled()
    train_and_save('metrics.dna_detector', train, out, 2, 1, FORMAT, split_seed=0)
    assert torch.are_deterministic_algorithms_enabled() == deterministic  # Restored for the rest of the process.
    loaded = load_dna_detector(path=out)
    assert loaded.net.kwargs == dict(channels=[8, 8, 8], kernels=[3, 3, 3], feature_dim=128, num_classes=3)
    assert loaded.meta['command'] == f'python -m metrics.dna_detector --out {out} --seed 2 --epochs 1'
    torch.manual_seed(2)
    reference = DNAFeatureNet(channels=(8, 8, 8), kernels=(3, 3, 3)).eval()
    x = tokens_to_net_input(random_tokens(2))
    assert torch.equal(loaded(x), reference.features(x))


def test_files_without_kwargs_are_refused(tmp_path):
    path = tmp_path / 'old.pt'
    torch.save(dict(format=FORMAT, state_dict=DNAFeatureNet().state_dict(), meta={}), path)
    with pytest.raises(ValueError, match='not an FD-ARS weights file'):
        load_dna_detector(path=str(path))
