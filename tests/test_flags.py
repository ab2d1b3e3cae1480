"""No silent flag: every Config field is read by the run it is given to or refused by check_config; Ctrl-C and
SIGTERM lose nothing (a checkpoint at the next iteration boundary, then one line; the re-run resumes bit-identically)."""
import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import dmd2
import edm_net
from official_format import write_edm_pickle
from test_edm_path import write_dataset_zip
from test_t2i import write_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = [f.name for f in dataclasses.fields(dmd2.Config)]
TINY = ["--iters", "2", "--warmup_steps", "0", "--batch_size", "4"]
EMBEDDED = [*TINY, "--teacher_iters", "3", "--teacher_batch", "8", "--teacher_eval_steps", "2", "--students", "1",
            "--eval_samples", "200", "--eval_batch", "200", "--gen_cls_loss_weight", "3e-3"]


def rung_argv(rung, tmp_path):
    """A tiny run of each kind of rung: embedded, EDM (official-format pickle and zip), text-to-image (--tiny)."""
    if rung in ("toy2d", "shapes"):
        return ["--dataset", rung, *EMBEDDED, "--out_dir", str(tmp_path)]
    if rung == "imagenet64":
        torch.manual_seed(0)
        teacher = edm_net.EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, model_type="DhariwalUNet",
                                     model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
        write_edm_pickle(teacher, str(tmp_path / "t.pkl"))
        write_dataset_zip(tmp_path / "d.zip", 4, 16, 10)
        return ["--dataset", rung, *TINY, "--teacher", str(tmp_path / "t.pkl"), "--data_path", str(tmp_path / "d.zip"),
                "--resolution", "16", "--num_classes", "10", "--num_workers", "0", "--out_dir", str(tmp_path)]
    folder = str(write_folder(tmp_path / "data", n=4))
    argv = ["--dataset", rung, "--tiny", "true", "--data_path", folder, "--precision", "fp32", *TINY[:4],
            "--batch_size", "2", "--out_dir", str(tmp_path)]
    if rung == "sdxl-ode":
        argv += ["--regression_pairs", "4", "--teacher_eval_steps", "2", "--regression_loss", "mse", "--eval_batch",
                 "4", "--cache_dir", str(tmp_path / "cache")]
    return argv


def perturbed(cfg, name):
    """A valid value other than the preset's for the field `name`."""
    value = getattr(cfg, name)
    special = dict(gen_cls_loss_weight=0.01, device="cpu", precision="fp32" if value == "bf16" else "bf16",
                   engine="fsdp", regression_loss="mse", guidance_scale=cfg.guidance_scale + 1, students=[1, 2],
                   teacher_arch={"model_channels": 8})
    if name in special:
        return special[name]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value // 2 if value > 1 else value + 1
    if isinstance(value, float):
        return 1.0 if value == float("inf") else value / 2 if value > 0 else 0.5
    return "other"


