"""Full ImageNet-64 architecture on this CPU: seconds per TTUR iteration and peak memory, written to
benchmarks/results/imagenet.json.

    python benchmarks/imagenet.py [--batch 2] [--precision bf16] [--micro_batch 0]

Three copies of the 296M-parameter ADM (frozen teacher, fake score + GAN head, generator), two AdamW optimisers,
the paper's loss weights; random weights (the timing does not depend on them). One generator iteration (DM + GAN
generator terms, then the critic step) and one critic-only iteration are timed; a TTUR cycle of ratio 5 costs
1 x the first + 4 x the second. Peak memory is the process's peak resident set size (ru_maxrss).
"""
import argparse
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dmd2  # noqa: E402
import edm_net  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--grad_checkpointing", type=dmd2.parse_bool, default=False)
    parser.add_argument("--micro_batch", type=int, default=0)
    args = parser.parse_args()
    cfg = dmd2.Config(**{**dmd2.PRESETS["imagenet64"], "dataset": "imagenet64", "batch_size": args.batch,
                         "precision": args.precision, "warmup_steps": 0, "grad_checkpointing": args.grad_checkpointing,
                         "micro_batch": args.micro_batch})
    torch.manual_seed(0)
    start = time.perf_counter()
    teacher = edm_net.EDMPrecond(**edm_net.imagenet64_config(dropout=0.0))
    teacher.spec = dict(kind="edm", kwargs=edm_net.init_kwargs(teacher))
    teacher = dmd2.prepare_network(teacher, cfg, torch.device("cpu"))
    distiller = dmd2.Distiller(cfg, teacher, (3, 64, 64))
    build_s = time.perf_counter() - start
    real = (torch.rand(args.batch, 3, 64, 64) * 2 - 1, torch.randint(0, 1000, (args.batch,)))
    times = []
    for _ in range(3):  # iterations 0 (generator + critic), 1, 2 (critic only)
        start = time.perf_counter()
        distiller.train_step(real)
        times.append(time.perf_counter() - start)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    out = dict(batch=args.batch, micro_batch=args.micro_batch, precision=args.precision,
               grad_checkpointing=args.grad_checkpointing,
               parameters_per_network=sum(p.numel() for p in teacher.parameters()), build_s=round(build_s, 1),
               generator_iteration_s=round(times[0], 2), critic_iteration_s=round(min(times[1:]), 2),
               ttur_cycle_s=round(times[0] + 4 * min(times[1:]), 2), peak_rss_gb=round(peak_gb, 2))
    print(json.dumps(out, indent=1))
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    name = f"imagenet_{args.precision}" + (f"_batch{args.batch}_micro{args.micro_batch}" if args.micro_batch else "")
    with open(os.path.join(os.path.dirname(__file__), "results", f"{name}.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
