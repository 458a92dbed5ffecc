"""FD-ARS: a small 1-D CNN trained here on the real yeast ARS1 library whose 128-d penultimate features give fast
CPU-scale Fréchet distances on one-hot DNA of 128 nt (comparable with each other only); the DNA counterpart of
FD-MNIST (metrics/mnist_detector.py). Its model card (data, task, network, training command, held-out accuracies,
what FD-ARS tells apart) is in docs/evaluation.md, "Detectors trained here"; `python -m metrics.dna_detector`
trains it.
"""

import os

import numpy as np
import torch
import torch.nn.functional as F

from metrics.frechet import FeatureStats, frechet_distance
from metrics.trained_detector import TrainedDetector, load_weights, train_and_save, training_command
from training import sequences

SEQUENCE_LENGTH = 128
FEATURE_DIM = 128
CLASSES = ('library', 'selected', 'corrupted')
NUM_TRAIN = 32_000  # Per class: 96,000 training sequences.
NUM_TEST = 6_000  # Per class: 18,000 held-out sequences.
FLOOR_SIZE = 1000
SPLIT_SEED = 0  # The split and the held-out corruptions never depend on --seed, so every run is scored alike.
SHUFFLE_K = (2, 4, 8, 16)
RESAMPLE_RANGE = (0.1, 0.3)
WEIGHTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'dna_detector.pt')
FORMAT = 'infonoise-edm-dna-detector'


