"""Non-leaking augmentation pipeline of EDM (Karras et al. 2022, Section 5).

EDM regularizes training on small datasets with the geometric augmentations of ADA (Karras et al. 2020,
"Training generative adversarial networks with limited data", Appendix B) and keeps them from leaking into
the generated images by conditioning the denoiser on the augmentation parameters: `AugmentPipe` returns the
augmented images together with a label vector per image, and the network receives those labels as
`augment_labels`; at sampling time the labels are zero, which selects the un-augmented distribution.

Constructor arguments, defaults, the order of the random draws and the layout of the labels follow EDM, so
EDM's training setting (p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1) gives the
same 9 labels: xflip, yflip, scale, rotate (cos - 1, sin), aniso (w cos r, w sin r), translate (tx, ty).
Labels are the raw normalized draws and 0 for a skipped op. All randomness comes from torch's global RNG on
the images' device, there is no Python loop over samples and no host-device synchronization.
"""

import numpy as np
import torch

# Low-pass filter of the Symlet-6 wavelet (decomposition coefficients), used for 2x up- and downsampling.
SYM6 = [
    0.015404109327027373,
    0.0034907120842174702,
    -0.11799011114819057,
    -0.048311742585633,
    0.4910559419267466,
    0.787641141030194,
    0.3379294217276218,
    -0.07263752278646252,
    -0.021060292512300564,
    0.04472490177066578,
    0.0017677118642428036,
    -0.007800708325034148,
]


def _matrix(rows, like):
    """Batch of matrices [N, R, C] whose entries are numbers or tensors shaped like `like` ([N])."""
    entries = [x if torch.is_tensor(x) else torch.full_like(like, x) for row in rows for x in row]
    return torch.stack(entries, dim=-1).reshape(*like.shape, len(rows), len(rows[0]))


def _translate2d(tx, ty, like):
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], like)


def _scale2d(sx, sy, like):
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], like)


def _rotate2d(theta):
    c, s = theta.cos(), theta.sin()
    return _matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], theta)


def _rotate_luma(theta):
    """Rotation by theta about the luma axis v = (1, 1, 1) / sqrt(3) of RGB space (Rodrigues' formula)."""
    c, s = theta.cos(), theta.sin()
    diag = (1 - c) / 3 + c
    plus = (1 - c) / 3 + s / np.sqrt(3)
    minus = (1 - c) / 3 - s / np.sqrt(3)
    return _matrix([[diag, minus, plus, 0], [plus, diag, minus, 0], [minus, plus, diag, 0], [0, 0, 0, 1]], theta)


def _reflect(index, size):
    """Mirror integer pixel indices into [0, size) without repeating the edge pixel ('reflect' padding)."""
    return size - 1 - (size - 1 - index % (2 * size - 2)).abs()


def _upsample2x(images, f):
    """Insert zeros between pixels and low-pass with f along both axes (a transposed convolution)."""
    n, c, h, w = images.shape
    pad = (len(f) - 1) // 2
    x = images.reshape(n * c, 1, h, w)
    x = torch.nn.functional.conv_transpose2d(x, f.reshape(1, 1, 1, -1), stride=(1, 2), padding=(0, pad))
    x = torch.nn.functional.conv_transpose2d(x, f.reshape(1, 1, -1, 1), stride=(2, 1), padding=(pad, 0))
    return x.reshape(n, c, h * 2, w * 2)


