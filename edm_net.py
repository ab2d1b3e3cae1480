"""EDM networks (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"), written
to be state-dict compatible with NVIDIA's official `training/networks.py` (NVlabs/edm @ 008a4e5): same constructor
arguments and defaults, same state-dict keys, order and shapes, same forward math and weight initialisation.

What is here, top to bottom:
  layers (Linear, Conv2d, GroupNorm, attention, embeddings) -> UNetBlock -> SongUNet (DDPM++ / NCSN++) and
  DhariwalUNet (ADM) -> EDM preconditioning (edm_precondition, EDMPrecond) -> the EDM Heun sampler ->
  loaders for official snapshot pickles (without running anything from the file) and plain state dicts.

Deviations from the official code, all on purpose:
  * `use_fp16=True` computes in bfloat16 on every device (DMD2's edit of networks.py selects bf16; official EDM used
    float16 and only on CUDA). We also use it on CPU, where AVX-512 BF16 / AMX make bf16 convolutions faster.
    Parameters stay float32; the mapping network, preconditioning, attention softmax and D stay float32.
  * `forward(..., return_bottleneck=True)` returns the encoder output (DMD2's edit; for SongUNet likewise).
  * The UNets also run under an outer `torch.autocast` (the attention logits/softmax stay float32 there too) and
    take channels_last tensors; `set_gradient_checkpointing` adds activation checkpointing per UNetBlock.
  * Attention uses plain autograd instead of the official custom autograd Function (same values and gradients;
    the official one only saves memory by keeping q, k, w in the compute dtype).
"""

import collections
import contextlib
import inspect
import io
import math
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn.functional import silu


# ----------------------------------------------------------------------------------------------------------------
# Layers. Every layer casts its float32 parameters to the input's dtype (official), so one set of float32 weights
# serves float32 and bfloat16 compute.


def weight_init(shape, mode, fan_in, fan_out):
    """The official initialisers (networks.py weight_init): uniform on [-a, a] or normal with std s."""
    if mode == 'xavier_uniform':
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'unknown init_mode {mode!r}: use xavier_uniform, xavier_normal, kaiming_uniform or kaiming_normal')


class Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """Conv with optional 2x up/down resampling by a separable FIR filter (official: [1,1] = nearest up / 2x2 average
    down). kernel=0 means resample only (no weight). The filter is a persistent buffer when up or down is set."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=[1, 1],
                 fused_resample=False, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        if up and down:
            raise ValueError('Conv2d: up and down are exclusive')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight) \
            if kernel else None
        self.bias = nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum() ** 2  # [1, 1, L, L], sums to 1
        self.register_buffer('resample_filter', f if up or down else None)

    def forward(self, x):
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if self.fused_resample and self.up and w is not None:  # in the official code; no official config uses it
            x = F.conv_transpose2d(x, (4 * f).expand(self.in_channels, 1, -1, -1), groups=self.in_channels,
                                   stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:  # NCSN++ aux_residual: conv first, then filter
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.expand(self.out_channels, 1, -1, -1), groups=self.out_channels, stride=2)
        else:
            if self.up and f.shape[-1] == 2:
                # Official: conv_transpose2d(x, 4f per channel, stride 2, padding 0). With a 2x2 kernel and stride 2
                # every output pixel gets exactly one product x[i, j] * 4f[a, b], so this is the same computation
                # (bit for bit); it avoids oneDNN's depthwise transposed conv, ~30x slower than this in bf16 on CPU.
                # For the [1,1] filter (4f = 1) it is nearest-neighbour upsampling.
                x = F.interpolate(x, scale_factor=2, mode='nearest') * (4 * f).tile(1, 1, *x.shape[-2:])
            elif self.up:  # depthwise transposed conv with 4f (gain 4 keeps the mean)
                x = F.conv_transpose2d(x, (4 * f).expand(self.in_channels, 1, -1, -1), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.expand(self.in_channels, 1, -1, -1), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group norm with min(32, C // 4) groups (official: at least 4 channels per group)."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def attention(qkv, num_heads):
    """Multi-head self-attention over the pixels of qkv [N, 3C, H, W] -> [N, C, H, W].

    Channel layout of qkv (official, from reshape(N*heads, C/heads, 3, HW)): channel head*3c + ch*3 + j holds
    j = 0 query, 1 key, 2 value of channel ch of that head (interleaved, not three C-blocks). Logits
    q.k / sqrt(c) and the softmax run in float32 even inside autocast; the weights are then cast back to the
    compute dtype for the weighted sum (official AttentionOp). Output channel = head*c + ch."""
    n, _, height, width = qkv.shape
    q, k, v = qkv.reshape(n, num_heads, -1, 3, height * width).unbind(3)  # a view for NCHW and channels_last
    c = q.shape[2]
    float32_region = torch.autocast(qkv.device.type, enabled=False) \
        if torch.amp.autocast_mode.is_autocast_available(qkv.device.type) else contextlib.nullcontext()
    with float32_region:
        logits = torch.einsum('nhcq,nhck->nhqk', q.float(), (k / math.sqrt(c)).float())
        w = logits.softmax(dim=3).to(q.dtype)
    return torch.einsum('nhqk,nhck->nhcq', w, v).reshape(n, -1, height, width)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoids of a vector x [N] -> [N, num_channels] = [cos(x f), sin(x f)] (cos half first),
    f_j = (1 / max_positions) ** (j / (num_channels/2 - endpoint)). ADM: endpoint=False; DDPM++: endpoint=True."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        x = torch.outer(x, ((1 / self.max_positions) ** freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (NCSN++): [cos(2 pi x f), sin(2 pi x f)], f ~ N(0, scale^2) a persistent buffer."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# The U-Net block shared by DDPM++, NCSN++ and ADM


class UNetBlock(nn.Module):
    """GroupNorm-SiLU-Conv (with resampling) -> embedding (ADM: adaptive scale/shift; DDPM++: added bias) ->
    GroupNorm-SiLU-Dropout-Conv -> + skip, times skip_scale -> optional self-attention (residual, times skip_scale).
    Submodule names and order are the official ones: norm0 conv0 affine norm1 conv1 [skip] [norm2 qkv proj]."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5, resample_filter=[1, 1],
                 resample_proj=False, adaptive_scale=True, init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = {} if init is None else init  # official default: dict()
        init_zero = dict(init_weight=0) if init_zero is None else init_zero  # official default
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter,
                            **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:  # 1x1 conv if the width changes (or asked), else resample only
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        h = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:  # ADM: first half scale, second half shift
            scale, shift = params.chunk(2, dim=1)
            h = silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if self.num_heads:
            h = (self.proj(attention(self.qkv(self.norm2(h)), self.num_heads)) + h) * self.skip_scale
        return h


def _run_block(unet, block, x, emb):
    """block(x, emb), under activation checkpointing when the U-Net has it switched on and is training."""
    if unet.gradient_checkpointing and unet.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, emb, use_reentrant=False)
    return block(x, emb)


def _drop_labels(labels, p, training):
    """Zero each sample's label row with probability p while training (official label_dropout, for CFG)."""
    if not (training and p):
        return labels
    return labels * (torch.rand([labels.shape[0], 1], device=labels.device) >= p).to(labels.dtype)


# ----------------------------------------------------------------------------------------------------------------
# SongUNet: DDPM++ and NCSN++ (Song et al. 2021) as re-implemented by EDM (CIFAR-10, FFHQ, AFHQv2 models)


