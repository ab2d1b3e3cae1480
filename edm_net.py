"""EDM networks (Karras et al. 2022, arXiv 2206.00364), state-dict compatible with NVlabs/edm.

Written from the project's reference notes (shared/reference/edm_fid.md: NVlabs/edm @ 008a4e5 training/networks.py
and generate.py; tianweiy/DMD2 for its two edits). Module names, constructor arguments, defaults, parameter/buffer
registration and weight initialisation (including the order of random draws) follow the official code, so official
weights load with strict=True both ways and, on identical weights, outputs agree to float32 round-off (during
development: bit-identical to the official modules on CPU with the official attention op, and the same seed gave
bit-identical initial weights).

Contents: layers (Linear, Conv2d, GroupNorm, attention, embeddings), UNetBlock, SongUNet (DDPM++/NCSN++),
DhariwalUNet (ADM), EDMPrecond, the EDM Heun sampler, official configs and download URLs, loaders for official EDM
snapshot pickles (without executing anything from the file) and plain state dicts (DMD2's released generators), EDM's
FID protocol (TF1 resize, the Inception detector, float64 statistics, .npz reference files, the ImageNet-64 sampling
protocol) and its dataset_tool zip / folder reader.
Speed options that leave the state dict alone: attention through F.scaled_dot_product_attention (the default) or the
official op (set_attention), gradient checkpointing.

DMD2's edits to EDM (both optional): `use_fp16=True` computes the UNet in bfloat16 (official EDM: float16, CUDA
only; DMD2 switched to bfloat16 because float16 training diverged; here it applies on CPU and CUDA alike), and
`return_bottleneck=True` returns the UNet encoder output for the GAN classifier head.
"""
import collections
import contextlib
import inspect
import io
import json
import math
import os
import pathlib
import pickle
import zipfile

import numpy as np
import PIL.Image
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ---------------------------------------------------------------------------------------------------------------
# Weight initialisation (official `weight_init`: same modes, same use of the global RNG, same order of draws).


def weight_init(shape, mode, fan_in, fan_out):
    if mode == 'xavier_uniform':
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'unknown init mode {mode!r}; use xavier_uniform, xavier_normal, kaiming_uniform or '
                     f'kaiming_normal')

# ---------------------------------------------------------------------------------------------------------------
# Primitive layers. Parameters stay float32; every forward casts them to the input's dtype (official behaviour).


class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


