"""Benchmark: Inception features per second of dmd2.InceptionV3 against pytorch-fid's InceptionV3 on this CPU.

Both networks get the same random weights in pytorch-fid's layout (nothing is downloaded) and the same uint8
64x64 images (the ImageNet-64 size; both resize to 299 inside). Ours runs in 'pytorch-fid' mode so the features
must agree (max relative difference reported); pytorch-fid runs as its get_activations does (eval, no_grad,
float32 NCHW). Measurements alternate A, B, A, B so a load change on the shared machine hits both sides; the
report gives the median of the per-round ratios and the ratio of the best rounds (the least disturbed ones).
Writes benchmarks/results/fid.json.

    python benchmarks/fid.py [--images 32] [--batch 32] [--rounds 5]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import pytorch_fid.inception as pfid_inception  # noqa: E402

from dmd2 import InceptionV3  # noqa: E402
from test_fid import random_inception_state  # noqa: E402  (the tests' random weights in pytorch-fid's layout)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    state = random_inception_state()
    pfid_inception.load_state_dict_from_url = lambda *a, **k: state  # their builder, our weights, no download
    theirs = pfid_inception.InceptionV3([3]).eval()
    ours = InceptionV3("pytorch-fid")
    ours.load_state_dict(state, strict=True)
    ours.eval()
    images = torch.randint(0, 256, (args.images, 3, 64, 64), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    batches = images.split(args.batch)

    def run_theirs():
        with torch.no_grad():
            return torch.cat([theirs(b.float() / 255)[0].flatten(1) for b in batches])

    def run_ours():
        return torch.cat([ours(b) for b in batches])

    load_before = os.getloadavg()
    reference, features = run_theirs(), run_ours()  # also the warm-up
    max_rel_diff = float((features - reference).abs().max() / reference.abs().max())
    rates = {"pytorch_fid": [], "ours": []}
    for _ in range(args.rounds):
        for name, fn in (("pytorch_fid", run_theirs), ("ours", run_ours)):
            start = time.perf_counter()
            fn()
            rates[name].append(args.images / (time.perf_counter() - start))
    ratios = [o / t for o, t in zip(rates["ours"], rates["pytorch_fid"])]
    result = {
        "what": "Inception pool_3 features/s on uint8 64x64 images (resized to 299 inside), same random weights",
        "images": args.images, "batch": args.batch, "rounds": args.rounds,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "pytorch_fid_images_per_s": [round(r, 3) for r in rates["pytorch_fid"]],
        "ours_images_per_s": [round(r, 3) for r in rates["ours"]],
        "speedup_per_round": [round(r, 3) for r in ratios],
        "speedup_median": round(statistics.median(ratios), 3),
        "speedup_best_vs_best": round(max(rates["ours"]) / max(rates["pytorch_fid"]), 3),
        "max_rel_diff_features": max_rel_diff,
        "features_equal_1e-4": max_rel_diff < 1e-4,
    }
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fid.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
