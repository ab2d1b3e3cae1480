"""Tests for edm_net.py: official key layout, forward math against hand/float64 references, loaders, sampler."""
import collections
import copy
import json
import math
import os
import pickle
import pickletools
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import edm_net
from official_format import write_edm_pickle

# The official key/shape list, generated from NVlabs/edm 008a4e5 and pytorch-fid b9c1811 (a fact file shipped with
# the tests; see its header).
KEYS_FILE = os.path.join(os.path.dirname(__file__), 'data', 'edm_fid_keys.txt')


@pytest.fixture(autouse=True, scope='module')
def single_thread():
    """Tiny networks gain nothing from intra-op threads, and on a busy 2-core machine spinning OpenMP workers made
    this file ~5x slower (measured 76 s vs 10 s). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_keys(section_prefix):
    """(name, shape, dtype) rows of one section of edm_fid_keys.txt (official Module.state_dict() order)."""
    text = open(KEYS_FILE).read()
    section = [s for s in re.split(r'^## ', text, flags=re.M) if s.startswith(section_prefix)]
    assert len(section) == 1, section_prefix
    rows = []
    for line in section[0].splitlines()[1:]:
        m = re.fullmatch(r'(\S+) \[([\d, ]*)\] (\S+)', line.strip())
        if m:
            rows.append((m[1], [int(v) for v in m[2].split(',') if v.strip()], m[3]))
    return rows


def small_adm(**kw):
    cfg = dict(img_resolution=16, img_channels=3, label_dim=4, model_type='DhariwalUNet', model_channels=32,
               channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)
    cfg.update(kw)
    return cfg


def small_song(arch='ncsnpp', **kw):
    cfg = edm_net.cifar10_config(arch, dropout=0.0)
    cfg.update(img_resolution=16, label_dim=4, model_channels=32, channel_mult=[1, 2], num_blocks=1,
               attn_resolutions=[8])
    cfg.update(kw)
    return cfg


_RANDOMIZED = {}


def randomized(cfg, seed=0, scale=0.05):
    """A network with every parameter random (official init zeroes conv1/proj/out_conv, which would hide bugs).
    Built once per config, then deep-copied (keeps the suite fast)."""
    key = json.dumps([cfg, seed, scale], sort_keys=True)
    if key not in _RANDOMIZED:
        torch.manual_seed(seed)
        net = edm_net.EDMPrecond(**cfg)
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(torch.randn_like(p) * scale + (1.0 if name.endswith('norm0.weight') else 0.0))
        _RANDOMIZED[key] = net.eval()
    return copy.deepcopy(_RANDOMIZED[key])


def pickle_globals(path):
    """module.name of every global a pickle stream references."""
    names, strings = set(), []
    for op, arg, _ in pickletools.genops(open(path, 'rb').read()):
        if op.name in ('SHORT_BINUNICODE', 'BINUNICODE', 'UNICODE'):
            strings.append(arg)
        elif op.name == 'STACK_GLOBAL':
            names.add(f'{strings[-2]}.{strings[-1]}')
        elif op.name == 'GLOBAL':
            names.add(arg.replace(' ', '.'))
    return names

# ---------------------------------------------------------------------------------------------------------------
# Official layout: keys, order, shapes, dtypes, parameter counts (built on the meta device: no memory, no init).


@pytest.mark.parametrize('section, config, n_keys, n_params', [
    ('edm-imagenet-64x64-cond-adm', edm_net.imagenet64_config(), 553, 295_899_267),
    ('edm-cifar10-32x32-cond-vp', edm_net.cifar10_config('ddpmpp'), 427, 55_735_299),
    ('edm-cifar10-32x32-cond-ve', edm_net.cifar10_config('ncsnpp'), 434, 56_400_643),
])
def test_official_state_dict_layout(section, config, n_keys, n_params):
    with torch.device('meta'):
        net = edm_net.EDMPrecond(**config)
    ours = [(k, list(v.shape), str(v.dtype).replace('torch.', '')) for k, v in net.state_dict().items()]
    assert len(ours) == n_keys and all(k.startswith('model.') for k, _, _ in ours)
    assert sum(p.numel() for p in net.parameters()) == n_params
    ref = reference_keys(section)
    assert len(ref) == n_keys
    assert ours == ref


def test_imagenet_config_shapes_on_meta():
    with torch.device('meta'):
        net = edm_net.EDMPrecond(**edm_net.imagenet64_config())
        x, sigma, labels = torch.randn(2, 3, 64, 64), torch.ones(2), torch.zeros(2, 1000)
        bottleneck = net(x, sigma, labels, return_bottleneck=True)
        out = net(x, sigma, labels)
    assert list(bottleneck.shape) == [2, 768, 8, 8]
    assert bottleneck.dtype == torch.bfloat16  # use_fp16=True in the official config -> bf16 compute
    assert list(out.shape) == [2, 3, 64, 64] and out.dtype == torch.float32


def test_small_net_bottleneck_shapes():
    x = torch.randn(2, 3, 16, 16)
    adm = edm_net.EDMPrecond(**small_adm())
    assert list(adm(x, torch.ones(2), return_bottleneck=True).shape) == [2, 64, 8, 8]
    song = edm_net.EDMPrecond(**small_song())
    assert list(song(x, torch.ones(2), return_bottleneck=True).shape) == [2, 64, 8, 8]
    assert list(song(x, torch.ones(2)).shape) == [2, 3, 16, 16]


def test_configs_and_init_kwargs_round_trip():
    cfg = edm_net.imagenet64_config()
    assert (cfg['label_dim'], cfg['model_channels'], cfg['channel_mult'], cfg['use_fp16'], cfg['dropout']) == \
        (1000, 192, [1, 2, 3, 4], True, 0.1)
    assert edm_net.imagenet64_config(dropout=0.0)['dropout'] == 0.0
    c = edm_net.cifar10_config('ncsnpp')
    assert (c['label_dim'], c['augment_dim'], c['embedding_type'], c['resample_filter']) == \
        (10, 9, 'fourier', [1, 3, 3, 1])
    with pytest.raises(ValueError, match='ddpmpp'):
        edm_net.cifar10_config('adm')
    net = edm_net.EDMPrecond(**small_adm(channel_mult=(1, 2)))
    kwargs = edm_net.init_kwargs(net)
    assert kwargs['channel_mult'] == [1, 2] and kwargs['model_type'] == 'DhariwalUNet'
    json.dumps(kwargs)  # serialisable
    rebuilt = edm_net.EDMPrecond(**kwargs)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    with pytest.raises(TypeError):
        edm_net.init_kwargs(net.model)
    net.use_fp16 = True  # the lead toggles plain attributes after construction
    assert edm_net.init_kwargs(net)['use_fp16'] is True and edm_net.EDMPrecond(**edm_net.init_kwargs(net)).use_fp16

# ---------------------------------------------------------------------------------------------------------------
# Forward math against hand values and float64 re-computations.


def test_edm_precondition_hand_values():
    sd = 0.5
    for s in [0.002, 0.1, 0.5, 1.0, 80.0]:
        c_skip, c_out, c_in, c_noise = edm_net.edm_precondition(torch.tensor(s, dtype=torch.float64), sd)
        assert c_skip.item() == pytest.approx(0.25 / (s * s + 0.25), rel=1e-12)
        assert c_out.item() == pytest.approx(s * 0.5 / math.sqrt(s * s + 0.25), rel=1e-12)
        assert c_in.item() == pytest.approx(1 / math.sqrt(s * s + 0.25), rel=1e-12)
        assert c_noise.item() == pytest.approx(math.log(s) / 4, rel=1e-12)
    # sigma = sigma_data: c_skip = 1/2, c_out = c_in * sd^2 = sd / sqrt(2)
    c_skip, c_out, c_in, _ = edm_net.edm_precondition(torch.tensor(0.5), 0.5)
    assert (c_skip.item(), c_out.item(), c_in.item()) == pytest.approx((0.5, 0.5 / math.sqrt(2), math.sqrt(2)))


class RecordingUNet(torch.nn.Module):
    """Stands in for the UNet: records its inputs, returns a fixed tensor."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, noise_labels, class_labels=None, return_bottleneck=False, **kw):
        self.seen = (x, noise_labels, class_labels, kw)
        return self.out.to(x.dtype)