class Conv2d(torch.nn.Module):
    """kernel=0 means resample only (no weight, no bias). With up/down the FIR filter outer(f, f) / sum(f)^2 is a
    persistent buffer `resample_filter` [1, 1, L, L] (official: it is in the state dict); f=[1,1] gives exact
    nearest-neighbour upsampling and 2x2 average pooling."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=[1, 1],
                 fused_resample=False, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        assert not (up and down), 'Conv2d: up and down are exclusive'
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = torch.nn.Parameter(
            weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = f.outer(f)[None, None] / f.sum().square()
        self.register_buffer('resample_filter', f if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                                   padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:  # NCSN++ aux_residual: conv first, then filter
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(torch.nn.Module):
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def attention_weights(q, k):
    """softmax over keys of q.k / sqrt(c), computed in float32 and cast back (official AttentionOp). q, k: [N, c, HW].
    Autocast is switched off here so an outer bf16 autocast cannot push the softmax back to low precision. Used by
    UNetBlocks set to attention 'official' (set_attention); the default 'sdpa' never materialises these weights."""
    no_autocast = (torch.autocast(q.device.type, enabled=False) if torch.amp.is_autocast_available(q.device.type)
                   else contextlib.nullcontext())
    with no_autocast:
        w = torch.einsum('ncq,nck->nqk', q.float(), k.float() / math.sqrt(k.shape[1])).softmax(dim=2)
    return w.to(q.dtype)


class PositionalEmbedding(torch.nn.Module):
    """Transformer sinusoids, output [cos, sin]; freqs = (1/max_positions)^(j / (C/2 - endpoint))."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        freqs = torch.arange(self.num_channels // 2, dtype=torch.float32, device=x.device)
        freqs = freqs / (self.num_channels // 2 - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.outer(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features (NCSN++), output [cos, sin]; `freqs` is a persistent buffer (official)."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.outer((2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

# ---------------------------------------------------------------------------------------------------------------
# UNet block shared by both architectures.


class UNetBlock(torch.nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5, resample_filter=[1, 1],
                 resample_proj=False, adaptive_scale=True, init=dict(), init_zero=dict(init_weight=0),
                 init_attn=None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = (0 if not attention else num_heads if num_heads is not None
                          else out_channels // channels_per_head)
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        self.attention_op = 'sdpa'  # how attention is computed, see set_attention(); not in the state dict

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter,
                            **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0  # kernel 0: resample only (ADM)
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:  # ADM: scale (first half) and shift (second half)
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:  # DDPM++/NCSN++: additive embedding
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            # qkv channels are interleaved per head: channel = head*3c + ch*3 + {0: q, 1: k, 2: v} (official layout).
            n, c, h, w = x.shape
            qkv = self.qkv(self.norm2(x)).reshape(n, self.num_heads, c // self.num_heads, 3, h * w)
            if self.attention_op == 'sdpa':
                # [3, n, heads, HW, c_head], contiguous so the fused CUDA kernels accept it (last dim stride 1).
                q, k, v = qkv.permute(3, 0, 1, 4, 2).contiguous().unbind(0)
                a = F.scaled_dot_product_attention(q, k, v).transpose(2, 3)  # default scale 1/sqrt(c_head)
            else:  # official AttentionOp: materialised float32 softmax weights
                q, k, v = qkv.reshape(n * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
                a = torch.einsum('nqk,nck->ncq', attention_weights(q, k), v)
            x = (self.proj(a.reshape(n, c, h, w)) + x) * self.skip_scale
        return x


def run_block(unet, block, x, emb):
    """Call a UNetBlock, under activation checkpointing when set_gradient_checkpointing() switched it on."""
    if getattr(unet, 'gradient_checkpointing', False) and unet.training and torch.is_grad_enabled():
        return checkpoint(block, x, emb, use_reentrant=False)
    return block(x, emb)


def set_gradient_checkpointing(net, enabled=True):
    """Recompute every UNetBlock in the backward pass instead of storing its activations (training only). Sets a
    plain attribute on each SongUNet/DhariwalUNet inside `net`; the state dict does not change."""
    unets = [m for m in net.modules() if isinstance(m, (SongUNet, DhariwalUNet))]
    if not unets:
        raise ValueError(f'set_gradient_checkpointing: {type(net).__name__} contains no SongUNet or DhariwalUNet')
    for unet in unets:
        unet.gradient_checkpointing = bool(enabled)
    return net


def store_frozen_in_bf16(precond):
    """Store a FROZEN EDMPrecond's weights in bf16 wherever its use_fp16 forward computes in bf16, so no forward
    re-casts them (~580 casts per ADM forward) and they take half the memory. The noise/label embedding (map_*) and
    each block's affine map of it run in float32 and keep float32 weights, so outputs are bit-identical to casting at
    every forward (tested). Not for trainable networks: their updates need float32 weights."""
    for name, module in precond.named_modules():
        if isinstance(module, (Linear, Conv2d, GroupNorm)) and not ('.map_' in name or name.endswith('.affine')):
            module.to(torch.bfloat16)
    return precond


def set_attention(net, op):
    """How every attention UNetBlock inside `net` computes attention (a plain attribute; the state dict and the
    parameters do not change):
    - 'sdpa' (default): F.scaled_dot_product_attention on q/k/v in the compute dtype. In float32 it equals the
      official op to float32 round-off; in bf16 (use_fp16) its fused kernels round where the official AttentionOp
      does (bf16 q/k/v in, scores and softmax in float32, bf16 weights times v), and nothing of size [HW, HW] is
      stored for backward.
    - 'official': the official AttentionOp (attention_weights): a materialised float32 softmax, for comparisons."""
    if op not in ('sdpa', 'official'):
        raise ValueError(f"set_attention: op {op!r} must be 'sdpa' or 'official'")
    blocks = [m for m in net.modules() if isinstance(m, UNetBlock)]
    if not blocks:
        raise ValueError(f'set_attention: {type(net).__name__} contains no UNetBlock')
    for block in blocks:
        block.attention_op = op
    return net


# ---------------------------------------------------------------------------------------------------------------
# DDPM++ / NCSN++ (Song et al. 2021), official `SongUNet`: CIFAR-10, FFHQ and AFHQv2 checkpoints.


class SongUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=128,
                 channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4, attn_resolutions=[16], dropout=0.10,
                 label_dropout=0, embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                 decoder_type='standard', resample_filter=[1, 1]):
        assert embedding_type in ['fourier', 'positional'], embedding_type
        assert encoder_type in ['standard', 'skip', 'residual'], encoder_type
        assert decoder_type in ['standard', 'skip'], decoder_type
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping (attribute order = state-dict order).
        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == 'positional'
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
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
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
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
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions  # attention only on a level's last block
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None, return_bottleneck=False):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [cos, sin] -> [sin, cos] (official)
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                labels = labels * (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            elif isinstance(block, UNetBlock):
                x = run_block(self, block, x, emb)
                skips.append(x)
            else:
                x = block(x)
                skips.append(x)
        if return_bottleneck:  # DMD2 edit; SongUNet: output of the deepest encoder block (CIFAR: 256 x 8 x 8)
            return x

        aux = None
        tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = run_block(self, block, x, emb)
        return aux

# ---------------------------------------------------------------------------------------------------------------
# ADM (Dhariwal & Nichol 2021), official `DhariwalUNet`: the ImageNet-64 checkpoint.


class DhariwalUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=192,
                 channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8],
                 dropout=0.10, label_dropout=0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)  # skip_scale 1, eps 1e-5, filter [1,1], adaptive scale: defaults

        # Mapping (attribute order = state-dict order).
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal',
                                init_weight=math.sqrt(label_dim)) if label_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
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
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
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
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None, return_bottleneck=False):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                labels = labels * (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(labels.dtype)
            emb = emb + self.map_label(labels)
        emb = F.silu(emb)

        skips = []
        for block in self.enc.values():
            x = run_block(self, block, x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        if return_bottleneck:  # DMD2 edit: encoder output (ImageNet-64: 768 x 8 x 8) for the GAN classifier
            return x

        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = run_block(self, block, x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))

# ---------------------------------------------------------------------------------------------------------------
# EDM preconditioning (paper Table 1 / Sec. 5; official `EDMPrecond`).


def edm_precondition(sigma, sigma_data=0.5):
    """EDM Table 1: returns (c_skip, c_out, c_in, c_noise) for noise level(s) `sigma`; D = c_skip x + c_out F."""
    sigma = torch.as_tensor(sigma)
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float('inf'), sigma_data=0.5, model_type='DhariwalUNet', **model_kwargs):
        super().__init__()
        if model_type not in ('DhariwalUNet', 'SongUNet'):
            raise ValueError(f"EDMPrecond: model_type {model_type!r} is not 'DhariwalUNet' or 'SongUNet'")
        # Constructor kwargs (JSON-friendly) so init_kwargs(net) can rebuild this network; not in the state dict.
        self.init_kwargs = _plain(dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                       use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max,
                                       sigma_data=sigma_data, model_type=model_type, **model_kwargs))
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        unet = DhariwalUNet if model_type == 'DhariwalUNet' else SongUNet
        self.model = unet(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                          label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_bottleneck=False, **model_kwargs):
        """D(x; sigma). sigma: [N] or a 0-dim tensor (broadcast over the batch). class_labels: one-hot [N, label_dim]
        (None -> zeros). model_kwargs go to the UNet (e.g. augment_labels). With return_bottleneck the raw UNet
        encoder output is returned in the compute dtype (no preconditioning applied to it)."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        # DMD2 edit: bfloat16 compute when use_fp16 (official EDM: float16 and only on CUDA).
        dtype = torch.bfloat16 if self.use_fp16 and not force_fp32 else torch.float32
        c_skip, c_out, c_in, c_noise = edm_precondition(sigma, self.sigma_data)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels,
                         return_bottleneck=return_bottleneck, **model_kwargs)
        if return_bottleneck:
            return F_x
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)  # official: identity for EDMPrecond


def _plain(value):
    """Tuples -> lists and numpy scalars -> Python numbers, recursively (JSON-friendly constructor kwargs)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def init_kwargs(net):
    """The EDMPrecond constructor kwargs that rebuild `net` (also through DDP / torch.compile wrappers), including
    later changes of its plain attributes (e.g. `net.use_fp16 = False`): EDMPrecond(**init_kwargs(net))."""
    net = getattr(net, 'module', net)
    net = getattr(net, '_orig_mod', net)
    if not isinstance(net, EDMPrecond):
        raise TypeError(f'init_kwargs: expected an EDMPrecond, got {type(net).__name__}')
    attributes = ['img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'sigma_min', 'sigma_max', 'sigma_data']
    return _plain({**net.init_kwargs, **{k: getattr(net, k) for k in attributes}})


def imagenet64_config(dropout=0.1):
    """EDMPrecond kwargs of edm-imagenet-64x64-cond-adm.pkl (README: --cond=1 --arch=adm --augment=0 --fp16=1
    --dropout=0.10; train.py: adm -> model_channels 192, channel_mult [1,2,3,4]). DMD2 rebuilds it with dropout 0."""
    return dict(img_resolution=64, img_channels=3, label_dim=1000, use_fp16=True, sigma_min=0, sigma_max=float('inf'),
                sigma_data=0.5, model_type='DhariwalUNet', augment_dim=0, model_channels=192,
                channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8],
                dropout=dropout, label_dropout=0)


