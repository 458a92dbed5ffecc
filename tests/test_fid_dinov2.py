"""FD-DINOv2 (metrics/dinov2.py) and several detectors in one pass of fid.py, with tiny stand-ins for the networks.

The stand-in "ViT" takes what DINOv2 takes (normalised float32 [N, 3, 224, 224]) and returns a fixed random
projection of the 2x2 average-pooled input: a TorchScript export for `dinov2:FILE`, and a module built by a fake
hub repo (hubconf.py + checkpoints/dinov2_vitl14_pretrain.pth) in a temporary torch hub cache for `dinov2`.
"""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_edm_zip

import fid
from metrics import dinov2
from metrics.detectors import load_detector, parse_detectors

pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.:DeprecationWarning')

FEATURE_DIM = 6
HUBCONF = """import torch


class TinyViT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(12, 6)

    def forward(self, x):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


def dinov2_vitl14(pretrained=True, **kwargs):
    assert not pretrained  # metrics/dinov2.py loads the weights itself.
    return TinyViT()
"""


class TinyViT(torch.nn.Module):
    """The stand-in: 12 pooled numbers -> FEATURE_DIM features (the same layout as HUBCONF's)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(12, FEATURE_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 224, 224)
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


class TinyInception(torch.nn.Module):
    """An Inception stand-in called NVIDIA's way, as in tests/test_fid.py."""

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(images.to(torch.float32), 2).flatten(1) / 255


@pytest.fixture(scope='module')
def files(tmp_path_factory, digits8):
    root = tmp_path_factory.mktemp('dinov2')
    torch.jit.script(TinyViT()).save(str(root / 'vit.pt'))
    torch.jit.script(TinyInception()).save(str(root / 'incep.pt'))
    torch.save(TinyViT().state_dict(), root / 'weights.pth')
    others = digits8[0][::-1][:40].copy()
    return dict(root=root, vit=str(root / 'vit.pt'), incep=str(root / 'incep.pt'), weights=str(root / 'weights.pth'),
                zip=write_edm_zip(root / 'digits.zip', digits8[0]), others=write_edm_zip(root / 'others.zip', others))  # fmt: skip


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub cache for this test."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / 'hub'))
    yield tmp_path / 'hub'
    torch.hub.set_dir(old)


def run_fid(*args):
    return CliRunner().invoke(fid.main, [str(arg) for arg in args])


def test_preprocessing_is_edm2s():
    # A constant image stays constant through the bicubic resize; then /255 and ImageNet's mean and std.
    images = torch.full([2, 3, 32, 48], 200, dtype=torch.uint8)
    x = dinov2.preprocess(images)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    expected = (200 / 255 - torch.tensor(dinov2.IMAGENET_MEAN)) / torch.tensor(dinov2.IMAGENET_STD)
    assert torch.allclose(x.mean([0, 2, 3]), expected, atol=1e-5) and float(x.std([2, 3]).max()) < 1e-4
    # The resize is torch's bicubic with antialiasing, on values 0..255.
    ramp = torch.arange(64, dtype=torch.uint8).repeat(1, 3, 64, 1) * 4
    resized = torch.nn.functional.interpolate(ramp.float(), size=(224, 224), mode='bicubic', antialias=True)
    assert torch.allclose(dinov2.preprocess(ramp) * torch.tensor(dinov2.IMAGENET_STD).reshape(1, 3, 1, 1)
                          + torch.tensor(dinov2.IMAGENET_MEAN).reshape(1, 3, 1, 1), resized / 255, atol=1e-6)  # fmt: skip


def test_torchscript_file_and_hub_weights_give_the_same_features(files, hub_dir, digits8):
    images = torch.as_tensor(digits8[0][:5])[:, None]
    detector = load_detector(f'dinov2:{files["vit"]}', 'cpu')
    assert detector.feature_dim == FEATURE_DIM
    features = detector(images)
    assert features.shape == (5, FEATURE_DIM) and features.dtype == torch.float32
    assert torch.equal(features, detector(images.repeat([1, 3, 1, 1])))  # Grayscale is repeated to RGB.
    with torch.no_grad():
        assert torch.allclose(features, TinyViT()(dinov2.preprocess(images.repeat([1, 3, 1, 1]))))

    # The hub cache: the repo's code builds the network, our loader puts the weights in.
    (hub_dir / dinov2.HUB_REPO).mkdir(parents=True)
    (hub_dir / dinov2.HUB_REPO / 'hubconf.py').write_text(HUBCONF)
    (hub_dir / 'checkpoints').mkdir()
    torch.save(TinyViT().state_dict(), hub_dir / 'checkpoints' / dinov2.CHECKPOINT)
    assert torch.allclose(load_detector('dinov2', 'cpu')(images), features, atol=1e-6)
    assert torch.allclose(load_detector(f'dinov2:{files["weights"]}', 'cpu')(images), features, atol=1e-6)