class SongUNet(nn.Module):
    """DDPM++ (embedding_type='positional', encoder_type='standard', resample_filter=[1,1]) or NCSN++ ('fourier',
    'residual', [1,3,3,1], channel_mult_noise=2). Defaults are the official constructor defaults."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=[16], dropout=0.10, label_dropout=0, embedding_type='positional',
                 channel_mult_noise=1, encoder_type='standard', decoder_type='standard', resample_filter=[1, 1]):
        for arg, value, allowed in [('embedding_type', embedding_type, ('fourier', 'positional')),
                                    ('encoder_type', encoder_type, ('standard', 'skip', 'residual')),
                                    ('decoder_type', decoder_type, ('standard', 'skip'))]:
            if value not in allowed:
                raise ValueError(f'SongUNet: {arg}={value!r}, expected one of {allowed}')
        super().__init__()
        self.label_dropout = label_dropout
        self.gradient_checkpointing = False  # see set_gradient_checkpointing
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')  # official SongUNet inits
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network (attribute order = state-dict order: map_noise, map_label, map_augment, map_layer0/1).
        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == 'positional' \
            else FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder: {res}x{res}_conv | _down [+ _aux_*] then _block0..num_blocks-1 per level.
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder: deepest level _in0 (attention) + _in1, other levels _up; then num_blocks+1 blocks that take the
        # concatenated skip; attention only in the last block of a level; output head at level 0 (aux_norm/conv).
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(
                    cin, cout, attention=idx == num_blocks and res in attn_resolutions, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None, return_bottleneck=False):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # official: swap to [sin, cos]
        if self.map_label is not None:  # one-hot labels scaled by sqrt(label_dim) (official)
            labels = _drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer1(silu(self.map_layer0(emb))))

        skips, aux = [], x  # aux: the downsampled input image path of the 'skip'/'residual' encoders
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = _run_block(self, block, x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        if return_bottleneck:  # encoder output (CIFAR-10 configs: [N, 256, 8, 8])
            return x

        aux = tmp = None  # aux: the output image path (running sum over levels for decoder_type 'skip')
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
                x = _run_block(self, block, x, emb)
        return aux


# ----------------------------------------------------------------------------------------------------------------
# DhariwalUNet: ADM (Dhariwal & Nichol 2021) as re-implemented by EDM (the ImageNet-64 model)


class DhariwalUNet(nn.Module):
    """ADM U-Net. Defaults are the official ones (= the ImageNet-64 teacher apart from label_dim)."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0):
        super().__init__()
        self.label_dropout = label_dropout
        self.gradient_checkpointing = False  # see set_gradient_checkpointing
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))  # official
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)  # skip_scale 1, eps 1e-5, filter [1,1], adaptive scale

        # Mapping network (attribute order = state-dict order: map_noise, map_augment, map_layer0/1, map_label).
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal',
                                init_weight=math.sqrt(label_dim)) if label_dim else None  # N(0, 1) entries

        # Encoder: {res}x{res}_conv (level 0) or _down, then _block0..num_blocks-1 per level.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder: _in0 (attention) + _in1 at the deepest level, _up elsewhere, then num_blocks+1 blocks each
        # taking one concatenated skip.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None, return_bottleneck=False):
        emb = self.map_noise(noise_labels)  # [cos, sin], float32 even when the trunk runs in bf16
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training))
        emb = silu(emb)

        skips = []
        for block in self.enc.values():
            x = _run_block(self, block, x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        if return_bottleneck:  # DMD2's edit: the encoder output, ImageNet-64: [N, 768, 8, 8]
            return x
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = _run_block(self, block, x, emb)
        return self.out_conv(silu(self.out_norm(x)))


def set_gradient_checkpointing(net, enabled=True):
    """Recompute each UNetBlock's activations in the backward pass (torch.utils.checkpoint, use_reentrant=False)
    while training: less memory, about one more forward of compute. A plain attribute, so state dicts are unchanged."""
    unets = [m for m in net.modules() if isinstance(m, (DhariwalUNet, SongUNet))]
    if not unets:
        raise ValueError(f'set_gradient_checkpointing: {type(net).__name__} contains no DhariwalUNet or SongUNet')
    for unet in unets:
        unet.gradient_checkpointing = enabled
    return net


# ----------------------------------------------------------------------------------------------------------------
# EDM preconditioning (Karras et al. 2022, Table 1 and Sec. 5)


def edm_precondition(sigma, sigma_data=0.5):
    """(c_skip, c_out, c_in, c_noise) for D(x) = c_skip x + c_out F(c_in x, c_noise), shaped like sigma.
    c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4 (EDM Table 1)."""
    sigma = torch.as_tensor(sigma)
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


UNETS = {'DhariwalUNet': DhariwalUNet, 'SongUNet': SongUNet}


class EDMPrecond(nn.Module):
    """The EDM denoiser D(x; sigma, labels) around a U-Net. Constructor arguments and defaults are the official
    ones; `use_fp16=True` means bfloat16 compute on any device (see the module docstring)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float('inf'), sigma_data=0.5, model_type='DhariwalUNet', **model_kwargs):
        if model_type not in UNETS:
            raise ValueError(f'EDMPrecond: model_type={model_type!r}, expected one of {sorted(UNETS)}')
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self._init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                 use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data,
                                 model_type=model_type, **model_kwargs)  # as the official persistence records it
        self.model = UNETS[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                       out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_bottleneck=False, **model_kwargs):
        """D(x; sigma) in float32 for x [N, C, H, W] and sigma [N] (or a scalar, broadcast over the batch).
        class_labels: one-hot rows [N, label_dim] (None = zeros). model_kwargs (e.g. augment_labels) go to the
        U-Net. return_bottleneck=True returns the U-Net's encoder output instead, in the compute dtype."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.bfloat16 if self.use_fp16 and not force_fp32 else torch.float32  # official: fp16, CUDA only
        c_skip, c_out, c_in, c_noise = edm_precondition(sigma, self.sigma_data)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels,
                         return_bottleneck=return_bottleneck, **model_kwargs)
        if return_bottleneck:
            return F_x
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


