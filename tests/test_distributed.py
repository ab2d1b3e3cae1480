"""Multi-process training (torchrun / gloo on CPU): W processes with batch B equal one process with batch W*B."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dmd2

BATCH, RATIO = 8, 3


def make_cfg(batch):
    return dmd2.Config(**{**dmd2.PRESETS["toy2d"], "dataset": "toy2d", "batch_size": batch, "warmup_steps": 0,
                          "dfake_gen_update_ratio": RATIO, "generator_steps": 2})


def one_cycle(rank, world_size, batch):
    """One TTUR cycle (RATIO iterations: one generator step, RATIO critic steps) on a fixed toy teacher."""
    torch.manual_seed(0)
    teacher = dmd2.ToyDenoiser(num_classes=4, hidden=32, depth=2)
    cfg = make_cfg(batch)
    distiller = dmd2.Distiller(cfg, teacher, (2,), rank=rank, world_size=world_size)
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
