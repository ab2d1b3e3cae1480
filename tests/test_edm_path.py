"""The --dataset imagenet64 path end to end on CPU: an official-format teacher pickle, a DMD2-style generator state
dict, an EDM dataset_tool zip, then one generator step and one critic step through dmd2.main."""
import io
import json
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

import dmd2
import edm_net
from official_format import write_edm_pickle


def write_dataset_zip(path, num_images, resolution, num_classes, seed=0):
    """A tiny EDM dataset_tool zip: 00000/img0000000i.png + dataset.json with labels."""
    rs = np.random.RandomState(seed)
    labels = []
    with zipfile.ZipFile(path, "w") as z:
        for i in range(num_images):
            buf = io.BytesIO()
            PIL.Image.fromarray(rs.randint(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(buf, "PNG")
            name = f"00000/img{i:08d}.png"
            z.writestr(name, buf.getvalue())
            labels.append([name, int(rs.randint(num_classes))])
        z.writestr("dataset.json", json.dumps({"labels": labels}))


def run_imagenet_path(tmp_path, teacher, resolution, num_classes, extra=()):
    pkl, gen, data = tmp_path / "teacher.pkl", tmp_path / "pytorch_model.bin", tmp_path / "data.zip"
    write_edm_pickle(teacher, str(pkl))
    torch.save(teacher.state_dict(), gen)  # the released generator layout: a plain state dict, keys model.*
    write_dataset_zip(data, 4, resolution, num_classes)
    args = ["--dataset", "imagenet64", "--teacher", str(pkl), "--data_path", str(data), "--generator_init", str(gen),
            "--out_dir", str(tmp_path / "runs"), "--iters", "1", "--batch_size", "2", "--warmup_steps", "0",
            "--num_workers", "0", "--resolution", str(resolution), "--num_classes", str(num_classes), *extra]
    distiller = dmd2.main(args)
    run_dir = tmp_path / "runs" / "imagenet64" / "student_1step"
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["distiller"]["step"] == 1
    # optimiser states are keyed by parameter name (torch.distributed.checkpoint's state-dict API)
    assert {float(s["step"]) for s in state["distiller"]["opt_g"]["state"].values()} == {1}  # one generator step
    assert {float(s["step"]) for s in state["distiller"]["opt_d"]["state"].values()} == {1}  # one critic step
    released = torch.load(run_dir / "pytorch_model.bin", weights_only=True)
    assert list(released) == list(teacher.state_dict())  # written back in the released layout
    moved = [k for k, v in distiller.generator.state_dict().items() if not torch.equal(v, teacher.state_dict()[k])]
    assert moved  # the generator step changed weights
    # the teacher is unchanged (stored in bf16 where it computes in bf16: edm_net.store_frozen_in_bf16)
    assert all(torch.equal(v, teacher.state_dict()[k].to(v.dtype)) for k, v in distiller.real_score.state_dict().items())
    return distiller


def test_imagenet_path_small_teacher(tmp_path):
    """The same code path with a narrow ADM at 16 px and 10 classes (fast)."""
    torch.manual_seed(0)
    teacher = edm_net.EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, model_type="DhariwalUNet",
                                 model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    run_imagenet_path(tmp_path, teacher, 16, 10)


def test_imagenet_path_rejects_wrong_teacher_and_data(tmp_path):
    torch.manual_seed(0)
    teacher = edm_net.EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, model_type="DhariwalUNet",
                                 model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    write_edm_pickle(teacher, str(tmp_path / "t.pkl"))
    write_dataset_zip(tmp_path / "d.zip", 4, 16, 10)
    write_dataset_zip(tmp_path / "d64.zip", 4, 64, 1000)
    base = ["--dataset", "imagenet64", "--teacher", str(tmp_path / "t.pkl"), "--out_dir", str(tmp_path / "runs"),
            "--iters", "1", "--batch_size", "2", "--num_workers", "0"]
    with pytest.raises(Exception, match="t.pkl.*64"):  # the preset expects 64 px: the 16 px teacher is refused
        dmd2.main(base + ["--data_path", str(tmp_path / "d64.zip")])
    with pytest.raises(Exception, match="d.zip.*16x16.*expected 3x32x32|expected.*32"):
        dmd2.main(base + ["--data_path", str(tmp_path / "d.zip"), "--resolution", "32", "--num_classes", "10"])
    with pytest.raises(SystemExit, match="--data_path"):
        dmd2.main(base + ["--resolution", "16", "--num_classes", "10"])


@pytest.mark.parametrize("problem", ["missing", "resolution", "labels", "corrupt", "generator_init", "run folder"])
def test_bad_input_is_reported_before_any_download(tmp_path, problem, monkeypatch):
    """Data, start files and the run folder are checked before the teacher is fetched (here: an unreachable URL)."""
    monkeypatch.setattr(dmd2, "download_cached", lambda *a, **k: pytest.fail("download attempted before the check"))
    write_dataset_zip(tmp_path / "d.zip", 4, 16, 10)
    data = {"missing": tmp_path / "none.zip", "resolution": tmp_path / "d.zip", "corrupt": tmp_path / "bad.zip"}
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 not really a zip")
    if problem == "labels":
        write_dataset_zip(tmp_path / "l.zip", 4, 16, 1000)
    args = ["--dataset", "cifar10", "--teacher", "https://unreachable.invalid/t.pkl", "--out_dir", str(tmp_path),
            "--data_path", str(data.get(problem, tmp_path / ("l.zip" if problem == "labels" else "d.zip"))),
            "--resolution", "32" if problem == "resolution" else "16"]
    if problem == "generator_init":
        args += ["--generator_init", str(tmp_path / "nope.bin")]
    if problem == "run folder":
        (tmp_path / "cifar10" / "student_1step").mkdir(parents=True)
        (tmp_path / "cifar10" / "student_1step" / "checkpoint.pt").write_bytes(b"garbage")
    expected = {"missing": "none.zip.*not found", "resolution": "expected 3x32x32", "labels": "outside 0..9",
                "corrupt": "bad.zip", "generator_init": "nope.bin: no such file", "run folder": "checkpoint.pt"}[problem]
    with pytest.raises((SystemExit, ValueError, FileNotFoundError, RuntimeError), match=expected):
        dmd2.main(args)


@pytest.mark.slow
def test_imagenet_path_full_size_teacher(tmp_path):
    """The full 296M-parameter ImageNet-64 ADM (random init), bf16 compute, batch 2: one generator and one critic
    step from an official-format pickle and a released-layout generator state dict (about 10 GB of RAM)."""
    torch.manual_seed(0)
    teacher = edm_net.EDMPrecond(**edm_net.imagenet64_config(dropout=0.1))
    run_imagenet_path(tmp_path, teacher, 64, 1000, extra=["--precision", "bf16"])