@pytest.mark.parametrize("rung", ["toy2d", "shapes", "imagenet64", "sdxl", "sdxl-ode", "sd15"])
def test_every_flag_is_read_by_the_run_or_refused(rung, tmp_path, monkeypatch):
    """A tiny run records which Config fields the run reads after check_config (dataclasses.asdict and replace do not
    count, nor a field that replace() overrides: the embedded main job sets generator_steps per student). Each field
    it never reads, set to another valid value, must be refused by check_config in a line naming it: a flag the run
    would ignore can't pass silently. (Reading is what this test can see; fields read only in a branch that makes
    them moot, e.g. --grad_checkpointing on toy2d's MLP, are refused by the rules it does not reach.)"""
    read, recording = set(), [False]

    class Recorded(dmd2.Config):
        def __getattribute__(self, name):
            if recording[0] and name in FIELDS and name not in object.__getattribute__(self, "__dict__").get(
                    "_overridden", ()):
                read.add(name)
            return object.__getattribute__(self, name)

    def paused(fn):
        def call(*args, **kwargs):
            on, recording[0] = recording[0], False
            try:
                return fn(*args, **kwargs)
            finally:
                recording[0] = on
        return call

    replace, check = dataclasses.replace, dmd2.check_config

    def replace_recorded(obj, **changes):
        new = paused(replace)(obj, **changes)
        new.__dict__["_overridden"] = set(changes) | obj.__dict__.get("_overridden", set())
        return new

    def check_then_record(cfg):
        check(cfg)
        recording[0] = True

    monkeypatch.setattr(dataclasses, "replace", replace_recorded)
    monkeypatch.setattr(dataclasses, "asdict", paused(dataclasses.asdict))
    monkeypatch.setattr(dmd2, "Config", Recorded)
    monkeypatch.setattr(dmd2, "check_config", check_then_record)
    argv = rung_argv(rung, tmp_path)
    dmd2.main(argv)
    recording[0] = False
    monkeypatch.undo()
    unread = [name for name in FIELDS if name not in read]
    assert {"iters", "batch_size", "seed"} <= read  # the recording saw the run
    base = dmd2.parse_config(argv)
    silent = []
    for name in unread:
        cfg = dataclasses.replace(base, **{name: perturbed(base, name)})
        try:
            dmd2.check_config(cfg)
            silent.append(name)
        except SystemExit as e:
            if f"--{name}" not in str(e):
                silent.append(f"{name} (refused, but the line does not name it: {e})")
    assert not silent, f"{rung}: flags the run ignores without a word: {silent}"


@pytest.mark.parametrize("argv, expected", [
    (["--dataset", "toy2d", "--generator_steps", "4"], "use --students 4"),
    (["--dataset", "shapes", "--generator_steps", "2"], "use --students 4"),
    (["--dataset", "toy2d", "--generator_init", "/nonexistent/g.bin"], "--generator_init /nonexistent/g.bin: no such"),
    (["--dataset", "shapes", "--guidance_init", "/nonexistent/f.bin"], "--guidance_init /nonexistent/f.bin: no such"),
    (["--dataset", "toy2d", "--iters", "50"], "--gen_cls_loss_weight auto is measured over the first 10"),
    (["--dataset", "toy2d", "--grad_checkpointing", "true"], "--grad_checkpointing: toy2d's networks are fp32 MLPs"),
    (["--dataset", "imagenet64", "--students", "1", "4"], "--students: only for the embedded main job"),
])
def test_named_flags_are_refused_where_they_mean_nothing(argv, expected):
    with pytest.raises(SystemExit, match="config error") as e:
        dmd2.check_config(dmd2.parse_config(argv))
    assert expected in str(e.value)


