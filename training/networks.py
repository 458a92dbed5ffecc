"""Network architectures and preconditioners of EDM (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models").

Architectures: `SongUNet` (DDPM++ and NCSN++ of Song et al. 2021) and `DhariwalUNet` (ADM of Dhariwal & Nichol
2021), built from the shared layers below (our 1-D `SequenceUNet` for DNA is in training/networks_1d.py).
Preconditioners (EDM Table 1): `VPPrecond`, `VEPrecond`, `iDDPMPrecond` and `EDMPrecond` wrap a raw network F as
D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)).

Class names, constructor arguments, defaults, parameter shapes, state-dict keys and the order in which weights are
drawn at initialisation follow NVlabs/edm, so EDM checkpoints load by name. List defaults are written as tuples and
dict defaults as None (same behaviour). Beyond EDM: the preconditioners also run under autocast (bf16) and always
return float32; attention logits stay in float32 there too.
"""

import numpy as np
import torch
from torch.nn.functional import silu

from infonoise.grids import VP_BETA_D, VP_BETA_MIN, VP_EPSILON_T, vp_sigma, vp_t
from infonoise.uncertainty import LearnedUncertainty


def weight_init(shape, mode, fan_in, fan_out):
    """Draw a tensor of the given shape with one of the four standard initialisation rules."""
    if mode == 'xavier_uniform':
        return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return np.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'Invalid init mode "{mode}"')


class Linear(torch.nn.Module):
    """Fully-connected layer; weights are cast to the input dtype."""

    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        init_kwargs = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **init_kwargs) * init_weight)
        # The bias is drawn even when scaled to zero, so that the RNG stream matches EDM.
        self.bias = torch.nn.Parameter(weight_init([out_features], **init_kwargs) * init_bias) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)
        return x