def cifar10_config(arch='ddpmpp', dropout=0.13):
    """EDMPrecond kwargs of edm-cifar10-32x32-cond-{vp,ve}.pkl (train.py presets: ddpmpp = vp file, ncsnpp = ve
    file; --cond=1 -> label_dim 10; --augment=0.12 -> augment_dim 9; --dropout 0.13; fp16 off)."""
    presets = dict(
        ddpmpp=dict(embedding_type='positional', encoder_type='standard', decoder_type='standard',
                    channel_mult_noise=1, resample_filter=[1, 1]),
        ncsnpp=dict(embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                    channel_mult_noise=2, resample_filter=[1, 3, 3, 1]))
    if arch not in presets:
        raise ValueError(f"cifar10_config: arch {arch!r} must be 'ddpmpp' or 'ncsnpp'")
    return dict(img_resolution=32, img_channels=3, label_dim=10, use_fp16=False, sigma_min=0, sigma_max=float('inf'),
                sigma_data=0.5, model_type='SongUNet', augment_dim=9, model_channels=128, channel_mult=[2, 2, 2],
                dropout=dropout, **presets[arch])

# ---------------------------------------------------------------------------------------------------------------
# EDM sampler (EDM Algorithm 2; official generate.py `edm_sampler`).


@torch.no_grad()
def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002,
                sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1):
    """Heun's 2nd-order sampler in float64, 2*num_steps - 1 network evaluations; S_churn > 0 gives the stochastic
    variant. `net(x, sigma, class_labels)` is any denoiser; sigma is passed as a 0-dim float64 tensor."""
    sigma_min = max(sigma_min, getattr(net, 'sigma_min', 0))
    sigma_max = min(sigma_max, getattr(net, 'sigma_max', float('inf')))
    round_sigma = getattr(net, 'round_sigma', torch.as_tensor)

    # Time steps, EDM eq. 5: t_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, then t_N = 0.
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1)
               * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([round_sigma(t_steps), torch.zeros_like(t_steps[:1])])

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Churn: raise the noise level temporarily (EDM Alg. 2 lines 4-6).
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        # Euler step.
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # 2nd-order correction, skipped on the last step (t_next = 0).
        if i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next

