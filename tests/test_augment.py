"""Tests for EDM's non-leaking augmentation pipe (training/augment.py): label layout, exact pixel blitting,
perfect reconstruction of the resampling path, warps that match the labels, closed-form color ops, gating
probabilities, determinism, dtypes and error messages."""

import math

import numpy as np
import pytest
import torch

from training.augment import AugmentPipe

EDM_SETTING = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
BLIT_OPS = dict(xflip=1, yflip=1, rotate_int=1, translate_int=1)
GEOMETRIC_OPS = dict(scale=1, rotate_frac=1, aniso=1, translate_frac=1)
COLOR_OPS = dict(brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)


def pattern(x, y):
    """Smooth test pattern over pixel coordinates measured from the image center (x right, y down)."""
    waves = torch.sin(2 * math.pi * x / 23 + 0.3) * torch.cos(2 * math.pi * y / 19 - 0.2)
    return waves + 0.5 * torch.sin(2 * math.pi * (x + y) / 29)


def centered_grid(h, w):
    y = torch.arange(h, dtype=torch.float64).reshape(h, 1).expand(h, w) - (h - 1) / 2
    x = torch.arange(w, dtype=torch.float64).reshape(1, w).expand(h, w) - (w - 1) / 2
    return x, y


@pytest.mark.parametrize(
    'kwargs, width',
    [
        (dict(), 0),
        (EDM_SETTING, 9),
        (dict(xflip=1), 1),
        (dict(rotate_int=1), 2),
        (dict(translate_int=1), 2),
        (dict(rotate_frac=1), 2),
        (dict(translate_frac=1, hue=1), 4),
        (COLOR_OPS, 6),
        ({**BLIT_OPS, **GEOMETRIC_OPS, **COLOR_OPS}, 19),
    ],
)
def test_label_width(kwargs, width):
    images, labels = AugmentPipe(p=0.5, **kwargs)(torch.randn(5, 3, 8, 8))
    assert images.shape == (5, 3, 8, 8)
    assert labels.shape == (5, width) and labels.dtype == torch.float32


def test_p_zero_is_identity():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 16, 16)

    # Blitting and color ops reduce to exact identities.
    images, labels = AugmentPipe(p=0, **BLIT_OPS, **COLOR_OPS)(x)
    assert torch.equal(images, x)
    assert labels.shape == (6, 12) and not labels.any()

    # The resampling path still runs; the sym6 up/down pair reconstructs the image up to rounding.
    images, labels = AugmentPipe(p=0, **GEOMETRIC_OPS)(x)
    assert labels.shape == (6, 7) and not labels.any()
    torch.testing.assert_close(images, x, atol=2e-5, rtol=0)


@pytest.mark.parametrize('op, dim', [('xflip', 3), ('yflip', 2)])
def test_flip_exact(op, dim):
    torch.manual_seed(1)
    x = torch.randn(32, 3, 6, 5)
    images, labels = AugmentPipe(p=1, **{op: 1})(x)
    flipped = labels[:, 0] == 1
    assert set(labels[:, 0].tolist()) == {0.0, 1.0}
    assert torch.equal(images[flipped], x[flipped].flip(dim))
    assert torch.equal(images[~flipped], x[~flipped])


def test_rotate_int_exact():
    torch.manual_seed(2)
    x = torch.randn(48, 2, 7, 7)
    images, labels = AugmentPipe(p=1, rotate_int=1)(x)
    # Labels (flip_x, flip_y) encode k quarter turns counterclockwise: (0,0) 0, (1,0) 1, (1,1) 2, (0,1) 3.
    k = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}
    turns = [k[(int(a), int(b))] for a, b in labels.tolist()]
    assert set(turns) == {0, 1, 2, 3}
    for i, t in enumerate(turns):
        assert torch.equal(images[i], torch.rot90(x[i], t, dims=(1, 2)))
    with pytest.raises(ValueError, match='square'):
        AugmentPipe(rotate_int=1)(torch.zeros(1, 1, 4, 6))


def test_translate_int_exact():
    torch.manual_seed(3)
    N, H, W, max_frac = 24, 8, 12, 0.25
    x = torch.randn(N, 2, H, W)
    images, labels = AugmentPipe(p=1, translate_int=1, translate_int_max=max_frac)(x)
    tx = (labels[:, 0] * W * max_frac).round().long().tolist()
    ty = (labels[:, 1] * H * max_frac).round().long().tolist()
    assert any(tx) and any(ty)
    torch.testing.assert_close(labels[:, 0] * W * max_frac, torch.tensor(tx, dtype=torch.float32))
    padded = np.pad(x.numpy(), [(0, 0), (0, 0), (H, H), (W, W)], mode='reflect')
    for i in range(N):
        # Content moves right by tx and up by ty; uncovered pixels are mirrored.
        expected = padded[i, :, H + ty[i] : 2 * H + ty[i], W - tx[i] : 2 * W - tx[i]]
        assert np.array_equal(images[i].numpy(), expected)


