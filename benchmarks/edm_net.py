"""CPU forward time of a mid-size DhariwalUNet (EDMPrecond) in float32 against bfloat16 + channels_last, written to
benchmarks/results/edm_net.json.

    python benchmarks/edm_net.py [--threads 1] [--batch 8] [--reps 3]

Modes: float32 (NCHW, the default layout), float32 + channels_last, bf16 (use_fp16=True: bf16 compute, float32
weights) NCHW, bf16 + channels_last. Times are medians of --reps no-grad forwards after one warm-up. A profiler pass
splits the float32 and bf16 + channels_last forwards into op categories (convolutions, group norm, attention
matmul/softmax, dtype casts, the rest) to show where a bf16 speed-up comes from and where it does not, and two layer
timings isolate known slow bf16 kernels (depthwise transposed conv for 2x up-sampling, channels-last group norm).
The load average is recorded: on a shared machine other processes inflate multi-threaded timings.

    python benchmarks/edm_net.py --attention [--threads 2] [--batch 2] [--reps 1] [--precisions bf16 float32]

writes benchmarks/results/edm_net_attention.json instead: one forward + backward of the full ImageNet-64 ADM
(edm_net.imagenet64_config, 296M parameters, train mode, dropout 0) with the official attention op (materialised
float32 softmax) against F.scaled_dot_product_attention (edm_net.set_attention), in bf16 compute (use_fp16, the DMD2
setting; --precisions bf16 float32 adds float32). Each measurement runs in a fresh process, so its peak resident
memory (ru_maxrss) belongs to it alone: peak memory = the highest RSS during the first forward + backward minus the
RSS just before it (weights, inputs and the Python runtime), i.e. activations kept for backward, gradients and
temporaries. Times are medians of --reps further passes.
"""
import argparse
import concurrent.futures
import gc
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import edm_net  # noqa: E402

CONFIG = dict(img_resolution=32, img_channels=3, label_dim=10, model_type='DhariwalUNet', model_channels=128,
              channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[16, 8], dropout=0.0)  # 31.9M parameters
CATEGORIES = [('convolution', ('conv',)), ('group_norm', ('group_norm',)), ('attention', ('bmm', 'softmax')),
              ('casts', ('copy_', '_to_copy'))]