def test_edm_precond_wiring():
    net = edm_net.EDMPrecond(**small_adm(sigma_data=0.7))
    out = torch.randn(2, 3, 16, 16)
    net.model = RecordingUNet(out)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    sigma = torch.tensor([0.3, 5.0])
    D = net(x, sigma, augment_labels=torch.zeros(2, 9))
    s = sigma.reshape(-1, 1, 1, 1).double()
    c_skip, c_out, c_in = 0.49 / (s ** 2 + 0.49), s * 0.7 / (s ** 2 + 0.49).sqrt(), 1 / (s ** 2 + 0.49).sqrt()
    seen_x, noise, labels, kw = net.model.seen
    assert D.dtype == torch.float32
    torch.testing.assert_close(seen_x.double(), c_in * x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(noise, (sigma.log() / 4), rtol=1e-6, atol=1e-7)
    assert labels.shape == (1, 4) and not labels.any()  # None -> zeros [1, label_dim]
    assert set(kw) == {'augment_labels'}
    torch.testing.assert_close(D.double(), c_skip * x + c_out * out.double(), rtol=1e-5, atol=1e-5)
    # a 0-dim sigma broadcasts; one-hot labels are reshaped to [-1, label_dim]
    net(x, torch.tensor(2.0), torch.eye(4)[[1, 3]])
    assert net.model.seen[1].shape == (1,) and net.model.seen[2].tolist() == torch.eye(4)[[1, 3]].tolist()
    net.use_fp16 = True
    net(x, sigma)
    assert net.model.seen[0].dtype == torch.bfloat16
    net(x, sigma, force_fp32=True)
    assert net.model.seen[0].dtype == torch.float32


def block_reference_float64(block, x, emb, P=None):
    """UNetBlock forward written out independently in float64, attention with explicit per-head q/k/v indexing.
    P: the block's parameters as float64 tensors by state-dict name (default: a detached copy); pass leaf tensors
    that require grad to differentiate the reference."""
    P = P or {k: v.detach().double() for k, v in block.state_dict().items()}
    x, emb = x.double(), emb.double()
    eps = block.norm0.eps
    gn = lambda t, pre: F.group_norm(t, 32 if t.shape[1] >= 128 else t.shape[1] // 4, P[pre + '.weight'],
                                     P[pre + '.bias'], eps)
    h = F.conv2d(F.silu(gn(x, 'norm0')), P['conv0.weight'], P['conv0.bias'], padding=1)
    params = (emb @ P['affine.weight'].T + P['affine.bias'])[:, :, None, None]
    if block.adaptive_scale:
        C = h.shape[1]
        h = F.silu(params[:, C:] + gn(h, 'norm1') * (params[:, :C] + 1))
    else:
        h = F.silu(gn(h + params, 'norm1'))
    h = F.conv2d(h, P['conv1.weight'], P['conv1.bias'], padding=1)
    skip = F.conv2d(x, P['skip.weight'], P['skip.bias']) if 'skip.weight' in P else x
    h = (h + skip) * block.skip_scale
    N, C, H, W = h.shape
    qkv = F.conv2d(gn(h, 'norm2'), P['qkv.weight'], P['qkv.bias']).reshape(N, 3 * C, H * W)
    heads, c = block.num_heads, C // block.num_heads
    a = []
    for head in range(heads):
        base = head * 3 * c
        q = qkv[:, [base + ch * 3 + 0 for ch in range(c)]]  # [N, c, HW]
        k = qkv[:, [base + ch * 3 + 1 for ch in range(c)]]
        v = qkv[:, [base + ch * 3 + 2 for ch in range(c)]]
        w = torch.softmax(torch.einsum('ncq,nck->nqk', q, k) / math.sqrt(c), dim=2)
        a.append(torch.einsum('nqk,nck->ncq', w, v))
    out = F.conv2d(torch.cat(a, dim=1).reshape(N, C, H, W), P['proj.weight'], P['proj.bias'])
    return (out + h) * block.skip_scale


def attention_block(kind, seed=1):
    """A UNetBlock with attention and random weights (official init zeroes conv1/proj, which would hide bugs)."""
    torch.manual_seed(seed)
    if kind == 'adm':  # 2 heads of 16 channels, adaptive scale/shift, skip_scale 1
        block = edm_net.UNetBlock(24, 32, 20, attention=True, channels_per_head=16)
    else:  # SongUNet style: one head of full width, additive embedding, skip_scale sqrt(1/2), eps 1e-6
        block = edm_net.UNetBlock(24, 32, 20, attention=True, num_heads=1, skip_scale=math.sqrt(0.5), eps=1e-6,
                                  adaptive_scale=False, resample_proj=True)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return block


@pytest.mark.parametrize('kind', ['adm', 'song'])
def test_unet_block_attention_against_float64(kind):
    block = attention_block(kind)
    x, emb = torch.randn(2, 24, 4, 4), torch.randn(2, 20)
    ref = block_reference_float64(block, x, emb)
    assert block.num_heads == (2 if kind == 'adm' else 1)
    for op in ['sdpa', 'official']:
        out = edm_net.set_attention(block, op)(x, emb)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
        # the interleaved layout matters: the contiguous-block reading differs by far more than the tolerance
        assert (out.double() - ref).abs().max() < 1e-4 < ref.std()


def forward_and_grads(fn, params, x, emb, seed=3):
    """Output of fn(x, emb) and the gradients of <output, fixed random cotangent> w.r.t. x, emb and each tensor of
    `params` (name -> leaf tensor)."""
    x, emb = x.detach().requires_grad_(), emb.detach().requires_grad_()
    for p in params.values():
        p.grad = None
    out = fn(x, emb)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out.double() * cotangent).sum().backward()
    return out.detach(), {'x': x.grad, 'emb': emb.grad, **{k: p.grad for k, p in params.items()}}


