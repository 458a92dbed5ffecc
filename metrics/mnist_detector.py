"""FD-MNIST: a small CNN trained here on MNIST-5k whose 128-d penultimate features stand in for Inception-v3 in fast
CPU-scale Fréchet distances on digits (comparable with each other, never with FIDs). Its model card (data, training
command, held-out accuracies) is in docs/evaluation.md, "Detectors trained here"; `python -m metrics.mnist_detector`
trains it.
"""

import os

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from metrics.trained_detector import TrainedDetector, load_weights, train_and_save, training_command
from training.dataset import mnist5k_digits

FEATURE_DIM = 128
RESOLUTION = 32
NUM_TRAIN = 4000
SPLIT_SEED = 0  # The train/test split never depends on --seed, so that every run is scored on the same digits.
WEIGHTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mnist_detector.pt')
FORMAT = 'infonoise-edm-mnist-detector'


class MNISTFeatureNet(torch.nn.Module):
    """Three conv blocks (conv 3x3, batch norm, ReLU, 2x2 max pool), global average pool, a 128-d layer with ReLU,
    and a 10-way classifier.

    Input: float [N, 1, 32, 32] in [-1, 1], EDM's pixel scaling.
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), feature_dim: int = FEATURE_DIM, num_classes=10):
        super().__init__()
        self.kwargs = dict(channels=list(channels), feature_dim=feature_dim, num_classes=num_classes)  # Saved with it.
        blocks = []
        for c_in, c_out in zip((1, *channels[:-1]), channels):
            blocks += [
                torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                torch.nn.BatchNorm2d(c_out),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
            ]
        self.conv = torch.nn.Sequential(*blocks)
        self.fc = torch.nn.Linear(channels[-1], feature_dim)
        self.classifier = torch.nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 128-d layer before its ReLU [N, feature_dim]: the FD-MNIST features.

        Taken before the ReLU because a quarter of its units never fire on MNIST: after it, they would be constant
        zeros, and the rest half-rectified, a poor fit for the Gaussian that the Fréchet distance assumes.
        """
        return self.fc(self.conv(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.relu(self.features(x)))


def to_net_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] (C = 1 or 3) to the network's float32 [N, 1, 32, 32] in [-1, 1].

    Three channels are averaged (grayscale saved as RGB has three equal ones); any other size is resized to 32x32
    with antialiased bilinear interpolation.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f'Expected uint8 images of shape [N, 1 or 3, H, W], got {images.dtype} of shape {tuple(images.shape)}'
        )
    x = images.to(torch.float32).mean(dim=1, keepdim=True)
    if x.shape[2:] != (RESOLUTION, RESOLUTION):
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode='bilinear', align_corners=False, antialias=True)
    return x / 127.5 - 1


def load_mnist_detector(device: torch.device | str = 'cpu', path: str = WEIGHTS_PATH) -> TrainedDetector:
    """The FD-MNIST detector with the committed weights (or those in `path`), in eval mode on `device`: uint8 images
    [N, 1 or 3, H, W] -> float32 features [N, 128]."""
    net, meta = load_weights(path, FORMAT, 'FD-MNIST', 'metrics.mnist_detector', MNISTFeatureNet)
    return TrainedDetector(net, to_net_input, meta).to(device)


def mnist5k_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST-5k padded to 32x32 as uint8 [N, 1, 32, 32]: (train images, labels, test images, labels), 4,000/1,000.

    The split is the first 4,000 / last 1,000 digits of a permutation drawn with numpy's legacy RandomState, whose
    streams never change across numpy versions.
    """
    images, labels = mnist5k_digits()
    images = np.pad(images, [(0, 0), (2, 2), (2, 2)])
    perm = np.random.RandomState(SPLIT_SEED).permutation(len(images))
    images = torch.from_numpy(images[perm]).unsqueeze(1)
    labels = torch.from_numpy(labels[perm].astype(np.int64))
    return images[:NUM_TRAIN], labels[:NUM_TRAIN], images[NUM_TRAIN:], labels[NUM_TRAIN:]


def binarize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to {0, 255} at the threshold dataset_tool.py's `mnist5k-binary` uses (> 127)."""
    return torch.where(images > 127, 255, 0).to(torch.uint8)