def timed(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prepared(net, x, bf16, channels_last):
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    else:
        net, x = net.to(memory_format=torch.contiguous_format), x.contiguous()
    net.use_fp16 = bf16
    return net, x


def op_breakdown(net, x, sigma, labels):
    """Self CPU milliseconds of one forward, summed by category."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        net(x, sigma, labels)
    out = {name: 0.0 for name, _ in CATEGORIES} | {'other': 0.0}
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3
        category = next((name for name, keys in CATEGORIES if any(k in event.key for k in keys)), 'other')
        out[category] += ms
    return {k: round(v, 1) for k, v in out.items()}


def layer_timings(batch, reps):
    """Two single layers in float32 (NCHW) and bf16 channels_last, milliseconds."""
    up = edm_net.Conv2d(256, 256, kernel=0, up=True)  # the resample-only skip of an ADM `_up` block
    norm = edm_net.GroupNorm(256)  # 8 channels per group
    x = torch.randn(batch, 256, 16, 16)
    xb = x.to(memory_format=torch.channels_last).bfloat16()
    with torch.no_grad():
        return {'upsample_2x_256ch_16px': {'float32': round(1e3 * timed(lambda: up(x), reps), 2),
                                           'bf16_channels_last': round(1e3 * timed(lambda: up(xb), reps), 2)},
                'group_norm_256ch_16px': {'float32': round(1e3 * timed(lambda: norm(x), reps), 2),
                                          'bf16_channels_last': round(1e3 * timed(lambda: norm(xb), reps), 2)}}


def rss_bytes():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def adm_forward_backward(op, bf16, batch, reps, threads):
    """In a fresh process: seconds per forward + backward of the full ImageNet-64 ADM and the peak RSS above the
    resident weights during the first one (ru_maxrss is in KiB on Linux)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = edm_net.EDMPrecond(**edm_net.imagenet64_config(dropout=0.0)).train()  # DMD2 rebuilds it with dropout 0
    net.use_fp16 = bf16
    edm_net.set_attention(net, op)
    x = torch.randn(batch, 3, 64, 64)
    sigma = torch.exp(torch.randn(batch) * 1.2 - 1.2)
    labels = torch.eye(1000)[torch.arange(batch) * 7]

    def step():
        net(x, sigma, labels).square().mean().backward()
        net.zero_grad(set_to_none=True)

    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return dict(seconds=round(statistics.median(times), 3), first_pass_seconds=round(first, 3),
                peak_gib=round((peak - before) / 2 ** 30, 3), resident_before_gib=round(before / 2 ** 30, 3))


def attention_benchmark(args):
    spawn = multiprocessing.get_context('spawn')
    runs = {}
    for precision in args.precisions:
        bf16 = precision == 'bf16'
        for op in ['official', 'sdpa']:
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                runs.setdefault(precision, {})[op] = pool.submit(adm_forward_backward, op, bf16, args.batch,
                                                                 args.reps, args.threads).result()
            print(precision, op, runs[precision][op], flush=True)
    result = dict(
        what='forward + backward of the full ImageNet-64 ADM (edm_net.imagenet64_config, dropout 0), CPU',
        parameters=295_899_267, batch=args.batch, reps=args.reps, threads=args.threads, precisions=args.precisions,
        load_average_1min=round(os.getloadavg()[0], 2), cpu=platform.processor() or platform.machine(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__, runs=runs,
        time_ratio_official_over_sdpa={p: round(r['official']['seconds'] / r['sdpa']['seconds'], 3)
                                       for p, r in runs.items()},
        peak_memory_ratio_official_over_sdpa={p: round(r['official']['peak_gib'] / r['sdpa']['peak_gib'], 3)
                                              for p, r in runs.items()})
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'edm_net_attention.json')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ('time_ratio_official_over_sdpa', 'peak_memory_ratio_official_over_sdpa',
                                             'threads', 'load_average_1min')}, indent=1))
    print(f'wrote {path}')


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--batch', type=int, default=None, help='default 8; 2 with --attention')
    parser.add_argument('--reps', type=int, default=None, help='default 3; 1 with --attention')
    parser.add_argument('--attention', action='store_true', help='official vs SDPA attention on the full ADM')
    parser.add_argument('--precisions', nargs='+', default=['bf16'], choices=['bf16', 'float32'],
                        help='with --attention: compute precisions to measure (bf16 = use_fp16, the DMD2 setting)')
    args = parser.parse_args()
    if args.attention:
        args.batch, args.reps = args.batch or 2, args.reps or 1
        return attention_benchmark(args)
    args.batch, args.reps = args.batch or 8, args.reps or 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = edm_net.EDMPrecond(**CONFIG).eval()
    x = torch.randn(args.batch, 3, 32, 32)
    sigma = torch.exp(torch.randn(args.batch) * 1.2 - 1.2)  # EDM training noise levels
    labels = torch.eye(10)[torch.arange(args.batch) % 10]

    seconds = {}
    for name, bf16, channels_last in [('float32', False, False), ('float32_channels_last', False, True),
                                      ('bf16', True, False), ('bf16_channels_last', True, True)]:
        model, inputs = prepared(net, x, bf16, channels_last)
        with torch.no_grad():
            seconds[name] = timed(lambda: model(inputs, sigma, labels), args.reps)
        print(f'{name:24s} {seconds[name]:.3f} s per forward (batch {args.batch})')
    breakdown = {name: op_breakdown(*prepared(net, x, bf16, cl), sigma, labels)
                 for name, bf16, cl in [('float32', False, False), ('bf16_channels_last', True, True)]}
    result = dict(
        config=CONFIG, parameters=sum(p.numel() for p in net.parameters()), batch=args.batch, threads=args.threads,
        load_average_1min=round(os.getloadavg()[0], 2), cpu=platform.processor() or platform.machine(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__,
        forward_seconds={k: round(v, 4) for k, v in seconds.items()},
        speedup_bf16_channels_last_vs_float32=round(seconds['float32'] / seconds['bf16_channels_last'], 2),
        speedup_bf16_channels_last_vs_float32_channels_last=round(
            seconds['float32_channels_last'] / seconds['bf16_channels_last'], 2),
        speedup_bf16_vs_float32=round(seconds['float32'] / seconds['bf16'], 2),
        self_cpu_ms_by_category=breakdown,
        category_speedup={k: round(breakdown['float32'][k] / max(breakdown['bf16_channels_last'][k], 1e-3), 2)
                          for k in breakdown['float32']},
        layer_ms=layer_timings(args.batch, 10),
    )
    os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results'), exist_ok=True)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'edm_net.json')
    with open(path, 'w') as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ('speedup_bf16_channels_last_vs_float32', 'category_speedup',
                                             'layer_ms', 'threads', 'load_average_1min')}, indent=1))
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