def float64_reference_with_grads(block, x, emb):
    P = {k: v.detach().double().requires_grad_(k in dict(block.named_parameters()))
         for k, v in block.state_dict().items()}
    return forward_and_grads(lambda x, emb: block_reference_float64(block, x, emb, P),
                             {k: v for k, v in P.items() if v.requires_grad}, x, emb)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize('kind', ['adm', 'song'])
def test_sdpa_attention_equals_official_float32_forward_and_grads(kind):
    """Both float32 paths agree with an independent float64 computation to float32 round-off, outputs and the
    gradients of x, emb and every parameter; so they agree with each other to float32 round-off."""
    block = attention_block(kind)
    x, emb = torch.randn(2, 24, 8, 8), torch.randn(2, 20)
    ref, ref_grads = float64_reference_with_grads(block, x, emb)
    results = {}
    for op in ['sdpa', 'official']:
        results[op] = forward_and_grads(edm_net.set_attention(block, op), dict(block.named_parameters()),
                                        x, emb)
    assert len(ref_grads) == 2 + len(list(block.parameters()))
    for op, (out, grads) in results.items():
        assert out.dtype == torch.float32 and rel(out, ref) < 1e-6, op  # measured 1.4e-7 - 2.1e-7
        for name, g in ref_grads.items():
            assert grads[name].dtype == torch.float32 and rel(grads[name], g) < 2e-6, (op, name)  # <= 4.2e-7
    (new, new_grads), (old, old_grads) = results['sdpa'], results['official']
    assert rel(new, old) < 1e-6
    assert all(rel(new_grads[k], old_grads[k]) < 2e-6 for k in ref_grads)


@pytest.mark.parametrize('kind', ['adm', 'song'])
def test_sdpa_attention_bf16_close_to_official_and_float64(kind, monkeypatch):
    """use_fp16 (bf16 compute): SDPA runs on bf16 q/k/v, like the official op's inputs; output and gradients stay
    within bf16 tolerance of the float64 reference, and as close to it as the official op's (measured:
    outputs 5e-3, gradients 2e-3 - 9e-3 relative, for both)."""
    block = attention_block(kind)
    x, emb = torch.randn(2, 24, 8, 8), torch.randn(2, 20)
    ref, ref_grads = float64_reference_with_grads(block, x, emb)
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda q, k, v: seen.append((q.dtype, k.dtype, v.dtype))
                        or sdpa(q, k, v))
    errors = {}
    for op in ['sdpa', 'official']:
        out, grads = forward_and_grads(edm_net.set_attention(block, op), dict(block.named_parameters()),
                                       x.bfloat16(), emb)
        assert out.dtype == torch.bfloat16 and grads['x'].dtype == torch.bfloat16, op
        assert grads['qkv.weight'].dtype == torch.float32  # parameters and their gradients stay float32
        errors[op] = [rel(out, ref)] + [rel(grads[k], g) for k, g in ref_grads.items()]
    assert seen == [(torch.bfloat16,) * 3]  # only the sdpa pass called it, with bf16 q, k, v
    for op, errs in errors.items():
        assert max(errs) < 3e-2, (op, errs)  # bf16: 8 mantissa bits, ~0.4% per rounding
        assert min(errs) > 1e-4, (op, errs)  # really computed in bf16
    assert max(errors['sdpa']) < 2 * max(errors['official'])


def test_set_attention_keeps_state_dict_and_network_output():
    net = randomized(small_adm())
    blocks = [m for m in net.modules() if isinstance(m, edm_net.UNetBlock)]
    assert {b.attention_op for b in blocks} == {'sdpa'}  # the default
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.4, 2.0]), torch.eye(4)[[1, 3]]
    new = net(x, sigma, labels)
    assert edm_net.set_attention(net, 'official') is net
    assert {b.attention_op for b in blocks} == {'official'}
    after = net.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    old = net(x, sigma, labels)
    assert 0 < rel(new, old) < 1e-6
    with pytest.raises(ValueError, match="'sdpa' or 'official'"):
        edm_net.set_attention(net, 'flash')
    with pytest.raises(ValueError, match='contains no UNetBlock'):
        edm_net.set_attention(torch.nn.Linear(2, 2), 'sdpa')


def test_compile_networks_in_place_same_keys_and_output():
    """compile_networks keeps parameter names (no _orig_mod. prefix); backend 'eager' traces with dynamo only."""
    import dmd2  # the --compile path (issue 24) on an EDM network
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    net = randomized(small_adm())
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.4, 2.0]), torch.eye(4)[[1, 3]]
    ref = net(x, sigma, labels)
    keys = list(net.state_dict())
    dmd2.compile_networks(net, backend='eager')
    assert list(net.state_dict()) == keys
    blocks = [m for m in net.modules() if isinstance(m, edm_net.UNetBlock)]
    assert all(b._compiled_call_impl is not None for b in blocks)
    torch.testing.assert_close(net(x, sigma, labels), ref, rtol=1e-6, atol=1e-6)
    # 10 blocks of 10 configurations share UNetBlock.forward: more graphs than dynamo's default limit of 8, each
    # block one whole graph (fullgraph), none left to eager
    counters = torch._dynamo.utils.counters
    assert len(blocks) == 10 and counters['stats']['unique_graphs'] == 10 and not counters['graph_break']
    clone, eager = copy.deepcopy(net), randomized(small_adm())  # a deep copy runs eager, with its own weights
    with torch.no_grad():
        for copied in (clone, eager):
            copied.model.enc['16x16_block0'].conv1.weight.mul_(3.0)
    assert clone.model.enc['16x16_block0']._compiled_call_impl is None
    torch.testing.assert_close(clone(x, sigma, labels), eager(x, sigma, labels), rtol=1e-6, atol=1e-6)
    assert (clone(x, sigma, labels) - ref).abs().max() > 1e-3
    linear = torch.nn.Linear(2, 2)  # no repeated blocks: compiled whole
    dmd2.compile_networks(linear, backend='eager')
    assert linear._compiled_call_impl is not None