def init_kwargs(net):
    """Keyword arguments that rebuild `net` (an EDMPrecond) as it is now: EDMPrecond(**init_kwargs(net)) has the same
    architecture and settings (the recorded constructor arguments, with use_fp16/sigma_* read back from the net)."""
    kwargs = dict(net._init_kwargs)
    kwargs.update(use_fp16=net.use_fp16, sigma_min=net.sigma_min, sigma_max=net.sigma_max, sigma_data=net.sigma_data)
    return kwargs


def imagenet64_config(dropout=0.10, use_fp16=False):
    """EDMPrecond kwargs of `edm-imagenet-64x64-cond-adm.pkl` (train.py --arch=adm --cond=1 --augment=0: ADM 192,
    [1,2,3,4], 3 blocks, attention at 32/16/8; 295,899,267 parameters). It was trained with dropout 0.10 and
    --fp16=1; DMD2 rebuilds it with dropout 0.0, and the compute precision is a runtime choice here."""
    return dict(img_resolution=64, img_channels=3, label_dim=1000, use_fp16=use_fp16, sigma_min=0,
                sigma_max=float('inf'), sigma_data=0.5, model_type='DhariwalUNet', model_channels=192,
                channel_mult=[1, 2, 3, 4], dropout=dropout)


def cifar10_config(arch='ddpmpp', dropout=0.13, use_fp16=False, label_dim=10, augment_dim=9):
    """EDMPrecond kwargs of `edm-cifar10-32x32-cond-{vp,ve}.pkl`: arch 'ddpmpp' (vp file) or 'ncsnpp' (ve file),
    train.py presets; defaults --dropout 0.13, --augment 0.12 -> augment_dim 9, --cond 1 -> label_dim 10."""
    presets = dict(ddpmpp=dict(embedding_type='positional', encoder_type='standard', decoder_type='standard',
                               channel_mult_noise=1, resample_filter=[1, 1]),
                   ncsnpp=dict(embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                               channel_mult_noise=2, resample_filter=[1, 3, 3, 1]))
    if arch not in presets:
        raise ValueError(f"cifar10_config: arch={arch!r}, expected 'ddpmpp' or 'ncsnpp'")
    return dict(img_resolution=32, img_channels=3, label_dim=label_dim, use_fp16=use_fp16, sigma_min=0,
                sigma_max=float('inf'), sigma_data=0.5, model_type='SongUNet', augment_dim=augment_dim,
                model_channels=128, channel_mult=[2, 2, 2], dropout=dropout, **presets[arch])


