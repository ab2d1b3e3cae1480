"""The command line's one error path: every user error is one line on stderr naming the cause and the fix, exit
status 2, no traceback unless DMD2_DEBUG is set."""
import os
import subprocess
import sys

import pytest
import torch

import dmd2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def error_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dmd2.cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.parametrize("argv, expected", [
    (["--precision", "fp8"], "--precision fp8 is not one of auto, bf16, fp32"),
    (["--batch_size", "0"], "--batch_size 0 must be a positive integer"),
    (["--iters", "-5"], "--iters -5 must be a positive integer"),
    (["--generator_lr", "0"], "--generator_lr 0.0 must be a finite number > 0"),
    (["--max_step_percent", "1.5"], "0 <= min < max <= 1"),
    (["--device", "gpu"], "--device gpu is not one of"),
    (["--dataset", "imagenet64", "--data_path", "/nonexistent/imagenet.zip"], "imagenet.zip not found"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--no_such_flag", "1"], "unrecognized arguments"),
    (["--guidance_scale", "8"], "--guidance_scale: only for text-to-image teachers"),
    (["--dataset", "imagenet64", "--lora_rank", "4", "--tiny", "true"], "--tiny, --lora_rank: only for text-to-image"),
    (["--dataset", "sdxl", "--lora_rank", "-1"], "--lora_rank -1 must be >= 0"),
    (["--dataset", "sdxl", "--fsdp_bf16_params", "true"], "--fsdp_bf16_params is for sharded text-to-image runs"),
    (["--dataset", "imagenet64", "--engine", "zero3"], "--engine zero3 is not one of ddp, fsdp, hsdp"),
    (["--dataset", "sdxl-1step", "--conditioning_timestep", "1000"], "--conditioning_timestep 1000 is not a grid level"),
    (["--dataset", "sdxl", "--tiny", "true"], "no such folder (--data_path wants a folder of images with .txt"),
    (["--dataset", "sd15", "--tiny", "true", "--data_path", "/nonexistent"], "/nonexistent: no such folder"),
])
def test_user_errors_are_one_line_with_status_2(argv, expected, capsys, tmp_path):
    assert expected in error_line(argv + ["--out_dir", str(tmp_path)], capsys)


def test_sample_refuses_files_that_are_not_run_checkpoints(tmp_path, capsys):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a torch file")
    line = error_line(["sample", "--checkpoint", str(tmp_path / "other.pt")], capsys)
    assert "not a dmd2.py run checkpoint" in line
    line = error_line(["sample", "--checkpoint", str(tmp_path / "corrupt.pt")], capsys)
    assert "not a readable DMD2 checkpoint" in line and "checkpoint.pt of a dmd2.py run folder" in line
    assert "--run_name" not in line  # the training fix is not offered to someone sampling
    assert "no such checkpoint" in error_line(["sample", "--checkpoint", str(tmp_path / "none.pt")], capsys)
    assert "sample --model needs --prompt" in error_line(["sample", "--model", "dmd2-sd15"], capsys)


def test_debug_variable_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("DMD2_DEBUG", "1")
    with pytest.raises(RuntimeError, match="not a readable DMD2 checkpoint"):
        dmd2.cli(["sample", "--checkpoint", __file__])


def test_script_exit_status_and_stderr():
    done = subprocess.run([sys.executable, "dmd2.py", "--batch_size", "0"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == "dmd2.py: error: config error: --batch_size 0 must be a positive integer"


@pytest.mark.parametrize("argv, expected", [
    (["evaluate", "--model", "dmd2-sdxl", "--grid", "g.png"], "--grid: not with --model"),
    (["evaluate", "--released", sorted(dmd2.DMD2_IMAGENET_RUNS)[0], "--coco", "c", "--steps", "2"],
     "--coco, --steps: not with --released / --generator"),
    (["evaluate", "--model", "dmd2-sdxl"], "evaluate --model needs --coco DIR"),
    (["evaluate", "--model", "dmd2-sdxl", "--generator", "g.pt"], "not allowed with argument"),
    (["fid", "--ref_from", "/nonexistent/data", "--cache_dir", "/nonexistent/cache"], "use either --images"),
])
def test_subcommands_have_one_parser_each_and_refuse_flags_of_the_other_protocol(argv, expected, capsys):
    """`evaluate` is one parser (no argv sniffing): the flags of the other protocol are refused, not ignored; `fid`
    spells its flags with underscores like the rest (the hyphen spellings remain aliases)."""
    assert expected in error_line(argv, capsys)


def test_every_flag_has_its_config_comment_as_help(capsys):
    with pytest.raises(SystemExit):
        dmd2.parse_config(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    help_text = dmd2.field_help()
    assert set(help_text) == {f.name for f in dmd2.dataclasses.fields(dmd2.Config)}
    assert "critic iterations per generator update; 1 = no TTUR" in out
    assert "SDXL 1-step: 399 (official)" in help_text["conditioning_timestep"]  # a continuation line joins its field
    assert sum(not text for text in help_text.values()) <= 1  # max_step_percent shares min_step_percent's comment