def test_geometric_near_identity():
    torch.manual_seed(4)
    x = pattern(*centered_grid(16, 16)).expand(8, 3, 16, 16).to(torch.float32)
    pipe = AugmentPipe(
        p=1, **GEOMETRIC_OPS, scale_std=1e-4, rotate_frac_max=1e-5, aniso_std=1e-4, translate_frac_std=1e-5
    )
    images, labels = pipe(x)
    assert labels.shape == (8, 7) and labels.abs().max() > 0.1
    torch.testing.assert_close(images, x, atol=1e-3, rtol=0)


def homogeneous(A, b):
    """Batch of 3x3 affine matrices from A [N, 2, 2] and b [N, 2]."""
    G = torch.eye(3, dtype=A.dtype).repeat(len(A), 1, 1)
    G[:, :2, :2], G[:, :2, 2] = A, b
    return G


def rotation(theta):
    c, s = theta.cos(), theta.sin()
    return homogeneous(
        torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2), torch.zeros(len(c), 2, dtype=c.dtype)
    )


def scaling(sx, sy):
    return homogeneous(torch.diag_embed(torch.stack([sx, sy], -1)), torch.zeros(len(sx), 2, dtype=sx.dtype))


def inverse_warps(kwargs, labels, H, W):
    """Candidate matrices G_inv (output to input pixel coordinates), composed here from the labels."""
    N = len(labels)
    warps, col = [torch.eye(3, dtype=labels.dtype).repeat(N, 1, 1)], 0
    if kwargs.get('scale'):
        inv_s = (-labels[:, col] * kwargs['scale_std']).exp2()
        warps, col = [G @ scaling(inv_s, inv_s) for G in warps], col + 1
    if kwargs.get('rotate_frac'):
        theta = torch.atan2(labels[:, col + 1], labels[:, col] + 1)
        warps, col = [G @ rotation(theta) for G in warps], col + 2
    if kwargs.get('aniso'):
        # The labels (w cos r, w sin r) fix (w, r) only up to (-w, r + pi), so both candidates are kept.
        w, r = labels[:, col : col + 2].norm(dim=1), torch.atan2(labels[:, col + 1], labels[:, col])
        candidates = [(sign * w * kwargs['aniso_std']).exp2() for sign in (1, -1)]
        warps = [G @ rotation(-r) @ scaling(1 / s, s) @ rotation(r) for G in warps for s in candidates]
        col += 2
    if kwargs.get('translate_frac'):
        shift = torch.stack([labels[:, col] * W, labels[:, col + 1] * H], -1) * kwargs['translate_frac_std']
        warps = [G @ homogeneous(torch.eye(2, dtype=labels.dtype).repeat(N, 1, 1), -shift) for G in warps]
    return warps


# Tolerances: sym6 is not linear-phase, so the up/down filters cancel exactly only for near-identity warps;
# a half turn leaves about 0.05 on this pattern (same as EDM), while a wrong sign or a half-pixel offset
# in the centering gives errors above 0.1.
@pytest.mark.parametrize(
    'kwargs, tolerance',
    [
        (dict(translate_frac=1, translate_frac_std=0.05), 0.01),
        (dict(rotate_frac=1), 0.07),
        (dict(scale=1, scale_std=0.3), 0.02),
        (dict(aniso=1, aniso_std=0.3, aniso_rotate_prob=1), 0.04),
        (dict(**GEOMETRIC_OPS, scale_std=0.1, rotate_frac_max=0.25, aniso_std=0.1, translate_frac_std=0.05), 0.04),
    ],
)
def test_geometric_ops_move_pattern_by_label(kwargs, tolerance):
    # Each output pixel p (centered coordinates) shows the input pattern at G_inv p.
    torch.manual_seed(5)
    N, H, W = 16, 32, 32
    x, y = centered_grid(H, W)
    images, labels = AugmentPipe(p=1, **kwargs)(pattern(x, y).expand(N, 1, H, W).to(torch.float32))
    errors = []
    for G in inverse_warps(kwargs, labels.double(), H, W):
        G = G.reshape(N, 3, 3, 1, 1)
        src_x = G[:, 0, 0] * x + G[:, 0, 1] * y + G[:, 0, 2]
        src_y = G[:, 1, 0] * x + G[:, 1, 1] * y + G[:, 1, 2]
        assert (src_x - x).abs().amax() > 2
        # Compare where the source and its filter footprint lie well inside the image (no mirrored pixels).
        inside = (src_x.abs() < W / 2 - 9) & (src_y.abs() < H / 2 - 9)
        assert inside.sum() > N * 50
        error = (images[:, 0].double() - pattern(src_x, src_y)).abs() * inside
        errors.append(error.flatten(1).amax(dim=1))
    assert torch.stack(errors).amin(dim=0).max() < tolerance


