"""Every user error is one line: bad inputs to training (every rung), sample, fid and evaluate each end with exit
status 2 and one line on stderr, `dmd2.py: error: ...` naming the flag or path, no traceback and no usage dump;
nothing is downloaded, no work starts, and nothing on disk changes (each case runs in its own folder, snapshotted)."""
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

import dmd2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "dmd2.py: error: "
RELEASED = sorted(dmd2.DMD2_IMAGENET_RUNS)[0]
TRAINING = ("range", "type", "refused", "path")
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="about --device cuda on a machine without a GPU")


def train(dataset, *flags):
    """Training argv: the rung (None: the default one), the run folder inside the case's folder, then the flags."""
    return (["--dataset", dataset] if dataset else []) + ["--out_dir", "runs", *flags]


def group(name, *entries):
    """pytest.params (argv, expected substring), ids `name: argv` (without --dataset and --out_dir runs)."""
    label = lambda argv: " ".join(" ".join(argv).replace("--out_dir runs", "", 1).replace(RELEASED, "RELEASED")
                                  .replace("--dataset ", "" if name in TRAINING else "--dataset ").split())
    return [pytest.param(argv, expected, marks=marks, id=f"{name}: {label(argv)}")
            for argv, expected, *marks in entries]


RANGES = group(
    "range",
    (train("toy2d", "--ema_decay", "1.5"), "--ema_decay"),
    (train("shapes", "--ema_decay", "-0.1"), "--ema_decay"),
    (train("imagenet64", "--ema_decay", "1"), "--ema_decay"),
    (train("shapes", "--max_grad_norm", "-1"), "--max_grad_norm"),
    (train("cifar10", "--max_grad_norm", "0"), "--max_grad_norm"),
    (train("toy2d", "--teacher_iters", "0"), "--teacher_iters"),
    (train("shapes", "--teacher_iters", "0"), "--teacher_iters"),
    (train("toy2d", "--eval_samples", "3"), "--eval_samples"),
    (train("shapes", "--eval_samples", "3"), "--eval_samples"),
    (train("shapes", "--num_classes", "0"), "--num_classes"),
    (train("toy2d", "--num_classes", "5"), "--num_classes"),
    (train("shapes", "--num_classes", "5"), "--num_classes"),
    (train("imagenet64", "--diffusion_gan_max_timestep", "0"), "--diffusion_gan_max_timestep"),
    (train("sdxl", "--diffusion_gan_max_timestep", "1001"), "--diffusion_gan_max_timestep"),
    (train("toy2d", "--teacher_eval_steps", "0"), "--teacher_eval_steps"),
    (train("shapes", "--sigma_min", "-1"), "--sigma_min"),
    (train("imagenet64", "--sigma_max", "nan"), "--sigma_max"),
    (train("cifar10", "--sigma_min", "100"), "--sigma_min"),
    (train("shapes", "--rho", "0"), "--rho"),
    (train("toy2d", "--sigma_data", "0"), "--sigma_data"),
    (train("shapes", "--batch_size", "0"), "--batch_size"),
    (train("sd15", "--iters", "-5"), "--iters"),
    (train("shapes", "--generator_lr", "-1e-3"), "--generator_lr"),  # a negative number is a value, then refused
    (train("imagenet64", "--guidance_lr", "0"), "--guidance_lr"),
    (train("shapes", "--teacher_lr", "0"), "--teacher_lr"),
    (train("toy2d", "--log_every", "0"), "--log_every"),
    (train("cifar10", "--ckpt_every", "0"), "--ckpt_every"),
    (train("sdxl-1step", "--sample_every", "0"), "--sample_every"),
    (train("shapes", "--eval_batch", "0"), "--eval_batch"),
    (train("toy2d", "--teacher_batch", "0"), "--teacher_batch"),
    (train("imagenet64", "--warmup_steps", "-1"), "--warmup_steps"),
    (train("cifar10", "--num_workers", "-1"), "--num_workers"),
    (train("shapes", "--micro_batch", "3", "--batch_size", "32"), "--micro_batch"),
    (train("sd15-gan", "--dfake_gen_update_ratio", "0"), "--dfake_gen_update_ratio"),
    (train("toy2d", "--students", "0"), "--students"),
    (train("imagenet64", "--generator_steps", "0"), "--generator_steps"),
    (train("shapes", "--min_step_percent", "0.9", "--max_step_percent", "0.5"), "--min_step_percent"),
    (train("sdxl-1step", "--conditioning_timestep", "1000"), "--conditioning_timestep"),
    (train("shapes", "--cls_loss_weight", "-1"), "--cls_loss_weight"),
    (train("imagenet64", "--dm_loss_weight", "-1"), "--dm_loss_weight"),
    (train("toy2d", "--gen_cls_loss_weight", "-1"), "--gen_cls_loss_weight"),
    (train("sdxl-ode", "--regression_loss_weight", "-1"), "--regression_loss_weight"),
    (train("sdxl-ode", "--regression_loss", "foo"), "--regression_loss"),
    (train("shapes", "--precision", "fp8"), "--precision"),
    (train("toy2d", "--device", "gpu"), "--device"),
    (train("shapes", "--device", "cuda"), "--device cpu", NO_GPU),
    (train("imagenet64", "--engine", "zero3"), "--engine"),
    (train("toy2d", "--seed", "-1"), "--seed"),
    (train("sdxl", "--lora_rank", "4", "--lora_alpha", "0"), "--lora_alpha"),
    (train("sdxl", "--guidance_scale", "0.5"), "--guidance_scale"),
)

TYPES = group(  # argparse's own errors: one line too, no usage dump
    "type",
    (train("shapes", "--iters", "abc"), "--iters"),
    (train("toy2d", "--iters", "1.5"), "--iters"),
    (train("shapes", "--gan", "maybe"), "--gan"),
    (train("toy2d", "--students", "a"), "--students"),
    (train("shapes", "--teacher_arch", "{bad json"), "--teacher_arch"),
    (train("shapes", "--teacher_arch", "5"), "a JSON object"),  # valid JSON, but not the keyword arguments
    (train("toy2d", "--generator_lr"), "--generator_lr"),  # the value is missing at the end
    (train(None, "--no_such_flag", "1"), "--no_such_flag"),
    (train("mnist"), "mnist"),
    (train("cifar10", "--gen_cls_loss_weight", "often"), "--gen_cls_loss_weight"),
)

ARCH = '{"model_channels": 8}'
MISPLACED = group(  # flags that mean nothing on the rung (or without another flag) are refused, not ignored
    "refused",
    (train("toy2d", "--generator_steps", "4"), "--students"),
    (train("shapes", "--data_path", "x"), "--data_path"),
    (train("toy2d", "--teacher", "x.pkl"), "--teacher"),
    (train("shapes", "--num_workers", "2"), "--num_workers"),
    (train("toy2d", "--dist_timeout", "5"), "--dist_timeout"),
    (train("shapes", "--guidance_scale", "8"), "--guidance_scale"),
    (train("toy2d", "--model_id", "x"), "--model_id"),
    (train("shapes", "--tiny", "true"), "--tiny"),
    (train("toy2d", "--lora_rank", "4"), "--lora_rank"),
    (train("toy2d", "--teacher_arch", ARCH), "--teacher_arch"),
    (train("toy2d", "--precision", "bf16"), "--precision"),
    (train("toy2d", "--resolution", "16"), "--resolution"),
    (train("toy2d", "--channels_last", "true"), "--channels_last"),
    (train("toy2d", "--grad_checkpointing", "true"), "--grad_checkpointing"),
    (train("imagenet64", "--students", "1", "4"), "--students"),
    (train("cifar10", "--no_gan_student", "true"), "--no_gan_student"),
    (train("imagenet64", "--teacher_iters", "10"), "--teacher_iters"),
    (train("cifar10", "--teacher_batch", "8"), "--teacher_batch"),
    (train("imagenet64", "--teacher_lr", "2e-3"), "--teacher_lr"),
    (train("imagenet64", "--teacher_arch", ARCH), "--teacher_arch"),
    (train("cifar10", "--eval_samples", "500"), "--eval_samples"),
    (train("imagenet64", "--eval_batch", "10"), "--eval_batch"),
    (train("cifar10", "--teacher_eval_steps", "4"), "--teacher_eval_steps"),
    (train("imagenet64", "--regression_loss_weight", "0.25"), "--regression_loss_weight"),
    (train("sdxl", "--resolution", "32"), "--resolution"),
    (train("sdxl", "--num_classes", "5"), "--num_classes"),
    (train("sdxl-1step", "--sigma_min", "0.01"), "--sigma_min"),
    (train("sdxl", "--sigma_max", "10"), "--sigma_max"),
    (train("sd15", "--rho", "3"), "--rho"),
    (train("sdxl", "--students", "1", "4"), "--students"),
    (train("sd15", "--teacher", "x.pkl"), "--teacher"),
    (train("sdxl", "--num_workers", "2"), "--num_workers"),
    (train("sd15-gan", "--eval_samples", "500"), "--eval_samples"),
    (train("sdxl-ode", "--teacher_iters", "5"), "--teacher_iters"),
    (train("sdxl", "--lora_alpha", "16"), "--lora_alpha"),  # without --lora_rank
    (train("shapes", "--regression_pairs", "10"), "--regression_pairs"),  # without --regression_loss_weight
    (train("toy2d", "--regression_loss", "mse"), "--regression_loss"),
    (train("toy2d", "--students", "1", "--backward_simulation", "false"), "--backward_simulation"),
    (train("shapes", "--backward_simulation", "false"), "--backward_simulation"),
    (train("imagenet64", "--backward_simulation", "false"), "--backward_simulation"),
    (train("shapes", "--gan", "false", "--cls_loss_weight", "0.1"), "--cls_loss_weight"),
    (train("sd15", "--cls_loss_weight", "0.1"), "--cls_loss_weight"),  # sd15's preset has no GAN
    (train("imagenet64", "--gan", "false", "--diffusion_gan_max_timestep", "500"), "--diffusion_gan_max_timestep"),
    (train("toy2d", "--gen_cls_loss_weight", "0.01", "--gan", "false"), "--gen_cls_loss_weight"),
    (train("sdxl", "--fsdp_bf16_params", "true"), "--fsdp_bf16_params"),  # with the default --engine ddp
    (train("shapes", "--engine", "fsdp"), "--engine"),
)

