"""Multi-process training (torchrun / gloo on CPU): W processes with batch B equal one process with batch W*B."""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dmd2
import edm_net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BATCH, RATIO = 8, 3


def make_cfg(batch):
    return dmd2.Config(**{**dmd2.PRESETS["toy2d"], "dataset": "toy2d", "batch_size": batch, "warmup_steps": 0,
                          "dfake_gen_update_ratio": RATIO, "generator_steps": 2})


def one_cycle(rank, world_size, batch):
    """One TTUR cycle (RATIO iterations: one generator step, RATIO critic steps) on a fixed toy teacher."""
    torch.manual_seed(0)
    teacher = dmd2.ToyDenoiser(num_classes=4, hidden=32, depth=2)
    cfg = make_cfg(batch)
    distiller = dmd2.Distiller(cfg, teacher, (2,), wrap=dmd2.engine(cfg, world_size, torch.device("cpu")), rank=rank,
                               world_size=world_size)
    images, labels = dmd2.toy2d_sample(256, torch.Generator().manual_seed(1))
    real = dmd2.InMemoryBatches(images, labels, batch * world_size, seed=5, rank=rank, world_size=world_size)
    for _ in range(RATIO):
        distiller.train_step(next(real))
    return {f"{name}.{k}": v for name in ("generator", "fake_score", "head")
            for k, v in getattr(distiller, name).state_dict().items()}


def worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.save(one_cycle(rank, world_size, BATCH), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_with_the_combined_batch(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    single = one_cycle(0, 1, 2 * BATCH)
    initial = dmd2.Distiller(make_cfg(BATCH), dmd2.ToyDenoiser(num_classes=4, hidden=32, depth=2), (2,))
    moved = 0
    for key, value in single.items():
        assert torch.equal(rank0[key], rank1[key]), key  # ranks stay in sync
        assert torch.allclose(rank0[key], value, rtol=1e-4, atol=1e-6), key
        moved += key.startswith("generator.") and not torch.equal(value, initial.generator.state_dict()[key[10:]])
    assert moved > 0  # the generator did take its step


def test_shared_noise_slices_the_global_draw():
    full = dmd2.SharedNoise(3, 0, 1).randn((6, 2))
    parts = [dmd2.SharedNoise(3, r, 3).randn((2, 2)) for r in range(3)]
    assert torch.equal(torch.cat(parts), full)
    ks = {dmd2.SharedNoise(7, r, 3).shared_randint(0, 4) for r in range(3)}
    assert len(ks) == 1  # one backward-simulation step index for every rank


# ----- the real path through torchrun: official-format pickle, EDM zip, GAN on ------------------------------------

def edm_path_args(tmp_path, out, batch, extra=()):
    from official_format import write_edm_pickle
    from test_edm_path import write_dataset_zip
    if not (tmp_path / "t.pkl").exists():
        torch.manual_seed(0)
        teacher = edm_net.EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, model_type="DhariwalUNet",
                                     model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
        with torch.no_grad():  # as if trained, so every layer gets gradient (EDM zero-initialises output layers)
            for p in teacher.parameters():
                p.add_(0.05 * torch.randn_like(p))
        write_edm_pickle(teacher, str(tmp_path / "t.pkl"))
        write_dataset_zip(tmp_path / "d.zip", 16, 16, 10)
    return ["--dataset", "cifar10", "--teacher", str(tmp_path / "t.pkl"), "--data_path", str(tmp_path / "d.zip"),
            "--resolution", "16", "--out_dir", str(tmp_path / out), "--batch_size", str(batch), "--iters", "3",
            "--dfake_gen_update_ratio", "2", "--warmup_steps", "0", "--generator_lr", "1e-3", "--guidance_lr", "1e-3",
            "--num_workers", "0", "--device", "cpu", "--precision", "fp32", "--sample_every", "100", *extra]


def run_script(args, nproc=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, *launcher, "dmd2.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("micro_batch", [0, 1])
def test_torchrun_on_the_zip_path_equals_one_process(tmp_path, micro_batch):
    """torchrun --nproc_per_node 2 at batch 2 == one process at batch 4, GAN on real images from an EDM zip."""
    run_script(edm_path_args(tmp_path, "two", 2, ["--micro_batch", str(micro_batch)]), nproc=2)
    run_script(edm_path_args(tmp_path, "one", 4))
    two = torch.load(tmp_path / "two/cifar10/student_1step/checkpoint.pt", weights_only=True)["distiller"]
    one = torch.load(tmp_path / "one/cifar10/student_1step/checkpoint.pt", weights_only=True)["distiller"]
    teacher = edm_net.load_edm_pickle(str(tmp_path / "t.pkl")).state_dict()
    assert two["step"] == one["step"] == 3
    # Adam's near-sign steps amplify float32 rounding (batch 2 vs 4 kernels) on a few entries whose gradient is ~0,
    # so compare the whole update: measured ~1e-5 of it when the ranks read the one-process batch, 3-5% when each
    # rank read every other image of the permutation (the reader before this test existed).
    for name, prefix in (("generator", ""), ("critic", "fake_score.")):  # the critic: fake_score.* and head.*
        ours = {k[len(prefix):]: v for k, v in one[name].items() if k.startswith(prefix)}
        diff = torch.cat([(two[name][prefix + k] - v).abs().flatten() for k, v in ours.items()]).mean()
        update = torch.cat([(v - teacher[k]).abs().flatten() for k, v in ours.items()]).mean()
        assert update > 1e-4 and diff < 1e-3 * update, (name, float(diff), float(update))


def agree_worker(rank, world_size, init_file, root, same):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        path = os.path.join(root, "shared" if same else f"node{rank}", "checkpoint.pt")
        try:
            result = str(dmd2.agree_on_checkpoint(path, world_size))
        except SystemExit as e:
            result = f"exit: {e}"
        with open(os.path.join(root, f"rank{rank}.txt"), "w") as f:
            f.write(result)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", ["node-local folders", "different checkpoints", "one shared checkpoint"])
def test_ranks_agree_on_resuming_or_stop(tmp_path, case):
    """Rank 0 decides; a rank that sees no checkpoint (or another one) stops every rank with one clear line."""
    for folder in ("shared", "node0", "node1"):
        (tmp_path / folder).mkdir()
    torch.save({"step": 5}, tmp_path / "shared" / "checkpoint.pt")
    torch.save({"step": 5}, tmp_path / "node0" / "checkpoint.pt")
    if case == "different checkpoints":
        torch.save({"step": 6}, tmp_path / "node1" / "checkpoint.pt")
    mp.spawn(agree_worker, args=(2, str(tmp_path / "init"), str(tmp_path), case == "one shared checkpoint"),
             nprocs=2, join=True)
    results = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    if case == "one shared checkpoint":
        assert results == ["True", "True"]
    else:
        expected = "ranks \\[1\\] see none than rank 0" if case == "node-local folders" else "another checkpoint"
        for text in results:
            assert re.search(f"exit: .*{expected}.*shared by every node", text), text