# ---------------------------------------------------------------------------------------------------------------
# Loading official EDM snapshot pickles without executing anything from the file (reference 2.2-2.3).


DOWNLOAD_URL = "https://nvlabs-fi-cdn.nvidia.com/edm"  # official teachers and FID statistics (reference edm_fid.md 2.4)
TEACHER_URLS = {"imagenet64": f"{DOWNLOAD_URL}/pretrained/edm-imagenet-64x64-cond-adm.pkl",
                "cifar10": f"{DOWNLOAD_URL}/pretrained/edm-cifar10-32x32-cond-vp.pkl"}


class EDMLoadError(ValueError):
    """A network file could not be read or does not match the expected network."""


class _PersistentRecord:
    """Stands in for an object pickled by torch_utils.persistence: the class name and its __dict__, nothing run."""

    def __init__(self, class_name, state):
        self.class_name = class_name
        self.state = state


class _ContainerRecord:
    """Stands in for a torch.nn container (ModuleDict, ...): pickle's BUILD hands it the module's __dict__."""

    def __setstate__(self, state):
        self.state = state


def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get('type') != 'class' or meta.get('version') != 6:
        raise EDMLoadError(f"unsupported persistent object (type {meta.get('type') if isinstance(meta, dict) else '?'},"
                           f" version {meta.get('version') if isinstance(meta, dict) else '?'}; expected class, 6)")
    return _PersistentRecord(meta['class_name'], meta['state'])  # meta['module_src'] is never looked at


def _numpy_scalar(dtype, data=None):
    return np.frombuffer(data, dtype=dtype)[0]


def _load_storage_bytes(data):
    return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)


_ALLOWED_GLOBALS = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
    ('torch.nn.modules.container', 'ModuleDict'): _ContainerRecord,
    ('torch.nn.modules.container', 'ModuleList'): _ContainerRecord,
    ('torch.nn.modules.container', 'Sequential'): _ContainerRecord,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): torch._utils._rebuild_parameter_with_state,
    ('torch.storage', '_load_from_bytes'): _load_storage_bytes,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy', 'dtype'): np.dtype,
    ('dnnlib.util', 'EasyDict'): dict,
}


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise EDMLoadError(f'refusing untrusted pickle: it references {module}.{name}, which is not in the EDM '
                               f'allow-list (nothing from the file was run)')
        target = _ALLOWED_GLOBALS[(module, name)]
        if isinstance(target, type):  # immutable types, or ours with __setstate__ (BUILD on the class then fails)
            return target
        # Functions: a fresh wrapper per reference. Pickle's BUILD opcode sets attributes on whatever object is on
        # the stack, so handing out the function itself would let a file change it (e.g. __defaults__ of
        # torch._utils._rebuild_tensor_v2) for the rest of the process.
        return lambda *args: target(*args)

    def persistent_load(self, pid):
        raise EDMLoadError(f'unexpected persistent id {pid!r}; not an EDM snapshot pickle')


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ''


def _flatten_state(record, prefix=''):
    """Module.state_dict() order: own parameters, persistent buffers, then children recursively (reference 2.3)."""
    state = record.state
    flat = collections.OrderedDict()
    for name, p in state.get('_parameters', {}).items():
        if p is not None:
            flat[prefix + name] = p.detach()
    skip = state.get('_non_persistent_buffers_set', set())
    for name, b in state.get('_buffers', {}).items():
        if b is not None and name not in skip:
            flat[prefix + name] = b.detach()
    for name, child in state.get('_modules', {}).items():
        if child is not None:
            flat.update(_flatten_state(child, prefix + name + '.'))
    return flat


_PRECOND_ARGS = list(inspect.signature(EDMPrecond.__init__).parameters)[1:-1]  # positional names, no self/**kwargs