PATHS = group(
    "path",
    (train("shapes", "--run_name", "../../x"), "--run_name"),
    (train("imagenet64", "--run_name", "a/b"), "--run_name"),
    (train("shapes", "--out_dir", "somefile.txt/runs"), "--out_dir"),
    (train("imagenet64", "--data_path", "missing.zip"), "missing.zip"),
    (train("imagenet64", "--generator_init", "missing.bin"), "missing.bin"),
    (train("shapes", "--generator_init", "missing.bin"), "missing.bin"),
    (train("shapes", "--generator_init", "somefile.txt"), "somefile.txt"),
    (train("sd15", "--guidance_init", "missing.bin"), "missing.bin"),
)

SAMPLE = group(
    "sample",
    (["sample", "--checkpoint", "checkpoint.pt", "--num", "0"], "--num"),
    (["sample", "--checkpoint", "checkpoint.pt", "--num", "-5"], "--num"),
    (["sample", "--checkpoint", "missing.pt"], "missing.pt"),
    (["sample", "--checkpoint", "corrupt.pt"], "corrupt.pt"),
    (["sample", "--checkpoint", "other.pt"], "other.pt"),
    (["sample", "--checkpoint", "checkpoint.pt", "--model", "dmd2-sd15"], "--checkpoint"),
    (["sample"], "--checkpoint"),
    (["sample", "--model", "dmd2-sd15"], "--prompt"),
    (["sample", "--model", "dmd2-sd15", "--prompt", "a cat", "--num", "0"], "--num"),
    (["sample", "--checkpoint", "checkpoint.pt", "--out", "existing.png"], "--overwrite"),
    (["sample", "--checkpoint", "checkpoint.pt", "--seed", "abc"], "--seed"),
    (["sample", "--model", "dmd2-sd15", "--prompt", "a cat", "--steps", "0"], "--steps"),
    (["sample", "--checkpoint", "checkpoint.pt", "--out", "somefile.txt/x.png"], "somefile.txt"),
)