def test_attention_softmax_in_float32_under_autocast():
    torch.manual_seed(2)
    q, k = torch.randn(3, 8, 16) * 4, torch.randn(3, 8, 16) * 4
    ref = torch.softmax(torch.einsum('ncq,nck->nqk', q.double(), k.double()) / math.sqrt(8), dim=2)
    with torch.autocast('cpu', torch.bfloat16):
        w = edm_net.attention_weights(q, k)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.double(), ref, rtol=1e-5, atol=1e-6)
    w16 = edm_net.attention_weights(q.bfloat16(), k.bfloat16())
    assert w16.dtype == torch.bfloat16
    torch.testing.assert_close(w16.double(), ref, rtol=0.05, atol=0.02)  # bf16 inputs: ~3 significant digits


def test_embeddings_hand_formulas():
    x = torch.tensor([0.3, -1.2, 2.5])
    for endpoint in [False, True]:
        emb = edm_net.PositionalEmbedding(8, endpoint=endpoint)(x)
        denom = 4 - (1 if endpoint else 0)
        freqs = [(1 / 10000) ** (j / denom) for j in range(4)]
        hand = [[math.cos(v * f) for f in freqs] + [math.sin(v * f) for f in freqs] for v in x.tolist()]
        torch.testing.assert_close(emb, torch.tensor(hand), rtol=1e-6, atol=1e-6)
    fourier = edm_net.FourierEmbedding(6)
    assert fourier.freqs.shape == (3,) and 'freqs' in fourier.state_dict()
    f = fourier.freqs.tolist()
    hand = [[math.cos(2 * math.pi * v * fj) for fj in f] + [math.sin(2 * math.pi * v * fj) for fj in f]
            for v in x.tolist()]
    torch.testing.assert_close(fourier(x), torch.tensor(hand), rtol=1e-4, atol=1e-4)


def capture_input(module):
    store = {}
    module.register_forward_pre_hook(lambda m, args: store.__setitem__('x', args[0]))
    return store


def test_mapping_networks_order_and_label_scaling():
    noise = torch.tensor([0.2, -0.4])
    labels = torch.eye(4)[[2, 0]]
    x = torch.randn(2, 3, 16, 16)
    # ADM: [cos, sin] into map_layer0; labels (unscaled, no bias) added after map_layer1; silu at the end.
    adm = randomized(small_adm()).model
    seen0, seen_aff = capture_input(adm.map_layer0), capture_input(adm.enc['16x16_block0'].affine)
    adm(x, noise, labels)
    pos = edm_net.PositionalEmbedding(32)(noise)
    assert torch.equal(seen0['x'], pos)
    L = adm.map_layer1
    expect = F.silu(L(F.silu(adm.map_layer0(pos))) + labels @ adm.map_label.weight.T)
    torch.testing.assert_close(seen_aff['x'], expect)
    # SongUNet: [sin, cos], labels scaled by sqrt(label_dim) through a Linear with bias, before map_layer0.
    song = randomized(small_song('ddpmpp')).model
    seen0 = capture_input(song.map_layer0)
    song(x, noise, labels)
    pos = edm_net.PositionalEmbedding(32, endpoint=True)(noise)
    swapped = torch.cat([pos[:, 16:], pos[:, :16]], dim=1)
    expect = swapped + (labels * 2.0) @ song.map_label.weight.T + song.map_label.bias
    torch.testing.assert_close(seen0['x'], expect)


def wave(shape, phase):
    """Deterministic pseudo-random values without an RNG: sin(0.7548776662 * index + phase)."""
    n = math.prod(shape)
    return torch.sin(torch.arange(n, dtype=torch.float64) * 0.7548776662 + phase).reshape(shape).float()


# F_x[:, :, 5, 9] (flattened), mean |F_x| and std(F_x) of the OFFICIAL EDMPrecond (NVlabs/edm 008a4e5,
# training/networks.py, CPU float32) on the wave weights/inputs below; recorded once, numbers only.
OFFICIAL_GOLDEN = {
    'adm': ([-0.895781, 0.884413, -0.801719, -0.755063, 0.614854, -0.508368], 0.547284, 0.678655),
    'ddpmpp': ([-0.199419, -0.077409, 0.050734, -0.228183, -0.042672, 0.02356], 0.311179, 0.393454),
    'ncsnpp': ([-0.949958, 1.325781, -0.900992, -0.075585, 0.773754, -0.88644], 0.904491, 1.141668),
}


@pytest.mark.parametrize('op', ['sdpa', 'official'])
@pytest.mark.parametrize('name', ['adm', 'ddpmpp', 'ncsnpp'])
def test_forward_matches_official_golden_values(name, op):
    cfg = small_adm() if name == 'adm' else small_song(name)
    with torch.device('meta'):
        shapes = edm_net.EDMPrecond(**cfg).state_dict()
    state = {}
    for i, (k, v) in enumerate(shapes.items()):
        if 'resample_filter' in k:
            f = torch.tensor(cfg.get('resample_filter', [1, 1]), dtype=torch.float32)
            state[k] = (f.outer(f) / f.sum() ** 2)[None, None]
        elif k.endswith('freqs'):
            state[k] = 4 * wave(v.shape, i)
        else:
            state[k] = 0.1 * wave(v.shape, i) + (1.0 if 'norm' in k and k.endswith('weight') else 0.0)
    net = edm_net.set_attention(edm_net.load_edm_state_dict(state, cfg), op)
    x, sigma, labels = wave([2, 3, 16, 16], 0.5), torch.tensor([0.3, 4.0]), torch.eye(4)[[1, 2]]
    kw = dict(augment_labels=0.5 * wave([2, 9], 1.0)) if cfg.get('augment_dim') else {}
    with torch.no_grad():
        D = net(x, sigma, labels, **kw)
    c_skip, c_out, _, _ = edm_net.edm_precondition(sigma.reshape(-1, 1, 1, 1))
    F_x = (D - c_skip * x) / c_out
    values, mean_abs, std = OFFICIAL_GOLDEN[name]
    torch.testing.assert_close(F_x[:, :, 5, 9].flatten(), torch.tensor(values), rtol=0, atol=2e-4)
    assert F_x.abs().mean().item() == pytest.approx(mean_abs, abs=2e-5)
    assert F_x.std().item() == pytest.approx(std, abs=2e-5)


