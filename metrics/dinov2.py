"""DINOv2 ViT-L/14 as a feature detector: FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model
evaluation metrics"), the second metric EDM2 reports (Karras et al. 2024, calculate_metrics.py).

EDM2's recipe, which `DinoV2Detector` follows: uint8 RGB images become float32 (values 0..255), are resized to
224x224 by bicubic interpolation with antialiasing (torch's, EDM2's fast default, not PIL's), divided by 255 and
normalised with the ImageNet mean and standard deviation; the feature is the network's output, the layer-normed
CLS token (1024 numbers for ViT-L/14). Grayscale images are repeated to RGB first, as for Inception.

Where the network comes from (nothing is downloaded here):
- `dinov2`: torch hub's cache (`torch.hub.get_dir()`, i.e. $TORCH_HOME/hub): the code of facebookresearch/dinov2
  in `facebookresearch_dinov2_main/` and the weights in `checkpoints/dinov2_vitl14_pretrain.pth`, as one online
  `torch.hub.load('facebookresearch/dinov2:main', 'dinov2_vitl14')` leaves them;
- `dinov2:FILE`: a TorchScript export of the whole network (normalised [N, 3, 224, 224] -> [N, D]), which needs no
  code, or the weights file `dinov2_vitl14_pretrain.pth` kept elsewhere (the code still comes from the cache).
"""

import os

import torch

HUB_REPO = 'facebookresearch_dinov2_main'  # torch.hub's folder for 'facebookresearch/dinov2:main'.
CHECKPOINT = 'dinov2_vitl14_pretrain.pth'
WEIGHTS_URL = f'https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/{CHECKPOINT}'
RESOLUTION = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def hub_paths() -> tuple[str, str]:
    """Where torch hub keeps DINOv2's code and the ViT-L/14 weights."""
    hub = torch.hub.get_dir()
    return os.path.join(hub, HUB_REPO), os.path.join(hub, 'checkpoints', CHECKPOINT)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB NCHW -> float32 [N, 3, 224, 224]: bicubic antialiased resize, then ImageNet normalisation (EDM2)."""
    x = torch.nn.functional.interpolate(
        images.to(torch.float32), size=(RESOLUTION, RESOLUTION), mode='bicubic', antialias=True
    )
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).reshape(1, 3, 1, 1)
    return (x / 255 - mean) / std


class DinoV2Detector:
    """A DINOv2 network with EDM2's input stage: uint8 RGB NCHW at any resolution -> CLS features [N, D]."""

    def __init__(self, net: torch.nn.Module, device: torch.device):
        self.net = net.eval()  # Called under no_grad; a ScriptModule has no requires_grad_.
        self.device = torch.device(device)
        self.feature_dim = int(
            self(torch.zeros([1, 3, RESOLUTION, RESOLUTION], dtype=torch.uint8, device=device)).shape[1]
        )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f'Detector input must be NCHW images with 1 or 3 channels, got shape {list(images.shape)}')
        images = images.repeat([1, 3, 1, 1]) if images.shape[1] == 1 else images
        features = self.net(preprocess(images))
        if features.ndim != 2 or features.shape[0] != images.shape[0]:
            raise ValueError(f'DINOv2 must return features [N, D], got shape {list(features.shape)}')
        return features.to(torch.float32)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _missing_message(repo: str, checkpoint: str) -> str:
    return (
        f'Detector "dinov2" needs DINOv2\'s code in {repo} (git clone https://github.com/facebookresearch/dinov2 '
        f'there) and the ViT-L/14 weights in {checkpoint} (from {WEIGHTS_URL}); online, '
        "torch.hub.load('facebookresearch/dinov2:main', 'dinov2_vitl14') puts both there; or pass "
        '--detector=dinov2:FILE with a TorchScript export or the .pth weights'
    )


def _build_from_hub_code(repo: str, checkpoint: str, state: dict) -> torch.nn.Module:
    """ViT-L/14 built by the cached hub code (without its own download), then `state` loaded into it."""
    import warnings

    warnings.filterwarnings('ignore', 'xFormers is not available')
    try:
        net = torch.hub.load(repo, 'dinov2_vitl14', source='local', pretrained=False, verbose=False)
        net.load_state_dict(state)
    except Exception as e:  # The hub code is someone else's: any failure becomes one line.
        raise ValueError(f'Cannot build DINOv2 from "{repo}" with "{checkpoint}": {_first_line(e)}') from None
    return net


def load_dinov2_detector(device: torch.device | str, path: str | None = None) -> DinoV2Detector:
    """DINOv2 ViT-L/14 from torch hub's cache (`path` None) or from `path`: a TorchScript export, or the weights."""
    device = torch.device(device)
    repo, checkpoint = hub_paths()
    if path is None:
        if not os.path.isdir(repo) or not os.path.isfile(checkpoint):
            raise ValueError(_missing_message(repo, checkpoint))
        path = checkpoint
    elif not os.path.isfile(path):
        raise ValueError(f'Detector "dinov2:{path}": no such file')
    try:
        net = torch.jit.load(path, map_location=device)  # A TorchScript export needs no code.
    except (RuntimeError, ValueError):
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:
            raise ValueError(f'Cannot read DINOv2 weights "{path}": {_first_line(e)}') from None
        if not os.path.isdir(repo):
            raise ValueError(_missing_message(repo, checkpoint)) from None
        net = _build_from_hub_code(repo, path, state)
    return DinoV2Detector(net.to(device), device)
