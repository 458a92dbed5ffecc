"""Tests for training/networks.py and training/networks_1d.py: EDM's parameter counts and state-dict layout,
preconditioning formulas (EDM Table 1), layer math, initialisation, real forward/backward passes on tiny networks, the
build on the meta device, and every architecture's output against a reference written here from EDM's formulas."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from training import networks, networks_1d, options  # noqa: F401 (networks_1d registers SequenceUNet, as checkpoint does)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The architecture presets of EDM's train.py (--arch), as our train.py defines them.
PRESETS = options.ARCH_KWARGS


def build_preset(arch, img_resolution=32, label_dim=0, augment_dim=9, cres=None, use_fp16=False, dropout=0.13):
    """EDMPrecond exactly as EDM's train.py configures it, built on the meta device (no memory, no time)."""
    kwargs = dict(PRESETS[arch])
    if cres is not None:
        kwargs['channel_mult'] = cres
    if augment_dim:
        kwargs['augment_dim'] = augment_dim
    with torch.device('meta'):
        return networks.EDMPrecond(
            img_resolution=img_resolution,
            img_channels=3,
            label_dim=label_dim,
            use_fp16=use_fp16,
            dropout=dropout,
            **kwargs,
        )


def shapes(net):
    return {key: list(value.shape) for key, value in net.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------------
# 1. Parameter counts (EDM facts, table 3.1).


@pytest.mark.parametrize(
    'arch, img_resolution, label_dim, augment_dim, cres, use_fp16, params, buffers, keys',
    [
        ('ddpmpp', 32, 10, 9, None, False, 55_735_299, 32, 427),
        ('ddpmpp', 32, 0, 9, None, False, 55_733_891, 32, 425),
        ('ddpmpp', 32, 0, 0, None, False, 55_732_739, 32, 424),
        ('ncsnpp', 32, 10, 9, None, False, 56_400_643, 288, 434),
        ('ncsnpp', 32, 0, 9, None, False, 56_397_827, 288, 432),
        ('ddpmpp', 64, 0, 9, [1, 2, 2, 2], False, 61_805_571, 48, 553),
        ('ncsnpp', 64, 0, 9, [1, 2, 2, 2], False, 62_761_091, 368, 563),
        ('adm', 64, 1000, 0, None, True, 295_899_267, 48, 553),
    ],
)
def test_parameter_counts(arch, img_resolution, label_dim, augment_dim, cres, use_fp16, params, buffers, keys):
    net = build_preset(arch, img_resolution, label_dim, augment_dim, cres, use_fp16)
    assert sum(p.numel() for p in net.parameters()) == params
    assert sum(b.numel() for b in net.buffers()) == buffers
    assert len(net.state_dict()) == keys
    assert all(key.startswith('model.') for key in net.state_dict())
    assert all(p.device.type == 'meta' for p in net.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# 2. State-dict keys, shapes and block structure (EDM facts, section 3.2).

BLOCK_KEYS = [
    'norm0.weight',
    'norm0.bias',
    'conv0.weight',
    'conv0.bias',
    'affine.weight',
    'affine.bias',
    'norm1.weight',
    'norm1.bias',
    'conv1.weight',
    'conv1.bias',
]


def test_ddpmpp_first_45_keys():
    net = build_preset('ddpmpp', label_dim=10)
    expected = [
        ('model.map_label.weight', [128, 10]),
        ('model.map_label.bias', [128]),
        ('model.map_augment.weight', [128, 9]),
        ('model.map_layer0.weight', [512, 128]),
        ('model.map_layer0.bias', [512]),
        ('model.map_layer1.weight', [512, 512]),
        ('model.map_layer1.bias', [512]),
        ('model.enc.32x32_conv.weight', [128, 3, 3, 3]),
        ('model.enc.32x32_conv.bias', [128]),
        ('model.enc.32x32_block0.norm0.weight', [128]),
        ('model.enc.32x32_block0.norm0.bias', [128]),
        ('model.enc.32x32_block0.conv0.weight', [256, 128, 3, 3]),
        ('model.enc.32x32_block0.conv0.bias', [256]),
        ('model.enc.32x32_block0.affine.weight', [256, 512]),
        ('model.enc.32x32_block0.affine.bias', [256]),
        ('model.enc.32x32_block0.norm1.weight', [256]),
        ('model.enc.32x32_block0.norm1.bias', [256]),
        ('model.enc.32x32_block0.conv1.weight', [256, 256, 3, 3]),
        ('model.enc.32x32_block0.conv1.bias', [256]),
        ('model.enc.32x32_block0.skip.weight', [256, 128, 1, 1]),
        ('model.enc.32x32_block0.skip.bias', [256]),
    ]
    expected_keys = [key for key, _ in expected]
    for idx in (1, 2, 3):
        expected_keys += [f'model.enc.32x32_block{idx}.{key}' for key in BLOCK_KEYS]
    expected_keys = expected_keys[:45]
    items = list(shapes(net).items())
    assert [key for key, _ in items[:45]] == expected_keys
    assert items[:21] == expected


def test_ddpmpp_keys_and_structure():
    net = build_preset('ddpmpp', label_dim=10)
    sd = shapes(net)
    assert sd['model.enc.16x16_down.conv0.resample_filter'] == [1, 1, 2, 2]
    assert sd['model.enc.16x16_down.skip.weight'] == [256, 256, 1, 1]
    assert sd['model.enc.16x16_down.skip.resample_filter'] == [1, 1, 2, 2]
    assert sd['model.enc.16x16_block0.norm2.weight'] == [256]
    assert sd['model.enc.16x16_block0.qkv.weight'] == [768, 256, 1, 1]
    assert sd['model.enc.16x16_block0.proj.weight'] == [256, 256, 1, 1]
    assert list(sd.items())[-4:] == [
        ('model.dec.32x32_aux_norm.weight', [256]),
        ('model.dec.32x32_aux_norm.bias', [256]),
        ('model.dec.32x32_aux_conv.weight', [3, 256, 3, 3]),
        ('model.dec.32x32_aux_conv.bias', [3]),
    ]
    down_keys = [key for key in sd if key.startswith('model.enc.16x16_down.')]
    assert down_keys == [f'model.enc.16x16_down.{k}' for k in BLOCK_KEYS[:4]] + [
        'model.enc.16x16_down.conv0.resample_filter',
        *[f'model.enc.16x16_down.{k}' for k in BLOCK_KEYS[4:]],
        'model.enc.16x16_down.skip.weight',
        'model.enc.16x16_down.skip.bias',
        'model.enc.16x16_down.skip.resample_filter',
    ]

    enc = net.model.enc
    dec = net.model.dec
    blocks = [f'block{i}' for i in range(4)]
    assert list(enc) == (
        ['32x32_conv']
        + [f'32x32_{b}' for b in blocks]
        + ['16x16_down']
        + [f'16x16_{b}' for b in blocks]
        + ['8x8_down']
        + [f'8x8_{b}' for b in blocks]
    )
    blocks = [f'block{i}' for i in range(5)]
    assert list(dec) == (
        ['8x8_in0', '8x8_in1']
        + [f'8x8_{b}' for b in blocks]
        + ['16x16_up']
        + [f'16x16_{b}' for b in blocks]
        + ['32x32_up']
        + [f'32x32_{b}' for b in blocks]
        + ['32x32_aux_norm', '32x32_aux_conv']
    )
    assert (enc['32x32_block0'].in_channels, enc['32x32_block0'].out_channels) == (128, 256)
    assert [dec[f'8x8_block{i}'].in_channels for i in range(5)] == [512] * 5
    assert [dec[f'32x32_block{i}'].in_channels for i in range(5)] == [512] * 4 + [384]
    attention = {
        f'{part}.{name}': block.num_heads
        for part, modules in (('enc', enc), ('dec', dec))
        for name, block in modules.items()
        if isinstance(block, networks.UNetBlock) and block.num_heads
    }
    assert attention == {
        'enc.16x16_block0': 1,
        'enc.16x16_block1': 1,
        'enc.16x16_block2': 1,
        'enc.16x16_block3': 1,
        'dec.8x8_in0': 1,
        'dec.16x16_block4': 1,
    }


def test_ncsnpp_keys():
    net = build_preset('ncsnpp', label_dim=10)
    sd = shapes(net)
    keys = list(sd)
    assert keys[:4] == [
        'model.map_noise.freqs',
        'model.map_label.weight',
        'model.map_label.bias',
        'model.map_augment.weight',
    ]
    assert sd['model.map_noise.freqs'] == [128]
    assert sd['model.map_label.weight'] == [256, 10]
    assert sd['model.map_augment.weight'] == [256, 9]
    assert sd['model.map_layer0.weight'] == [512, 256]
    assert sd['model.enc.16x16_aux_residual.weight'] == [256, 3, 3, 3]
    assert sd['model.enc.16x16_aux_residual.bias'] == [256]
    assert sd['model.enc.16x16_aux_residual.resample_filter'] == [1, 1, 4, 4]
    assert sd['model.enc.8x8_aux_residual.weight'] == [256, 256, 3, 3]
    filters = [shape for key, shape in sd.items() if key.endswith('resample_filter')]
    assert len(filters) == 10 and all(shape == [1, 1, 4, 4] for shape in filters)
    names = list(net.model.enc)
    assert names[names.index('16x16_down') + 1] == '16x16_aux_residual'
    assert names[names.index('8x8_down') + 1] == '8x8_aux_residual'


def test_adm_keys_and_structure():
    net = build_preset('adm', img_resolution=64, label_dim=1000, augment_dim=0, use_fp16=True)
    sd = shapes(net)
    assert list(sd.items())[:6] == [
        ('model.map_layer0.weight', [768, 192]),
        ('model.map_layer0.bias', [768]),
        ('model.map_layer1.weight', [768, 768]),
        ('model.map_layer1.bias', [768]),
        ('model.map_label.weight', [768, 1000]),
        ('model.enc.64x64_conv.weight', [192, 3, 3, 3]),
    ]
    assert not any('map_noise' in key for key in sd) and 'model.map_label.bias' not in sd
    assert list(sd.items())[-4:] == [
        ('model.out_norm.weight', [192]),
        ('model.out_norm.bias', [192]),
        ('model.out_conv.weight', [3, 192, 3, 3]),
        ('model.out_conv.bias', [3]),
    ]
    assert sd['model.enc.32x32_block0.affine.weight'] == [768, 768]
    assert sd['model.enc.8x8_block0.affine.weight'] == [1536, 768]
    for name in ('enc.32x32_down', 'enc.16x16_down', 'enc.8x8_down', 'dec.16x16_up', 'dec.32x32_up', 'dec.64x64_up'):
        skip_keys = [key for key in sd if key.startswith(f'model.{name}.skip.')]
        assert skip_keys == [f'model.{name}.skip.resample_filter']

    enc = net.model.enc
    dec = net.model.dec
    levels = [(64, 0), (32, 6), (16, 9), (8, 12)]
    expected_enc = ['64x64_conv']
    for res, _ in levels:
        expected_enc += ([] if res == 64 else [f'{res}x{res}_down']) + [f'{res}x{res}_block{i}' for i in range(3)]
    assert list(enc) == expected_enc
    assert [enc[f'{res}x{res}_block0'].out_channels for res, _ in levels] == [192, 384, 576, 768]
    for res, heads in levels:
        assert [enc[f'{res}x{res}_block{i}'].num_heads for i in range(3)] == [heads] * 3
    assert enc['32x32_down'].num_heads == 0
    assert (dec['8x8_in0'].num_heads, dec['8x8_in1'].num_heads) == (12, 0)
    dec_inputs = {
        8: [1536, 1536, 1536, 1344],
        16: [1344, 1152, 1152, 960],
        32: [960, 768, 768, 576],
        64: [576, 384, 384, 384],
    }
    for res, heads in levels:
        assert [dec[f'{res}x{res}_block{i}'].in_channels for i in range(4)] == dec_inputs[res]
        assert [dec[f'{res}x{res}_block{i}'].num_heads for i in range(4)] == [heads] * 4
    assert list(dec)[:2] == ['8x8_in0', '8x8_in1'] and list(dec)[-5] == '64x64_up'


# ---------------------------------------------------------------------------------------------------------------------
# 3. Preconditioning (EDM Table 1) with a stub model.


class StubModel(torch.nn.Module):
    """Returns a constant F in the first `img_channels` channels (a huge value elsewhere) and records its inputs."""

    def __init__(self, img_channels, out_channels):
        super().__init__()
        self.img_channels = img_channels
        self.out_channels = out_channels
        self.value = 0.0
        self.dtype = torch.float32
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None, **kwargs):
        self.calls.append(dict(x=x, noise_labels=noise_labels, class_labels=class_labels, kwargs=kwargs))
        out = torch.full([x.shape[0], self.out_channels, *x.shape[2:]], self.value, dtype=self.dtype)
        out[:, self.img_channels :] = 1e6
        return out


def with_stub(precond_class, label_dim=0, **kwargs):
    tiny = dict(model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    with torch.device('meta'):
        net = precond_class(img_resolution=4, img_channels=3, label_dim=label_dim, **tiny, **kwargs)
    out_channels = 6 if precond_class is networks.iDDPMPrecond else 3
    net.model = StubModel(3, out_channels)
    return net


def vp_t(sigma, beta_d=19.9, beta_min=0.1):
    return (np.sqrt(beta_min**2 + 2 * beta_d * np.log1p(sigma**2)) - beta_min) / beta_d


def ref(c):
    return torch.tensor(c).reshape(-1, 1, 1, 1)


def closed_forms(name, sigma, net):
    """(c_skip, c_out, c_in, c_noise) of EDM Table 1 in float64."""
    if name == 'EDMPrecond':
        sd = 0.5
        return (
            sd**2 / (sigma**2 + sd**2),
            sigma * sd / np.sqrt(sigma**2 + sd**2),
            1 / np.sqrt(sigma**2 + sd**2),
            np.log(sigma) / 4,
        )
    if name == 'VPPrecond':
        return np.ones_like(sigma), -sigma, 1 / np.sqrt(sigma**2 + 1), 999 * vp_t(sigma)
    if name == 'VEPrecond':
        return np.ones_like(sigma), sigma, np.ones_like(sigma), np.log(sigma / 2)
    u = net.u.double().numpy()
    index = np.abs(sigma[:, None] - u[None, :]).argmin(axis=1)
    return np.ones_like(sigma), -sigma, 1 / np.sqrt(sigma**2 + 1), 999 - index.astype(np.float64)


@pytest.mark.parametrize('name', ['EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond'])
def test_preconditioning_coefficients(name):
    net = with_stub(getattr(networks, name))
    sigma = np.array([0.002, 0.03, 0.5, 1.0, 7.3, 80.0])
    if name == 'iDDPMPrecond':
        # Some exact table entries and some values in between.
        sigma = np.concatenate([net.u[[1, 10, 300, 998]].double().numpy(), sigma])
    c_skip, c_out, c_in, c_noise = closed_forms(name, sigma, net)
    torch.manual_seed(0)
    x = torch.randn(len(sigma), 3, 4, 4, dtype=torch.float64)
    sigma_t = torch.tensor(sigma)

    # With F = 0 the output is c_skip x; the model saw c_in x and c_noise.
    net.model.value = 0.0
    D_x = net(x, sigma_t)
    assert D_x.dtype == torch.float32 and D_x.shape == x.shape
    torch.testing.assert_close(D_x.double(), ref(c_skip) * x, rtol=1e-5, atol=1e-6)
    call = net.model.calls[-1]
    torch.testing.assert_close(call['x'].double(), ref(c_in) * x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(call['noise_labels'].double(), torch.tensor(c_noise), rtol=1e-5, atol=1e-5)
    assert call['class_labels'] is None

    # With F = 1 the output is c_skip x + c_out (only the first img_channels of F are used).
    net.model.value = 1.0
    D_x = net(x, sigma_t)
    torch.testing.assert_close((D_x.double() - ref(c_skip) * x), ref(c_out).expand_as(x), rtol=1e-5, atol=1e-5)


def test_precond_labels_broadcast_and_dtype():
    net = with_stub(networks.EDMPrecond, label_dim=5)
    x = torch.randn(4, 3, 4, 4)

    # A 0-dim sigma gives one noise label that the network broadcasts over the batch.
    net(x, torch.tensor(2.0))
    call = net.model.calls[-1]
    assert call['noise_labels'].shape == (1,)
    torch.testing.assert_close(call['noise_labels'], torch.tensor([math.log(2.0) / 4]))
    torch.testing.assert_close(call['class_labels'], torch.zeros(1, 5))

    labels = torch.eye(5, dtype=torch.float64)[[0, 2, 4, 1]]
    augment_labels = torch.randn(4, 9)
    net(x, torch.full([4], 0.7), labels, augment_labels=augment_labels)
    call = net.model.calls[-1]
    assert call['class_labels'].dtype == torch.float32 and torch.equal(call['class_labels'], labels.float())
    assert call['kwargs'].keys() == {'augment_labels'} and call['kwargs']['augment_labels'] is augment_labels

    # fp16 is used only on CUDA, so on the CPU the model still runs in float32.
    fp16 = with_stub(networks.EDMPrecond, use_fp16=True)
    assert fp16(x, torch.tensor(2.0), force_fp32=False).dtype == torch.float32
    assert fp16.model.calls[-1]['x'].dtype == torch.float32

    # A model that returns another dtype is an error, except under autocast where layers choose their own.
    net.model.dtype = torch.bfloat16
    with pytest.raises(RuntimeError, match='instead of torch.float32'):
        net(x, torch.tensor(2.0))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert net(x, torch.tensor(2.0)).dtype == torch.float32


def test_vp_sigma_schedule():
    net = with_stub(networks.VPPrecond)
    assert net.sigma_min == pytest.approx(0.0010005, rel=1e-4)
    assert net.sigma_max == pytest.approx(152.167, abs=1e-3)
    t = torch.linspace(1e-5, 1, 21, dtype=torch.float64)
    sigma = net.sigma(t)
    torch.testing.assert_close(sigma, torch.sqrt(torch.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1))
    torch.testing.assert_close(net.sigma_inv(sigma), t)
    assert torch.equal(net.round_sigma(sigma), sigma)


def test_edm_and_ve_ranges():
    edm = with_stub(networks.EDMPrecond)
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data) == (0, float('inf'), 0.5)
    edm(torch.zeros(2, 3, 4, 4), torch.tensor([0.002, 80.0]))
    c_noise = edm.model.calls[-1]['noise_labels']
    torch.testing.assert_close(c_noise, torch.tensor([-1.554, 1.096]), atol=5e-4, rtol=0)
    ve = with_stub(networks.VEPrecond)
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100)


def test_iddpm_table_and_round_sigma():
    net = with_stub(networks.iDDPMPrecond)
    u = net.u.double()

    # The float32 table follows the float64 recursion u_{j-1} = sqrt((u_j^2 + 1) / max(ab(j-1) / ab(j), C_1) - 1).
    alpha_bar = np.sin(0.5 * np.pi * np.arange(1001) / 1000 / 1.008) ** 2
    u64 = np.zeros(1001)
    for j in range(1000, 0, -1):
        u64[j - 1] = np.sqrt((u64[j] ** 2 + 1) / max(alpha_bar[j - 1] / alpha_bar[j], 0.001) - 1)
    # EDM computes it in float32, which loses ~5e-4 relative accuracy at the smallest sigmas (u is a buffer, so EDM's
    # own float32 values are what checkpoints carry).
    np.testing.assert_allclose(u.numpy(), u64, rtol=1e-3)
    np.testing.assert_allclose(u.numpy()[:900], u64[:900], rtol=1e-5)
    assert u[1000] == 0 and bool((u[:-1] > u[1:]).all())
    assert (net.sigma_min, net.sigma_max) == (float(net.u[999]), float(net.u[0]))

    # Table entries map to themselves; other values snap to the nearest entry.
    assert torch.equal(net.round_sigma(net.u), net.u)
    assert torch.equal(net.round_sigma(net.u, return_index=True), torch.arange(1001))
    sigma = torch.exp(torch.linspace(-6, 5, 50, dtype=torch.float64))
    nearest = (sigma[:, None] - u[None, :]).abs().argmin(dim=1)
    rounded = net.round_sigma(sigma.reshape(5, 10))
    assert rounded.dtype == torch.float64 and rounded.shape == (5, 10)
    assert torch.equal(rounded.flatten(), u[nearest])
    assert torch.equal(net.round_sigma(sigma, return_index=True), nearest)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Layer math and initialisation.


@pytest.mark.parametrize('endpoint', [False, True])
def test_positional_embedding(endpoint):
    x = torch.tensor([0.0, 0.3, -2.5, 17.0], dtype=torch.float64)
    out = networks.PositionalEmbedding(num_channels=8, endpoint=endpoint)(x)
    freqs = (1 / 10000) ** (np.arange(4) / (4 - (1 if endpoint else 0)))
    arg = x.numpy()[:, None] * freqs[None, :]
    np.testing.assert_allclose(out.numpy(), np.concatenate([np.cos(arg), np.sin(arg)], axis=1), atol=1e-6)


def test_fourier_embedding():
    torch.manual_seed(1)
    emb = networks.FourierEmbedding(num_channels=8)
    assert emb.freqs.shape == (4,) and 'freqs' in emb.state_dict()
    x = torch.tensor([0.0, 0.01, -0.3])
    arg = 2 * np.pi * x.double().numpy()[:, None] * emb.freqs.double().numpy()[None, :]
    expected = np.concatenate([np.cos(arg), np.sin(arg)], axis=1)
    np.testing.assert_allclose(emb(x).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_conv2d_resampling():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    down = networks.Conv2d(3, 3, kernel=0, down=True, resample_filter=[1, 1])
    up = networks.Conv2d(3, 3, kernel=0, up=True, resample_filter=[1, 1])
    assert down.weight is None and down.bias is None and list(down.state_dict()) == ['resample_filter']
    torch.testing.assert_close(down(x), torch.nn.functional.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    assert networks.Conv2d(3, 3, kernel=1).resample_filter is None

    # The [1, 3, 3, 1] filter has unit DC gain: a constant image stays constant away from the zero padding.
    f = networks.Conv2d(3, 3, kernel=0, down=True, resample_filter=[1, 3, 3, 1]).resample_filter
    torch.testing.assert_close(f[0, 0], torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64)
    ones = torch.ones(1, 1, 8, 8)
    for conv in (
        networks.Conv2d(1, 1, 0, down=True, resample_filter=[1, 3, 3, 1]),
        networks.Conv2d(1, 1, 0, up=True, resample_filter=[1, 3, 3, 1]),
    ):
        interior = conv(ones)[..., 1:-1, 1:-1]
        torch.testing.assert_close(interior, torch.ones_like(interior))

    # Non-fused: resample, then the k x k convolution; bias last.
    conv = networks.Conv2d(3, 5, kernel=3, down=True, init_bias=1)
    expected = torch.nn.functional.conv2d(torch.nn.functional.avg_pool2d(x, 2), conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(conv(x), expected)

    # Fused resampling keeps the 2x output size; with [1, 1] fused upsampling equals the non-fused one.
    for filt in ([1, 1], [1, 3, 3, 1]):
        assert networks.Conv2d(3, 5, 3, down=True, resample_filter=filt, fused_resample=True)(x).shape == (2, 5, 4, 4)
        assert networks.Conv2d(3, 5, 3, up=True, resample_filter=filt, fused_resample=True)(x).shape == (2, 5, 16, 16)
    fused = networks.Conv2d(3, 5, 3, up=True, fused_resample=True, init_bias=1)
    plain = networks.Conv2d(3, 5, 3, up=True)
    plain.load_state_dict(fused.state_dict())
    torch.testing.assert_close(fused(x), plain(x))
    with pytest.raises(ValueError, match='upsample and downsample'):
        networks.Conv2d(3, 3, 3, up=True, down=True)


def test_group_norm():
    assert [networks.GroupNorm(c).num_groups for c in (8, 16, 64, 128, 256, 768)] == [2, 4, 16, 32, 32, 32]
    norm = networks.GroupNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_()
        norm.bias.uniform_()
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(norm(x), torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, eps=1e-6))


def test_attention_channel_layout():
    torch.manual_seed(0)
    C, heads = 8, 2
    block = networks.UNetBlock(C, C, emb_channels=4, attention=True, num_heads=heads, skip_scale=0.7)
    with torch.no_grad():
        block.proj.weight.normal_()
        block.proj.bias.normal_()
        block.qkv.bias.normal_()
    x = torch.randn(2, C, 3, 3)
    emb = torch.randn(2, 4)
    out = block(x, emb)

    # Residual part by hand: adaptive scale and shift (scale first), no skip layer since channels are unchanged.
    silu = torch.nn.functional.silu
    scale, shift = block.affine(emb)[:, :C, None, None], block.affine(emb)[:, C:, None, None]
    h = silu(block.norm1(block.conv0(silu(block.norm0(x)))) * (scale + 1) + shift)
    h = (block.conv1(h) + x) * 0.7

    # Attention by hand, with the qkv channels laid out as (head, channel in head, {q, k, v}).
    qkv = block.qkv(block.norm2(h)).reshape(2, heads, C // heads, 3, 9)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    w = torch.softmax(torch.einsum('bhci,bhcj->bhij', q, k) / math.sqrt(C // heads), dim=-1)
    a = torch.einsum('bhij,bhcj->bhci', w, v).reshape(2, C, 3, 3)
    expected = (block.proj(a) + h) * 0.7
    torch.testing.assert_close(out, expected)


def test_attention_op_gradient_and_fp32_softmax():
    torch.manual_seed(0)
    q = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(networks.AttentionOp.apply, (q, k))

    # Under bf16 autocast the logits and softmax are still computed in float32.
    q16 = torch.randn(2, 16, 32).bfloat16()
    k16 = torch.randn(2, 16, 32).bfloat16()
    expected = torch.einsum('ncq,nck->nqk', q16.float(), (k16 / 4).float()).softmax(dim=2).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        w = networks.AttentionOp.apply(q16, k16)
    assert w.dtype == torch.bfloat16 and torch.equal(w, expected)


def tiny_kwargs(arch):
    base = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.1)
    if arch == 'ddpmpp':
        return dict(PRESETS['ddpmpp'], **base)
    if arch == 'ncsnpp':
        return dict(PRESETS['ncsnpp'], **base)
    if arch == 'skip':
        return dict(PRESETS['ddpmpp'], **dict(base, encoder_type='skip', decoder_type='skip'))
    return dict(PRESETS['adm'], **base)


def test_song_initialisation():
    torch.manual_seed(0)
    net = networks.EDMPrecond(16, 3, label_dim=4, augment_dim=9, **tiny_kwargs('ddpmpp'))
    for name, param in net.named_parameters():
        if name.endswith('bias') and 'norm' not in name:
            assert torch.equal(param, torch.zeros_like(param)), name
    for module in net.modules():
        if isinstance(module, networks.GroupNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)) and module.eps == 1e-6
    block = net.model.enc['8x8_block0']
    for conv, scale in ((block.conv1, 1e-5), (block.proj, 1e-5), (block.qkv, math.sqrt(0.2)), (block.conv0, 1)):
        fan_in = conv.in_channels * conv.weight.shape[-1] ** 2
        fan_out = conv.out_channels * conv.weight.shape[-1] ** 2
        bound = scale * math.sqrt(6 / (fan_in + fan_out))
        assert 0.9 * bound < conv.weight.abs().max() <= bound
    aux_conv = net.model.dec['16x16_aux_conv']
    assert aux_conv.weight.abs().max() <= 1e-5 * math.sqrt(6 / (aux_conv.in_channels * 9 + 3 * 9))

    # Same seed, same network.
    torch.manual_seed(0)
    again = networks.EDMPrecond(16, 3, label_dim=4, augment_dim=9, **tiny_kwargs('ddpmpp'))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


def test_adm_initialisation():
    torch.manual_seed(0)
    net = networks.EDMPrecond(16, 3, label_dim=1000, augment_dim=9, **tiny_kwargs('adm'))
    model = net.model
    zero = [model.out_conv.weight, model.out_conv.bias, model.map_augment.weight]
    for block in list(model.enc.values())[1:] + list(model.dec.values()):
        zero += [block.conv1.weight, block.conv1.bias] + (
            [block.proj.weight, block.proj.bias] if block.num_heads else []
        )
    assert all(torch.equal(p, torch.zeros_like(p)) for p in zero)
    assert model.out_norm.eps == 1e-5

    # Weights and biases ~ U(+-1 / sqrt(fan_in)), like PyTorch's default layer init.
    conv0 = model.enc['8x8_block0'].conv0
    bound = 1 / math.sqrt(conv0.in_channels * 9)
    for tensor in (conv0.weight, conv0.bias):
        assert 0.8 * bound < tensor.abs().max() <= bound
    label_weight = model.map_label.weight
    assert abs(label_weight.std().item() - 1) < 0.01 and abs(label_weight.mean().item()) < 0.01


def test_invalid_arguments():
    with pytest.raises(ValueError, match='model_type'):
        networks.EDMPrecond(16, 3, model_type='UNet')
    with pytest.raises(ValueError, match='encoder_type'):
        networks.SongUNet(16, 3, 3, encoder_type='fancy')
    with pytest.raises(ValueError, match='init mode'):
        networks.Linear(2, 2, init_mode='orthogonal')


# ---------------------------------------------------------------------------------------------------------------------
# 5. Real forward and backward passes on tiny networks.


@pytest.mark.parametrize('arch', ['ddpmpp', 'ncsnpp', 'skip', 'adm'])
def test_forward_backward(arch):
    torch.manual_seed(0)
    net = networks.EDMPrecond(16, 3, label_dim=4, augment_dim=9, **tiny_kwargs(arch)).train()
    if arch == 'skip':
        assert {'8x8_aux_down', '8x8_aux_skip'} <= set(net.model.enc)
        assert {'8x8_aux_norm', '8x8_aux_conv', '16x16_aux_up', '16x16_aux_norm', '16x16_aux_conv'} <= set(
            net.model.dec
        )
    x = torch.randn(3, 3, 16, 16)
    labels = torch.eye(4)[[0, 3, 1]]
    augment_labels = torch.randn(3, 9)
    for sigma in (torch.tensor([0.01, 1.0, 30.0]), torch.tensor(2.5)):
        net.zero_grad(set_to_none=True)
        D_x = net(x, sigma, labels, augment_labels=augment_labels)
        assert D_x.shape == x.shape and D_x.dtype == torch.float32
        D_x.square().mean().backward()
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0

    # bf16 autocast returns float32 close to the float32 result (which section 7 checks against a reference).
    net.eval()
    with torch.no_grad():
        sigma = torch.tensor([0.01, 1.0, 30.0])
        ref = net(x, sigma, labels)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            D_x = net(x, sigma, labels)
    assert D_x.dtype == torch.float32
    assert (D_x - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize('arch', ['ddpmpp', 'adm'])
def test_label_dropout(arch):
    kwargs = dict(tiny_kwargs(arch), dropout=0, label_dropout=1)
    torch.manual_seed(0)
    net = networks.EDMPrecond(16, 3, label_dim=4, **kwargs)
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.5, 2.0])
    # Perturb the zero-initialised output layers so that the output depends on the labels.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    with torch.no_grad():
        net.train()
        dropped = [net(x, sigma, torch.eye(4)[[i, i]]) for i in range(2)]
        net.eval()
        kept = [net(x, sigma, torch.eye(4)[[i, i]]) for i in range(2)]
    torch.testing.assert_close(dropped[0], dropped[1])
    torch.testing.assert_close(dropped[0], net(x, sigma, torch.zeros(2, 4)).detach())
    assert not torch.allclose(kept[0], kept[1])


# ---------------------------------------------------------------------------------------------------------------------
# 6. Every architecture builds on the meta device (shape options can be checked before anything is written), and the
#    1-D network is known wherever stored network kwargs are turned into a network.

SHAPES = {'ddpmpp': (32, 3), 'ncsnpp': (32, 3), 'adm': (64, 3), 'ddpmpp1d': (128, 4)}


@pytest.mark.parametrize('precond', ['VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond'])
@pytest.mark.parametrize('arch', sorted(PRESETS))
def test_every_arch_builds_on_the_meta_device(arch, precond):
    assert set(PRESETS) == set(SHAPES)  # A new --arch needs a shape here.
    resolution, channels = SHAPES[arch]
    kwargs = dict(img_resolution=resolution, img_channels=channels, label_dim=10, augment_dim=9, **PRESETS[arch])
    with torch.device('meta'):
        net = getattr(networks, precond)(**kwargs)
    assert all(p.device.type == 'meta' for p in net.parameters())
    assert net.img_shape == [channels, 1 if arch == 'ddpmpp1d' else resolution, resolution]

    # The same shapes as a real build (at a small width, to stay fast).
    small = dict(kwargs, model_channels=16, num_blocks=1)
    with torch.device('meta'):
        meta = getattr(networks, precond)(**small)
    assert shapes(meta) == shapes(getattr(networks, precond)(**small))


def test_model_types_are_known_wherever_networks_are_built_from_stored_kwargs():
    # training/networks.py never imports networks_1d (no cycle); training/checkpoint.py, which every trainer and
    # loader imports, does. A fresh process that imports only checkpoint builds a stored 1-D network by name.
    code = (
        'import torch\n'
        'from training import checkpoint, networks\n'
        "assert sorted(networks.MODEL_TYPES) == ['DhariwalUNet', 'SequenceUNet', 'SongUNet'], networks.MODEL_TYPES\n"
        "cls = checkpoint.network_class('training.networks.EDMPrecond')\n"
        "with torch.device('meta'):\n"
        "    net = cls(img_resolution=16, img_channels=4, model_type='SequenceUNet', model_channels=8)\n"
        "assert type(net.model).__module__ == 'training.networks_1d' and net.img_shape == [4, 1, 16]\n"
    )
    subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True)

    # Without networks_1d the name is refused in one line.
    code = (
        'from training import networks\n'
        "try:\n    networks.EDMPrecond(16, 4, model_type='SequenceUNet')\n"
        'except ValueError as e:\n    print(e)\n'
    )
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    assert out == "Invalid model_type \"SequenceUNet\"; expected one of ['DhariwalUNet', 'SongUNet']\n"