def test_resampling_nearest_and_average_and_filters():
    x = torch.randn(2, 5, 6, 6)
    up = edm_net.Conv2d(5, 5, kernel=0, up=True)
    down = edm_net.Conv2d(5, 5, kernel=0, down=True)
    assert list(up.state_dict()) == ['resample_filter']
    assert torch.equal(up.resample_filter, torch.full((1, 1, 2, 2), 0.25))
    torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode='nearest'), rtol=0, atol=1e-6)
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2), rtol=0, atol=1e-6)
    assert 'resample_filter' not in edm_net.Conv2d(5, 5, kernel=3).state_dict()
    f = edm_net.Conv2d(5, 5, kernel=0, down=True, resample_filter=[1, 3, 3, 1]).resample_filter
    torch.testing.assert_close(f[0, 0], torch.outer(torch.tensor([1., 3, 3, 1]), torch.tensor([1., 3, 3, 1])) / 64)
    # fused down (NCSN++ aux_residual) on a constant image: interior = (sum of weights) * c + bias, half size
    conv = edm_net.Conv2d(2, 4, kernel=3, down=True, resample_filter=[1, 3, 3, 1], fused_resample=True)
    with torch.no_grad():
        conv.bias.normal_()
    y = conv(torch.full((1, 2, 16, 16), 0.7))
    assert y.shape == (1, 4, 8, 8)
    expect = conv.weight.sum(dim=(1, 2, 3)) * 0.7 + conv.bias
    torch.testing.assert_close(y[0, :, 3, 3], expect, rtol=1e-5, atol=1e-5)


def test_official_weight_init():
    torch.manual_seed(0)
    adm = edm_net.EDMPrecond(**small_adm(model_channels=64)).model
    blk = adm.enc['8x8_block0']
    for zero in [blk.conv1.weight, blk.conv1.bias, blk.proj.weight, blk.proj.bias, adm.out_conv.weight]:
        assert not zero.any()
    bound = 1 / math.sqrt(64)  # kaiming_uniform * sqrt(1/3) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias too
    w = adm.map_layer0.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert adm.map_layer0.bias.abs().max() > 0.5 * bound
    assert adm.map_label.weight.std().item() == pytest.approx(1.0, rel=0.1)  # kaiming_normal * sqrt(label_dim)
    song = edm_net.EDMPrecond(**small_song()).model
    blk = song.enc['8x8_block0']  # 32 -> 64 channels
    xav = math.sqrt(6 / (32 * 9 + 64 * 9))  # xavier_uniform bound, fans of a 3x3 conv
    assert blk.conv0.weight.abs().max() <= xav and blk.conv0.weight.abs().max() > 0.95 * xav
    assert not blk.conv0.bias.any()  # init_bias 0
    assert blk.conv1.weight.abs().max() <= 1e-5 * xav  # init_zero: xavier_uniform * 1e-5
    qkv_bound = math.sqrt(0.2) * math.sqrt(6 / (64 + 192))  # 1x1 conv 64 -> 192
    assert blk.qkv.weight.abs().max() <= qkv_bound and blk.qkv.weight.abs().max() > 0.9 * qkv_bound
    assert song.map_noise.freqs.std().item() == pytest.approx(16, rel=0.5)

# ---------------------------------------------------------------------------------------------------------------
# Low precision, channels_last, gradient checkpointing.


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize('cfg', [small_adm(), small_song()], ids=['adm', 'ncsnpp'])
def test_bf16_and_autocast_channels_last_close_to_float32(cfg):
    net = randomized(cfg)
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.4, 2.0]), torch.eye(cfg['label_dim'])[[1, 3]]
    ref = net(x, sigma, labels)
    net.use_fp16 = True
    assert net(x, sigma, labels, return_bottleneck=True).dtype == torch.bfloat16
    bf16 = net(x, sigma, labels)
    assert bf16.dtype == torch.float32
    assert relative_error(bf16, ref) < 3e-2  # bf16 has 8 mantissa bits: ~0.4% per op, a few % over the net
    assert net(x, sigma, labels, force_fp32=True).sub(ref).abs().max() < 1e-6
    net.use_fp16 = False
    net_cl = net.to(memory_format=torch.channels_last)
    with torch.autocast('cpu', torch.bfloat16):
        auto = net_cl(x.to(memory_format=torch.channels_last), sigma, labels)
    assert auto.dtype == torch.float32
    assert relative_error(auto, ref) < 3e-2
    assert relative_error(auto, ref) > 0  # autocast really ran in low precision


def test_gradient_checkpointing_same_grads_and_state_dict():
    net = randomized(small_adm()).train()
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.4, 2.0]), torch.eye(4)[[1, 3]]
    keys = list(net.state_dict())
    net(x, sigma, labels).square().mean().backward()
    ref = {k: p.grad.clone() for k, p in net.named_parameters()}
    net.zero_grad()
    assert edm_net.set_gradient_checkpointing(net) is net
    assert net.model.gradient_checkpointing and list(net.state_dict()) == keys
    net(x, sigma, labels).square().mean().backward()
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.grad, ref[k], rtol=1e-5, atol=1e-7)
    edm_net.set_gradient_checkpointing(net, False)
    assert not net.model.gradient_checkpointing
    with pytest.raises(ValueError, match='no SongUNet or DhariwalUNet'):
        edm_net.set_gradient_checkpointing(torch.nn.Linear(2, 2))

# ---------------------------------------------------------------------------------------------------------------
# Loading official snapshot pickles (allow-listed unpickler) and plain state dicts.


@pytest.mark.parametrize('cfg', [small_adm(), small_song('ncsnpp')], ids=['adm', 'ncsnpp'])
def test_official_pickle_round_trip_bit_exact(tmp_path, cfg):
    net = randomized(cfg)
    had_torch_utils = 'torch_utils' in sys.modules
    path = write_edm_pickle(net, tmp_path / 'snap.pkl', extra=dict(note=np.float64(0.5)))
    assert ('torch_utils' in sys.modules) == had_torch_utils  # the writer's stand-in module is gone again
    assert 'torch_utils.persistence._reconstruct_persistent_obj' in pickle_globals(path)
    assert 'numpy' in ' '.join(pickle_globals(path))  # the numpy scalar path of the allow-list is exercised
    loaded = edm_net.load_edm_pickle(path)
    assert not loaded.training and isinstance(loaded, edm_net.EDMPrecond)
    a, b = net.state_dict(), loaded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert edm_net.init_kwargs(loaded) == edm_net.init_kwargs(net)
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.4, 2.0]), torch.eye(cfg['label_dim'])[[1, 3]]
    assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))
    over = edm_net.load_edm_pickle(path, expect=dict(img_resolution=16), dropout=0.25, use_fp16=True)
    assert over.model.enc['16x16_block0'].dropout == 0.25 and over.use_fp16


def test_pickle_embedded_source_is_never_run(tmp_path):
    sentinel = tmp_path / 'ran.txt'
    src = f'open({str(sentinel)!r}, "w").write("executed")\n'
    path = write_edm_pickle(randomized(small_adm()), tmp_path / 'snap.pkl', module_src=src)
    edm_net.load_edm_pickle(path)
    assert not sentinel.exists()