def _effective_config(kwargs):
    """Constructor kwargs with EDMPrecond's defaults filled in (for checks and messages)."""
    defaults = {k: p.default for k, p in inspect.signature(EDMPrecond.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **kwargs}


def _check_expect(config, expect, path, what):
    for key, want in (expect or {}).items():
        have = config.get(key)
        if _plain(have) != _plain(want):
            raise EDMLoadError(f'{path}: {what} has {key} {have}, expected {want}')


def _build_and_load(config, state, source, copy):
    """EDMPrecond(**config) built on the meta device (no init, no RNG draws), then loaded with
    load_state_dict(strict=True, assign=True) from float32 copies of `state`. On mismatch: a readable error listing a
    few missing/unexpected/mis-shaped keys. copy=False lets the net own tensors that nobody else holds."""
    try:
        with torch.device('meta'):
            net = EDMPrecond(**config)
    except (TypeError, ValueError) as e:
        raise EDMLoadError(f'{source}: the network config does not fit EDMPrecond: {_first_line(e)}') from None
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f'{k} {list(state[k].shape)} vs {list(own[k].shape)}' for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f'{len(missing)} missing (e.g. {", ".join(missing[:3])})' if missing else '',
                 f'{len(unexpected)} unexpected (e.g. {", ".join(unexpected[:3])})' if unexpected else '',
                 f'{len(shapes)} shape mismatches (file vs network, e.g. {"; ".join(shapes[:3])})' if shapes else '']
        raise EDMLoadError(f'{source}: weights do not fit the network config: ' + ', '.join(p for p in parts if p))
    state = {k: v.detach().to(torch.float32, copy=copy) for k, v in state.items()}
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval()


def load_edm_pickle(path, expect=None, **overrides):
    """Read an official EDM snapshot pickle (e.g. edm-imagenet-64x64-cond-adm.pkl) safely: an allow-listed
    unpickler rebuilds only tensors and plain containers, the network is rebuilt from the stored EDMPrecond
    `_init_kwargs` (+ `overrides`, e.g. dropout=0.0, use_fp16=False) and loaded strictly. `expect` (e.g.
    dict(img_resolution=64, label_dim=1000)) is checked against the stored config. Returns the net in eval mode."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such EDM pickle (download e.g. {TEACHER_URLS["imagenet64"]})')
    try:
        with open(path, 'rb') as f:
            data = _AllowListUnpickler(f).load()
    except EDMLoadError as e:
        raise EDMLoadError(f'{path}: {e}') from None
    except Exception as e:  # truncated / corrupt streams raise many different types deep inside pickle
        raise EDMLoadError(f'{path}: not a readable EDM pickle (truncated or corrupt?): {type(e).__name__}: '
                          f'{_first_line(e)}') from None
    if not isinstance(data, dict) or 'ema' not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise EDMLoadError(f"{path}: no 'ema' network in this pickle (found {keys}); expected an EDM snapshot")
    ema = data['ema']
    if not isinstance(ema, _PersistentRecord) or ema.class_name != 'EDMPrecond':
        name = ema.class_name if isinstance(ema, _PersistentRecord) else type(ema).__name__
        raise EDMLoadError(f"{path}: 'ema' is {name}; only EDMPrecond snapshots are supported")
    kwargs = dict(ema.state.get('_init_kwargs', {}))
    kwargs.update(zip(_PRECOND_ARGS, ema.state.get('_init_args', ())))
    config = _effective_config(_plain(kwargs))
    model = ema.state.get('_modules', {}).get('model')
    if isinstance(model, _PersistentRecord) and model.class_name != config['model_type']:
        raise EDMLoadError(f"{path}: inner model is {model.class_name} but model_type is {config['model_type']}")
    _check_expect(config, expect, path, 'teacher')
    config.update(overrides)
    return _build_and_load(config, _flatten_state(ema), path, copy=False)


def load_edm_state_dict(path_or_state_dict, config, name=None):
    """Build EDMPrecond(**config) and load a plain state dict into it strictly (e.g. DMD2's released ImageNet
    generator pytorch_model.bin, keys model.*). Files are read with torch.load(weights_only=True). Returns eval mode."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        source = name or path
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{source}: no such state-dict file')
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:
            raise EDMLoadError(f'{source}: not a readable torch state dict (weights_only=True): '
                               f'{type(e).__name__}: {_first_line(e)}') from None
    else:
        state = path_or_state_dict
        source = name or 'state dict'
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise EDMLoadError(f'{source}: expected a flat state dict of tensors (keys model.*), '
                           f'got {type(state).__name__}')
    return _build_and_load(config, state, source, copy=not isinstance(path_or_state_dict, (str, os.PathLike)))


# ---------------------------------------------------------------------------------------------------------------
# EDM's FID protocol (reference edm_fid.md 4; official fid.py and generate.py): uint8 images, NVIDIA's TF-ported
# Inception (TF1 bilinear resize to 299, (x - 128) / 128, 2048-d pool features), float64 mean and unbiased covariance,
# reference statistics as .npz {mu, sigma}. The Inception here is pytorch-fid's network and weight file, a port of the
# same TF graph (inception-2015-12-05); not byte-compared with NVIDIA's, so equality is expected (torch-fidelity:
# features within 1e-4 of TF), not verified. dmd2.py adds the weights download, the Frechet distance, the command line.