# ---------------------------------------------------------------------------------------------------------------------
# 7. The forward pass, composed from blocks written here from EDM's formulas (edm-facts 3.3 and 3.4). The reference
#    reads only the state dict and uses torch's plain convolution and softmax; group norm, resampling, attention,
#    embeddings, skip connections and the U-Net wiring are written out below, independently of training/networks*.py.

silu = torch.nn.functional.silu


def ref_group_norm(x, weight, bias, eps):
    groups = min(32, x.shape[1] // 4)
    g = x.reshape(x.shape[0], groups, -1)
    g = (g - g.mean(dim=2, keepdim=True)) / (g.var(dim=2, unbiased=False, keepdim=True) + eps).sqrt()
    per_channel = [1, -1] + [1] * (x.ndim - 2)
    return g.reshape(x.shape) * weight.reshape(per_channel) + bias.reshape(per_channel)


def fir_down(x, taps, pad):
    """2x downsampling of the last axis by the FIR filter taps / sum(taps): y[i] = sum_k f[k] x[2i + k - pad]."""
    f = [t / sum(taps) for t in taps]
    x = torch.nn.functional.pad(x, (pad, pad))
    n = (x.shape[-1] - len(f)) // 2 + 1
    return sum(f[k] * x[..., k : k + 2 * n - 1 : 2] for k in range(len(f)))


def fir_up(x, taps, pad):
    """2x upsampling of the last axis, the transpose of fir_down with gain 2: x[i] adds 2 f[k] to y[2i + k - pad]."""
    n = x.shape[-1]
    y = x.new_zeros(*x.shape[:-1], 2 * n + len(taps))
    for k, t in enumerate(taps):
        y[..., k : k + 2 * n : 2] += 2 * t / sum(taps) * x
    return y[..., pad : pad + 2 * n]


def ref_resample(x, taps, up, pad=None):
    """Separable 2x resampling of every spatial axis ([N, C, H, W] or [N, C, L])."""
    pad = (len(taps) - 1) // 2 if pad is None else pad
    for _ in range(x.ndim - 2):
        x = (fir_up if up else fir_down)(x, taps, pad).movedim(-1, 2)  # Each axis in turn is the last one.
    return x


def ref_linear(sd, name, x):
    bias = sd.get(f'{name}.bias')
    return x @ sd[f'{name}.weight'].T + (0 if bias is None else bias)


def ref_conv(sd, name, x, taps=(1, 1), up=False, down=False, fused_down=False):
    """EDM's Conv2d (or our Conv1d): resample, then convolve with 'same' padding, bias last. A fused downsampling
    convolves first, with the filter's padding added, then filters without padding."""
    weight, bias = sd.get(f'{name}.weight'), sd.get(f'{name}.bias')
    conv = torch.nn.functional.conv1d if x.ndim == 3 else torch.nn.functional.conv2d
    if fused_down:
        x = ref_resample(conv(x, weight, padding=weight.shape[-1] // 2 + (len(taps) - 1) // 2), taps, False, pad=0)
    else:
        if up or down:
            x = ref_resample(x, taps, up)
        if weight is not None:
            x = conv(x, weight, padding=weight.shape[-1] // 2)
    return x if bias is None else x + bias.reshape([1, -1] + [1] * (x.ndim - 2))


def ref_attention(q, k, v):
    """softmax over keys of q.k / sqrt(C), applied to v; [N, heads, C, L] each."""
    w = torch.softmax(torch.einsum('nhci,nhcj->nhij', q, k) / math.sqrt(q.shape[2]), dim=-1)
    return torch.einsum('nhij,nhcj->nhci', w, v)


def ref_block(sd, name, x, emb, heads, skip_scale, eps, adaptive, taps=(1, 1), up=False, down=False):
    """UNetBlock (edm-facts 3.3): conditioned residual branch, skip, then optional multi-head self-attention."""

    def norm(t, layer):
        return ref_group_norm(t, sd[f'{name}.{layer}.weight'], sd[f'{name}.{layer}.bias'], eps)

    h = ref_conv(sd, f'{name}.conv0', silu(norm(x, 'norm0')), taps, up, down)
    params = ref_linear(sd, f'{name}.affine', emb).reshape(*emb.shape[:1], -1, *[1] * (x.ndim - 2))
    if adaptive:  # ADM: scale (first half) and shift.
        scale, shift = params[:, : h.shape[1]], params[:, h.shape[1] :]
        h = silu(norm(h, 'norm1') * (scale + 1) + shift)
    else:
        h = silu(norm(h + params, 'norm1'))
    h = ref_conv(sd, f'{name}.conv1', h)
    has_skip = any(key.startswith(f'{name}.skip.') for key in sd)
    x = (h + (ref_conv(sd, f'{name}.skip', x, taps, up, down) if has_skip else x)) * skip_scale
    if heads:
        # The qkv channels are laid out as (head, channel in head, {q, k, v}).
        qkv = ref_conv(sd, f'{name}.qkv', norm(x, 'norm2')).reshape(x.shape[0], heads, x.shape[1] // heads, 3, -1)
        a = ref_attention(qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]).reshape(x.shape)
        x = (ref_conv(sd, f'{name}.proj', a) + x) * skip_scale
    return x


def positional_freqs(channels, endpoint):
    """f_j = (1 / 10000)^(j / (C/2 - endpoint)), j < C/2, computed in float32 as EDM computes them."""
    j = torch.arange(channels // 2, dtype=torch.float32)
    return ((1 / 10000) ** (j / (channels // 2 - endpoint))).double()


def ref_song_embedding(sd, c_noise, labels, augment_labels, noise_channels, fourier):
    """DDPM++ / NCSN++ mapping: [sin, cos] of the noise label (the halves of EDM's embedding swapped)."""
    if fourier:
        arg = 2 * math.pi * torch.outer(c_noise, sd['map_noise.freqs'])
    else:
        arg = torch.outer(c_noise, positional_freqs(noise_channels, endpoint=True))
    emb = torch.cat([arg.sin(), arg.cos()], dim=1)
    emb = emb + ref_linear(sd, 'map_label', labels * math.sqrt(labels.shape[1]))
    emb = emb + ref_linear(sd, 'map_augment', augment_labels)
    return silu(ref_linear(sd, 'map_layer1', silu(ref_linear(sd, 'map_layer0', emb))))


def ref_song_unet(sd, x, c_noise, labels, augment_labels, cfg):
    """SongUNet / SequenceUNet: encoder, bottleneck, decoder with skip concatenation, summed output heads."""
    res, mult, num_blocks, attn = cfg['res'], cfg['channel_mult'], cfg['num_blocks'], cfg['attn_resolutions']
    taps, enc_type, dec_type = cfg.get('taps', (1, 1)), cfg.get('encoder_type'), cfg.get('decoder_type')
    noise_channels = cfg['model_channels'] * cfg.get('channel_mult_noise', 1)
    emb = ref_song_embedding(sd, c_noise, labels, augment_labels, noise_channels, cfg.get('fourier', False))
    block = dict(skip_scale=math.sqrt(0.5), eps=1e-6, adaptive=False, taps=taps)
    name = (lambda r: f'{r}') if cfg.get('sequence') else (lambda r: f'{r}x{r}')
    levels = len(mult)

    skips, aux = [], x
    for level in range(levels):
        r = res >> level
        if level == 0:
            x = ref_conv(sd, f'enc.{name(r)}_conv', x)
        else:
            x = ref_block(sd, f'enc.{name(r)}_down', x, emb, heads=0, down=True, **block)
            if enc_type == 'skip':
                aux = ref_resample(aux, taps, up=False)
                x = x + ref_conv(sd, f'enc.{name(r)}_aux_skip', aux)
            if enc_type == 'residual':
                x = aux = (x + ref_conv(sd, f'enc.{name(r)}_aux_residual', aux, taps, fused_down=True)) / math.sqrt(2)
        skips.append(x)
        for i in range(num_blocks):
            x = ref_block(sd, f'enc.{name(r)}_block{i}', x, emb, heads=int(r in attn), **block)
            skips.append(x)

    out = None
    for level in reversed(range(levels)):
        r = res >> level
        if level == levels - 1:
            x = ref_block(sd, f'dec.{name(r)}_in0', x, emb, heads=1, **block)
            x = ref_block(sd, f'dec.{name(r)}_in1', x, emb, heads=0, **block)
        else:
            x = ref_block(sd, f'dec.{name(r)}_up', x, emb, heads=0, up=True, **block)
        for i in range(num_blocks + 1):
            heads = int(i == num_blocks and r in attn)
            x = ref_block(sd, f'dec.{name(r)}_block{i}', torch.cat([x, skips.pop()], dim=1), emb, heads, **block)
        if cfg.get('sequence') and level == 0:
            normed = ref_group_norm(x, sd['out_norm.weight'], sd['out_norm.bias'], 1e-6)
            out = ref_conv(sd, 'out_conv', silu(normed))
        elif dec_type == 'skip' or level == 0:
            if out is not None:
                out = ref_resample(out, taps, up=True)
            normed = ref_group_norm(x, sd[f'dec.{name(r)}_aux_norm.weight'], sd[f'dec.{name(r)}_aux_norm.bias'], 1e-6)
            out = ref_conv(sd, f'dec.{name(r)}_aux_conv', silu(normed)) + (0 if out is None else out)
    assert not skips
    return out


def ref_dhariwal_unet(sd, x, c_noise, labels, augment_labels, cfg):
    """DhariwalUNet (ADM): [cos, sin] embedding, scale-shift blocks, attention in every block at attn_resolutions."""
    res, mult, num_blocks, attn, mc = (
        cfg[k] for k in ('res', 'channel_mult', 'num_blocks', 'attn_resolutions', 'model_channels')
    )
    arg = torch.outer(c_noise, positional_freqs(mc, endpoint=False))
    emb = torch.cat([arg.cos(), arg.sin()], dim=1) + ref_linear(sd, 'map_augment', augment_labels)
    emb = ref_linear(sd, 'map_layer1', silu(ref_linear(sd, 'map_layer0', emb)))
    emb = silu(emb + ref_linear(sd, 'map_label', labels))
    block = dict(skip_scale=1, eps=1e-5, adaptive=True)
    heads = lambda r, channels: channels // 64 if r in attn else 0  # noqa: E731

    skips = []
    for level, m in enumerate(mult):
        r = res >> level
        if level == 0:
            x = ref_conv(sd, f'enc.{r}x{r}_conv', x)
        else:
            x = ref_block(sd, f'enc.{r}x{r}_down', x, emb, heads=0, down=True, **block)
        skips.append(x)
        for i in range(num_blocks):
            x = ref_block(sd, f'enc.{r}x{r}_block{i}', x, emb, heads=heads(r, mc * m), **block)
            skips.append(x)
    for level, m in reversed(list(enumerate(mult))):
        r = res >> level
        if level == len(mult) - 1:
            x = ref_block(sd, f'dec.{r}x{r}_in0', x, emb, heads=x.shape[1] // 64, **block)
            x = ref_block(sd, f'dec.{r}x{r}_in1', x, emb, heads=0, **block)
        else:
            x = ref_block(sd, f'dec.{r}x{r}_up', x, emb, heads=0, up=True, **block)
        for i in range(num_blocks + 1):
            x = ref_block(
                sd, f'dec.{r}x{r}_block{i}', torch.cat([x, skips.pop()], dim=1), emb, heads(r, mc * m), **block
            )
    return ref_conv(sd, 'out_conv', silu(ref_group_norm(x, sd['out_norm.weight'], sd['out_norm.bias'], 1e-5)))


TINY = dict(channel_mult=[1, 2], attn_resolutions=[4], dropout=0)
REFERENCE_CASES = {
    # arch: (train.py preset, overrides, image shape [C, H, W], what the reference needs to know)
    'ddpmpp': ('ddpmpp', dict(TINY, model_channels=8, num_blocks=2), [3, 8, 8], {}),
    'ncsnpp': ('ncsnpp', dict(TINY, model_channels=8, num_blocks=1), [3, 8, 8], dict(taps=(1, 3, 3, 1), fourier=True)),
    'skip': (
        'ddpmpp',
        dict(TINY, model_channels=8, num_blocks=1, encoder_type='skip', decoder_type='skip'),
        [3, 8, 8],
        {},
    ),
    # 64 and 128 channels: one and two attention heads of 64 channels.
    'adm': ('adm', dict(TINY, model_channels=64, num_blocks=1), [3, 8, 8], {}),
    'ddpmpp1d': (
        'ddpmpp1d',
        dict(TINY, model_channels=8, num_blocks=1, channel_mult=[1, 2, 2], attn_resolutions=[8]),
        [4, 1, 16],
        dict(sequence=True),
    ),
}


def reference_network(arch, precond='EDMPrecond', seed=0):
    """A tiny network with every weight drawn at random (so that zero-initialised layers count), in float64 and eval
    mode, and its configuration for the reference."""
    preset, overrides, shape, extra = REFERENCE_CASES[arch]
    kwargs = dict(PRESETS[preset], **overrides)
    torch.manual_seed(seed)
    net = getattr(networks, precond)(shape[2], shape[0], label_dim=3, augment_dim=2, **kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    cfg = dict(kwargs, res=shape[2], **extra)
    return net.double().eval(), cfg, shape


def reference_model(net, cfg, x, c_noise, labels, augment_labels):
    """F(x; c_noise) by the reference, from the state dict of the network inside the preconditioner."""
    sd = {key.removeprefix('model.'): value for key, value in net.state_dict().items()}
    if cfg['model_type'] == 'DhariwalUNet':
        return ref_dhariwal_unet(sd, x, c_noise, labels, augment_labels, cfg)
    if cfg.get('sequence'):
        return ref_song_unet(sd, x[:, :, 0], c_noise, labels, augment_labels, cfg).unsqueeze(2)
    return ref_song_unet(sd, x, c_noise, labels, augment_labels, cfg)


def reference_inputs(shape, n=3):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, dtype=torch.float64, generator=generator)
    labels = torch.eye(3, dtype=torch.float64)[[2, 0, 1][:n]]
    augment_labels = torch.randn(n, 2, dtype=torch.float64, generator=generator)
    return x, labels, augment_labels


@pytest.mark.parametrize('arch', list(REFERENCE_CASES))
def test_network_matches_the_reference_in_float64(arch):
    net, cfg, shape = reference_network(arch)
    x, labels, augment_labels = reference_inputs(shape)
    c_noise = torch.tensor([-1.3, 0.2, 0.9], dtype=torch.float64)
    with torch.no_grad():
        F_x = net.model(x, c_noise, labels, augment_labels=augment_labels)
    expected = reference_model(net, cfg, x, c_noise, labels, augment_labels)
    assert F_x.dtype == torch.float64 and F_x.shape == expected.shape
    assert expected.std() > 0.1  # Not a trivially small output.
    torch.testing.assert_close(F_x, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    'precond, arch',
    [('EDMPrecond', arch) for arch in REFERENCE_CASES]
    + [('VPPrecond', 'ddpmpp'), ('VEPrecond', 'ncsnpp'), ('iDDPMPrecond', 'adm'), ('VPPrecond', 'ddpmpp1d')],
)
def test_preconditioned_network_matches_the_reference(precond, arch):
    # D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with EDM Table 1's closed forms (closed_forms above) and the
    # reference F. The preconditioner runs in float32, as EDM's does, hence the float32 tolerance.
    net, cfg, shape = reference_network(arch, precond)
    x, labels, augment_labels = reference_inputs(shape)
    sigma = np.array([0.05, 1.3, 20.0])
    c_skip, c_out, c_in, c_noise = (torch.as_tensor(c) for c in closed_forms(precond, sigma, net))
    reshape = lambda c: c.reshape(-1, *[1] * len(shape))  # noqa: E731
    F_x = reference_model(net, cfg, reshape(c_in) * x, c_noise, labels, augment_labels)
    if precond == 'iDDPMPrecond':
        F_x = F_x[:, : shape[0]]  # The variance half of the output is not used.
    expected = reshape(c_skip) * x + reshape(c_out) * F_x
    with torch.no_grad():
        D_x = net(x, torch.as_tensor(sigma), labels, augment_labels=augment_labels)
    assert D_x.dtype == torch.float32
    torch.testing.assert_close(D_x.double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


SONG_BLOCK = dict(skip_scale=math.sqrt(0.5), eps=1e-6, resample_proj=True, adaptive_scale=False)
NCSN_BLOCK = dict(SONG_BLOCK, resample_filter=[1, 3, 3, 1])
BLOCK_CASES = {
    # name: UNetBlock kwargs (beyond channels and emb_channels), input channels, output channels
    'song down': (dict(SONG_BLOCK, down=True), 8, 8),
    'song up, attention': (dict(SONG_BLOCK, up=True, attention=True, num_heads=1), 8, 8),
    'song new channels': (dict(SONG_BLOCK, attention=True, num_heads=1), 8, 12),
    'ncsn down': (dict(NCSN_BLOCK, down=True), 8, 8),
    'ncsn up': (dict(NCSN_BLOCK, up=True), 8, 8),
    'adm two heads': (dict(attention=True, channels_per_head=64), 64, 128),
    'adm down': (dict(down=True), 16, 16),
}


@pytest.mark.parametrize('case', list(BLOCK_CASES))
def test_unet_block_matches_the_reference(case):
    kwargs, cin, cout = BLOCK_CASES[case]
    torch.manual_seed(0)
    block = networks.UNetBlock(cin, cout, emb_channels=6, **kwargs)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    block = block.double()
    x = torch.randn(2, cin, 8, 8, dtype=torch.float64)
    emb = torch.randn(2, 6, dtype=torch.float64)
    heads = block.num_heads
    assert heads == (2 if case == 'adm two heads' else int(kwargs.get('attention', False)))
    adaptive = kwargs.get('adaptive_scale', True)
    expected = ref_block(
        {f'b.{key}': value for key, value in block.state_dict().items()}, 'b', x, emb, heads, kwargs.get('skip_scale', 1), kwargs.get('eps', 1e-5), adaptive,
        tuple(kwargs.get('resample_filter', (1, 1))), kwargs.get('up', False), kwargs.get('down', False),
    )  # fmt: skip
    torch.testing.assert_close(block(x, emb), expected, rtol=1e-12, atol=1e-12)