FID = group(
    "fid",
    (["fid", "--images", "imgs", "--ref", "r.npz", "--batch", "0"], "--batch"),
    (["fid", "--images", "imgs", "--ref", "r.npz", "--batch", "-1"], "--batch"),
    (["fid", "--images", "imgs", "--ref", "r.npz", "--batch", "abc"], "--batch"),
    (["fid", "--images", "missing_dir", "--ref", "missing.npz"], "missing"),
    (["fid", "--images", "imgs", "--ref", "missing.npz"], "missing.npz"),
    (["fid", "--images", "missing_dir", "--ref", "r.npz"], "missing_dir"),
    (["fid", "--images", "imgs", "--ref", "corrupt.npz"], "corrupt.npz"),
    (["fid", "--images", "imgs"], "--ref"),
    (["fid", "--ref_from", "missing_data", "--out", "x.npz"], "missing_data"),
    (["fid", "--ref_from", "imgs"], "--out"),
    (["fid", "--images", "imgs", "--ref", "r.npz", "--ref_from", "imgs"], "--ref_from"),
    (["fid", "--images", "imgs", "--ref", "r.npz", "--mode", "foo"], "--mode"),
    (["fid", "--images", "imgs", "--ref", "r.npz", "--device", "cuda"], "--device", NO_GPU),
    (["fid", "--images", "imgs", "--ref", "r.npz", "--inception", "missing.pth"], "missing.pth"),
    (["fid", "--ref_from", "imgs", "--out", "existing.npz"], "--overwrite"),
    (["fid", "--ref_from", "imgs", "--out", "somefile.txt/x.npz"], "somefile.txt"),
    (["fid", "--images", "empty_dir", "--ref", "r.npz"], "empty_dir"),
)

EVALUATE = group(
    "evaluate",
    (["evaluate", "--generator", "checkpoint.pt", "--batch", "0"], "--batch"),
    (["evaluate", "--generator", "checkpoint.pt", "--num", "0"], "--num"),
    (["evaluate", "--generator", "checkpoint.pt", "--num", "-3"], "--num"),
    (["evaluate", "--released", "no_such_run"], "--released"),
    (["evaluate", "--generator", "missing.pt"], "missing.pt"),
    (["evaluate", "--generator", "corrupt.pt"], "corrupt.pt"),
    (["evaluate", "--generator", "other.pt"], "other.pt"),
    (["evaluate", "--model", "dmd2-sdxl"], "--coco"),
    (["evaluate", "--model", "dmd2-sdxl", "--coco", "missing_coco"], "missing_coco"),
    (["evaluate", "--model", "dmd2-sdxl", "--grid", "g.png"], "--grid"),
    (["evaluate", "--released", RELEASED, "--coco", "c"], "--coco"),
    (["evaluate", "--generator", "checkpoint.pt", "--released", RELEASED], "--released"),
    (["evaluate", "--dataset", "mnist", "--generator", "checkpoint.pt"], "mnist"),
    (["evaluate", "--generator", "checkpoint.pt", "--ref", "missing.npz"], "missing.npz"),
    (["evaluate", "--generator", "checkpoint.pt", "--dataset", "cifar10", "--inception", "missing.pth"],
     "missing.pth"),
    (["evaluate", "--model", "images", "--out", "missing_dir", "--coco", "missing_coco"], "missing"),
)

CASES = RANGES + TYPES + MISPLACED + PATHS + SAMPLE + FID + EVALUATE


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory):
    """checkpoint.pt of a real (tiny) toy2d run, made once."""
    folder = tmp_path_factory.mktemp("toy2d_run")
    dmd2.main(["--dataset", "toy2d", "--teacher_iters", "20", "--iters", "2", "--students", "1", "--no_gan_student",
               "false", "--gen_cls_loss_weight", "3e-3", "--eval_samples", "400", "--eval_batch", "400",
               "--teacher_eval_steps", "2", "--out_dir", str(folder), "--cache_dir", str(folder / "cache")])
    return folder / "toy2d" / "student_1step" / "checkpoint.pt"