class SystemCall:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_malicious_pickle_refused(tmp_path):
    sentinel = tmp_path / 'pwned.txt'
    path = tmp_path / 'evil.pkl'
    with open(path, 'wb') as f:
        pickle.dump({'ema': SystemCall(f'touch {sentinel}')}, f)
    with pytest.raises(edm_net.EDMLoadError) as err:
        edm_net.load_edm_pickle(path)
    message = str(err.value)
    assert re.search(r'(posix|os|nt)\.system', message) and str(path) in message
    assert not sentinel.exists()

# Hand-assembled pickle streams (pickle opcodes), so any module.name can be referenced the ways an attacker would.
Global = collections.namedtuple('Global', 'module name opcode', defaults=['GLOBAL'])  # or STACK_GLOBAL
Call = collections.namedtuple('Call', 'fn args')  # REDUCE: fn(*args)
Inst = collections.namedtuple('Inst', 'module name args opcode', defaults=['INST'])  # INST / OBJ: class(*args)


def opcodes(obj):
    if isinstance(obj, Global):
        if obj.opcode == 'STACK_GLOBAL':
            return opcodes(obj.module) + opcodes(obj.name) + pickle.STACK_GLOBAL
        return pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode()
    if isinstance(obj, Call):
        return opcodes(obj.fn) + opcodes(tuple(obj.args)) + pickle.REDUCE
    if isinstance(obj, Inst):
        args = b''.join(opcodes(a) for a in obj.args)
        if obj.opcode == 'OBJ':
            return pickle.MARK + opcodes(Global(obj.module, obj.name)) + args + pickle.OBJ
        return pickle.MARK + args + pickle.INST + f'{obj.module}\n{obj.name}\n'.encode()
    if isinstance(obj, str):
        return pickle.UNICODE + obj.encode('raw_unicode_escape') + b'\n'
    if isinstance(obj, bytes):
        return pickle.SHORT_BINBYTES + bytes([len(obj)]) + obj
    if isinstance(obj, tuple):
        return pickle.MARK + b''.join(opcodes(v) for v in obj) + pickle.TUPLE
    if isinstance(obj, list):
        return pickle.EMPTY_LIST + pickle.MARK + b''.join(opcodes(v) for v in obj) + pickle.APPENDS
    if isinstance(obj, dict):
        return pickle.EMPTY_DICT + pickle.MARK + b''.join(opcodes(k) + opcodes(v) for k, v in obj.items()) + \
            pickle.SETITEMS
    if obj is None:
        return pickle.NONE
    raise TypeError(type(obj))


def snapshot_stream(ema):
    """An EDM-snapshot-shaped stream {'ema': ema, 'loss_fn': None} (protocol 4 header, no framing)."""
    return pickle.PROTO + bytes([4]) + opcodes({'ema': ema, 'loss_fn': None}) + pickle.STOP


def forbidden_payloads(sentinel):
    """(name the error must report, payload) for globals an attacker uses; each payload, if it ran, would create
    `sentinel` (alone or chained) or do something else no weights file needs."""
    s = str(sentinel)
    touch = f"open({s!r}, 'w').close()"
    os_module = Call(Global('builtins', '__import__'), ['os'])
    return [
        ('builtins.eval', Call(Global('builtins', 'eval'), [touch])),
        ('builtins.exec', Call(Global('builtins', 'exec'), [touch])),
        ('builtins.compile', Call(Global('builtins', 'compile'), [touch, '<pickle>', 'exec'])),
        ('builtins.open', Call(Global('builtins', 'open'), [s, 'w'])),
        ('builtins.getattr', Call(Call(Global('builtins', 'getattr'), [os_module, 'system']), [f'touch {s}'])),
        ('builtins.__import__', os_module),
        ('builtins.setattr', Call(Global('builtins', 'setattr'), [Global('builtins', 'dict'), 'x', None])),
        ('builtins.globals', Call(Global('builtins', 'globals'), [])),
        ('builtins.vars', Call(Global('builtins', 'vars'), [])),
        ('builtins.type', Call(Global('builtins', 'type'), ['X', (), {}])),
        ('builtins.object', Call(Global('builtins', 'object'), [])),
        ('__builtin__.eval', Call(Global('__builtin__', 'eval'), [touch])),  # Python 2 name (fix_imports)
        ('os.system', Call(Global('os', 'system'), [f'touch {s}'])),
        ('posix.system', Call(Global('posix', 'system'), [f'touch {s}'])),
        ('os.popen', Call(Global('os', 'popen'), [f'touch {s}'])),
        ('subprocess.Popen', Call(Global('subprocess', 'Popen'), [['touch', s]])),
        ('subprocess.check_output', Call(Global('subprocess', 'check_output'), [['touch', s]])),
        ('subprocess.run', Call(Global('subprocess', 'run'), [['touch', s]])),
        ('functools.partial', Call(Call(Global('functools', 'partial'), [Global('os', 'system'), f'touch {s}']), [])),
        ('functools.reduce', Call(Global('functools', 'reduce'), [Global('builtins', 'eval'), [touch], None])),
        ('operator.attrgetter', Call(Global('operator', 'attrgetter'), ['system'])),
        ('operator.methodcaller', Call(Global('operator', 'methodcaller'), ['system', f'touch {s}'])),
        ('operator.itemgetter', Call(Global('operator', 'itemgetter'), ['x'])),
        ('importlib.import_module', Call(Global('importlib', 'import_module'), ['os'])),
        ('pickle.loads', Call(Global('pickle', 'loads'), [b'N.'])),
        ('runpy.run_path', Call(Global('runpy', 'run_path'), [s])),
        ('copyreg._reconstructor', Call(Global('copyreg', '_reconstructor'), [Global('builtins', 'object'),
                                                                              Global('builtins', 'object'), None])),
        ('types.FunctionType', Call(Global('types', 'FunctionType'), [None, None])),
        ('torch.load', Call(Global('torch', 'load'), [s])),
        ('numpy.load', Call(Global('numpy', 'load'), [s])),
        ('io.open', Call(Global('io', 'open'), [s, 'w'])),
        # the same globals through the other opcodes that resolve names
        ('os.system', Call(Global('os', 'system', 'STACK_GLOBAL'), [f'touch {s}'])),
        ('builtins.eval', Call(Global('builtins', 'eval', 'STACK_GLOBAL'), [touch])),
        ('os.system', Inst('os', 'system', [f'touch {s}'])),
        ('subprocess.Popen', Inst('subprocess', 'Popen', [['touch', s]], 'OBJ')),
    ]


