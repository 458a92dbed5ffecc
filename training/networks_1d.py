"""The 1-D U-Net for DNA sequences (not in EDM): `SequenceUNet`, SongUNet's DDPM++ design on [N, C, L].

A sequence travels through the pipeline as a 4-channel "image" [4, 1, L] (training/sequences.py), so EDM's
preconditioners in training/networks.py wrap this network unchanged: importing this module adds it to
`networks.MODEL_TYPES` under the name 'SequenceUNet', which snapshots store as `model_type`. This module imports
networks.py and never the reverse; training/checkpoint.py imports both, so every path that builds a network from
stored kwargs (training, resuming, loading for generation) knows it.
"""

import numpy as np
import torch
from torch.nn.functional import silu

from training import networks
from training.networks import AttentionOp, GroupNorm, Linear, PositionalEmbedding, song_embedding, weight_init


class Conv1d(torch.nn.Module):
    """1-D convolution with optional 2x resampling: nearest-neighbour upsampling and pair averaging, the 1-D
    counterparts of Conv2d with DDPM++'s resample_filter=(1, 1); kernel=0 gives a pure resampler."""

    def __init__(
        self, in_channels, out_channels, kernel, bias=True, up=False, down=False, init_mode='xavier_uniform',
        init_weight=1, init_bias=0,
    ):  # fmt: skip
        if up and down:
            raise ValueError('Conv1d cannot upsample and downsample at the same time')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        init_kwargs = dict(mode=init_mode, fan_in=in_channels * kernel, fan_out=out_channels * kernel)
        self.weight = None
        self.bias = None
        if kernel:
            self.weight = torch.nn.Parameter(
                weight_init([out_channels, in_channels, kernel], **init_kwargs) * init_weight
            )
            if bias:
                self.bias = torch.nn.Parameter(weight_init([out_channels], **init_kwargs) * init_bias)

    def forward(self, x):
        if self.up:
            x = x.repeat_interleave(2, dim=2)
        if self.down:
            x = torch.nn.functional.avg_pool1d(x, 2)
        if self.weight is not None:
            w = self.weight.to(x.dtype)
            x = torch.nn.functional.conv1d(x, w, padding=w.shape[-1] // 2)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1)
        return x


class SequenceBlock(torch.nn.Module):
    """UNetBlock of DDPM++ (additive embedding, skip scale sqrt(1/2), one attention head) on [N, C, L]."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False, dropout=0):
        super().__init__()
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.dropout = dropout
        self.norm0 = GroupNorm(num_channels=in_channels, eps=1e-6)
        self.conv0 = Conv1d(in_channels, out_channels, kernel=3, up=up, down=down, **init)
        self.affine = Linear(emb_channels, out_channels, **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=1e-6)
        self.conv1 = Conv1d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv1d(in_channels, out_channels, kernel=1, up=up, down=down, **init)
        self.attention = attention
        if attention:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=1e-6)
            self.qkv = Conv1d(
                out_channels, out_channels * 3, kernel=1, init_mode='xavier_uniform', init_weight=np.sqrt(0.2)
            )
            self.proj = Conv1d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(silu(self.norm0(x)))
        x = silu(self.norm1(x + self.affine(emb).unsqueeze(2).to(x.dtype)))
        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * np.sqrt(0.5)
        if self.attention:
            q, k, v = self.qkv(self.norm2(x)).reshape(x.shape[0], x.shape[1], 3, -1).unbind(2)
            w = AttentionOp.apply(q, k)
            x = (self.proj(torch.einsum('nqk,nck->ncq', w, v)) + x) * np.sqrt(0.5)
        return x


class SequenceUNet(torch.nn.Module):
    """A 1-D U-Net for sequences (DNA one-hot matrices), the DDPM++ design of SongUNet with 1-D convolutions: the
    same mapping network, 'standard' encoder and decoder, residual blocks and skip connections, halving the length
    at each level. Inputs are [N, C, 1, L] (see training/sequences.py), so every preconditioner wraps it unchanged;
    `img_resolution` is the length L, which must be divisible by 2^(len(channel_mult) - 1). `attn_resolutions`
    lists the lengths with self-attention. This is our analogue of DNA-Diffusion's U-Net, not a copy of it."""

    img_height = 1  # Samples are [C, 1, L]: the preconditioners' `img_shape` reads this.

    def __init__(
        self,
        img_resolution,  # Sequence length L.
        in_channels,  # Channels per position (4 for DNA).
        out_channels,  # Channels of the output.
        label_dim=0,  # Number of class labels, 0 = unconditional.
        augment_dim=0,  # Augmentation label dimensionality, 0 = no augmentation.
        model_channels=128,  # Base multiplier for the number of channels.
        channel_mult=(1, 2, 2),  # Per-level multipliers for the number of channels.
        channel_mult_emb=4,  # Multiplier for the dimensionality of the embedding vector.
        num_blocks=2,  # Number of residual blocks per level.
        attn_resolutions=(),  # Sequence lengths with self-attention.
        dropout=0.10,  # Dropout probability of intermediate activations.
        label_dropout=0,  # Dropout probability of class labels for classifier-free guidance.
    ):
        levels = len(channel_mult)
        if img_resolution < 1 or img_resolution % (1 << (levels - 1)) != 0:
            raise ValueError(
                f'Sequence length {img_resolution} must be a positive multiple of 2^{levels - 1} for {levels} levels '
                f'(channel_mult={list(channel_mult)})'
            )
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='xavier_uniform')
        self.map_noise = PositionalEmbedding(num_channels=model_channels, endpoint=True)
        self.map_label = Linear(label_dim, model_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        block = dict(emb_channels=emb_channels, dropout=dropout)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = model_channels
        self.enc[f'{img_resolution}_conv'] = Conv1d(in_channels, cout, kernel=3, **init)
        for level, mult in enumerate(channel_mult):
            length = img_resolution >> level
            if level > 0:
                self.enc[f'{length}_down'] = SequenceBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{length}_block{idx}'] = SequenceBlock(
                    cin, cout, attention=length in attn_resolutions, **block
                )
        skips = [b.out_channels for b in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            length = img_resolution >> level
            if level == levels - 1:
                self.dec[f'{length}_in0'] = SequenceBlock(cout, cout, attention=True, **block)
                self.dec[f'{length}_in1'] = SequenceBlock(cout, cout, **block)
            else:
                self.dec[f'{length}_up'] = SequenceBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and length in attn_resolutions
                self.dec[f'{length}_block{idx}'] = SequenceBlock(cin, cout, attention=attn, **block)
        self.out_norm = GroupNorm(num_channels=cout, eps=1e-6)
        self.out_conv = Conv1d(cout, out_channels, kernel=3, init_mode='xavier_uniform', init_weight=1e-5)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        if x.ndim != 4 or x.shape[2] != 1:
            raise ValueError(f'SequenceUNet takes [N, C, 1, L], got {list(x.shape)}')
        emb = song_embedding(self, noise_labels, class_labels, augment_labels, x.shape[0])

        x = x[:, :, 0, :]
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, SequenceBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x))).unsqueeze(2)


networks.MODEL_TYPES['SequenceUNet'] = SequenceUNet