FID_REF_URLS = {"imagenet64": f"{DOWNLOAD_URL}/fid-refs/imagenet-64x64.npz",
                "cifar10": f"{DOWNLOAD_URL}/fid-refs/cifar10-32x32.npz"}

def tf1_resize_matrix(size_in, size_out):
    """[size_out, size_in] matrix of TF1 bilinear resize (align_corners=False, no half-pixel centres): output i
    samples source coordinate i * in/out, neighbours clamped at the border (EDM/NVIDIA detector, TTUR FID)."""
    src = torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)
    lo = src.floor().long()
    frac = src - lo
    rows = torch.arange(size_out)
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    matrix.index_put_((rows, lo), 1 - frac, accumulate=True)
    matrix.index_put_((rows, (lo + 1).clamp(max=size_in - 1)), frac, accumulate=True)
    return matrix


def tf1_bilinear_resize(x, size=299):
    """Resize float [N, C, H, W] to size x size with the TF1 rule, as two matrix products (separable bilinear)."""
    rows = tf1_resize_matrix(x.shape[2], size).to(x)
    cols = tf1_resize_matrix(x.shape[3], size).to(x)
    return rows @ x @ cols.T


class InceptionV3(torch.nn.Module):
    """pytorch-fid's FID Inception up to the 2048-d pool features (float32); `state`: a state dict in its weight-file
    layout, loaded strictly (None: random). Input uint8 [N, 3, H, W]. `mode` 'edm': TF1 bilinear resize to 299,
    (x - 128) / 128 (EDM fid.py, the paper's FID); 'pytorch-fid': x / 255, F.interpolate bilinear to 299, 2x - 1."""

    def __init__(self, mode="edm", state=None):
        super().__init__()
        import pytorch_fid.inception as pfid
        import torchvision
        from unittest import mock
        if mode not in ("edm", "pytorch-fid"):
            raise ValueError(f"InceptionV3 mode must be 'edm' or 'pytorch-fid', got {mode!r}")
        self.mode = mode
        if state is None:  # pytorch-fid's tree is torchvision's Inception v3 with 1008 classes and no aux head
            state = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                                    init_weights=False).state_dict()
        with mock.patch.object(pfid, "load_state_dict_from_url", lambda *args, **kwargs: state):  # not downloaded
            self.net = pfid.InceptionV3(resize_input=False, normalize_input=False).eval()  # loads `state` strictly
        self.net.to(memory_format=torch.channels_last)  # faster CPU convolutions; the same math

    @torch.inference_mode()
    def forward(self, images):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionV3 takes uint8 images [N, 3, H, W], got {images.dtype} "
                             f"{list(images.shape)} (use images_to_uint8 for [-1, 1] floats)")
        x = images.to(next(self.parameters()).device, torch.float32)
        if self.mode == "edm":
            return self.features((tf1_bilinear_resize(x, 299) - 128) / 128)
        return self.features(2 * F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1)

    @torch.inference_mode()
    def features(self, x):
        """Pool features of preprocessed float input [N, 3, 299, 299] in [-1, 1] (the text-to-image path)."""
        return self.net(x.to(next(self.parameters()).device, torch.float32))[0].flatten(1)


def images_to_uint8(x, convention="edm"):
    """[-1, 1] float images -> uint8. 'edm': EDM generate.py, x * 127.5 + 128 clipped and truncated (rounding to
    nearest). 'dmd2': the official DMD2 evaluator (test_folder_edm.py), (x + 1) * 127.5 truncated: half a grey level
    darker on average, a documented quirk."""
    if convention not in ("edm", "dmd2"):
        raise ValueError(f"images_to_uint8 convention must be 'edm' or 'dmd2', got {convention!r}")
    offset = 128.0 if convention == "edm" else 127.5
    return (x.float() * 127.5 + offset).clamp(0, 255).to(torch.uint8)  # float32 first: bf16 cannot hold 255.5


def rank_world():
    """(rank, world size) of torch.distributed, (0, 1) without it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class FeatureStats:
    """Float64 running sums of feature vectors -> mean and unbiased covariance (EDM fid.py: mu = sum f / n,
    sigma = (sum f f^T - n mu mu^T) / (n - 1)). Shards combine exactly: merge() here, all_reduce() across ranks."""

    def __init__(self, dim=2048, device="cpu"):
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, features):
        f = torch.as_tensor(features).to(self.sum.device, torch.float64)
        if f.ndim != 2 or f.shape[1] != self.sum.shape[0]:
            raise ValueError(f"features must be [N, {self.sum.shape[0]}], got {list(f.shape)}")
        self.count += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def merge(self, other):
        self.count += other.count
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.outer.device)
        return self

    def all_reduce(self):
        if dist.is_available() and dist.is_initialized():
            count = torch.tensor([self.count], dtype=torch.float64, device=self.sum.device)
            for t in (count, self.sum, self.outer):
                dist.all_reduce(t)
            self.count = int(count.item())
        return self

    def mu_sigma(self):
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def save_stats(path, mu, sigma, **extra):
    """EDM's reference statistics: .npz with float64 mu [D], sigma [D, D] (plus `extra` arrays), written atomically."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"save_stats: mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, **extra)
    os.replace(tmp, path)