def test_unpickler_refuses_code_execution_globals(tmp_path):
    sentinel = tmp_path / 'pwned.txt'
    payloads = forbidden_payloads(sentinel)
    assert not any(edm_net._ALLOWED_GLOBALS.get(tuple(name.rsplit('.', 1))) for name, _ in payloads)
    for i, (name, payload) in enumerate(payloads):
        path = tmp_path / f'evil{i}.pkl'
        stream = snapshot_stream(payload)
        list(pickletools.genops(stream))  # a well-formed stream: the refusal is not a parse error
        path.write_bytes(stream)
        with pytest.raises(edm_net.EDMLoadError) as err:
            edm_net.load_edm_pickle(path)
        message = str(err.value)
        assert message == (f'{path}: refusing untrusted pickle: it references {name}, which is not in the EDM '
                           f'allow-list (nothing from the file was run)'), name
        assert not sentinel.exists(), name
    # the hand-assembled streams are valid pickles: plain pickle would have run them (the os.system one here)
    pickle.loads(snapshot_stream(Call(Global('os', 'system'), [f'touch {sentinel}'])))
    assert sentinel.exists()


def test_unpickler_build_cannot_change_allowed_globals(tmp_path):
    """Pickle's BUILD opcode sets attributes on the object on the stack. Aimed at an allow-listed global it must
    not change it (e.g. __defaults__ of torch._utils._rebuild_tensor_v2 would then hold for every later load)."""
    def state(target):
        return (getattr(target, '__defaults__', None), target.__doc__, dict(getattr(target, '__dict__', {})))

    before = {key: state(target) for key, target in edm_net._ALLOWED_GLOBALS.items()}
    for i, (module, name) in enumerate(edm_net._ALLOWED_GLOBALS):
        for j, build_state in enumerate([(None, {'__defaults__': ('pwned',), '__doc__': 'pwned'}), {'pwned': 'x'}]):
            path = tmp_path / f'build{i}_{j}.pkl'
            stream = opcodes(Global(module, name)) + opcodes(build_state) + pickle.BUILD
            path.write_bytes(pickle.PROTO + bytes([4]) + pickle.EMPTY_DICT + opcodes('ema') + stream +
                             pickle.SETITEM + pickle.STOP)
            with pytest.raises(edm_net.EDMLoadError, match=f'build{i}_{j}.pkl'):
                edm_net.load_edm_pickle(path)
    assert {key: state(target) for key, target in edm_net._ALLOWED_GLOBALS.items()} == before


def test_unpickler_numpy_object_scalar_refused(tmp_path):
    """The allow-listed numpy scalar rebuilder must not turn file bytes into object pointers."""
    path = tmp_path / 'object_scalar.pkl'
    scalar = Call(Global('numpy.core.multiarray', 'scalar'), [Call(Global('numpy', 'dtype'), ['O']), b'\x41' * 8])
    path.write_bytes(snapshot_stream(scalar))
    with pytest.raises(edm_net.EDMLoadError, match='object_scalar.pkl: not a readable EDM pickle.*OBJECT'):
        edm_net.load_edm_pickle(path)


def test_pickle_errors_are_one_line_and_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.pkl'):
        edm_net.load_edm_pickle(tmp_path / 'missing.pkl')
    good = write_edm_pickle(randomized(small_adm()), tmp_path / 'good.pkl')
    data = open(good, 'rb').read()
    truncated = tmp_path / 'truncated.pkl'
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(edm_net.EDMLoadError, match='truncated.pkl.*truncated or corrupt') as err:
        edm_net.load_edm_pickle(truncated)
    assert '\n' not in str(err.value) and err.value.__cause__ is None
    garbage = tmp_path / 'garbage.pkl'
    garbage.write_bytes(b'not a pickle at all')
    with pytest.raises(edm_net.EDMLoadError, match='garbage.pkl'):
        edm_net.load_edm_pickle(garbage)
    no_ema = tmp_path / 'no_ema.pkl'
    no_ema.write_bytes(pickle.dumps({'loss_fn': None}))
    with pytest.raises(edm_net.EDMLoadError, match="no_ema.pkl: no 'ema'"):
        edm_net.load_edm_pickle(no_ema)
    with pytest.raises(edm_net.EDMLoadError, match='good.pkl: teacher has img_resolution 16, expected 64'):
        edm_net.load_edm_pickle(good, expect=dict(img_resolution=64, label_dim=4))
    with pytest.raises(edm_net.EDMLoadError, match='teacher has label_dim 4, expected 1000'):
        edm_net.load_edm_pickle(good, expect=dict(label_dim=1000))
    with pytest.raises(edm_net.EDMLoadError, match='good.pkl: the network config does not fit.*no_such_option'):
        edm_net.load_edm_pickle(good, no_such_option=1)
    wrong_version = tmp_path / 'v5.pkl'  # persistence format version 5 instead of the official 6
    assert b'version\x94K\x06' in data
    wrong_version.write_bytes(data.replace(b'version\x94K\x06', b'version\x94K\x05'))
    with pytest.raises(edm_net.EDMLoadError, match='v5.pkl: unsupported persistent object.*version 5'):
        edm_net.load_edm_pickle(wrong_version)


def test_load_state_dict_file_and_errors(tmp_path):
    cfg = small_adm()
    net = randomized(cfg)
    path = tmp_path / 'pytorch_model.bin'
    torch.save(net.state_dict(), path)
    loaded = edm_net.load_edm_state_dict(path, cfg)
    assert not loaded.training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in net.state_dict().items())
    # an in-memory dict is copied, not aliased
    copy = edm_net.load_edm_state_dict(net.state_dict(), cfg)
    with torch.no_grad():
        copy.model.map_layer0.weight.zero_()
    assert net.model.map_layer0.weight.abs().sum() > 0
    # wrong keys / shapes -> one clear error naming the file and a few keys
    bad = dict(net.state_dict())
    bad['model.extra.weight'] = bad.pop('model.map_layer0.weight')
    bad['model.map_layer1.bias'] = torch.zeros(7)
    torch.save(bad, tmp_path / 'bad.bin')
    with pytest.raises(edm_net.EDMLoadError) as err:
        edm_net.load_edm_state_dict(tmp_path / 'bad.bin', cfg)
    msg = str(err.value)
    assert 'bad.bin' in msg and 'model.map_layer0.weight' in msg and 'model.extra.weight' in msg
    assert 'model.map_layer1.bias [7] vs [128]' in msg
    with pytest.raises(edm_net.EDMLoadError, match='released.bin.*1 missing'):
        edm_net.load_edm_state_dict({k: v for k, v in bad.items() if k != 'model.extra.weight'} | {
            'model.map_layer1.bias': net.state_dict()['model.map_layer1.bias']}, cfg, name='released.bin')
    (tmp_path / 'corrupt.bin').write_bytes(b'\x00' * 100)
    with pytest.raises(edm_net.EDMLoadError, match='corrupt.bin'):
        edm_net.load_edm_state_dict(tmp_path / 'corrupt.bin', cfg)
    with pytest.raises(FileNotFoundError, match='nothere.bin'):
        edm_net.load_edm_state_dict(tmp_path / 'nothere.bin', cfg)

