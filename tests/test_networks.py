"""Tests for training/networks.py: EDM's parameter counts and state-dict layout, preconditioning formulas (EDM
Table 1), layer math, initialisation and real forward/backward passes on tiny networks."""

import math

import numpy as np
import pytest
import torch

import train
from training import networks

# The architecture presets of EDM's train.py (--arch), as our train.py defines them.
PRESETS = train.ARCH_KWARGS


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

    # Eval mode is deterministic; bf16 autocast returns float32 close to the float32 result.
    net.eval()
    with torch.no_grad():
        sigma = torch.tensor([0.01, 1.0, 30.0])
        ref = net(x, sigma, labels)
        torch.testing.assert_close(net(x, sigma, labels), ref)
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