def load_stats(path, dim=2048):
    """(mu, sigma) float64 from EDM's .npz layout (e.g. EDM's fid-refs/imagenet-64x64.npz)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: reference statistics not found (make them with `python dmd2.py fid "
                                f"--ref_from DATA --out REF.npz`, or get EDM's from "
                                f"{DOWNLOAD_URL}/fid-refs/)")
    try:
        with np.load(path, allow_pickle=False) as f:
            stats = {k: f[k] for k in f.files}
    except Exception as error:
        raise ValueError(f"{path}: not a readable .npz file ({type(error).__name__}: {error})") from None
    if "mu" not in stats or "sigma" not in stats:
        raise ValueError(f"{path}: reference statistics need arrays 'mu' and 'sigma', found {sorted(stats)}")
    mu, sigma = stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(f"{path}: expected mu [{dim}] and sigma [{dim}, {dim}] (Inception pool features), got "
                         f"mu {list(mu.shape)} and sigma {list(sigma.shape)}")
    return mu, sigma


def iter_image_batches(source, batch_size=64, rank=0, world_size=1):
    """uint8 [B, 3, H, W] batches of the images of an EDM dataset_tool zip or a folder (recursive), in sorted name
    order, all of one size; rank r of world_size reads names r, r + world_size, ... (EDM fid.py's dataset pass)."""
    if os.path.isdir(source):
        archive = contextlib.nullcontext()
        names = [os.path.relpath(os.path.join(root, f), source) for root, _, files in os.walk(source) for f in files]
        read = lambda name: pathlib.Path(source, name).read_bytes()
    elif os.path.isfile(source) and zipfile.is_zipfile(source):
        archive = zipfile.ZipFile(source)
        names, read = archive.namelist(), archive.read
    else:
        raise FileNotFoundError(f"{source}: not an image folder or a zip file (EDM dataset_tool output)")
    names = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ValueError(f"{source}: no {'/'.join(IMAGE_EXTENSIONS)} images found")
    batch, shape = [], None
    with archive:
        for name in names[rank::world_size]:
            batch.append(decode_image(read(name), f"{source}/{name}", rgb=True))
            shape = shape or batch[-1].shape
            if batch[-1].shape != shape:
                raise ValueError(f"{source}/{name}: size {list(batch[-1].shape)} differs from the first image's "
                                 f"{list(shape)}")
            if len(batch) == batch_size:
                yield torch.from_numpy(np.stack(batch))
                batch = []
        if batch:
            yield torch.from_numpy(np.stack(batch))


def image_stats(source, inception, batch_size=64, feature_dim=2048, device="cpu"):
    """FeatureStats of every image of a zip / folder, sharded over torch.distributed ranks and reduced.
    `inception`: any callable uint8 [N, 3, H, W] -> [N, feature_dim]; `device` holds the float64 sums."""
    stats = FeatureStats(feature_dim, device)
    for images in iter_image_batches(source, batch_size, *rank_world()):
        stats.add(inception(images))
    return stats.all_reduce()


def compute_reference_stats(source, out_path, inception, batch_size=64, feature_dim=2048, device="cpu"):
    """Reference statistics of a dataset (EDM fid.py ref: every image, no cap) -> (mu, sigma), saved to out_path."""
    mu, sigma = image_stats(source, inception, batch_size, feature_dim, device).mu_sigma()
    if out_path is not None and rank_world()[0] == 0:
        save_stats(out_path, mu, sigma)
    return mu, sigma


def generator_stats(generate_fn, inception, num_samples=50_000, num_classes=1000, batch_size=64, seed=0,
                    noise_shape=(3, 64, 64), rank=None, world_size=None, feature_dim=2048, device="cpu"):
    """FeatureStats of `generate_fn(noise, labels) -> [-1, 1] images` under the ImageNet-64 protocol: unit noise
    [B, *noise_shape] and int64 labels on `device` (generate_fn scales the noise, e.g. by sigma_max = 80, and encodes
    the labels). Sample i has label i % num_classes (official: arange % 1000, 50 per class) and noise from seed + i
    (EDM generate.py --seeds=0-49999; the official evaluator seeds each process 10 + rank), so the result does not
    depend on batch size or process count (a few-step generator takes per-step noise from a longer noise_shape).
    Rank r of world_size (default: torch.distributed) takes a contiguous run of whole label cycles: class-balanced
    shares whose union is the single-process set (the official evaluator repeats labels on every GPU)."""
    if num_samples % num_classes:
        raise ValueError(f"num_samples {num_samples} must be a multiple of num_classes {num_classes}")
    if rank is None or world_size is None:
        rank, world_size = rank_world()
    cycles = num_samples // num_classes
    start = cycles * rank // world_size * num_classes
    stop = cycles * (rank + 1) // world_size * num_classes
    stats = FeatureStats(feature_dim, device)
    for first in range(start, stop, batch_size):
        index = torch.arange(first, min(first + batch_size, stop))
        noise = torch.stack([torch.randn(noise_shape, generator=torch.Generator().manual_seed(seed + int(i)))
                             for i in index])
        with torch.no_grad():
            images = generate_fn(noise.to(device), (index % num_classes).to(device))
        stats.add(inception(images_to_uint8(images)))
    return stats.all_reduce()


# ---------------------------------------------------------------------------------------------------------------
# EDM's dataset format (official dataset.py and dataset_tool.py): images and dataset.json labels in a zip or a folder.


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PREPARE_HINT = ("prepare data with EDM's dataset_tool, e.g. `python dataset_tool.py --source=cifar-10-python.tar.gz "
                "--dest=cifar10-32x32.zip` or `python dataset_tool.py --source=ILSVRC/Data/CLS-LOC/train "
                "--dest=imagenet-64x64.zip --resolution=64x64 --transform=center-crop` (EDM README)")


def decode_image(data, name, rgb=False):
    """PNG/JPG bytes -> uint8 CHW array. Training (EDM dataset.py): grayscale gives one channel, other modes (RGBA,
    CMYK) are read as RGB. rgb=True (EDM fid.py): grayscale repeated to 3 channels; non-8-bit or non-RGB refused."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            if img.mode == "P" or (img.mode not in ("L", "RGB") and not rgb):  # palette indices are not intensities
                img = img.convert("RGB")
            mode, image = img.mode, np.asarray(img)
    except (OSError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"{name}: cannot decode image ({e}); replace or remove the file") from None
    image = image[:, :, None] if image.ndim == 2 else image
    if rgb:
        if image.dtype != np.uint8:
            raise ValueError(f"{name}: {image.dtype} pixels (PIL mode {mode}); FID needs 8-bit images")
        image = image.repeat(3, axis=2) if image.shape[2] == 1 else image
        if image.shape[2] != 3:
            raise ValueError(f"{name}: {image.shape[2]} channels (PIL mode {mode}); FID needs RGB or grayscale")
    return np.ascontiguousarray(image.transpose(2, 0, 1))


class EDMImageDataset(torch.utils.data.Dataset):
    """EDM dataset_tool output: a .zip or the same extracted into a folder. Images are all .png/.jpg files in
    sorted path order (EDM's ImageFolderDataset); labels come from dataset.json {"labels": [[path, label], ...]}
    (null or no file -> no labels, returned as 0). The zip is opened lazily, once per process, so the dataset is
    safe in DataLoader workers (forked workers reopen it)."""

    def __init__(self, path):
        self.path = path
        self.is_zip = os.path.isfile(path)
        self._zip, self._zip_pid = None, None
        if self.is_zip:
            try:
                names = self._zipfile().namelist()
            except zipfile.BadZipFile:
                raise ValueError(f"{path} is not a valid zip file; {PREPARE_HINT}") from None
        else:
            names = [os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
                     for root, _dirs, files in os.walk(path) for f in files]
        self.fnames = sorted(n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
        if not self.fnames:
            raise ValueError(f'{path} holds no {"/".join(IMAGE_EXTENSIONS)} images; {PREPARE_HINT}')
        self.labels = self._read_labels() if "dataset.json" in names else None
        self.image_shape = None
        self.image_shape = self[0][0].shape  # EDM's dataset takes the shape of the first image too

    def _zipfile(self):
        if self._zip is None or self._zip_pid != os.getpid():  # reopen after fork: handles are not shareable
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def _read(self, fname):
        if self.is_zip:
            return self._zipfile().read(fname)
        with open(os.path.join(self.path, fname), "rb") as f:
            return f.read()

    def _read_labels(self):
        name = os.path.join(self.path, "dataset.json")
        try:
            labels = json.loads(self._read("dataset.json"))["labels"]
            table = None if labels is None else dict(labels)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f'{name}: expected {{"labels": [[path, label], ...]}} ({e!r}); {PREPARE_HINT}') from None
        if table is None:
            return None
        missing = [f for f in self.fnames if f not in table]
        if missing:
            raise ValueError(f"{name} has no label for {missing[0]} ({len(missing)} images unlabelled); "
                             "re-create the dataset with dataset_tool")
        return np.array([table[f] for f in self.fnames], dtype=np.int64)

    def describe(self, index):
        return f"{self.path}/{self.fnames[index]}" if self.is_zip else os.path.join(self.path, self.fnames[index])

    def __getstate__(self):  # pickled into spawned workers without the open zip handle
        return dict(self.__dict__, _zip=None, _zip_pid=None)

    def __len__(self):
        return len(self.fnames)

    def __getitem__(self, index):
        image = decode_image(self._read(self.fnames[index]), self.describe(index))
        if self.image_shape is not None and image.shape != self.image_shape:
            raise ValueError(f"{self.describe(index)} is {image.shape} (CxHxW) but the first image is "
                             f"{self.image_shape}; re-create the dataset with dataset_tool --resolution")
        return image, np.int64(0 if self.labels is None else self.labels[index])