class DNAFeatureNet(torch.nn.Module):
    """Three conv blocks (conv, batch norm, ReLU, max pool 2) over 128 -> 16 positions, a position-aware linear
    layer on the flattened 64 x 16 map to 128 features, and a 3-way classifier.

    Input: float [N, 4, 128], one-hot rows A, C, G, T with entries 0/1.
    """

    def __init__(self, channels=(64, 64, 64), kernels=(9, 5, 5), feature_dim=FEATURE_DIM, num_classes=len(CLASSES)):
        super().__init__()
        self.kwargs = dict(
            channels=list(channels), kernels=list(kernels), feature_dim=feature_dim, num_classes=num_classes
        )  # Saved with the weights.
        blocks = []
        for c_in, c_out, k in zip((4, *channels[:-1]), channels, kernels):
            blocks += [
                torch.nn.Conv1d(c_in, c_out, k, padding=k // 2, bias=False),
                torch.nn.BatchNorm1d(c_out),
                torch.nn.ReLU(),
                torch.nn.MaxPool1d(2),
            ]
        self.conv = torch.nn.Sequential(*blocks)
        self.fc = torch.nn.Linear(channels[-1] * (SEQUENCE_LENGTH >> len(channels)), feature_dim)
        self.classifier = torch.nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 128-d layer before its ReLU [N, feature_dim]: the FD-ARS features."""
        if x.ndim != 3 or x.shape[1] != 4 or x.shape[2] != SEQUENCE_LENGTH:
            raise ValueError(f'The ARS detector takes one-hot DNA [N, 4, {SEQUENCE_LENGTH}], got {list(x.shape)}')
        return self.fc(self.conv(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.relu(self.features(x)))


def to_net_input(seqs: torch.Tensor) -> torch.Tensor:
    """The sequence datasets' uint8 [N, 4, 1, L] (255 at each base) or float [N, 4, L] to float32 [N, 4, L] 0/1."""
    if seqs.dtype == torch.uint8 and seqs.ndim == 4 and seqs.shape[1] == 4 and seqs.shape[2] == 1:
        seqs = seqs[:, :, 0, :].to(torch.float32) / 255
    elif not (seqs.is_floating_point() and seqs.ndim == 3 and seqs.shape[1] == 4):
        raise ValueError(f'Expected uint8 [N, 4, 1, L] or float [N, 4, L], got {seqs.dtype} {list(seqs.shape)}')
    if seqs.shape[-1] != SEQUENCE_LENGTH:
        raise ValueError(f'The ARS detector takes sequences of length {SEQUENCE_LENGTH}, got {seqs.shape[-1]}')
    return seqs.to(torch.float32)


def tokens_to_net_input(tokens: np.ndarray) -> torch.Tensor:
    """Base indices uint8 [N, L] to the network's float32 one-hot [N, 4, L]."""
    return F.one_hot(torch.from_numpy(np.asarray(tokens)).long(), 4).permute(0, 2, 1).to(torch.float32)


def load_dna_detector(
    device: torch.device | str = 'cpu', path: str = WEIGHTS_PATH, sequence_length: int = SEQUENCE_LENGTH
) -> TrainedDetector:
    """The FD-ARS detector with the committed weights (or those in `path`), in eval mode on `device`: the sequence
    datasets' uint8 [N, 4, 1, 128] (255 at each base) or float one-hot [N, 4, 128] -> float32 features [N, 128]."""
    if sequence_length != SEQUENCE_LENGTH:
        raise ValueError(f'Detector "ars" takes sequences of length {SEQUENCE_LENGTH}, not {sequence_length}')
    net, meta = load_weights(path, FORMAT, 'FD-ARS', 'metrics.dna_detector', DNAFeatureNet)
    return TrainedDetector(net, to_net_input, meta).to(device)


def corrupt(tokens: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Unnatural versions of base indices [N, L]: half get a random 10-30% of positions resampled uniformly, the
    other half their non-overlapping k-mers (k = 2, 4, 8 or 16) put in a random order."""
    n, length = tokens.shape
    out = tokens.copy()
    shuffled = rng.rand(n) < 0.5
    fraction = rng.uniform(*RESAMPLE_RANGE, size=n)
    resample = (rng.rand(n, length) < fraction[:, None]) & ~shuffled[:, None]
    out[resample] = rng.randint(0, 4, size=int(resample.sum()))
    k = np.array(SHUFFLE_K)[rng.randint(0, len(SHUFFLE_K), size=n)]
    for size in SHUFFLE_K:
        rows = np.flatnonzero(shuffled & (k == size))
        num_blocks = -(-length // size)
        blocks = np.argsort(rng.rand(len(rows), num_blocks), axis=1)
        # Positions of the blocks in their new order; the last, shorter block's padding is dropped.
        order = (blocks[:, :, None] * size + np.arange(size)).reshape(len(rows), -1)
        order = order[order < length].reshape(len(rows), length)
        out[rows] = np.take_along_axis(tokens[rows], order, axis=1)
    return out


def ars_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed split of the ARS sequences, centre 128 nt, as base indices uint8 [N, 128]:
    (train real, train real labels, train corruption sources, test tokens, test labels).

    Rows are taken in the order of a permutation by numpy's legacy RandomState(SPLIT_SEED), whose streams never
    change across numpy versions: the first NUM_TRAIN 'library' and 'selected' rows train, the next NUM_TEST test;
    of the remaining rows (either label), the first NUM_TRAIN are corrupted afresh every epoch, the next NUM_TEST
    once, by the same RandomState, for the held-out 'corrupted' class. Labels index CLASSES.
    """
    names, seqs, labels = sequences.read_ars()
    rng = np.random.RandomState(SPLIT_SEED)
    perm = rng.permutation(len(seqs))
    selected = np.array([label == 'selected' for label in labels])[perm]
    library_rows, selected_rows = perm[~selected], perm[selected]
    used = np.concatenate([library_rows[: NUM_TRAIN + NUM_TEST], selected_rows[: NUM_TRAIN + NUM_TEST]])
    rest = perm[~np.isin(perm, used)]

    def encode(rows: np.ndarray) -> np.ndarray:
        return sequences.encode([seqs[i] for i in rows], [names[i] for i in rows], length=SEQUENCE_LENGTH)

    train = encode(np.concatenate([library_rows[:NUM_TRAIN], selected_rows[:NUM_TRAIN]]))
    test_real = encode(
        np.concatenate(
            [library_rows[NUM_TRAIN : NUM_TRAIN + NUM_TEST], selected_rows[NUM_TRAIN : NUM_TRAIN + NUM_TEST]]
        )
    )
    sources = encode(rest[:NUM_TRAIN])
    test_corrupted = corrupt(encode(rest[NUM_TRAIN : NUM_TRAIN + NUM_TEST]), rng)
    train_labels = np.repeat([0, 1], NUM_TRAIN)
    test_labels = np.repeat([0, 1, 2], NUM_TEST)
    return train, train_labels, sources, np.concatenate([test_real, test_corrupted]), test_labels


@torch.no_grad()
def accuracy(net: DNAFeatureNet, tokens: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> dict:
    """Held-out accuracy of `net` (eval mode) on base indices [N, L], overall and per class of CLASSES."""
    predictions = np.concatenate(
        [
            net(tokens_to_net_input(tokens[start : start + batch_size])).argmax(dim=1).numpy()
            for start in range(0, len(tokens), batch_size)
        ]
    )
    correct = predictions == labels
    results = dict(test_accuracy=float(correct.mean()))
    for i, name in enumerate(CLASSES):
        results[f'test_accuracy_{name}'] = float(correct[labels == i].mean())
    return results


def frechet_between(detector: TrainedDetector, a: np.ndarray, b: np.ndarray) -> float:
    """FD-ARS between two sets of base indices [N, L], with the project's Fréchet code (as fid.py computes it)."""
    moments = []
    for tokens in (a, b):
        stats = FeatureStats()
        for start in range(0, len(tokens), 1000):
            stats.append(detector(tokens_to_net_input(tokens[start : start + 1000])))
        moments.append((stats.mu, stats.sigma))
    return frechet_distance(*moments[0], *moments[1])


def real_floor(detector: TrainedDetector, test_tokens: np.ndarray, test_labels: np.ndarray) -> float:
    """FD-ARS between two disjoint sets of FLOOR_SIZE held-out real sequences (both labels, in a fixed random order):
    what a perfect generator scores at that sample size."""
    real = test_tokens[test_labels < 2]
    order = np.random.RandomState(SPLIT_SEED).permutation(len(real))
    return frechet_between(detector, real[order[:FLOOR_SIZE]], real[order[FLOOR_SIZE : 2 * FLOOR_SIZE]])


def train(seed: int = 0, epochs: int = 4, batch_size: int = 250, lr: float = 3e-3) -> tuple[DNAFeatureNet, dict]:
    """Train the network on the fixed training split; returns it (eval mode), its held-out accuracies and real floor.

    Adam with a one-cycle learning rate; initialisation, batch order and the training corruptions follow
    `seed`. Every epoch sees the 2 x NUM_TRAIN real sequences and NUM_TRAIN freshly corrupted ones.
    """
    train_real, train_labels, sources, test_tokens, test_labels = ars_split()
    torch.manual_seed(seed)
    rng = np.random.RandomState(seed)
    net = DNAFeatureNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    num_items = 3 * NUM_TRAIN
    steps_per_epoch = num_items // batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    labels = torch.from_numpy(np.concatenate([train_labels, np.full(NUM_TRAIN, 2)]))
    for epoch in range(epochs):
        tokens = np.concatenate([train_real, corrupt(sources, rng)])
        perm = rng.permutation(num_items)
        net.train()
        for step in range(steps_per_epoch):
            idx = perm[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(net(tokens_to_net_input(tokens[idx])), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        net.eval()
        results = accuracy(net, test_tokens, test_labels)
        print(
            f'epoch {epoch + 1}/{epochs}  loss {loss.item():.4f}  '
            + '  '.join(f'{k} {v:.4f}' for k, v in results.items())
        )
    results = accuracy(net, test_tokens, test_labels)
    results['real_floor'] = real_floor(TrainedDetector(net, to_net_input), test_tokens, test_labels)
    return net, results


@training_command(seed_help='Seed for initialisation, batch order and training corruptions', epochs=4)
def main(out: str, seed: int, epochs: int) -> None:
    """Train the FD-ARS feature network on the ARS sequences and save its weights with their held-out accuracies.

    \b
    python -m metrics.dna_detector --out metrics/dna_detector.pt --seed 0 --epochs 4
    """
    train_and_save(
        'metrics.dna_detector', train, out, seed, epochs, FORMAT,
        split_seed=SPLIT_SEED, num_train=3 * NUM_TRAIN, num_test=3 * NUM_TEST,
    )  # fmt: skip


if __name__ == '__main__':
    main()