def _downsample2x(images, f):
    """Low-pass with f along both axes and keep every second pixel."""
    n, c, h, w = images.shape
    pad = (len(f) - 1) // 2
    x = images.reshape(n * c, 1, h, w)
    x = torch.nn.functional.conv2d(x, f.reshape(1, 1, 1, -1), stride=(1, 2), padding=(0, pad))
    x = torch.nn.functional.conv2d(x, f.reshape(1, 1, -1, 1), stride=(2, 1), padding=(pad, 0))
    return x.reshape(n, c, h // 2, w // 2)


class AugmentPipe:
    """EDM's augmentation pipe; each op is enabled by a probability multiplier > 0 (all disabled by default)."""

    def __init__(
        self,
        p=1,  # Overall multiplier for the augmentation probability.
        xflip=0,  # Probability multiplier for x-flip.
        yflip=0,  # Probability multiplier for y-flip.
        rotate_int=0,  # Probability multiplier for rotation by a multiple of 90 degrees.
        translate_int=0,  # Probability multiplier for integer translation.
        translate_int_max=0.125,  # Range of integer translation, relative to the image size.
        scale=0,  # Probability multiplier for isotropic scaling.
        rotate_frac=0,  # Probability multiplier for arbitrary rotation.
        aniso=0,  # Probability multiplier for anisotropic scaling.
        translate_frac=0,  # Probability multiplier for fractional translation.
        scale_std=0.2,  # Log2 standard deviation of isotropic scaling.
        rotate_frac_max=1,  # Range of arbitrary rotation, 1 = full circle.
        aniso_std=0.2,  # Log2 standard deviation of anisotropic scaling.
        aniso_rotate_prob=0.5,  # Probability of scaling anisotropically along a randomly rotated frame.
        translate_frac_std=0.125,  # Standard deviation of fractional translation, relative to the image size.
        brightness=0,  # Probability multiplier for brightness.
        contrast=0,  # Probability multiplier for contrast.
        lumaflip=0,  # Probability multiplier for luma flip.
        hue=0,  # Probability multiplier for hue rotation.
        saturation=0,  # Probability multiplier for saturation.
        brightness_std=0.2,  # Standard deviation of brightness.
        contrast_std=0.5,  # Log2 standard deviation of contrast.
        hue_max=1,  # Range of hue rotation, 1 = full circle.
        saturation_std=1,  # Log2 standard deviation of saturation.
    ):
        self.p = float(p)
        self.xflip = float(xflip)
        self.yflip = float(yflip)
        self.rotate_int = float(rotate_int)
        self.translate_int = float(translate_int)
        self.translate_int_max = float(translate_int_max)
        self.scale = float(scale)
        self.rotate_frac = float(rotate_frac)
        self.aniso = float(aniso)
        self.translate_frac = float(translate_frac)
        self.scale_std = float(scale_std)
        self.rotate_frac_max = float(rotate_frac_max)
        self.aniso_std = float(aniso_std)
        self.aniso_rotate_prob = float(aniso_rotate_prob)
        self.translate_frac_std = float(translate_frac_std)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.lumaflip = float(lumaflip)
        self.hue = float(hue)
        self.saturation = float(saturation)
        self.brightness_std = float(brightness_std)
        self.contrast_std = float(contrast_std)
        self.hue_max = float(hue_max)
        self.saturation_std = float(saturation_std)
        self._filters = {}

    def _lowpass(self, device, dtype):
        # Copy the filter to the device once; a copy per call would stall the host on every step.
        key = (device, dtype)
        if key not in self._filters:
            self._filters[key] = torch.tensor(SYM6, dtype=dtype, device=device)
        return self._filters[key]

    def _gate(self, w, multiplier, shape):
        # Keep a draw with probability multiplier * p, otherwise replace it by the identity value 0.
        keep = torch.rand(shape, device=w.device) < multiplier * self.p
        return torch.where(keep, w, torch.zeros_like(w))

    def __call__(self, images):
        N, C, H, W = images.shape
        device = images.device
        labels = [torch.zeros([N, 0], device=device)]

        # Pixel blitting: exact flips, quarter turns and integer translations.
        if self.xflip > 0:
            w = self._gate(torch.randint(2, [N, 1, 1, 1], device=device), self.xflip, [N, 1, 1, 1])
            images = torch.where(w == 1, images.flip(3), images)
            labels += [w]

        if self.yflip > 0:
            w = self._gate(torch.randint(2, [N, 1, 1, 1], device=device), self.yflip, [N, 1, 1, 1])
            images = torch.where(w == 1, images.flip(2), images)
            labels += [w]

        if self.rotate_int > 0:
            if H != W:
                raise ValueError(f'rotate_int needs square images, got {H}x{W}')
            w = self._gate(torch.randint(4, [N, 1, 1, 1], device=device), self.rotate_int, [N, 1, 1, 1])
            flip_x = (w == 1) | (w == 2)
            flip_y = (w == 2) | (w == 3)
            images = torch.where(flip_x, images.flip(3), images)
            images = torch.where(flip_y, images.flip(2), images)
            images = torch.where((w == 1) | (w == 3), images.transpose(2, 3), images)
            labels += [flip_x, flip_y]

        if self.translate_int > 0:
            w = self._gate(torch.rand([2, N, 1, 1, 1], device=device) * 2 - 1, self.translate_int, [1, N, 1, 1, 1])
            tx = (w[0] * (W * self.translate_int_max)).round().to(torch.int64)
            ty = (w[1] * (H * self.translate_int_max)).round().to(torch.int64)
            # Content moves by +tx along x and by -ty along y; pixels that enter are mirrored from the image.
            src_x = _reflect(torch.arange(W, device=device).reshape(1, 1, 1, W) - tx, W)
            src_y = _reflect(torch.arange(H, device=device).reshape(1, 1, H, 1) + ty, H)
            images = images.gather(3, src_x.expand(N, C, H, W)).gather(2, src_y.expand(N, C, H, W))
            labels += [tx / (W * self.translate_int_max), ty / (H * self.translate_int_max)]

        # Geometric transformations: compose G_inv, which maps output pixels to input pixels (coordinates
        # relative to the image center); the image is resampled once at the end.
        zeros = torch.zeros([N], device=device)
        G_inv = torch.eye(3, device=device)

        if self.scale > 0:
            w = self._gate(torch.randn([N], device=device), self.scale, [N])
            s = (w * self.scale_std).exp2()
            G_inv = G_inv @ _scale2d(1 / s, 1 / s, zeros)
            labels += [w]

        if self.rotate_frac > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.rotate_frac_max)
            w = self._gate(w, self.rotate_frac, [N])
            G_inv = G_inv @ _rotate2d(w)
            labels += [w.cos() - 1, w.sin()]

        if self.aniso > 0:
            w = torch.randn([N], device=device)
            r = (torch.rand([N], device=device) * 2 - 1) * np.pi
            w = self._gate(w, self.aniso, [N])
            r = torch.where(torch.rand([N], device=device) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = (w * self.aniso_std).exp2()
            # Stretch by s and squeeze by 1 / s along a pair of axes turned by r.
            G_inv = G_inv @ _rotate2d(-r) @ _scale2d(1 / s, s, zeros) @ _rotate2d(r)
            labels += [w * r.cos(), w * r.sin()]

        if self.translate_frac > 0:
            w = self._gate(torch.randn([2, N], device=device), self.translate_frac, [1, N])
            tx = w[0] * (W * self.translate_frac_std)
            ty = w[1] * (H * self.translate_frac_std)
            G_inv = G_inv @ _translate2d(-tx, -ty, zeros)
            labels += [w[0], w[1]]

        if self.scale > 0 or self.rotate_frac > 0 or self.aniso > 0 or self.translate_frac > 0:
            images = self._resample(images, G_inv, zeros)

        # Color transformations: compose one affine map M of homogeneous RGB, applied once at the end.
        luma = torch.zeros([4, 4], device=device)
        luma[:3, :3] = 1 / 3  # Projection onto the luma axis (1, 1, 1) / sqrt(3).
        eye = torch.eye(4, device=device)
        M = eye

        if self.brightness > 0:
            w = self._gate(torch.randn([N], device=device), self.brightness, [N])
            b = w * self.brightness_std
            M = _matrix([[1, 0, 0, b], [0, 1, 0, b], [0, 0, 1, b], [0, 0, 0, 1]], zeros) @ M
            labels += [w]

        if self.contrast > 0:
            w = self._gate(torch.randn([N], device=device), self.contrast, [N])
            c = (w * self.contrast_std).exp2()
            M = _matrix([[c, 0, 0, 0], [0, c, 0, 0], [0, 0, c, 0], [0, 0, 0, 1]], zeros) @ M
            labels += [w]

        if self.lumaflip > 0:
            w = self._gate(torch.randint(2, [N, 1, 1], device=device), self.lumaflip, [N, 1, 1])
            M = (eye - 2 * luma * w) @ M
            labels += [w]

        if self.hue > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.hue_max)
            w = self._gate(w, self.hue, [N])
            M = _rotate_luma(w) @ M
            labels += [w.cos() - 1, w.sin()]

        if self.saturation > 0:
            w = self._gate(torch.randn([N, 1, 1], device=device), self.saturation, [N, 1, 1])
            M = (luma + (eye - luma) * (w * self.saturation_std).exp2()) @ M
            labels += [w]

        if self.brightness > 0 or self.contrast > 0 or self.lumaflip > 0 or self.hue > 0 or self.saturation > 0:
            M = M.to(images.dtype)
            pixels = images.reshape(N, C, H * W)
            if C == 3:
                pixels = M[:, :3, :3] @ pixels + M[:, :3, 3:]
            elif C == 1:
                # Grayscale: average the RGB rows, then apply the summed gain and the offset.
                M = M[:, :3, :].mean(dim=1, keepdim=True)
                pixels = pixels * M[:, :, :3].sum(dim=2, keepdim=True) + M[:, :, 3:]
            else:
                raise ValueError(f'Color augmentation needs 1 or 3 channels, got {C}')
            images = pixels.reshape(N, C, H, W)

        labels = torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)
        return images, labels

    def _resample(self, images, G_inv, zeros):
        """Apply G_inv to every image: reflect pad, 2x upsample, bilinear sampling, 2x downsample, crop."""
        N, C, H, W = images.shape
        f = self._lowpass(images.device, images.dtype)
        margin = len(SYM6) // 4  # Extra output pixels per side that feed the downsampling filter.

        # Pad as far as 'reflect' allows. EDM pads only as far as the warped corners reach, which would need a host
        # sync to size the tensors; the pixels that get sampled are the same.
        images = torch.nn.functional.pad(images, [W - 1, W - 1, H - 1, H - 1], mode='reflect')
        images = _upsample2x(images, f)

        # Output pixel centers on the 2x grid sit at p = (q + 1/2) / 2 in original pixels, q being the
        # centered 2x-grid coordinate; the inverse holds for the input, whose sample i sits at 2x index 2i.
        out_h, out_w = (H + 2 * margin) * 2, (W + 2 * margin) * 2
        in_h, in_w = images.shape[2], images.shape[3]
        to_grid = _translate2d(-0.5, -0.5, zeros) @ _scale2d(2, 2, zeros)
        from_grid = _scale2d(0.5, 0.5, zeros) @ _translate2d(0.5, 0.5, zeros)
        # affine_grid (align_corners=False) measures positions in half-widths of the whole image.
        theta = (
            _scale2d(2 / in_w, 2 / in_h, zeros) @ to_grid @ G_inv @ from_grid @ _scale2d(out_w / 2, out_h / 2, zeros)
        )
        theta = theta[:, :2, :].to(images.dtype)
        grid = torch.nn.functional.affine_grid(theta, [N, C, out_h, out_w], align_corners=False)
        images = torch.nn.functional.grid_sample(
            images, grid, mode='bilinear', padding_mode='zeros', align_corners=False
        )

        images = _downsample2x(images, f)
        return images[:, :, margin:-margin, margin:-margin]