# ----------------------------------------------------------------------------------------------------------------
# EDM sampler (Karras et al. 2022, Algorithm 2; official generate.py edm_sampler)


@torch.no_grad()
def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002,
                sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, generator=None):
    """Heun's 2nd-order method on the EDM probability-flow ODE, optionally with churn (stochastic sampler).
    NFE = 2 num_steps - 1 (the last step, to sigma = 0, is a plain Euler step). The state is float64 (official).

    Noise levels t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then t_N = 0.
    Churn: gamma = min(S_churn/N, sqrt(2)-1) for t_i in [S_min, S_max]; fresh noise is drawn at every step as in
    the official code (so a seeded stream matches), from `generator` if given, else from randn_like(x).
    net(x, sigma, class_labels) is any denoiser; it gets x in float32 and one sigma per sample (EDMPrecond casts
    both to float32 itself, so this is the official computation). net.sigma_min/sigma_max/round_sigma are used
    when present. Defaults: EDM's (CIFAR-10: 18 steps; ImageNet-64 best: 256 steps, S_churn 40, S_min 0.05,
    S_max 50, S_noise 1.003)."""
    if generator is not None:
        randn_like = lambda x: torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    sigma_min = max(sigma_min, getattr(net, 'sigma_min', 0))
    sigma_max = min(sigma_max, getattr(net, 'sigma_max', float('inf')))
    round_sigma = getattr(net, 'round_sigma', torch.as_tensor)

    def denoise(x, t):
        sigma = t.to(torch.float32).reshape(1).expand(x.shape[0])
        return net(x.to(torch.float32), sigma, class_labels).to(torch.float64)

    i = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t_steps = (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([round_sigma(t_steps), torch.zeros_like(t_steps[:1])])

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat  # Euler step
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:  # Heun correction (not at the last step, t_next = 0)
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


# ----------------------------------------------------------------------------------------------------------------
# Loading official snapshot pickles without running anything from the file, and plain state dicts
#
# An EDM snapshot (training_loop.py) is pickle.dump(dict(ema=EDMPrecond, loss_fn, augment_pipe, dataset_kwargs)).
# Each network class pickles as torch_utils.persistence._reconstruct_persistent_obj(meta), meta = dict(type='class',
# version=6, module_src=<source of networks.py>, class_name, state=<the module's __dict__>); the official loader
# exec()s module_src. We resolve only an allow-list of globals, keep (class_name, state) records, never look at
# module_src, rebuild tensors with torch's own functions, and read the state dict off the module __dict__s.


class EDMLoadError(ValueError):
    """A network file that cannot be used; the message names the file and what to do."""


class UnsafePickleError(EDMLoadError):
    """The pickle references a global outside the allow-list; it was refused before anything from it ran."""


class _ObjectRecord:
    """A persistent object (class_name, state) or a pickled torch container module (state set by BUILD)."""

    def __init__(self, class_name=None, state=None):
        self.class_name, self.state = class_name, state

    def __setstate__(self, state):
        self.state = state


def _torch_container(class_name):
    return type(class_name, (_ObjectRecord,), {'__init__': lambda self, *args: _ObjectRecord.__init__(self, class_name)})


def _persistent_record(meta):
    if not isinstance(meta, dict) or meta.get('type') != 'class' or meta.get('version') != 6:
        raise EDMLoadError('unsupported persistent object (expected torch_utils.persistence version 6, type class)')
    return _ObjectRecord(meta['class_name'], meta['state'])


def _numpy_scalar(dtype, data):
    return np.frombuffer(data, dtype=dtype)[0]  # no object dtypes: frombuffer refuses them


def _load_storage(data):
    return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)  # legacy torch.save of one storage