def test_color_ops_closed_form():
    torch.manual_seed(6)
    x = torch.rand(16, 3, 4, 4) * 2 - 1
    luma = x.mean(dim=1, keepdim=True)

    images, labels = AugmentPipe(p=1, brightness=1, contrast=1, brightness_std=0.2, contrast_std=0.5)(x)
    b = (labels[:, 0] * 0.2).reshape(-1, 1, 1, 1)
    c = (labels[:, 1] * 0.5).exp2().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(images, (x + b) * c)

    images, labels = AugmentPipe(p=1, lumaflip=1)(x)
    flip = labels[:, 0].reshape(-1, 1, 1, 1)
    assert set(labels[:, 0].tolist()) == {0.0, 1.0}
    torch.testing.assert_close(images, x - 2 * luma * flip)

    images, labels = AugmentPipe(p=1, saturation=1, saturation_std=1)(x)
    s = labels[:, 0].exp2().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(images, luma + (x - luma) * s)

    # Hue rotates the chroma vector about the luma axis by the labelled angle.
    images, labels = AugmentPipe(p=1, hue=1)(x)
    chroma_in, chroma_out = x - luma, images - images.mean(dim=1, keepdim=True)
    torch.testing.assert_close(images.mean(dim=1, keepdim=True), luma)
    torch.testing.assert_close(chroma_out.norm(dim=1), chroma_in.norm(dim=1))
    cos = (chroma_in * chroma_out).sum(dim=1) / chroma_in.norm(dim=1) ** 2
    torch.testing.assert_close(cos, (labels[:, 0] + 1).reshape(-1, 1, 1).expand_as(cos), atol=1e-5, rtol=0)


def test_color_ops_grayscale_and_channel_check():
    torch.manual_seed(7)
    x = torch.randn(8, 1, 4, 4)
    # On a gray image a luma flip negates and a hue rotation does nothing.
    images, labels = AugmentPipe(p=1, lumaflip=1, hue=1)(x)
    sign = 1 - 2 * labels[:, 0].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(images, x * sign)
    with pytest.raises(ValueError, match='1 or 3 channels'):
        AugmentPipe(brightness=1)(torch.zeros(2, 2, 4, 4))


def test_edm_setting_gating_probabilities():
    torch.manual_seed(8)
    p, N = 0.2, 20000
    _, labels = AugmentPipe(p=p, **EDM_SETTING)(torch.zeros(N, 1, 4, 4))
    active = (labels != 0).float().mean(dim=0)
    # xflip=1e8 saturates the gate, so x-flips happen half of the time; y-flips with probability p / 2.
    assert abs(active[0] - 0.5) < 0.02
    assert abs(active[1] - p / 2) < 0.01
    # Scale, rotation, aniso and translation are applied with probability p; the aniso frame is rotated
    # (so that w sin r is nonzero) with probability aniso_rotate_prob = 0.5.
    for column in (2, 3, 4, 5, 7, 8):
        assert abs(active[column] - p) < 0.015
    assert abs(active[6] - p / 2) < 0.01


def test_determinism_dtype_and_device():
    x = torch.randn(4, 3, 8, 8)
    pipe = AugmentPipe(p=0.7, **EDM_SETTING, **COLOR_OPS)
    torch.manual_seed(9)
    a, la = pipe(x)
    torch.manual_seed(9)
    b, lb = pipe(x)
    assert torch.equal(a, b) and torch.equal(la, lb)
    _, lc = pipe(x)
    assert not torch.equal(la, lc)
    for dtype in (torch.float32, torch.float64):
        images, labels = pipe(x.to(dtype))
        assert images.dtype == dtype and images.shape == x.shape and images.device == x.device
        assert labels.dtype == torch.float32 and labels.shape == (4, 15) and labels.device == x.device