def test_no_weights_offline_is_one_line_naming_the_files(files, hub_dir, tmp_path):
    for spec in ('dinov2', f'dinov2:{files["weights"]}'):  # Weights elsewhere still need the code in the cache.
        with pytest.raises(ValueError) as info:
            load_detector(spec, 'cpu')
        message = str(info.value)
        assert '\n' not in message and str(hub_dir / dinov2.HUB_REPO) in message
        assert str(hub_dir / 'checkpoints' / dinov2.CHECKPOINT) in message and dinov2.WEIGHTS_URL in message
    result = run_fid('ref', '--data', files['zip'], '--dest', tmp_path / 'r.npz', '--detector', 'dinov2')
    assert result.exit_code == 1 and 'Traceback' not in result.output
    assert result.stderr.startswith('Error: Detector "dinov2" needs') and result.stderr.count('\n') == 1
    with pytest.raises(ValueError, match='no such file'):
        load_detector(f'dinov2:{tmp_path / "missing.pt"}', 'cpu')


def test_several_detectors_in_one_pass_write_and_read_one_npz_each(files, tmp_path, monkeypatch):
    specs = f'{files["incep"]},dinov2:{files["vit"]}'
    reads = []
    batches_of = fid.batches_of
    monkeypatch.setattr(
        fid, 'batches_of', lambda loader, dataset: (reads.append(1) or b for b in batches_of(loader, dataset))
    )
    result = run_fid('ref', '--data', files['others'], '--dest', tmp_path / 'others.npz', '--detector', specs,
                     '--batch', 16, '--workers', 0)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(reads) == 3  # 40 images in batches of 16, each read once for both detectors.
    paths = {name: tmp_path / f'others-{name}.npz' for name in ('incep', 'dinov2')}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())

    # Each file equals what the detector alone writes.
    for name, spec in (('incep', files['incep']), ('dinov2', f'dinov2:{files["vit"]}')):
        alone = tmp_path / f'alone-{name}.npz'
        result = run_fid('ref', '--data', files['others'], '--dest', alone, '--detector', spec, '--workers', 0)
        assert result.exit_code == 0, result.output
        with np.load(alone) as a, np.load(paths[name]) as b:
            assert np.allclose(a['mu'], b['mu'], rtol=1e-12) and np.allclose(a['sigma'], b['sigma'], rtol=1e-10)
            assert b['mu'].shape == ((12,) if name == 'incep' else (FEATURE_DIM,))

    # calc prints one line per detector; the same images against themselves give zero.
    result = run_fid('calc', '--images', files['others'], '--ref', tmp_path / 'others.npz', '--num', 40,
                     '--detector', specs, '--workers', 0)  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()[-2:]
    assert [line.split(': ')[0] for line in lines] == ['incep', 'dinov2']
    assert all(abs(float(line.split(': ')[1])) < 1e-6 for line in lines), lines
    refs = f'{tmp_path / "alone-incep.npz"},{tmp_path / "alone-dinov2.npz"}'  # Or a comma list of files, in order.
    result = run_fid('calc', '--images', files['zip'], '--ref', refs, '--num', 64, '--detector', specs, '--workers', 0)
    assert result.exit_code == 0, result.output
    values = [float(line.split(': ')[1]) for line in result.stdout.strip().splitlines()[-2:]]
    for value, name, spec in zip(values, ('incep', 'dinov2'), (files['incep'], f'dinov2:{files["vit"]}')):
        result = run_fid('calc', '--images', files['zip'], '--ref', tmp_path / f'alone-{name}.npz', '--num', 64,
                         '--detector', spec, '--workers', 0)  # fmt: skip
        assert value > 0 and value == pytest.approx(float(result.stdout.strip().splitlines()[-1]), rel=1e-5)

    # Errors: a second run will not overwrite, refs and detectors must pair up, names must differ.
    result = run_fid('ref', '--data', files['others'], '--dest', tmp_path / 'others.npz', '--detector', specs)
    assert result.exit_code != 0 and 'others-incep.npz" exists' in result.output
    result = run_fid('calc', '--images', files['zip'], '--ref', f'{refs},x.npz', '--detector', specs)
    assert result.exit_code != 0 and '--ref: 3 files for 2 detectors' in result.output
    with pytest.raises(ValueError, match='two detectors named "dinov2"'):
        parse_detectors(f'dinov2,dinov2:{files["vit"]}')
    assert parse_detectors('inception,dinov2') == ['inception', 'dinov2']