_ALLOWED_GLOBALS = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _persistent_record,
    ('torch.nn.modules.container', 'ModuleDict'): _torch_container('ModuleDict'),
    ('torch.nn.modules.container', 'ModuleList'): _torch_container('ModuleList'),
    ('torch.nn.modules.container', 'Sequential'): _torch_container('Sequential'),
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): torch._utils._rebuild_parameter_with_state,
    ('torch.storage', '_load_from_bytes'): _load_storage,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy', 'dtype'): np.dtype,
    ('dnnlib.util', 'EasyDict'): dict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(f'{self.path}: refused: the pickle references {module}.{name}, which an EDM '
                                    f'snapshot does not contain (nothing from the file was run); only load trusted files')
        return _ALLOWED_GLOBALS[module, name]


def _flatten(node, prefix, out):
    """State dict of a pickled module record: its parameters, persistent buffers, then children (Module order)."""
    state = getattr(node, 'state', None)
    if not isinstance(state, dict) or '_parameters' not in state:
        raise EDMLoadError(f'{prefix or "ema"} is not a pickled torch module')
    for name, value in state['_parameters'].items():
        if value is not None:
            out[prefix + name] = value.detach()
    skipped = state.get('_non_persistent_buffers_set', set())
    for name, value in state['_buffers'].items():
        if value is not None and name not in skipped:
            out[prefix + name] = value
    for name, child in state['_modules'].items():
        if child is not None:
            _flatten(child, prefix + name + '.', out)
    return out