# ---------------------------------------------------------------------------------------------------------------
# Sampler against the analytic denoiser of Gaussian data.


class GaussianDenoiser:
    """Exact D(x, sigma) = E[x0 | x] for data x0 ~ N(m, s^2) per dimension; counts its evaluations."""

    def __init__(self, m, s):
        self.m, self.s, self.calls = m, s, 0

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        assert x.dtype == torch.float64 and sigma.dtype == torch.float64
        return self.m + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x - self.m)


def test_sampler_deterministic_converges_to_exact_flow():
    m, s, n = 1.5, 0.5, 4000
    z = torch.randn(n, generator=torch.Generator().manual_seed(0))
    # exact probability-flow ODE for Gaussian data: x(0) = m + s (sigma_max z - m) / sqrt(s^2 + sigma_max^2)
    exact = m + s * (80 * z.double() - m) / math.sqrt(s ** 2 + 80 ** 2)
    errors = {}
    for steps in [18, 100, 200]:
        denoiser = GaussianDenoiser(m, s)
        x = edm_net.edm_sampler(denoiser, z, num_steps=steps)
        assert denoiser.calls == 2 * steps - 1 and x.dtype == torch.float64
        errors[steps] = (x - exact).abs().max().item()
    # Heun is 2nd order: halving the step roughly quarters the error (measured: 0.113 at 18 steps, 7e-4 at 200;
    # the narrow data s=0.5 makes 18 steps visibly coarse here)
    assert errors[18] < 0.2 and errors[200] < 2e-3 and errors[100] / errors[200] > 3
    # sample statistics at 200 steps: against the exact flow of the same latents (tight), and against N(m, s^2)
    assert x.mean().item() == pytest.approx(exact.mean().item(), abs=1e-3)
    assert x.var().item() == pytest.approx(exact.var().item(), rel=2e-3)
    assert x.mean().item() == pytest.approx(m, abs=0.04)  # 5 standard errors of the mean (0.008)
    assert x.var().item() == pytest.approx(s ** 2, rel=0.12)  # 5 standard errors of the variance (2.2%)


def test_sampler_stochastic_variance_and_nfe():
    m, s, n, steps = -0.7, 0.8, 10000, 256
    denoiser = GaussianDenoiser(m, s)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(n, generator=gen)
    randn_like = lambda t: torch.randn(t.shape, dtype=t.dtype, generator=gen)
    # EDM's ImageNet-64 setting (README): 256 steps, S_churn 40, S_min 0.05, S_max 50 (S_noise 1 here)
    x = edm_net.edm_sampler(denoiser, z, randn_like=randn_like, num_steps=steps, S_churn=40, S_min=0.05, S_max=50,
                            S_noise=1.0)
    assert denoiser.calls == 2 * steps - 1
    deterministic = edm_net.edm_sampler(GaussianDenoiser(m, s), z, num_steps=steps)
    assert (x - deterministic).abs().mean() > 0.3  # churn really injected noise (measured 0.9)
    assert x.mean().item() == pytest.approx(m, abs=0.04)  # 5 standard errors (0.008)
    assert x.var().item() == pytest.approx(s ** 2, rel=0.08)  # 5 standard errors (1.4%) + discretisation bias


def test_sampler_sigma_schedule_and_churn_cap():
    seen = []

    def denoiser(x, sigma, class_labels=None):
        seen.append(sigma.item())
        return torch.zeros_like(x)

    rho, lo, hi = 7, 0.002 ** (1 / 7), 80 ** (1 / 7)
    t = [(hi + i / 3 * (lo - hi)) ** rho for i in range(4)]  # EDM eq. 5 with N=4
    edm_net.edm_sampler(denoiser, torch.randn(3, 2), num_steps=4)
    assert seen == pytest.approx([t[0], t[1], t[1], t[2], t[2], t[3], t[3]], rel=1e-12)
    # churn: gamma = min(S_churn/N, sqrt(2)-1) only for S_min <= t_i <= S_max (t = 80, 9.7, 0.38, 0.002)
    seen.clear()
    edm_net.edm_sampler(denoiser, torch.randn(3, 2), num_steps=4, S_churn=100, S_min=0.1, S_max=50)
    t_hat = [t[0], t[1] * math.sqrt(2), t[2] * math.sqrt(2), t[3]]
    assert seen == pytest.approx([t_hat[0], t[1], t_hat[1], t[2], t_hat[2], t[3], t_hat[3]], rel=1e-12)


def test_sampler_runs_an_edm_network():
    net = randomized(small_adm())
    z = torch.randn(2, 3, 16, 16)
    out = edm_net.edm_sampler(net, z, torch.eye(4)[[0, 1]], num_steps=3)
    assert out.shape == z.shape and out.dtype == torch.float64 and torch.isfinite(out).all()


@pytest.mark.parametrize('arch', ['DhariwalUNet', 'SongUNet'])
def test_frozen_bf16_weights_are_bit_identical_to_casting_every_forward(arch):
    """store_frozen_in_bf16 keeps the float32 embedding layers and stores the rest in bf16: the use_fp16 forward and
    its bottleneck are unchanged to the bit, and the bf16-computing layers hold bf16 weights."""
    torch.manual_seed(0)
    kwargs = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
    if arch == 'SongUNet':
        kwargs.update(embedding_type='positional', encoder_type='standard', decoder_type='standard',
                      channel_mult_noise=1, resample_filter=[1, 1], model_type='SongUNet')
    else:
        kwargs.update(model_type='DhariwalUNet')
    net = edm_net.EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, use_fp16=True, **kwargs).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # as if trained (zero-initialised layers would hide differences)
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.1, 2.0, 40.0])
    labels = torch.eye(4)[[0, 2, 3]]
    with torch.no_grad():
        before = net(x, sigma, labels), net(x, sigma, labels, return_bottleneck=True)
        edm_net.store_frozen_in_bf16(net.requires_grad_(False))
        after = net(x, sigma, labels), net(x, sigma, labels, return_bottleneck=True)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    dtypes = {name: p.dtype for name, p in net.named_parameters()}
    for name, dtype in dtypes.items():
        assert dtype == (torch.float32 if '.map_' in name or '.affine.' in name else torch.bfloat16), name
