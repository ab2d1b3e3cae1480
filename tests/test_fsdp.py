"""Sharded training (FSDP2, --engine fsdp / hsdp) on CPU with gloo: 2 processes equal 1, sharded checkpoints resume
exactly, bad launches are refused with one line."""
import json
import os
import subprocess
import sys

import pytest
import torch

import dmd2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
diffusers = pytest.importorskip("diffusers")  # the tiny SDXL-shaped model (requirements-sdxl.txt)


def write_folder(folder, n=4):
    import numpy as np
    import PIL.Image
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        PIL.Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"picture number {i}")
    return str(folder)


def run(tmp_path, out, nproc, batch, *extra, iters=3, check=True):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    args = ["--dataset", "sdxl", "--tiny", "true", "--data_path", write_folder(tmp_path / "data"), "--out_dir",
            str(tmp_path / out), "--batch_size", str(batch), "--iters", str(iters), "--dfake_gen_update_ratio", "2",
            "--warmup_steps", "0", "--generator_lr", "1e-3", "--guidance_lr", "1e-3", "--device", "cpu",
            "--precision", "fp32", "--sample_every", "100", *extra]
    done = subprocess.run([sys.executable, *launcher, "dmd2.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert not check or done.returncode == 0, done.stderr[-3000:]
    return done


def final(tmp_path, out):
    """The run's generator, fake score and head, gathered from its sharded checkpoint (or read from checkpoint.pt)."""
    folder = tmp_path / out / "sdxl" / "student_4step"
    if (folder / "checkpoint.pt").exists():
        state = torch.load(folder / "checkpoint.pt", weights_only=True)["distiller"]
        return state["step"], {"generator": state["generator"], "fake_score": {
            k[len("fake_score."):]: v for k, v in state["critic"].items() if k.startswith("fake_score.")}}
    import torch.distributed.checkpoint as dcp
    weights = dmd2.tiny_t2i_parts(seed=10).teacher().state_dict()  # the shapes; gathered into fresh tensors
    template = {"distiller": {"generator": {k: v.clone() for k, v in weights.items()},
                              "critic": {f"fake_score.{k}": v.clone() for k, v in weights.items()}, "step": 0}}
    dcp.load(template, checkpoint_id=str(folder / "checkpoint"), no_dist=True)
    nets = template["distiller"]
    return nets["step"], {"generator": nets["generator"],
                          "fake_score": {k[len("fake_score."):]: v for k, v in nets["critic"].items()}}


def close(a, b, teacher):
    for name in ("generator", "fake_score"):
        diff = torch.cat([(a[name][k] - v).abs().flatten() for k, v in b[name].items()]).mean()
        update = torch.cat([(v - teacher[k]).abs().flatten() for k, v in b[name].items()]).mean()
        assert update > 1e-5 and diff < 1e-3 * update, (name, float(diff), float(update))


def test_fsdp_two_processes_equal_one_process(tmp_path):
    """2 processes x batch 2 under --engine fsdp (also with micro-batches of 1 and activation checkpointing) end where
    one process with batch 4 does, after a TTUR cycle and a critic iteration."""
    run(tmp_path, "one", 1, 4)
    step_one, one = final(tmp_path, "one")
    teacher = dmd2.tiny_t2i_parts(seed=10).teacher().state_dict()
    for out, extra in (("fsdp", []), ("fsdp_micro", ["--micro_batch", "1", "--grad_checkpointing", "true"])):
        run(tmp_path, out, 2, 2, "--engine", "fsdp", *extra)
        step_two, two = final(tmp_path, out)
        assert step_two == step_one == 3
        close(two, one, teacher)
    assert (tmp_path / "fsdp" / "sdxl" / "student_4step" / "unet.bin").exists()  # the gathered export
    info = json.loads((tmp_path / "fsdp" / "sdxl" / "student_4step" / "checkpoint" / "run.json").read_text())
    assert info["world_size"] == 2 and info["step"] == 3


def test_sharded_engine_needs_torchrun(tmp_path, capsys):
    with pytest.raises(SystemExit):
        dmd2.cli(["--dataset", "sdxl", "--tiny", "true", "--engine", "fsdp", "--data_path", str(tmp_path),
                  "--out_dir", str(tmp_path)])
    assert "shards the networks over processes: launch with torchrun" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dmd2.cli(["--engine", "fsdp"])  # the embedded rungs run in one process
    assert "not with --ema_decay (the EMA copy is not sharded) nor on the embedded rungs" in capsys.readouterr().err


def test_sharded_run_exports_and_samples(tmp_path):
    """The gathered generator of a sharded run: unet.bin, a diffusers save_pretrained folder and `sample` from the
    sharded checkpoint folder all hold the same weights; a LoRA run writes an adapter file load_lora_weights reads."""
    run(tmp_path, "fsdp", 2, 1, "--engine", "fsdp", iters=2)
    folder = tmp_path / "fsdp" / "sdxl" / "student_4step"
    bin_weights = torch.load(folder / "unet.bin", weights_only=True)
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    assert all(torch.equal(v, bin_weights[k]) for k, v in unet.state_dict().items())
    generator, cfg, parts = dmd2.load_student(dmd2.read_run(str(folder / "checkpoint")))
    assert all(torch.equal(v, bin_weights[k]) for k, v in generator.unet.state_dict().items())
    assert cfg.engine == "fsdp" and parts.sdxl
    done = subprocess.run([sys.executable, "dmd2.py", "sample", "--checkpoint", str(folder / "checkpoint"),
                           "--prompt", "a cat", "--out", str(tmp_path / "grid.png")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and (tmp_path / "grid.png").exists(), done.stderr[-2000:]
    run(tmp_path, "lora", 1, 2, "--lora_rank", "4", "--lora_alpha", "4", iters=2)
    lora_run = tmp_path / "lora" / "sdxl" / "student_4step"
    assert (lora_run / "pytorch_lora_weights.safetensors").exists() and not (lora_run / "unet.bin").exists()
    generator, _, fresh = dmd2.load_student(dmd2.read_run(str(lora_run / "checkpoint.pt")))
    pipe = dmd2.t2i_pipe(fresh, diffusers.LCMScheduler())
    pipe.load_lora_weights(str(lora_run))
    pipe.fuse_lora(lora_scale=1.0)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    cond = dict(encoder_hidden_states=torch.randn(1, 77, 2048), added_cond_kwargs={
        "text_embeds": torch.randn(1, 1280), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])})
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, **cond).sample, generator.unet(x, t, **cond).sample,
                                   rtol=1e-4, atol=1e-4)