def _plain(value):
    """numpy scalars/tuples from a pickle -> Python values (so kwargs survive json and weights_only checkpoints)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _one_line(error):
    return f'{type(error).__name__}: {" ".join(str(error).split())}'[:300]


def _build_and_load(config, state, name):
    """EDMPrecond(**config) with `state` loaded strictly. The net is built on the meta device (no init cost) and
    takes the loaded tensors (float32, as the official files store them); returned in eval mode."""
    try:
        with torch.device('meta'):
            net = EDMPrecond(**config)
    except (TypeError, ValueError) as e:
        raise EDMLoadError(f'{name}: cannot build EDMPrecond from its config ({_one_line(e)})') from None
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f'{k} {list(state[k].shape)} (expected {list(v.shape)})' for k, v in expected.items()
             if k in state and (not torch.is_tensor(state[k]) or state[k].shape != v.shape)]
    if missing or unexpected or wrong:
        parts = [f'{len(items)} {what}: {", ".join(items[:4])}{", ..." if len(items) > 4 else ""}'
                 for what, items in [('missing', missing), ('unexpected', unexpected), ('wrong shape', wrong)] if items]
        raise EDMLoadError(f'{name}: state dict does not match EDMPrecond({config.get("model_type", "DhariwalUNet")}, '
                           f'img_resolution={config.get("img_resolution")}, label_dim={config.get("label_dim", 0)}): '
                           + '; '.join(parts))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval()


def _check_expect(config, expect, name):
    if not expect:
        return
    unet = UNETS.get(config.get('model_type', 'DhariwalUNet'))
    resolved = {k: p.default for cls in (unet, EDMPrecond) if cls is not None
                for k, p in inspect.signature(cls.__init__).parameters.items() if p.default is not p.empty}
    resolved.update(config)
    for key, want in expect.items():
        if key not in resolved:
            raise EDMLoadError(f'{name}: cannot check {key}={want!r}: not an EDMPrecond/{config.get("model_type")} '
                               f'argument')
        if resolved[key] != want:
            raise EDMLoadError(f'{name}: the network has {key}={resolved[key]!r} but {want!r} is needed here; '
                               f'pass the snapshot that matches this dataset')


def load_edm_pickle(path, expect=None, **overrides):
    """The `ema` network of an official EDM snapshot pickle as our EDMPrecond, in eval mode, on CPU.

    Nothing from the file is executed (allow-listed unpickler, see above); a global outside the list raises
    UnsafePickleError naming module.name. The network is built from the recorded constructor arguments
    (`_init_kwargs`), with `overrides` applied (e.g. dropout=0.0, use_fp16=True, as DMD2 rebuilds its teacher),
    and loaded strictly. expect=dict(img_resolution=64, label_dim=1000) checks the recorded config first.
    Errors (missing file, truncated/corrupt pickle, no 'ema', wrong config or keys) are one line naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such file; pass the path of an EDM snapshot pickle (e.g. '
                                f'edm-imagenet-64x64-cond-adm.pkl from https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/)')
    try:
        with open(path, 'rb') as f:
            data = _RestrictedUnpickler(f, path).load()
    except EDMLoadError as e:
        if str(e).startswith(path):
            raise
        raise EDMLoadError(f'{path}: {e}') from None
    except Exception as e:
        raise EDMLoadError(f'{path}: not a readable EDM snapshot pickle ({_one_line(e)}); the file is truncated or '
                           f'corrupt (re-download it), or it is a plain state dict (use load_edm_state_dict)') from None
    if not isinstance(data, dict) or 'ema' not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise EDMLoadError(f"{path}: no 'ema' network in the pickle (found {found}); pass an EDM network snapshot")
    ema = data['ema']
    if not isinstance(ema, _ObjectRecord) or ema.class_name != 'EDMPrecond':
        found = getattr(ema, 'class_name', type(ema).__name__)
        raise EDMLoadError(f"{path}: 'ema' is {found}, not EDMPrecond (VP/VE/iDDPM baselines are not supported)")
    state = ema.state
    args, kwargs = state.get('_init_args') or (), state.get('_init_kwargs')
    if kwargs is None:
        raise EDMLoadError(f'{path}: the EDMPrecond has no recorded constructor arguments (_init_kwargs)')
    try:
        config = inspect.signature(EDMPrecond).bind(*args, **kwargs).arguments
    except TypeError as e:
        raise EDMLoadError(f'{path}: recorded EDMPrecond arguments do not fit ({_one_line(e)})') from None
    config = _plain({**{k: v for k, v in config.items() if k != 'model_kwargs'}, **config.get('model_kwargs', {})})
    inner = getattr(state['_modules'].get('model'), 'class_name', None)
    if inner != config.get('model_type', 'DhariwalUNet'):
        raise EDMLoadError(f'{path}: the inner network is {inner} but model_type is '
                           f'{config.get("model_type", "DhariwalUNet")}')
    _check_expect(config, expect, path)
    return _build_and_load({**config, **overrides}, _flatten(ema, '', collections.OrderedDict()), path)


def load_edm_state_dict(path_or_dict, config, name=None):
    """EDMPrecond(**config) with a plain state dict (keys `model.*`, e.g. DMD2's released `pytorch_model.bin`)
    loaded strictly; in eval mode. path_or_dict: a file (read with torch.load(weights_only=True)) or a dict.
    config: EDMPrecond kwargs, e.g. imagenet64_config(dropout=0.0). Mismatches raise one line listing the first
    missing/unexpected keys and wrong shapes, naming the file (or `name`)."""
    if isinstance(path_or_dict, (str, os.PathLike)):
        name = name or os.fspath(path_or_dict)
        if not os.path.isfile(path_or_dict):
            raise FileNotFoundError(f'{name}: no such file; pass the path of a state-dict file (e.g. pytorch_model.bin)')
        try:
            state = torch.load(path_or_dict, map_location='cpu', weights_only=True)
        except Exception as e:
            raise EDMLoadError(f'{name}: not a readable torch state-dict file ({_one_line(e)}); an EDM snapshot '
                               f'pickle needs load_edm_pickle') from None
    else:
        name, state = name or 'state dict', path_or_dict
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise EDMLoadError(f'{name}: expected a flat dict of tensors (keys model.*), got {type(state).__name__}')
    return _build_and_load(dict(config), state, name)
