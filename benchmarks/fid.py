"""Benchmark: FID Inception features per second of dmd2.load_inception (EDM mode: the paper's protocol) on this CPU,
next to pytorch-fid's own InceptionV3 (its resize, x / 255 input) as a yardstick for the machine's load.

Random weights in pytorch-fid's file layout (torchvision's Inception v3 with 1008 classes, no aux head), saved to a
temporary file and read with dmd2.load_inception(path, mode="edm"), whose signature is the same before and after the
switch to pytorch-fid's network, so this script measures both: run it in a checkout of each commit with --label.
uint8 64x64 images (the ImageNet-64 size; both resize to 299 inside). Measurements alternate dmd2, pytorch-fid, ...
so a load change on the shared machine hits both sides. Merges {label: result} into benchmarks/results/fid.json
(or --out).

    OMP_NUM_THREADS=1 python benchmarks/fid.py --label after [--images 32] [--batch 32] [--rounds 3] [--root DIR]
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def random_state(seed=0):
    """pytorch-fid's weight-file layout with random values that keep activations O(1) through the 94 convs."""
    import torchvision
    layout = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in layout.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith("conv.weight"):
            state[name] = torch.randn(value.shape, generator=g) * math.sqrt(2 / value[0].numel())
        elif name.endswith(("bn.weight", "running_var")):
            state[name] = 0.5 + torch.rand(value.shape, generator=g)
        else:
            state[name] = 0.1 * torch.randn(value.shape, generator=g)
    return state


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", required=True, help="key of this measurement in the results file, e.g. before")
    parser.add_argument("--root", default=os.path.dirname(HERE), help="checkout whose dmd2.py is measured")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "fid.json"))
    args = parser.parse_args()
    sys.path.insert(0, args.root)
    import pytorch_fid.inception as pfid
    import dmd2

    state = random_state()
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, os.path.join(folder, "w.pth"))
        ours = dmd2.load_inception(os.path.join(folder, "w.pth"), mode="edm")
    pfid.load_state_dict_from_url = lambda *a, **k: state  # their builder, these weights, no download
    theirs = pfid.InceptionV3([3]).eval()
    images = torch.randint(0, 256, (args.images, 3, 64, 64), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    batches = images.split(args.batch)

    def run_ours():
        return torch.cat([ours(b) for b in batches])

    def run_theirs():
        with torch.no_grad():
            return torch.cat([theirs(b.float() / 255)[0].flatten(1) for b in batches])

    run_ours(), run_theirs()  # warm-up
    rates = {"dmd2_edm": [], "pytorch_fid": []}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name, fn in (("dmd2_edm", run_ours), ("pytorch_fid", run_theirs)):
            start = time.perf_counter()
            fn()
            rates[name].append(args.images / (time.perf_counter() - start))
    commit = subprocess.run(["git", "-C", args.root, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    result = {
        "commit": commit, "cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "images": args.images, "batch": args.batch, "rounds": args.rounds,
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "dmd2_edm_images_per_s": [round(r, 3) for r in rates["dmd2_edm"]],
        "pytorch_fid_images_per_s": [round(r, 3) for r in rates["pytorch_fid"]],
        "dmd2_edm_best": round(max(rates["dmd2_edm"]), 3),
        "ratio_to_pytorch_fid_median": round(statistics.median(
            o / t for o, t in zip(rates["dmd2_edm"], rates["pytorch_fid"])), 3),
    }
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    results = {k: v for k, v in results.items() if isinstance(v, dict)}  # measurements only
    results["what"] = ("FID Inception pool_3 features/s on uint8 64x64 images (resized to 299 inside), random weights: "
                       "dmd2.load_inception(mode='edm') and, alternating with it, pytorch-fid's InceptionV3")
    results[args.label] = result
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