def test_another_world_size_or_a_missing_shard_is_one_line_and_keeps_the_checkpoint(tmp_path):
    run(tmp_path, "fsdp", 2, 1, "--engine", "fsdp", iters=2)
    done = run(tmp_path, "fsdp", 3, 1, "--engine", "fsdp", iters=3, check=False)
    assert done.returncode != 0 and "written by 2 processes, this run has 3" in done.stderr
    folder = tmp_path / "fsdp" / "sdxl" / "student_4step" / "checkpoint"
    shard = next(p for p in sorted(folder.iterdir()) if p.suffix == ".distcp")
    shard.unlink()
    done = run(tmp_path, "fsdp", 2, 1, "--engine", "fsdp", iters=3, check=False)
    assert done.returncode != 0 and "cannot read this sharded checkpoint" in done.stderr
    assert "A shard file is missing or corrupt" in done.stderr and (folder / "run.json").exists()


def test_hsdp_over_two_nodes_equals_one_process(tmp_path):
    """--engine hsdp on 2 "nodes" of one process each (two torchrun launches meeting at one rendezvous): the 2-D mesh
    replicates across nodes and shards within one; the result equals one process with the combined batch."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = write_folder(tmp_path / "data")
    args = ["dmd2.py", "--dataset", "sdxl", "--tiny", "true", "--data_path", folder, "--out_dir", str(tmp_path / "hsdp"),
            "--batch_size", "1", "--iters", "3", "--dfake_gen_update_ratio", "2", "--warmup_steps", "0",
            "--generator_lr", "1e-3", "--guidance_lr", "1e-3", "--device", "cpu", "--precision", "fp32",
            "--sample_every", "100", "--engine", "hsdp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(r), "--master_addr", "127.0.0.1", "--master_port", str(port), *args],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    run(tmp_path, "one", 1, 2)
    info = json.loads((tmp_path / "hsdp" / "sdxl" / "student_4step" / "checkpoint" / "run.json").read_text())
    assert info["world_size"] == 2 and info["config"]["engine"] == "hsdp"
    (s_h, h), (s_o, o) = final(tmp_path, "hsdp"), final(tmp_path, "one")
    assert s_h == s_o == 3
    close(h, o, dmd2.tiny_t2i_parts(seed=10).teacher().state_dict())


def test_fsdp_on_the_edm_path_equals_one_process(tmp_path):
    """The same engine on an EDM teacher (official-format pickle, EDM zip, GAN on): blocks of enc / dec sharded."""
    from test_distributed import edm_path_args, run_script
    import edm_net
    run_script(edm_path_args(tmp_path, "fsdp", 2, ["--engine", "fsdp"]), nproc=2)
    run_script(edm_path_args(tmp_path, "one", 4))
    folder = tmp_path / "fsdp" / "cifar10" / "student_1step"
    one = torch.load(tmp_path / "one/cifar10/student_1step/checkpoint.pt", weights_only=True)["distiller"]
    gathered = torch.load(folder / "pytorch_model.bin", weights_only=True)
    teacher = edm_net.load_edm_pickle(str(tmp_path / "t.pkl")).state_dict()
    diff = torch.cat([(gathered[k] - v).abs().flatten() for k, v in one["generator"].items()]).mean()
    update = torch.cat([(v - teacher[k]).abs().flatten() for k, v in one["generator"].items()]).mean()
    assert update > 1e-4 and diff < 1e-3 * update, (float(diff), float(update))
    assert json.loads((folder / "checkpoint" / "run.json").read_text())["step"] == 3


def test_killed_sharded_run_resumes_and_ends_where_an_uninterrupted_one_does(tmp_path):
    """Kill a 2-process `--engine fsdp` run after its first sharded checkpoint, re-run the same command: it resumes
    from the shards, and its final weights equal those of a run that was never interrupted."""
    import signal
    import time
    args = ["--iters", "6", "--ckpt_every", "2"]
    run(tmp_path, "straight", 2, 1, "--engine", "fsdp", *args, iters=6)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dmd2.py",
               "--dataset", "sdxl", "--tiny", "true", "--data_path", write_folder(tmp_path / "data"), "--out_dir",
               str(tmp_path / "killed"), "--batch_size", "1", "--dfake_gen_update_ratio", "2", "--warmup_steps", "0",
               "--generator_lr", "1e-3", "--guidance_lr", "1e-3", "--device", "cpu", "--precision", "fp32",
               "--sample_every", "100", "--engine", "fsdp", *args]
    marker = tmp_path / "killed" / "sdxl" / "student_4step" / "checkpoint" / "run.json"
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # torchrun kills its workers (they run in sessions of their own)
    proc.wait()
    step_at_kill = json.loads(marker.read_text())["step"]
    assert 0 < step_at_kill < 6
    done = run(tmp_path, "killed", 2, 1, "--engine", "fsdp", *args, iters=6)
    assert f"at iteration {step_at_kill}" in done.stdout
    (s1, a), (s2, b) = final(tmp_path, "straight"), final(tmp_path, "killed")
    assert s1 == s2 == 6
    for name in a:
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name


def test_a_kill_between_the_two_renames_keeps_the_newest_complete_checkpoint(tmp_path):
    path = tmp_path / "checkpoint"
    for name, step in (("checkpoint.old", 2), ("checkpoint.tmp", 4)):  # killed after the first rename
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps({"step": step}))
    dmd2.recover_checkpoint(str(path))
    assert json.loads((path / "run.json").read_text())["step"] == 4
    import shutil
    shutil.rmtree(tmp_path / "checkpoint.old")
    os.replace(path, tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint.tmp").mkdir()  # an incomplete write (no run.json) is never taken
    dmd2.recover_checkpoint(str(path))
    assert json.loads((path / "run.json").read_text())["step"] == 4 and not (tmp_path / "checkpoint.old").exists()


def test_bf16_params_option_gathers_bf16_and_keeps_fp32_shards(tmp_path):
    """--fsdp_bf16_params: the UNet blocks compute with bf16 weights (gathered in bf16), the optimiser updates fp32
    shards, the adapter's sigma lookup and float64 epsilon -> x0 stay as they are (one process group of 1, gloo)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        parts = dmd2.tiny_t2i_parts(seed=0)
        cfg = dmd2.Config(**{**dmd2.PRESETS["sdxl"], "dataset": "sdxl", "tiny": True, "precision": "fp32",
                             "batch_size": 2, "warmup_steps": 0, "engine": "fsdp", "fsdp_bf16_params": True})
        captions = ["a cat", "a dog", "red car", "blue sky"]
        d = dmd2.Distiller(cfg, parts.teacher(), (4, 16, 16), wrap=dmd2.engine(cfg, 1, torch.device("cpu")),
                           conditions=dmd2.Prompts(captions, parts.tokenizers, parts.text_encoders))
        seen = []
        d.generator.unet.conv_in.register_forward_pre_hook(lambda m, args: seen.append((m.weight.dtype, args[0].dtype)))
        before = {n: p.detach().full_tensor().clone() for n, p in d.generator.named_parameters()}
        logs = d.train_step(dmd2.InMemoryBatches(torch.randn(4, 4, 16, 16).half(), captions, 2, 0).__next__())
        assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
        assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
        params = dict(d.generator.named_parameters())
        assert all(p.dtype == torch.float32 for p in params.values())  # the sharded master weights
        assert any(not torch.equal(params[n].full_tensor(), v) for n, v in before.items())
        assert {s["exp_avg"].dtype for s in d.opt_g.state.values()} == {torch.float32}
    finally:
        dist.destroy_process_group()


def test_a_sharded_run_starts_from_another_sharded_run(tmp_path):
    """--generator_init / --guidance_init take a sharded checkpoint folder (the SD v1.5 stage 2 or SDXL 1-step start,
    under FSDP); with the learning rate still 0 (warm-up), the new run holds exactly the weights it started from."""
    run(tmp_path, "first", 2, 1, "--engine", "fsdp", iters=2)
    source = str(tmp_path / "first" / "sdxl" / "student_4step" / "checkpoint")
    run(tmp_path, "second", 2, 1, "--engine", "fsdp", "--generator_init", source, "--guidance_init", source,
        "--warmup_steps", "1000", iters=1)
    (_, first), (_, second) = final(tmp_path, "first"), final(tmp_path, "second")
    for name in first:
        assert all(torch.equal(first[name][k], second[name][k]) for k in first[name]), name
    assert dmd2.gather_sharded(source, "distiller.critic.head.").keys()  # the GAN head came along