def downsample(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 images resized with Lanczos, as `dataset_tool.py --resolution` does (e.g. the 16x16 demo data)."""
    size = (resolution, resolution)
    out = [np.array(PIL.Image.fromarray(img[0].numpy()).resize(size, PIL.Image.Resampling.LANCZOS)) for img in images]
    return torch.from_numpy(np.stack(out)).unsqueeze(1)


@torch.no_grad()
def accuracy(net: MNISTFeatureNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of uint8 images [N, C, H, W] that `net` (in eval mode) classifies as `labels`."""
    device = next(net.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = net(to_net_input(images[start : start + batch_size].to(device)))
        correct += int((logits.argmax(dim=1).cpu() == labels[start : start + batch_size]).sum())
    return correct / len(images)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation of float images [N, 1, 32, 32] in [-1, 1], with one random draw per image.

    Random scale (0.85-1.25: unpadded 28x28 digits resized to 32x32 are 1.14x larger), rotation (±12°) and shift
    (±2 px); then binarisation with probability 1/2; then a down-up resize through 16, 28 or 32 pixels, so that
    the features see the blur of low-resolution samples.
    """
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    # Random similarity transform (affine_grid maps output to input coordinates, hence 1/scale).
    scale, angle = uniform(0.85, 1.25), uniform(-12, 12) * (torch.pi / 180)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * 2 / RESOLUTION)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x + 1, grid, mode='bilinear', padding_mode='zeros', align_corners=False) - 1

    # Binarise half of the images.
    binary = torch.rand(n, 1, 1, 1, generator=generator) < 0.5
    x = torch.where(binary, torch.where(x > 0, 1.0, -1.0), x)

    # Down-up resize each image through one of the resolutions.
    choice = torch.randint(0, 3, (n,), generator=generator)
    for i, res in enumerate((16, 28)):
        mask = choice == i
        if mask.any():
            low = F.interpolate(x[mask], size=(res, res), mode='bilinear', align_corners=False, antialias=True)
            x[mask] = F.interpolate(low, size=x.shape[2:], mode='bilinear', align_corners=False, antialias=True)
    return x


def train(seed: int = 0, epochs: int = 20, batch_size: int = 100, lr: float = 3e-3) -> tuple[MNISTFeatureNet, dict]:
    """Train the network on the 4,000 training digits; returns it (eval mode) and its test accuracies.

    Adam with a one-cycle learning rate; initialisation, batch order and augmentation all follow `seed`.
    """
    train_images, train_labels, test_images, test_labels = mnist5k_split()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = MNISTFeatureNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    steps_per_epoch = NUM_TRAIN // batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    x_train = train_images.to(torch.float32) / 127.5 - 1
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(NUM_TRAIN, generator=generator)
        for step in range(steps_per_epoch):
            idx = perm[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(net(augment(x_train[idx], generator)), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        net.eval()
        test_accuracy = accuracy(net, test_images, test_labels)
        print(f'epoch {epoch + 1}/{epochs}  loss {loss.item():.4f}  test accuracy {test_accuracy:.4f}')
    results = dict(
        test_accuracy=accuracy(net, test_images, test_labels),
        test_accuracy_binary=accuracy(net, binarize(test_images), test_labels),
        test_accuracy_16x16=accuracy(net, downsample(test_images, 16), test_labels),
    )
    return net, results


@training_command(seed_help='Seed for initialisation, batch order and augmentation', epochs=20)
def main(out: str, seed: int, epochs: int) -> None:
    """Train the FD-MNIST feature network on MNIST-5k and save its weights with their test accuracies.

    \b
    python -m metrics.mnist_detector --out metrics/mnist_detector.pt --seed 0 --epochs 20
    """
    train_and_save('metrics.mnist_detector', train, out, seed, epochs, FORMAT, split_seed=SPLIT_SEED)


if __name__ == '__main__':
    main()