def test_compile_is_honoured_by_the_embedded_teacher(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(dmd2, "compile_networks", lambda *nets, **kw: compiled.extend(nets))
    cfg = dmd2.parse_config(["--dataset", "toy2d", "--teacher_iters", "2", "--compile", "true",
                             "--cache_dir", str(tmp_path)])
    dmd2.embedded_teacher(cfg, dmd2.Toy2DBatches(8, 0), (2,), torch.device("cpu"))
    assert len(compiled) == 1 and isinstance(compiled[0], dmd2.ToyDenoiser)


def test_help_shows_the_preset_values(capsys):
    with pytest.raises(SystemExit) as e:
        dmd2.cli(["--dataset", "toy2d", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "critic iterations (official ImageNet run: ~200k) (default: 2000)" in out  # toy2d's, not Config's 300
    assert "(default: [1, 4])" in out and "Subcommands: sample, evaluate, fid" in out
    assert all(name in out for name in dmd2.PRESETS)


# --- interrupts ---------------------------------------------------------------------------------------------------

def toy2d_argv(out, cache, iters=8):
    return ["--dataset", "toy2d", "--teacher_iters", "20", "--iters", str(iters), "--students", "1",
            "--no_gan_student", "false", "--gen_cls_loss_weight", "3e-3", "--eval_samples", "400", "--eval_batch",
            "400", "--teacher_eval_steps", "2", "--ckpt_every", "100", "--out_dir", str(out), "--cache_dir",
            str(cache)]


def interrupt_at(monkeypatch, module, name, when):
    """Wrap module.name so that its call number `when` (1-based) is followed by a SIGINT to this process."""
    original, calls = getattr(module, name), [0]

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == when:
            signal.raise_signal(signal.SIGINT)
        return result
    monkeypatch.setattr(module, name, wrapped)


def states_equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return a == b


def interrupted_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        dmd2.cli(argv)
    assert e.value.code == 128 + signal.SIGINT
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_ctrl_c_in_training_checkpoints_and_the_rerun_resumes_bit_identically(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    dmd2.main(toy2d_argv(tmp_path / "straight", tmp_path / "cache"))
    with monkeypatch.context() as patch:
        interrupt_at(patch, dmd2.Distiller, "train_step", 3)
        line = interrupted_line(toy2d_argv(tmp_path / "cut", tmp_path / "cache"), capsys)
    run = tmp_path / "cut" / "toy2d" / "student_1step"
    assert line == f"dmd2.py: interrupted at iteration 3 of {run}; run the same command to resume"
    assert torch.load(run / "checkpoint.pt", weights_only=True)["distiller"]["step"] == 3  # ckpt_every is 100
    dmd2.main(toy2d_argv(tmp_path / "cut", tmp_path / "cache"))
    done = [torch.load(root / "toy2d" / "student_1step" / "checkpoint.pt", weights_only=True)
            for root in (tmp_path / "straight", run.parent.parent)]
    assert done[0]["distiller"]["step"] == 8 and states_equal(done[0]["distiller"], done[1]["distiller"])
    logs = [[json.loads(line) for line in open(root / "toy2d" / "student_1step" / "log.jsonl")]
            for root in (tmp_path / "straight", tmp_path / "cut")]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]]


def test_ctrl_c_in_the_embedded_teacher_resumes_bit_identically(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    dmd2.main(toy2d_argv(tmp_path / "a", tmp_path / "straight"))
    argv = toy2d_argv(tmp_path / "b", tmp_path / "cut")
    with monkeypatch.context() as patch:
        interrupt_at(patch, dmd2, "denoising_loss", 7)
        line = interrupted_line(argv, capsys)
    assert line == "dmd2.py: interrupted at teacher iteration 7; run the same command to resume"
    partial = [name for name in os.listdir(tmp_path / "cut") if name.endswith(".partial")]
    assert len(partial) == 1 and torch.load(tmp_path / "cut" / partial[0], weights_only=True)["step"] == 7
    dmd2.main(argv)
    assert "training the toy2d teacher: 20 iterations, from 7" in capsys.readouterr().out
    teachers = [[name for name in sorted(os.listdir(tmp_path / cache)) if name.startswith("teacher-toy2d")]
                for cache in ("straight", "cut")]
    assert teachers[0] == teachers[1] and len(teachers[0]) == 1  # the partial state is gone
    saved = [torch.load(tmp_path / cache / teachers[0][0], weights_only=True) for cache in ("straight", "cut")]
    assert states_equal(*saved)


def test_sigterm_to_the_script_checkpoints_with_one_line(tmp_path):
    """The real signal path: `python dmd2.py` is sent SIGTERM while its student trains."""
    argv = toy2d_argv(tmp_path / "runs", tmp_path / "cache", iters=100_000)
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "dmd2.py", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "a 1-step student" in line:
            break
    log = tmp_path / "runs" / "toy2d" / "student_1step" / "log.jsonl"
    while not (log.exists() and log.read_text().count("\n") >= 2):  # training is under way
        assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dmd2.py: interrupted at iteration "), err
    step = int(lines[0].split("iteration ")[1].split()[0])
    assert torch.load(log.parent / "checkpoint.pt", weights_only=True)["distiller"]["step"] == step > 0
