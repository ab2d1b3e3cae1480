"""Benchmark of the DMD2 training cycle and of sampling on this CPU, written to benchmarks/results/train.json.

    python benchmarks/train.py [--repeats 3]

Measured in one run, on the embedded default's networks (16 px, narrow ADM teacher), batch 32:
  1. one TTUR cycle (dfake_gen_update_ratio = 5 iterations: 5 critic steps, 1 generator step) against the sum of
     the network passes it is made of, each timed alone: the overhead of the loop itself (target <= 15%);
  2. bf16 compute + channels_last against float32: on the same cycle, and on one forward+backward of the full
     ImageNet-64 ADM at batch 4, where AMX bf16 matters (target >= 2x);
  3. student (1 and 4 steps) against teacher (EDM Heun, 18 steps = 35 NFE) images per second.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dmd2  # noqa: E402


def timed(fn, repeats):
    """Best wall time of fn() over repeats (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def make_distiller(precision, channels_last, batch):
    arch = {**dmd2.PRESETS["shapes"]["teacher_arch"], "model_channels": 32}  # the 32-channel net of results/train.json
    cfg = dmd2.Config(**{**dmd2.PRESETS["shapes"], "precision": precision, "channels_last": channels_last,
                         "batch_size": batch, "warmup_steps": 0, "teacher_arch": arch, "ema_decay": 0.0})
    torch.manual_seed(0)
    spec = dict(kind="edm", kwargs=dict(img_resolution=16, img_channels=3, label_dim=10, **cfg.teacher_arch))
    teacher = dmd2.prepare_network(dmd2.build_network(spec), cfg, torch.device("cpu"))
    images, labels = dmd2.shapes_dataset(512, 16, seed=0)
    return dmd2.Distiller(cfg, teacher, (3, 16, 16)), dmd2.InMemoryBatches(images, labels, batch, 0)


def cycle(distiller, real):
    for _ in range(distiller.cfg.dfake_gen_update_ratio):
        distiller.train_step(next(real))


def network_passes(distiller, real):
    """The passes of one cycle, each run alone: generator forwards (4 without, 1 with grad + backward), the DM
    loss's two score forwards, the GAN generator term (bottleneck forward + backward), and 5 critic steps' fake
    score forward+backward and two bottleneck forwards+backward (real and fake)."""
    d, cfg = distiller, distiller.cfg
    b = cfg.batch_size
    x = torch.randn(b, 3, 16, 16) * 80
    sigma = torch.full((b,), 80.0)
    labels = dmd2.onehot(torch.arange(b) % 10, 10)
    real_x = next(real)[0]
    times = {}

    def gen_nograd():
        with torch.no_grad():
            d.generator(x, sigma, labels)

    def gen_grad():
        d.generator(x, sigma, labels).float().mean().backward()

    def dm_scores():
        with torch.no_grad():
            d.real_score(real_x, sigma / 40, labels)
            d.fake_score(real_x, sigma / 40, labels)

    def gan_generator():
        inp = real_x.clone().requires_grad_(True)
        d.head(d.fake_score(inp, sigma / 40, labels, return_bottleneck=True)).mean().backward()

    def critic():
        d.fake_score(real_x, sigma / 40, labels).float().mean().backward()
        for _ in range(2):
            d.head(d.fake_score(real_x, sigma / 40, labels, return_bottleneck=True)).mean().backward()

    for name, fn, count in [("generator forward (no grad)", gen_nograd, 4), ("generator forward+backward", gen_grad, 1),
                            ("DM: real + fake score forwards", dm_scores, 1),
                            ("GAN generator term", gan_generator, 1), ("critic step passes", critic, 5)]:
        times[name] = count * timed(fn, 3)
    d.generator.zero_grad(set_to_none=True)
    d.fake_score.zero_grad(set_to_none=True)
    d.head.zero_grad(set_to_none=True)
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    out = {"machine": f"{os.cpu_count()} CPU threads, torch {torch.__version__}", "batch": args.batch}

    results = {}
    for name, precision, channels_last in [("fp32", "fp32", False), ("bf16+channels_last", "bf16", True)]:
        d, real = make_distiller(precision, channels_last, args.batch)
        cycle_s = timed(lambda: cycle(d, real), args.repeats)
        passes = network_passes(d, real)
        results[name] = dict(cycle_s=cycle_s, passes_s=sum(passes.values()), passes=passes)
        print(f"{name}: cycle {cycle_s:.3f} s, network passes alone {sum(passes.values()):.3f} s")
    for name, r in results.items():
        r["loop_overhead"] = r["cycle_s"] / r["passes_s"] - 1
    out["cycle"] = results
    out["bf16_channels_last_speedup"] = results["fp32"]["cycle_s"] / results["bf16+channels_last"]["cycle_s"]

    # bf16 at ImageNet size: one forward+backward of the 296M-parameter ADM, batch 4
    import edm_net
    net = edm_net.EDMPrecond(**edm_net.imagenet64_config(dropout=0.0))
    x, sigma, y = torch.randn(4, 3, 64, 64), torch.full((4,), 2.0), dmd2.onehot(torch.arange(4), 1000)
    adm = {}
    for name, bf16, channels_last in [("fp32", False, False), ("bf16+channels_last", True, True)]:
        net.use_fp16 = bf16
        net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)  # in place
        inp = x.contiguous(memory_format=torch.channels_last) if channels_last else x

        def fwd_bwd():
            net(inp, sigma, y).float().mean().backward()
            net.zero_grad(set_to_none=True)
        adm[name] = timed(fwd_bwd, args.repeats)
        print(f"ImageNet-64 ADM forward+backward, batch 4, {name}: {adm[name]:.2f} s")
    out["imagenet_adm_fwd_bwd_s"] = adm
    out["imagenet_adm_bf16_channels_last_speedup"] = adm["fp32"] / adm["bf16+channels_last"]

    # images per second, with the precision the default run uses
    d, _ = make_distiller(dmd2.PRESETS["shapes"]["precision"], dmd2.PRESETS["shapes"]["channels_last"], args.batch)
    n = 256
    noise, labels = torch.randn(n, 3, 16, 16), torch.arange(n) % 10
    teacher_s = timed(lambda: dmd2.sample_teacher(d.real_score, noise, labels, d.conditions, 18, 256), 1)
    sampling = {"teacher (Heun 18 steps, NFE 35)": n / teacher_s}
    for steps in (1, 4):
        sig = dmd2.generator_sigmas(steps, d.sigmas)
        sampling[f"student {steps} step"] = n / timed(lambda: dmd2.sample_student(d.generator, noise, labels, sig, d.conditions), 3)
    out["images_per_s"] = sampling
    out["student_1step_vs_teacher"] = sampling["student 1 step"] / sampling["teacher (Heun 18 steps, NFE 35)"]
    out["student_4step_vs_teacher"] = sampling["student 4 step"] / sampling["teacher (Heun 18 steps, NFE 35)"]
    print(json.dumps(out, indent=1))
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "train.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
