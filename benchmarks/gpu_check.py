"""One prepared check for a lent H100/H200 (issues 12, 14, 24): the full ImageNet-64 DMD2 setting on CUDA, variant by
variant, the compiled training, the sharded SDXL setting and the embedded main job, written to
gpu_<device-name>.json (default folder benchmarks/results) after every measurement.

    python benchmarks/gpu_check.py [--out FOLDER_OR_FILE] [--only train,compiled,...]  # CUDA: one 540 s call
    python benchmarks/gpu_check.py --tiny --out /tmp/g.json   # every section at a tiny size on CPU (tests)

Sections, in this order, each with its share of --budget_s (SECTIONS; time one leaves passes on to the next):
- train: three ADM networks of 296M parameters (edm_net.imagenet64_config with dropout 0, as DMD2 rebuilds it;
  random weights) through dmd2.Distiller with the imagenet64 preset (batch 40 per GPU, bf16 compute, TTUR ratio 5)
  on random real batches, per eager variant: seconds per generator iteration (generator + critic turn) and per
  critic iteration, timed apart after two warm-up iterations (warmup_s), the TTUR mean (1 generator + 4 critic
  iterations) / 5, and the peak memory (torch.cuda.max_memory_allocated);
- sampling (batch 40, the teacher network): images/s of the 1-step student (one forward at sigma 80) and of the
  teacher's Heun sampler (edm_net.edm_sampler) at 35 NFE (18 steps) and 511 NFE (256 steps, EDM's ImageNet churn);
- compiled: the sdpa_compile variant through dmd2's --compile (dmd2.compile_networks): its compile time (warmup_s)
  apart from its steady-state seconds per iteration, the iterations after which it pays against sdpa_nchw, its
  sampling rates, and dynamo's counters (compiled graphs, not a silent eager fallback);
- fsdp2: the sdxl preset (4-step backward simulation, CFG 8, GAN, bf16, batch 2) on a mid-size SDXL-shaped UNet
  (--tiny: the tiny one), generator and fake score sharded per block as --engine fsdp does, over a one-process mesh;
- embedded: `python dmd2.py`'s distillation (shapes preset, batch 32) on this device, iterations/s eager and compiled.
Variants of the ImageNet-64 setting (each changes one thing; later ones keep the earlier changes):
  today        official attention (materialised float32 softmax), channels_last, eager, TF32 off
  tf32         + TF32 matmuls and cudnn.benchmark
  sdpa         + F.scaled_dot_product_attention on bf16 q/k/v (edm_net.set_attention)
  sdpa_nchw    + channels_last off (CUDA group norm works on contiguous NCHW tensors)
  sdpa_compile + --compile, channels_last as in the faster of sdpa / sdpa_nchw
Every measurement runs under an alarm at its section's deadline and is skipped beforehand when its estimate (the
last time of the same kind) does not fit; skips and errors are recorded, never fatal.
"""
import argparse
import copy
import gc
import json
import math
import os
import platform
import re
import resource
import signal
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dmd2  # noqa: E402
import edm_net  # noqa: E402

VARIANTS = [
    ('today', dict(attention='official', channels_last=True, tf32=False, compile=False)),
    ('tf32', dict(attention='official', channels_last=True, tf32=True, compile=False)),
    ('sdpa', dict(attention='sdpa', channels_last=True, tf32=True, compile=False)),
    ('sdpa_nchw', dict(attention='sdpa', channels_last=False, tf32=True, compile=False)),
    ('sdpa_compile', dict(attention='sdpa', channels_last='faster', tf32=True, compile=True)),
]
TINY_NET = dict(img_resolution=8, img_channels=3, label_dim=1000, use_fp16=True, model_type='DhariwalUNet',
                model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)  # 1 head
# Heun sampler settings: 18 steps deterministic (35 NFE), and EDM's ImageNet-64 setting (README: 256 steps = 511 NFE,
# S_churn 40, S_min 0.05, S_max 50, S_noise 1.003). --tiny keeps the two kinds with 2 and 3 steps (3 and 5 NFE).
# SDXL's UNet config (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json) with 1 transformer layer per block
# in place of (1, 2, 10): SDXL's shapes and conditioning at about a third of its 2.57B parameters
MID_SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                attention_head_dim=(5, 10, 20), down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D',
                                                                   'CrossAttnDownBlock2D'),
                up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'), transformer_layers_per_block=1,
                use_linear_projection=True, cross_attention_dim=2048, addition_embed_type='text_time',
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
# Sections and their shares of --budget_s, in the order they run (issue 24: FSDP2 and the compiled variant get their
# time whatever the eager sections take; the embedded main job's rate last).
SECTIONS = dict(train=120, sampling=50, compiled=180, fsdp2=100, embedded=60)
CHURN = dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
SAMPLERS = [(18, {}), (256, CHURN)]
TINY_SAMPLERS = [(2, {}), (3, CHURN)]


class BudgetExceeded(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` on the way (dynamo's) swallows it."""


class Clock:
    """The deadline, and an alarm that interrupts a measurement when it is reached."""

    def __init__(self, budget_s):
        self.deadline = time.monotonic() + budget_s
        signal.signal(signal.SIGALRM, self.ring)

    def left(self):
        return self.deadline - time.monotonic()

    def ring(self, signum, frame):
        raise BudgetExceeded()

    def arm(self):
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 1e-3))

    def disarm(self):
        signal.setitimer(signal.ITIMER_REAL, 0)


def save(report, path):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def measure(report, path, clock, variant, what, fn, estimate_s=0.0):
    """Run fn() -> dict of numbers under the budget; store it as report['variants'][variant][what], or record why
    not in report['skipped'] / report['errors']. Writes the report either way."""
    if clock.left() < estimate_s:
        report['skipped'].append(dict(variant=variant, what=what,
                                      reason=f'budget: {clock.left():.0f} s left, needs ~{estimate_s:.0f} s'))
        save(report, path)
        print(f'{variant} {what}: skipped, {report["skipped"][-1]["reason"]}', flush=True)
        return None
    start = time.monotonic()
    try:
        clock.arm()
        try:
            result = fn()
        finally:
            clock.disarm()
        result['wall_s'] = round(time.monotonic() - start, 2)
        report['variants'][variant][what] = result
    except BudgetExceeded:
        result = None
        report['skipped'].append(dict(variant=variant, what=what, reason='budget ran out while it ran',
                                      ran_s=round(time.monotonic() - start, 1)))
    except Exception as e:  # one failure (out of memory, a compile error) must not lose the other variants
        result = None
        message = str(e).strip().splitlines()[0] if str(e).strip() else ''
        report['errors'].append(dict(variant=variant, what=what, error=f'{type(e).__name__}: {message}'[:500]))
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    save(report, path)
    print(f'[{clock.left():5.0f} s left] {variant} {what}:',
          result or (report['errors'] + report['skipped'])[-1], flush=True)
    return result


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def set_backend_flags(tf32):
    """On: TF32 float32 matmuls (the official DMD2 code enables TF32 for matmuls and cuDNN: reference
    dmd2_official.md) and cudnn.benchmark autotuning (issue 12). Off: torch's defaults, which our code keeps today
    (IEEE float32 matmuls, cuDNN heuristics). cuDNN's own TF32 switch stays at torch's default (on) in both."""
    torch.set_float32_matmul_precision('high' if tf32 else 'highest')
    torch.backends.cudnn.benchmark = tf32


def peak_memory_gib(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # CPU: the process's peak RSS (KiB)


def train_timings(cfg, teacher, batch, device, warmup, timed, compile_backend=None):
    """Seconds per generator and per critic iteration of dmd2.Distiller.train_step, and the peak memory."""
    # The Distiller owns its teacher (it may store it in bf16 in place): give it a copy; the original stays for the
    # other variants and the sampling rates, so the peak memory below includes one extra frozen teacher.
    distiller = dmd2.Distiller(cfg, copy.deepcopy(teacher), tuple(batch[0].shape[1:]), device=device)
    if cfg.compile:  # as dmd2.run_training does --compile: after construction (the copies are not compiled)
        dmd2.compile_networks(distiller.real_score, distiller.fake_score, distiller.generator, backend=compile_backend)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    r = cfg.dfake_gen_update_ratio
    times = dict(generator=[], critic=[])
    synchronize(device)
    start = time.perf_counter()
    for i in range(warmup + timed):
        if i == warmup:
            warmup_s = time.perf_counter() - start
        synchronize(device)
        t0 = time.perf_counter()
        distiller.train_step(batch)  # TTUR: the generator turn runs on steps 0, r, 2r, ... (then the critic turn)
        synchronize(device)
        if i >= warmup:
            times['generator' if i % r == 0 else 'critic'].append(time.perf_counter() - t0)
    g, c = statistics.median(times['generator']), statistics.median(times['critic'])
    return dict(generator_iter_s=g, critic_iter_s=c, mean_iter_s=(g + (r - 1) * c) / r,
                generator_iters_timed=len(times['generator']), critic_iters_timed=len(times['critic']),
                warmup_s=warmup_s if warmup else 0.0, peak_memory_gib=peak_memory_gib(device),
                matmul_precision=torch.get_float32_matmul_precision(),  # as they were after the run (dmd2 could
                cudnn_benchmark=torch.backends.cudnn.benchmark)         # set them itself)


def images_per_second(sample, batch, device, reps, warmup=True):
    """batch * reps / seconds of `reps` calls (after one warm-up call)."""
    if warmup:
        sample()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        sample()
    synchronize(device)
    return dict(images_per_s=batch * reps / (time.perf_counter() - start), reps=reps)


@torch.no_grad()
def sampling_rates(report, path, clock, name, net, z, onehot, samplers, estimates):
    """Images/s of the 1-step student (one evaluation at sigma 80: the DMD2 generator's cost) and of the Heun
    sampler, with `net` (the teacher). The first measurement's warm-up call includes any compilation."""
    n = z.shape[0]
    x_student, sigma_student = 80.0 * z, torch.full((n,), 80.0, device=z.device)  # generator input: 80 z at 80
    measure(report, path, clock, name, 'student_1step',
            lambda: images_per_second(lambda: net(x_student, sigma_student, onehot), n, z.device, reps=5))
    for steps, churn in samplers:
        nfe = 2 * steps - 1
        result = measure(report, path, clock, name, f'heun_{nfe}nfe', lambda: images_per_second(
            lambda: edm_net.edm_sampler(net, z, onehot, num_steps=steps, **churn), n, z.device, reps=1,
            warmup=False), estimates.get('nfe_s', 0) * nfe)
        if result:
            estimates['nfe_s'] = min(estimates.get('nfe_s', math.inf), result['wall_s'] / nfe)  # s per evaluation


def apply_variant(report, name, teacher):
    """Backend flags, attention op and memory layout of a variant, on the teacher (the Distiller copies it)."""
    settings = report['variants'][name]['settings']
    set_backend_flags(settings['tf32'])
    edm_net.set_attention(teacher, settings['attention'])
    teacher.to(memory_format=torch.channels_last if settings['channels_last'] else torch.contiguous_format)
    return settings


def eager_section(report, path, clock, ctx, what):
    """'train' or 'sampling' of every eager variant, in VARIANTS order."""
    for name, settings in VARIANTS:
        if settings['compile']:
            continue
        settings = apply_variant(report, name, ctx.teacher)
        if what == 'train':
            cfg = dmd2.Config(**{**ctx.cfg_kwargs, 'channels_last': settings['channels_last']})
            result = measure(report, path, clock, name, 'train', lambda: train_timings(
                cfg, ctx.teacher, ctx.batch, ctx.device, ctx.warmup, ctx.timed), ctx.estimates.get('train', 0))
            if result:
                ctx.estimates['train'] = result['wall_s']
        else:
            sampling_rates(report, path, clock, name, ctx.teacher, ctx.z, ctx.onehot, ctx.samplers, ctx.estimates)


def compiled_section(report, path, clock, ctx):
    """The compiled variant through dmd2's --compile path (dmd2.compile_networks): training first, its compile time
    (warmup_s: the two warm-up iterations, a generator and a critic turn) apart from its steady-state seconds per
    iteration and the iterations after which compiling pays, then sampling with the compiled teacher; dynamo's
    counters tell compiled graphs from an eager fallback."""
    for name in [name for name, settings in VARIANTS if settings['compile']]:
        settings = report['variants'][name]['settings']
        if settings['channels_last'] == 'faster':
            mean = {v: report['variants'][v].get('train', {}).get('mean_iter_s') for v in ('sdpa', 'sdpa_nchw')}
            settings['channels_last'] = None not in mean.values() and mean['sdpa'] < mean['sdpa_nchw']
        settings['backend'] = ctx.compile_backend
        apply_variant(report, name, ctx.teacher)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        cfg = dmd2.Config(**{**ctx.cfg_kwargs, 'channels_last': settings['channels_last'], 'compile': True})
        result = measure(report, path, clock, name, 'train', lambda: train_timings(
            cfg, ctx.teacher, ctx.batch, ctx.device, 2, max(ctx.timed, cfg.dfake_gen_update_ratio),  # a turn of each
            ctx.compile_backend))
        eager = report['variants']['sdpa_nchw'].get('train')
        if result and eager and eager['mean_iter_s'] > result['mean_iter_s']:
            result['break_even_iters'] = math.ceil(result['warmup_s'] / (eager['mean_iter_s'] - result['mean_iter_s']))
        dmd2.compile_networks(ctx.teacher, backend=ctx.compile_backend)
        sampling_rates(report, path, clock, name, ctx.teacher, ctx.z, ctx.onehot, ctx.samplers, ctx.estimates)
        report['variants'][name]['dynamo'] = {k: dict(v) for k, v in torch._dynamo.utils.counters.items()
                                              if k in ('stats', 'frames')}
        save(report, path)


def embedded_section(report, path, clock, device, tiny, compile_backend):
    """The embedded main job's distillation (`python dmd2.py`: the shapes preset, its 16-channel ADM teacher at 16 px,
    batch 32; random weights) on this device: iterations per second after two warm-up iterations, eager and
    compiled (warmup_s: the compile time)."""
    report['variants']['embedded_shapes'] = {}
    cfg = dmd2.Config(**{**dmd2.PRESETS['shapes'], 'dataset': 'shapes', 'device': str(device)})
    torch.manual_seed(0)
    teacher = edm_net.EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, **cfg.teacher_arch).to(device)
    gen = torch.Generator(device).manual_seed(0)
    batch = (torch.rand(32, 3, 16, 16, generator=gen, device=device) * 2 - 1,
             torch.randint(0, 10, (32,), generator=gen, device=device))
    iters = 4 if tiny else 100

    def run(compiled):
        distiller = dmd2.Distiller(cfg, copy.deepcopy(teacher).eval(), (3, 16, 16), device=device)
        if compiled:
            torch._dynamo.reset()
            dmd2.compile_networks(distiller.real_score, distiller.fake_score, distiller.generator,
                                  backend=compile_backend)
        start = time.perf_counter()
        for i in range(2 + iters):
            if i == 2:
                synchronize(device)
                warmup_s, start = time.perf_counter() - start, time.perf_counter()
            distiller.train_step(batch)
        synchronize(device)
        return dict(iters_per_s=iters / (time.perf_counter() - start), warmup_s=warmup_s, iters_timed=iters)

    for what, compiled in (('eager', False), ('compiled', True)):
        measure(report, path, clock, 'embedded_shapes', what, lambda: run(compiled))


def fsdp_section(report, path, clock, device, tiny):
    """Issue 14's check: a TTUR cycle of the sdxl preset with the generator and fake score sharded by FSDP2."""
    import tempfile
    import diffusers
    import torch.distributed as dist
    report['variants']['fsdp2_sdxl'] = {}
    parts = dmd2.tiny_t2i_parts(seed=0)
    if not tiny:
        torch.manual_seed(0)
        parts.unet = diffusers.UNet2DConditionModel(**MID_SDXL).requires_grad_(False).eval()
    for module in (parts.unet, *parts.text_encoders):
        module.to(device)
    size, captions = parts.unet.config.sample_size, [f'a photo of object {i}' for i in range(8)]

    def run():
        with tempfile.TemporaryDirectory() as tmp:
            dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', init_method=f'file://{tmp}/pg',
                                    rank=0, world_size=1)
            try:
                cfg = dmd2.Config(**{**dmd2.PRESETS['sdxl'], 'dataset': 'sdxl', 'engine': 'fsdp', 'precision': 'bf16',
                                     'batch_size': 2, 'device': str(device)})
                teacher = dmd2.prepare_network(parts.teacher(), cfg, device)
                conditions = dmd2.Prompts(captions, parts.tokenizers, parts.text_encoders)
                distiller = dmd2.Distiller(cfg, teacher, (4, size, size), device=device, conditions=conditions,
                                           wrap=dmd2.engine(cfg, 1, device))
                real = dmd2.InMemoryBatches(torch.randn(8, 4, size, size).half(), captions, 2, 0)
                if device.type == 'cuda':
                    torch.cuda.reset_peak_memory_stats(device)
                times = []
                for _ in range(cfg.dfake_gen_update_ratio + (0 if tiny else 2)):  # a cycle (+2 warm-up on CUDA)
                    batch = next(real)
                    synchronize(device)
                    t0 = time.perf_counter()
                    distiller.train_step(batch)
                    synchronize(device)
                    times.append(time.perf_counter() - t0)
                times = times[-cfg.dfake_gen_update_ratio:]  # step 0 of the timed cycle is a generator turn on CUDA
                sharded = type(distiller.generator).__name__.startswith('FSDP')
                return dict(generator_iter_s=times[0], critic_iter_s=statistics.median(times[1:]),
                            unet_parameters=sum(p.numel() for p in parts.unet.parameters()),
                            sharded=sharded, peak_memory_gib=peak_memory_gib(device))
            finally:
                dist.destroy_process_group()
    measure(report, path, clock, 'fsdp2_sdxl', 'train', run, estimate_s=5 if tiny else 90)


def device_slug(device):
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu_tiny'
    return re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--budget_s', type=float, default=510,
                        help='time for all measurements, shared by the sections (default 510: one 540 s call)')
    parser.add_argument('--tiny', action='store_true',
                        help="CPU smoke run of every section: tiny networks, batch 2, dynamo's 'eager' backend")
    parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results'),
                        help='JSON file, or a folder for gpu_<device-name>.json (default benchmarks/results)')
    parser.add_argument('--compile_backend', default=None,
                        help="torch.compile backend of the compiled runs (default inductor; --tiny: 'eager')")
    parser.add_argument('--only', default=','.join(SECTIONS),
                        help=f'comma-separated sections to run, in this order: {",".join(SECTIONS)} (default: all)')
    args = parser.parse_args()
    only = [name for name in SECTIONS if name in args.only.split(',')]
    if not only or set(args.only.split(',')) - set(SECTIONS):
        parser.error(f'--only: choose from {",".join(SECTIONS)}')
    if not args.tiny and not torch.cuda.is_available():
        sys.exit('gpu_check: no CUDA device here; run it on the GPU machine, or pass --tiny for the CPU smoke run')
    clock = Clock(args.budget_s)
    started = time.monotonic()
    device = torch.device('cpu' if args.tiny else 'cuda')
    path = os.path.join(args.out, f'gpu_{device_slug(device)}.json') if os.path.isdir(args.out) else args.out

    net_kwargs = TINY_NET if args.tiny else edm_net.imagenet64_config(dropout=0.0)  # DMD2 rebuilds it: dropout 0
    batch_size = 2 if args.tiny else dmd2.PRESETS['imagenet64']['batch_size']
    resolution = net_kwargs['img_resolution']
    cfg_kwargs = {**dmd2.PRESETS['imagenet64'], 'dataset': 'imagenet64', 'device': str(device), 'precision': 'bf16',
                  'batch_size': batch_size, 'resolution': resolution}
    report = dict(
        device=torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu',
        torch=torch.__version__, cuda=torch.version.cuda, tiny=args.tiny, budget_s=args.budget_s,
        batch=batch_size, network=net_kwargs, preset='imagenet64', sections={}, variants={}, skipped=[], errors=[],
        peak_memory=('torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'process peak RSS'))
    save(report, path)

    torch.manual_seed(0)
    with torch.device(device):  # random weights drawn on the device (fast); parameters float32, compute bf16
        teacher = edm_net.EDMPrecond(**net_kwargs).eval().requires_grad_(False)
    gen = torch.Generator(device).manual_seed(0)
    images = torch.rand(batch_size, 3, resolution, resolution, generator=gen, device=device) * 2 - 1
    labels = torch.randint(0, net_kwargs['label_dim'], (batch_size,), generator=gen, device=device)

    # Sections in order, each with its share of the budget; time a section leaves unused passes on to the next, so
    # none gets less than its share (the FSDP2 section comes after the compiled one, with its own share).
    ctx = argparse.Namespace(teacher=teacher, batch=(images, labels), cfg_kwargs=cfg_kwargs, device=device,
                             onehot=torch.eye(teacher.label_dim, device=device)[labels], estimates={},
                             z=torch.randn(images.shape, generator=torch.Generator(device).manual_seed(1),
                                           device=device),
                             warmup=0 if args.tiny else 2, timed=2 if args.tiny else 9,
                             samplers=TINY_SAMPLERS if args.tiny else SAMPLERS,
                             compile_backend=args.compile_backend or ('eager' if args.tiny else 'inductor'))
    for name, settings in VARIANTS:
        report['variants'][name] = dict(settings=dict(settings))
    run = dict(train=lambda: eager_section(report, path, clock, ctx, 'train'),
               sampling=lambda: eager_section(report, path, clock, ctx, 'sampling'),
               compiled=lambda: compiled_section(report, path, clock, ctx),
               fsdp2=lambda: fsdp_section(report, path, clock, device, args.tiny),
               embedded=lambda: embedded_section(report, path, clock, device, args.tiny, ctx.compile_backend))
    shares = {name: args.budget_s * SECTIONS[name] / sum(SECTIONS[n] for n in only) for name in only}
    end = started
    for name in only:
        end += shares[name]  # this section's share plus whatever the earlier ones left
        clock.deadline = end
        report['sections'][name] = dict(budget_s=round(shares[name], 1), given_s=round(clock.left(), 1))
        section_start = time.monotonic()
        run[name]()
        report['sections'][name]['ran_s'] = round(time.monotonic() - section_start, 1)
        save(report, path)

    signal.setitimer(signal.ITIMER_REAL, 0)
    report['elapsed_s'] = round(time.monotonic() - started, 1)
    today = report['variants'].get('today', {})
    report['speedup_vs_today'] = {
        name: {what: round(today[what]['mean_iter_s'] / v[what]['mean_iter_s'], 3)
               if what == 'train' else round(v[what]['images_per_s'] / today[what]['images_per_s'], 3)
               for what in today if what != 'settings' and what in v}
        for name, v in report['variants'].items() if name not in ('today', 'fsdp2_sdxl', 'embedded_shapes')}
    report['complete'] = not report['skipped'] and not report['errors']
    save(report, path)
    print(json.dumps({k: report[k] for k in ('device', 'elapsed_s', 'speedup_vs_today', 'skipped', 'errors')},
                     indent=1))
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
