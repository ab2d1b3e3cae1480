"""Sharded training (--engine fsdp) against replicas (--engine ddp) on 2 CPU processes (gloo), tiny SDXL-shaped model:
per-process bytes of the training state (trainable weights, gradients, AdamW moments: the part FSDP divides by the
number of processes), peak RSS, and seconds per TTUR iteration, measured in one run. Writes benchmarks/results/fsdp.json.

    python benchmarks/fsdp.py [--iters 6]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dmd2  # noqa: E402


def local_bytes(tensors):
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors if t is not None)


def worker(engine, iters, out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    parts = dmd2.tiny_t2i_parts(seed=0)
    cfg = dmd2.Config(**{**dmd2.PRESETS["sdxl"], "dataset": "sdxl", "tiny": True, "precision": "fp32", "batch_size": 2,
                         "warmup_steps": 0, "generator_lr": 1e-4, "guidance_lr": 1e-4, "engine": engine})
    latents, captions = torch.randn(8, 4, 16, 16).half(), [f"image number {i}" for i in range(8)]
    d = dmd2.Distiller(cfg, dmd2.prepare_network(parts.teacher(), cfg, torch.device("cpu")), (4, 16, 16), rank=rank,
                       world_size=world, wrap=dmd2.engine(cfg, world, torch.device("cpu")), conditions=dmd2.Prompts(captions, parts.tokenizers, parts.text_encoders))
    real = dmd2.InMemoryBatches(latents, captions, cfg.batch_size * world, 0, rank, world)
    for _ in range(cfg.dfake_gen_update_ratio):  # warm-up cycle: optimiser states exist afterwards
        d.train_step(next(real))
    trainable = [p for net in (d.generator, d.fake_score, d.head) for p in net.parameters() if p.requires_grad]
    state = {"weights": local_bytes(trainable),
             "adamw": local_bytes(t for opt in (d.opt_g, d.opt_d) for s in opt.state.values() for t in s.values()
                                  if torch.is_tensor(t) and t.ndim)}
    state["gradients (while held)"] = state["weights"]  # one gradient per trainable entry, sharded like it
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        d.train_step(next(real))
    dist.barrier()
    result = {"state_bytes": state, "state_total_bytes": sum(state.values()),
              "seconds_per_iteration": (time.perf_counter() - start) / iters,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--worker", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.iters, args.out)
    results = {}
    for engine in ("ddp", "fsdp"):
        out = os.path.join(ROOT, "benchmarks", "results", f".fsdp_{engine}.json")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        __file__, "--worker", engine, "--iters", str(args.iters), "--out", out], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}, cwd=ROOT)
        with open(out) as f:
            results[engine] = json.load(f)
        os.remove(out)
    results["state_fsdp_over_ddp"] = results["fsdp"]["state_total_bytes"] / results["ddp"]["state_total_bytes"]
    results["seconds_fsdp_over_ddp"] = (results["fsdp"]["seconds_per_iteration"]
                                        / results["ddp"]["seconds_per_iteration"])
    results["setup"] = "2 processes x batch 2, tiny SDXL-shaped model (dmd2.tiny_t2i_parts), fp32, gloo on CPU"
    path = os.path.join(ROOT, "benchmarks", "results", "fsdp.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