class Conv2d(torch.nn.Module):
    """Convolution with optional 2x up/downsampling by a separable FIR filter; kernel=0 gives a pure resampler."""

    def __init__(
        self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
        fused_resample=False, init_mode='kaiming_normal', init_weight=1, init_bias=0,
    ):  # fmt: skip
        if up and down:
            raise ValueError('Conv2d cannot upsample and downsample at the same time')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        init_kwargs = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        w = weight_init([out_channels, in_channels, kernel, kernel], **init_kwargs) * init_weight if kernel else None
        self.weight = torch.nn.Parameter(w) if kernel else None
        self.bias = (
            torch.nn.Parameter(weight_init([out_channels], **init_kwargs) * init_bias) if kernel and bias else None
        )
        # Separable 2-D filter, normalised to unit DC gain.
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f).reshape(1, 1, len(f), len(f)) / f.sum().square()
        self.register_buffer('resample_filter', f if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        conv2d = torch.nn.functional.conv2d
        conv_transpose2d = torch.nn.functional.conv_transpose2d

        if self.fused_resample and self.up and w is not None:
            # Upsample first, sharing the padding between the two convolutions so the output is exactly 2x.
            f_up = f.mul(4).tile([self.in_channels, 1, 1, 1])
            x = conv_transpose2d(x, f_up, groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            x = conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = conv2d(x, w, padding=w_pad + f_pad)
            x = conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                f_up = f.mul(4).tile([self.in_channels, 1, 1, 1])
                x = conv_transpose2d(x, f_up, groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(torch.nn.Module):
    """Group normalisation with at least `min_channels_per_group` channels per group."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        weight = self.weight.to(x.dtype)
        bias = self.bias.to(x.dtype)
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=weight, bias=bias, eps=self.eps)


class AttentionOp(torch.autograd.Function):
    """Attention weights softmax_k(q . k / sqrt(C)) over [N, C, L] tensors.

    The matmul and softmax run in at least float32 (also under autocast); inputs, outputs and gradients keep the
    input dtype so that fp16 / bf16 training stores only low-precision activations.
    """

    @staticmethod
    def forward(ctx, q, k):
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(device_type=q.device.type, enabled=False):
            logits = torch.einsum('ncq,nck->nqk', q.to(dtype), (k / np.sqrt(k.shape[1])).to(dtype))
            w = logits.softmax(dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, w)
        return w

    @staticmethod
    def backward(ctx, dw):
        q, k, w = ctx.saved_tensors
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(device_type=q.device.type, enabled=False):
            # Softmax backward: d logits = w * (dw - sum_k(dw * w)).
            w, dw = w.to(dtype), dw.to(dtype)
            db = w * (dw - (dw * w).sum(dim=2, keepdim=True))
            dq = torch.einsum('nck,nqk->ncq', k.to(dtype), db).to(q.dtype) / np.sqrt(k.shape[1])
            dk = torch.einsum('ncq,nqk->nck', q.to(dtype), db).to(k.dtype) / np.sqrt(k.shape[1])
        return dq, dk


class UNetBlock(torch.nn.Module):
    """Residual U-Net block with optional up/downsampling and self-attention (union of DDPM++, NCSN++ and ADM)."""

    def __init__(
        self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False, num_heads=None,
        channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5, resample_filter=(1, 1), resample_proj=False,
        adaptive_scale=True, init=None, init_zero=None, init_attn=None,
    ):  # fmt: skip
        super().__init__()
        init = {} if init is None else init
        init_zero = dict(init_weight=0) if init_zero is None else init_zero
        init_attn = init if init_attn is None else init_attn
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.num_heads = heads if attention else 0
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        # A 1x1 projection where channels change (or where asked to); otherwise the skip only resamples.
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, **resample, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(silu(self.norm0(x)))

        # Condition on the embedding: scale-shift (ADM) or additive bias (DDPM++ / NCSN++).
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x + params))

        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale

        if self.num_heads:
            # The qkv channels are laid out as (head, channel in head, {q, k, v}).
            qkv = self.qkv(self.norm2(x)).reshape(x.shape[0] * self.num_heads, x.shape[1] // self.num_heads, 3, -1)
            q, k, v = qkv.unbind(2)
            w = AttentionOp.apply(q, k)
            a = torch.einsum('nqk,nck->ncq', w, v)
            x = (self.proj(a.reshape(*x.shape)) + x) * self.skip_scale
        return x


class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding [cos(x f_j), sin(x f_j)] with f_j = (1 / max_positions)^(j / (C/2 - endpoint))."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        freqs = torch.arange(start=0, end=self.num_channels // 2, dtype=torch.float32, device=x.device)
        freqs = freqs / (self.num_channels // 2 - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features [cos(2 pi x f_j), sin(2 pi x f_j)] with f_j ~ N(0, scale^2) (NCSN++)."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def _drop_labels(class_labels, label_dropout, batch_size):
    """Zero each sample's labels with probability `label_dropout` (classifier-free guidance training)."""
    keep = torch.rand([batch_size, 1], device=class_labels.device) >= label_dropout
    return class_labels * keep.to(class_labels.dtype)


def song_embedding(net, noise_labels, class_labels, augment_labels, batch_size):
    """The mapping network of SongUNet (and of networks_1d.SequenceUNet, whose mapping layers have the same names):
    noise embedding with its halves swapped to [sin, cos] as in Song et al., plus labels and augment labels."""
    emb = net.map_noise(noise_labels)
    emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)
    if net.map_label is not None:
        labels = class_labels
        if net.training and net.label_dropout:
            labels = _drop_labels(labels, net.label_dropout, batch_size)
        emb = emb + net.map_label(labels * np.sqrt(net.map_label.in_features))
    if net.map_augment is not None and augment_labels is not None:
        emb = emb + net.map_augment(augment_labels)
    emb = silu(net.map_layer0(emb))
    return silu(net.map_layer1(emb))


class SongUNet(torch.nn.Module):
    """DDPM++ / NCSN++ U-Net (Song et al. 2021) as re-implemented in EDM."""

    def __init__(
        self,
        img_resolution,  # Image resolution at input/output.
        in_channels,  # Number of color channels at input.
        out_channels,  # Number of color channels at output.
        label_dim=0,  # Number of class labels, 0 = unconditional.
        augment_dim=0,  # Augmentation label dimensionality, 0 = no augmentation.
        model_channels=128,  # Base multiplier for the number of channels.
        channel_mult=(1, 2, 2, 2),  # Per-resolution multipliers for the number of channels.
        channel_mult_emb=4,  # Multiplier for the dimensionality of the embedding vector.
        num_blocks=4,  # Number of residual blocks per resolution.
        attn_resolutions=(16,),  # List of resolutions with self-attention.
        dropout=0.10,  # Dropout probability of intermediate activations.
        label_dropout=0,  # Dropout probability of class labels for classifier-free guidance.
        embedding_type='positional',  # Timestep embedding: 'positional' for DDPM++, 'fourier' for NCSN++.
        channel_mult_noise=1,  # Timestep embedding size: 1 for DDPM++, 2 for NCSN++.
        encoder_type='standard',  # Encoder: 'standard' for DDPM++, 'residual' for NCSN++ ('skip' also allowed).
        decoder_type='standard',  # Decoder: 'standard' for both DDPM++ and NCSN++ ('skip' also allowed).
        resample_filter=(1, 1),  # Resampling filter: (1, 1) for DDPM++, (1, 3, 3, 1) for NCSN++.
    ):
        if embedding_type not in ('fourier', 'positional'):
            raise ValueError(f'Invalid embedding_type "{embedding_type}"; expected "positional" or "fourier"')
        if encoder_type not in ('standard', 'skip', 'residual'):
            raise ValueError(f'Invalid encoder_type "{encoder_type}"; expected "standard", "skip" or "residual"')
        if decoder_type not in ('standard', 'skip'):
            raise ValueError(f'Invalid decoder_type "{decoder_type}"; expected "standard" or "skip"')
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False, init=init, init_zero=init_zero,
            init_attn=init_attn,
        )  # fmt: skip

        # Mapping.
        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. `caux` tracks the channels of the auxiliary input pyramid of the 'skip'/'residual' encoders.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    aux_down = Conv2d(caux, caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_down'] = aux_down
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == 'residual':
                    fused_down = dict(down=True, resample_filter=resample_filter, fused_resample=True)
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(caux, cout, kernel=3, **fused_down, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                attn = res in attn_resolutions
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    aux_up = Conv2d(out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter)
                    self.dec[f'{res}x{res}_aux_up'] = aux_up
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = song_embedding(self, noise_labels, class_labels, augment_labels, x.shape[0])

        # Encoder; every non-auxiliary output is kept for the decoder's skip connections.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder; the output is the sum of the auxiliary output heads (only one for the 'standard' decoder).
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


class DhariwalUNet(torch.nn.Module):
    """ADM U-Net (Dhariwal & Nichol 2021) as re-implemented in EDM."""

    def __init__(
        self,
        img_resolution,  # Image resolution at input/output.
        in_channels,  # Number of color channels at input.
        out_channels,  # Number of color channels at output.
        label_dim=0,  # Number of class labels, 0 = unconditional.
        augment_dim=0,  # Augmentation label dimensionality, 0 = no augmentation.
        model_channels=192,  # Base multiplier for the number of channels.
        channel_mult=(1, 2, 3, 4),  # Per-resolution multipliers for the number of channels.
        channel_mult_emb=4,  # Multiplier for the dimensionality of the embedding vector.
        num_blocks=3,  # Number of residual blocks per resolution.
        attn_resolutions=(32, 16, 8),  # List of resolutions with self-attention.
        dropout=0.10,  # Dropout probability of intermediate activations.
        label_dropout=0,  # Dropout probability of class labels for classifier-free guidance.
    ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        # U(+-1/sqrt(fan_in)) for weights and biases, like PyTorch's default layer init.
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(
            emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero
        )

        # Mapping; label weights are N(0, 1) because kaiming_normal is scaled back by sqrt(label_dim).
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = None
        if label_dim:
            label_init = dict(init_mode='kaiming_normal', init_weight=np.sqrt(label_dim))
            self.map_label = Linear(label_dim, emb_channels, bias=False, **label_init)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                attn = res in attn_resolutions
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                attn = res in attn_resolutions
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        # Mapping.
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                labels = _drop_labels(labels, self.label_dropout, x.shape[0])
            emb = emb + self.map_label(labels)
        emb = silu(emb)

        # Encoder.
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        # Decoder.
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))


# The networks a preconditioner wraps, by the `model_type` name its kwargs store. training/networks_1d.py adds
# 'SequenceUNet' when imported (this file never imports it, so there is no import cycle).
MODEL_TYPES = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}


class _Precond(torch.nn.Module):
    """Shared body of the preconditioners: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (EDM Eq. 7). Subclasses
    define `coefficients(sigma) -> (c_skip, c_out, c_in, c_noise)` for sigma of shape [N, 1, 1, 1]."""

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type, model_out_channels, model_kwargs):
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise ValueError(f'Invalid model_type "{model_type}"; expected one of {sorted(MODEL_TYPES)}')
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        shape = dict(img_resolution=img_resolution, in_channels=img_channels, out_channels=model_out_channels)
        self.model = MODEL_TYPES[model_type](**shape, label_dim=label_dim, **model_kwargs)

    def _init_uncertainty(self, uncertainty_channels):
        # EDM2's learned uncertainty u(σ) (infonoise.uncertainty); none at 0, so state-dict names stay EDM's.
        if uncertainty_channels:
            self.uncertainty = LearnedUncertainty(uncertainty_channels)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32

        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        # Under autocast the layers pick their own dtypes; otherwise the model must run in the requested one.
        if F_x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise RuntimeError(f'Model returned {F_x.dtype} instead of {dtype}')
        D_x = c_skip * x + c_out * F_x[:, : self.img_channels].to(torch.float32)
        if return_logvar:  # Inside forward, so that DDP synchronises u's gradients with the network's.
            if getattr(self, 'uncertainty', None) is None:
                raise ValueError('return_logvar=True needs a network built with uncertainty_channels > 0')
            return D_x, self.uncertainty(sigma.flatten())
        return D_x

    @property
    def img_shape(self) -> list[int]:
        """Shape [C, H, W] of one sample: [C, R, R] for images, [C, 1, L] for sequence models (img_height = 1)."""
        return [self.img_channels, getattr(self.model, 'img_height', self.img_resolution), self.img_resolution]

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class VPPrecond(_Precond):
    """Variance-preserving preconditioning (Song et al. 2021; EDM Table 1, "VP")."""

    def __init__(
        self,
        img_resolution,  # Image resolution.
        img_channels,  # Number of color channels.
        label_dim=0,  # Number of class labels, 0 = unconditional.
        use_fp16=False,  # Execute the underlying model at FP16 precision?
        beta_d=VP_BETA_D,  # Extent of the noise level schedule.
        beta_min=VP_BETA_MIN,  # Initial slope of the noise level schedule.
        M=1000,  # Original number of timesteps in the DDPM formulation.
        epsilon_t=VP_EPSILON_T,  # Minimum t-value used during training.
        uncertainty_channels=0,  # Channels of EDM2's learned uncertainty u(σ), 0 = none.
        model_type='SongUNet',  # Class name of the underlying model.
        **model_kwargs,  # Keyword arguments for the underlying model.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self._init_uncertainty(uncertainty_channels)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        # Evaluated in float32 on the CPU, also when the module is built under another default device (e.g. meta).
        with torch.device('cpu'):
            self.sigma_min = float(self.sigma(epsilon_t))
            self.sigma_max = float(self.sigma(1))

    def coefficients(self, sigma):
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise

    def sigma(self, t):
        """sigma(t) of the VP schedule (infonoise.grids.vp_sigma), in float32 for a number, as EDM."""
        return vp_sigma(torch.as_tensor(t), self.beta_d, self.beta_min)

    def sigma_inv(self, sigma):
        """t(sigma), the inverse (infonoise.grids.vp_t)."""
        return vp_t(torch.as_tensor(sigma), self.beta_d, self.beta_min)


class VEPrecond(_Precond):
    """Variance-exploding preconditioning (Song et al. 2021; EDM Table 1, "VE")."""

    def __init__(
        self,
        img_resolution,  # Image resolution.
        img_channels,  # Number of color channels.
        label_dim=0,  # Number of class labels, 0 = unconditional.
        use_fp16=False,  # Execute the underlying model at FP16 precision?
        sigma_min=0.02,  # Minimum supported noise level.
        sigma_max=100,  # Maximum supported noise level.
        uncertainty_channels=0,  # Channels of EDM2's learned uncertainty u(σ), 0 = none.
        model_type='SongUNet',  # Class name of the underlying model.
        **model_kwargs,  # Keyword arguments for the underlying model.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self._init_uncertainty(uncertainty_channels)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma):
        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise


class iDDPMPrecond(_Precond):
    """Improved-DDPM preconditioning (Nichol & Dhariwal 2021; EDM Table 1, "iDDPM"), on the discrete sigma set u_j."""

    def __init__(
        self,
        img_resolution,  # Image resolution.
        img_channels,  # Number of color channels.
        label_dim=0,  # Number of class labels, 0 = unconditional.
        use_fp16=False,  # Execute the underlying model at FP16 precision?
        C_1=0.001,  # Timestep adjustment at low noise levels.
        C_2=0.008,  # Timestep adjustment at high noise levels.
        M=1000,  # Original number of timesteps in the DDPM formulation.
        uncertainty_channels=0,  # Channels of EDM2's learned uncertainty u(σ), 0 = none.
        model_type='DhariwalUNet',  # Class name of the underlying model.
        **model_kwargs,  # Keyword arguments for the underlying model.
    ):
        # The model also predicts variances (second half of its output channels), which are ignored.
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels * 2, model_kwargs)
        self._init_uncertainty(uncertainty_channels)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M

        # u_M = 0, u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1) / alpha_bar(j), C_1) - 1), in float32 as EDM.
        # The table is computed on the CPU, also when the module is built under another default device (e.g. meta).
        with torch.device('cpu'):
            u = torch.zeros(M + 1)
            for j in range(M, 0, -1):
                ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1)
                u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        self.register_buffer('u', u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def coefficients(self, sigma):
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return c_skip, c_out, c_in, c_noise

    def alpha_bar(self, j):
        """alpha_bar(j) = sin^2(pi j / (2 M (C_2 + 1)))."""
        j = torch.as_tensor(j)
        return (0.5 * np.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index=False):
        """Snap sigma to the nearest u_j (or return j)."""
        sigma = torch.as_tensor(sigma)
        distance = (sigma.to(self.u.device, torch.float32).reshape(-1, 1) - self.u.reshape(1, -1)).abs()
        index = distance.argmin(dim=1)
        result = index if return_index else self.u[index].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


class EDMPrecond(_Precond):
    """EDM's own preconditioning (EDM Table 1 and Appendix B.6)."""

    def __init__(
        self,
        img_resolution,  # Image resolution.
        img_channels,  # Number of color channels.
        label_dim=0,  # Number of class labels, 0 = unconditional.
        use_fp16=False,  # Execute the underlying model at FP16 precision?
        sigma_min=0,  # Minimum supported noise level.
        sigma_max=float('inf'),  # Maximum supported noise level.
        sigma_data=0.5,  # Expected standard deviation of the training data.
        uncertainty_channels=0,  # Channels of EDM2's learned uncertainty u(σ), 0 = none.
        model_type='DhariwalUNet',  # Class name of the underlying model.
        **model_kwargs,  # Keyword arguments for the underlying model.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self._init_uncertainty(uncertainty_channels)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma):
        c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
        c_in = 1 / (self.sigma_data**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise
