"""Multi-seed sweep behind notebooks 02 (Table 3) and 03 (Table 4): every ablation row on `toy2d`, five or more
student seeds, evaluated along the way; results to benchmarks/results/ablations.json, which the notebooks read.

    python benchmarks/ablations.py run [--workers 2] [--seeds 10 11 12 13 14]   # trains (resumable), one thread each
    python benchmarks/ablations.py merge                                        # parts -> results/ablations.json

Every row is a set of flags of `python dmd2.py --dataset toy2d` (ROWS below). All rows share the teacher (trained
with seed 10, cached) and the evaluation noise; the seed of a row sets the student's noise, labels and data order
(the networks all start as copies of the teacher). Each run is evaluated on its generator EMA every EVAL_EVERY
critic iterations (`dmd2.distil` resumes the run folder exactly, so the curve costs no extra training), and at the
same points the fake score's error against the exact denoiser of the generator's current distribution is measured
(`fake_score_error`). Loss curves are read from each run's log (dmd2.read_log) and binned.

The functions here (ROWS, mode_balance, fake_score_error, paired_test) are also what the notebooks call.
"""
import argparse
import dataclasses
import glob
import json
import os
import platform
import shutil
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dmd2  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "ablations.json")
PARTS = os.path.join(ROOT, "runs", "ablations", "parts")
SEEDS = [10, 11, 12, 13, 14]
EMA = ["--ema_decay", "0.98"]  # every row of both tables evaluates its generator EMA (official: none; README)
# For the CPU budget of a shared 2-core machine (five seeds x ten rows), every row trains on batches of 128 instead
# of the preset's 256, and writes no sample grids (a row's samples are the notebooks' to show).
BUDGET = ["--batch_size", "128", "--sample_every", "1000000"]
GAN_ONLY = "--dm_loss_weight 0 --gen_cls_loss_weight 3e-3"  # auto needs a DM term; official ImageNet value
TABLES = {
    # Table 3 (ImageNet-64, one step): row -> (flags on top of --dataset toy2d --students 1, paper FID)
    "table3": dict(iters=1000, eval_every=250, base=["--students", "1"], rows={
        "DMD": ("--dfake_gen_update_ratio 1 --gan false --regression_loss_weight 0.25 --regression_pairs 4000 "
                "--regression_loss mse", 2.62),  # LPIPS has no meaning for 2-D points
        "w/o regression": ("--dfake_gen_update_ratio 1 --gan false", 3.48),
        "+ TTUR": ("--dfake_gen_update_ratio 5 --gan false", 2.61),
        "+ TTUR + GAN (DMD2)": ("--dfake_gen_update_ratio 5 --gan true", 1.51),
        "GAN only": (f"--dfake_gen_update_ratio 1 {GAN_ONLY}", 2.56),
        "GAN only + TTUR": (f"--dfake_gen_update_ratio 5 {GAN_ONLY}", 2.52),
    }),
    # Table 4 (SDXL, four steps): row -> (flags on top of --dataset toy2d --generator_steps 4, paper FID / patch FID
    # / CLIP)
    "table4": dict(iters=800, eval_every=200, base=["--generator_steps", "4", "--students", "4"], rows={
        "DMD2, 4 steps": ("", (19.32, 20.86, 0.332)),
        "w/o GAN": ("--gan false", (26.90, 27.66, 0.328)),
        "w/o distribution matching": (GAN_ONLY, (13.77, 27.96, 0.307)),
        "w/o backward simulation": ("--backward_simulation false", (20.66, 24.21, 0.332)),
    }),
}
LOSS_KEYS = ("loss_dm", "loss_fake", "loss_gan_g", "loss_gan_d", "loss_reg")
ERROR_SIGMAS = (0.1, 0.3, 1.0)


def config(table, row, seed, iters=None, out_dir=None, extra=()):
    spec = TABLES[table]
    flags = ["--dataset", "toy2d", *spec["base"], *EMA, *BUDGET, "--seed", str(seed), "--iters", str(iters or spec["iters"]),
             "--out_dir", out_dir or os.path.join(ROOT, "runs"), *spec["rows"][row][0].split(), *extra]
    return dmd2.parse_config(flags)


def folder(cfg_out, table, row, seed):
    return os.path.join(cfg_out, "toy2d", f"ablations_{table}", f"{row.replace('/', '').replace(' ', '_')}_seed{seed}")


def mode_balance(samples, labels):
    """Share of each class's samples in its less-visited mode (class c owns modes c and c + 4), mean over the four
    classes: 0.5 for a generator that splits every class evenly, 0 when it drops one mode of each class."""
    mode = torch.cdist(samples, dmd2.TOY2D_MODES).argmin(dim=1)
    shares = []
    for c in range(4):
        in_class = mode[labels == c]
        a, b = (in_class == c).sum().item(), (in_class == c + 4).sum().item()
        shares.append(min(a, b) / max(a + b, 1))
    return float(np.mean(shares))


@torch.no_grad()
def fake_score_error(distiller, sigmas=ERROR_SIGMAS, n_ref=4000, n_query=500, seed=0):
    """How well the fake score knows the generator's CURRENT distribution, per noise level sigma: the RMS distance
    between the fake score's denoiser D_fake(x_t) and the exact denoiser of that distribution, at x_t = a fresh
    generator sample + sigma * noise. In 2-D the exact denoiser is computable: for a set of n_ref generator samples
    x_i, E[x_0 | x_t] = sum_i softmax_i(-|x_t - x_i|^2 / 2 sigma^2) x_i. Also returned: the RMS distance of the
    teacher's denoiser from it, the size of the signal the DM gradient (D_real - D_fake) is meant to carry.
    Uses the raw generator (the one the fake score is trained on), class by class."""
    g = torch.Generator().manual_seed(seed)
    gen = distiller.generator.eval()
    out = {}
    for sigma in sigmas:
        err, signal = [], []
        for c in range(4):
            labels = torch.full((n_ref + n_query,), c)
            noise = torch.randn(n_ref + n_query, 2, generator=g)
            x = dmd2.sample_student(gen, noise, labels, distiller.step_sigmas, distiller.conditions, batch=4500)
            ref, x0 = x[:n_ref], x[n_ref:]
            x_t = x0 + sigma * torch.randn(x0.shape, generator=g)
            weights = torch.softmax(-torch.cdist(x_t, ref) ** 2 / (2 * sigma ** 2), dim=1)
            exact = weights @ ref
            y = dmd2.onehot(torch.full((n_query,), c), 4)
            s = torch.full((n_query,), float(sigma))
            err.append((distiller.fake_score(x_t, s, y) - exact).square().sum(1))
            signal.append((distiller.real_score(x_t, s, y) - exact).square().sum(1))
        out[str(sigma)] = dict(fake_error=float(torch.cat(err).mean().sqrt()),
                               teacher_minus_exact=float(torch.cat(signal).mean().sqrt()))
    gen.train()
    return out


def paired_test(a, b, lower_is_better=True, n_min=5):
    """The separation test of notebooks 02 and 03, over seeds paired by seed number: row a is "better" than row b in
    a metric when it is better in EVERY seed (one-sided sign test p = 2^-n, 0.031 for five seeds) AND the paired
    t statistic of the differences is beyond the two-sided 5% quantile (t > 2.776 for five seeds); "worse" likewise;
    otherwise "not separated". b may be a single number (the teacher, one deterministic row). Returns (verdict, mean
    difference a - b, smallest |difference| over the seeds (the margin), t statistic, number of pairs)."""
    from scipy import stats
    a = np.asarray(a, dtype=float)
    b = np.broadcast_to(np.asarray(b, dtype=float), a.shape)
    d = a - b
    n = len(d)
    sd = d.std(ddof=1) if n > 1 else float("nan")
    t = d.mean() / (sd / np.sqrt(n)) if n > 1 and sd > 0 else (np.inf * np.sign(d.mean()) if n > 1 else np.nan)
    crit = stats.t.ppf(0.975, n - 1) if n > 1 else np.inf
    verdict = "not separated"
    if n >= n_min and (np.all(d < 0) or np.all(d > 0)) and abs(t) > crit:
        verdict = "better" if (d.mean() < 0) == lower_is_better else "worse"
    return verdict, float(d.mean()), float(np.abs(d).min()), float(t), n


def binned_losses(records, width):
    """Loss curves of one run's log, as the mean of each key over bins of `width` iterations."""
    out = {}
    for key in LOSS_KEYS:
        pts = [(r["step"], r[key]) for r in records if key in r]
        if not pts:
            continue
        steps, values = np.array(pts).T
        bins = (steps // width).astype(int)
        out[key] = [[int((b + 0.5) * width), float(values[bins == b].mean())] for b in np.unique(bins)]
    return out


def run_one(rung, table, row, seed):
    spec = TABLES[table]
    cfg = config(table, row, seed)
    run_dir = folder(cfg.out_dir, table, row, seed)
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished job starts over: a checkpoint past a milestone would
    t0, c0 = time.time(), time.process_time()   # be reloaded as it is and evaluated under the milestone's name
    curve, errors = [], []
    for iters in range(spec["eval_every"], spec["iters"] + 1, spec["eval_every"]):
        result, samples, distiller = dmd2.distil(dataclasses.replace(cfg, iters=iters), rung, run_dir, name=row)
        result.update(iters=iters, balance=mode_balance(samples, rung.eval_labels))
        result.pop("images_per_s", None)
        curve.append(result)
        if table == "table3":
            errors.append(dict(iters=iters, **fake_score_error(distiller)))
    records = dmd2.read_log(os.path.join(run_dir, "log.jsonl"))
    return dict(table=table, row=row, seed=seed, final=curve[-1], curve=curve, fake_score_error=errors,
                losses=binned_losses(records, 100), gan_weight=distiller.gan_weight,
                wall_s=round(time.time() - t0, 1), cpu_s=round(time.process_time() - c0, 1))


def jobs(seeds):
    return [(t, r, s) for s in seeds for t in TABLES for r in TABLES[t]["rows"]]


def part_path(table, row, seed):
    return os.path.join(PARTS, f"{table}_{row.replace('/', '').replace(' ', '_')}_seed{seed}.json")


def run(seeds):
    torch.set_num_threads(1)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.makedirs(PARTS, exist_ok=True)
    rung = dmd2.embedded_rung(config("table3", "DMD", 10))  # the shared teacher (seed 10) and evaluation noise
    for table, row, seed in jobs(seeds):
        path = part_path(table, row, seed)
        try:  # claim the job: several workers share the list
            os.close(os.open(path + ".claim", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        result = run_one(rung, table, row, seed)
        with open(path, "w") as f:
            json.dump(result, f)
        print(f"{table} {row} seed {seed}: SWD {result['final']['SWD']:.4f} ({result['cpu_s']:.0f} s CPU, "
              f"{result['wall_s']:.0f} s wall)", flush=True)


def merge():
    torch.set_num_threads(1)
    rung = dmd2.embedded_rung(config("table3", "DMD", 10))
    teacher, teacher_samples = dmd2.evaluate_teacher(rung)
    teacher.update(balance=mode_balance(teacher_samples, rung.eval_labels))
    floor = dmd2.floor_row(rung)
    floor.update(balance=mode_balance(*rung.floor_data))
    runs = [truncated(json.load(open(p))) for p in sorted(glob.glob(os.path.join(PARTS, "*.json")))]
    out = dict(
        about="written by benchmarks/ablations.py (python benchmarks/ablations.py run; merge)",
        machine=dict(cpu=cpu_name(), cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                     threads_per_run=1),
        tables={t: dict(iters=s["iters"], eval_every=s["eval_every"], base=s["base"] + EMA + BUDGET,
                        rows={r: dict(flags=f, paper=p) for r, (f, p) in s["rows"].items()})
                for t, s in TABLES.items()},
        teacher={k: v for k, v in teacher.items() if k != "images_per_s"},
        floor={k: v for k, v in floor.items() if k not in ("images_per_s", "NFE")},
        runs=sorted(runs, key=lambda r: (r["table"], list(TABLES[r["table"]]["rows"]).index(r["row"]), r["seed"])))
    with open(RESULTS, "w") as f:
        json.dump(out, f, indent=0)
    print(f"{len(runs)} runs -> {RESULTS}; CPU total {sum(r['cpu_s'] for r in runs) / 60:.1f} min")


def truncated(run):
    """A run trained past its table's `iters` (e.g. by an earlier, longer setting of TABLES) cut to it: the
    trajectory up to there is the same, the learning rate being constant after its warm-up."""
    limit = TABLES[run["table"]]["iters"]
    run["curve"] = [c for c in run["curve"] if c["iters"] <= limit]
    run["fake_score_error"] = [e for e in run["fake_score_error"] if e["iters"] <= limit]
    run["losses"] = {k: [p for p in v if p[0] < limit] for k, v in run["losses"].items()}
    run["trained_iters"] = run["final"]["iters"]
    run["final"] = run["curve"][-1]
    return run


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["run", "merge"])
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if args.what == "merge":
        merge()
    elif args.workers > 1:
        import subprocess
        procs = [subprocess.Popen([sys.executable, __file__, "run", "--seeds", *map(str, args.seeds)])
                 for _ in range(args.workers)]
        sys.exit(max(p.wait() for p in procs))
    else:
        run(args.seeds)


# ---------------------------------------------------------------------------------------------------------------
# Reading the results (the notebooks' side)

PRIMARY = {"SWD": True, "MMD": True, "accuracy": False}  # metric -> lower is better


def load(table, path=RESULTS):
    """(results, {row: [run dicts ordered by seed]}) of one table of the stored sweep."""
    with open(path) as f:
        results = json.load(f)
    rows = {row: sorted((r for r in results["runs"] if r["table"] == table and r["row"] == row),
                        key=lambda r: r["seed"]) for row in results["tables"][table]["rows"]}
    return results, rows


def final_values(runs, key):
    return np.array([r["final"][key] for r in runs], dtype=float)


def mean_sd(values):
    """'mean ± sample std (ddof=1)'."""
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.4g} ± {values.std(ddof=1):.2g}" if len(values) > 1 else f"{values.mean():.4g}"


def compare(runs_a, runs_b, key):
    """paired_test of row a against row b (a list of runs, paired by seed, or a dict: the teacher's row)."""
    lower = PRIMARY.get(key, key != "balance")
    a = final_values(runs_a, key)
    if isinstance(runs_b, dict):
        return paired_test(a, runs_b[key], lower)
    by_seed = {r["seed"]: r["final"][key] for r in runs_b}
    seeds = [r["seed"] for r in runs_a if r["seed"] in by_seed]
    return paired_test([r["final"][key] for r in runs_a if r["seed"] in by_seed], [by_seed[s] for s in seeds], lower)


def agreement(paper, verdicts):
    """Whether the verdicts in the metrics mapped onto a paper metric go the paper's way. paper: 'better', 'worse'
    or 'level' (row a against row b in the paper's numbers); verdicts: paired_test verdicts."""
    if paper == "level":
        return "as the paper (not separated)" if all(v == "not separated" for v in verdicts) else \
            "not as the paper (separated: " + ", ".join(v for v in verdicts if v != "not separated") + ")"
    if all(v == paper for v in verdicts):
        return "as the paper, separated"
    if any(v not in ("not separated", paper) for v in verdicts):
        return "opposite to the paper"
    if any(v == paper for v in verdicts):
        return "as the paper in part (the other metric not separated)"
    return "not separated"