def write_png(path, value=128):
    PIL.Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(path)


def make_files(folder, argv, request):
    """The files a case names (by the first component of an argument): made before the snapshot."""
    def images(path):
        path.mkdir()
        for i in range(3):
            write_png(path / f"{i}.png", 60 * i)

    makers = {
        "somefile.txt": lambda p: p.write_text("a regular file, not a folder nor a checkpoint\n"),
        "corrupt.pt": lambda p: p.write_bytes(b"\x00garbage, not a torch file" * 50),
        "corrupt.npz": lambda p: p.write_bytes(b"\x00garbage, not an npz file" * 50),
        "other.pt": lambda p: torch.save({"w": torch.zeros(1)}, p),
        "existing.png": write_png,
        "existing.npz": lambda p: np.savez(p, mu=np.zeros(3)),
        "r.npz": lambda p: np.savez(p, mu=np.zeros(2048), sigma=np.eye(2048)),
        "imgs": images,
        "empty_dir": lambda p: p.mkdir(),
        "checkpoint.pt": lambda p: shutil.copy(request.getfixturevalue("run_checkpoint"), p),
    }
    for name in {arg.split("/")[0] for arg in argv} & set(makers):
        makers[name](folder / name)


def snapshot(root):
    """relative path -> (size, mtime_ns, sha256) of every file, "folder" for every folder under root."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            tree[os.path.relpath(os.path.join(dirpath, name), root)] = "folder"
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            stat = os.stat(path)
            tree[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns, digest)
    return tree


def refuse(*args, **kwargs):
    pytest.fail("download attempted")


def work(*args, **kwargs):
    pytest.fail("work (data, teacher, training) started before the error")


def one_line_error(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        dmd2.cli(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(PREFIX), lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in captured.err and "usage:" not in captured.err
    return captured.out


@pytest.mark.parametrize("argv, expected", CASES)
def test_bad_input_is_one_line_and_changes_nothing(argv, expected, tmp_path, monkeypatch, capsys, request):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DMD2_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DMD2_DEBUG", raising=False)
    make_files(tmp_path, argv, request)
    for name in ("download_cached", "download_dmd2"):
        monkeypatch.setattr(dmd2, name, refuse)
    for name in ("shapes_dataset", "embedded_teacher", "run_training", "t2i_parts"):
        monkeypatch.setattr(dmd2, name, work)
    before = snapshot(tmp_path)
    capsys.readouterr()  # what making the files printed
    out = one_line_error(argv, expected, capsys)
    assert out == "", out  # every case here is refused before any work, so before any progress line
    assert snapshot(tmp_path) == before


def test_there_are_many_cases_over_every_rung_and_subcommand():
    assert len(CASES) >= 100
    argvs = [p.values[0] for p in CASES]
    rungs = {argv[argv.index("--dataset") + 1] for argv in argvs if argv[0] not in ("sample", "fid", "evaluate")
             and "--dataset" in argv}
    assert set(dmd2.PRESETS) <= rungs
    assert {argv[0] for argv in argvs} >= {"sample", "fid", "evaluate"}
    assert len({p.id for p in CASES}) == len(CASES)  # the ids name each case


@pytest.mark.parametrize("argv, expected", [
    (train("toy2d", "--ema_decay", "1.5"), "--ema_decay"),
    (train("shapes", "--iters", "abc"), "--iters"),
    (["evaluate", "--released", "no_such_run"], "--released"),
], ids=["range", "type", "evaluate"])
def test_script_exit_status_and_one_line(argv, expected, tmp_path):
    argv = [os.path.join(tmp_path, a) if a == "runs" else a for a in argv]
    env = dict(os.environ, HF_HUB_OFFLINE="1", DMD2_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop("DMD2_DEBUG", None)
    done = subprocess.run([sys.executable, "dmd2.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and expected in lines[0], done.stderr
    assert os.listdir(tmp_path) == []
