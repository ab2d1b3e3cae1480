"""Data readers, the sharded batch iterator and cached downloads (no network: a local http.server)."""
import http.server
import io
import json
import os
import pickle
import threading
import time
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

import dmd2


# ----- helpers ---------------------------------------------------------------------------------------------

def png_bytes(image):
    """uint8 CHW -> PNG bytes (lossless, so a round trip must be exact)."""
    buf = io.BytesIO()
    PIL.Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def edm_layout(images, labels, per_folder=3):
    """The EDM dataset_tool layout as {relative path: bytes}: 00000/img00000000.png ... plus dataset.json."""
    files = {f"{i // per_folder:05d}/img{i:08d}.png": png_bytes(im) for i, im in enumerate(images)}
    names = list(files)
    files["dataset.json"] = json.dumps({"labels": None if labels is None else
                                        [[n, int(l)] for n, l in zip(names, labels)]}).encode()
    return files


def write_folder(root, files):
    for name, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    return str(root)


def write_zip(path, files):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return str(path)


def write_lmdb(path, images, labels, declared_shape=None):
    """The official DMD2 LMDB layout (main/data/create_imagenet_lmdb.py)."""
    lmdb = pytest.importorskip("lmdb")
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, (im, l) in enumerate(zip(images, labels)):
            txn.put(f"images_{i}_data".encode(), im.tobytes())
            txn.put(f"labels_{i}_data".encode(), np.int64(l).tobytes())
        shape = declared_shape or (len(images),) + images[0].shape
        txn.put(b"images_shape", " ".join(map(str, shape)).encode())
        txn.put(b"labels_shape", str(len(images)).encode())
    env.close()
    return str(path)


def random_images(n, channels=3, size=8, seed=0):
    return [np.random.RandomState(seed + i).randint(0, 256, (channels, size, size), dtype=np.uint8) for i in range(n)]


IMAGES = random_images(7)
LABELS = [3, 0, 9, 9, 1, 5, 2]


# ----- readers ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["zip", "folder", "lmdb"])
def test_round_trip(tmp_path, kind):
    if kind == "zip":
        path = write_zip(tmp_path / "d.zip", edm_layout(IMAGES, LABELS))
    elif kind == "folder":
        path = write_folder(tmp_path / "d", edm_layout(IMAGES, LABELS))
    else:
        path = write_lmdb(tmp_path / "d_lmdb", IMAGES, LABELS)
    ds = dmd2.open_image_dataset(path, resolution=8, num_channels=3, num_classes=10)
    assert len(ds) == 7
    for i in range(7):
        image, label = ds[i]
        assert image.dtype == np.uint8 and image.shape == (3, 8, 8)
        np.testing.assert_array_equal(image, IMAGES[i])
        assert label.dtype == np.int64 and label == LABELS[i]


def test_grayscale_and_unlabelled(tmp_path):
    gray = random_images(4, channels=1)
    path = write_zip(tmp_path / "g.zip", edm_layout(gray, None))
    ds = dmd2.open_image_dataset(path, resolution=8, num_channels=1)
    np.testing.assert_array_equal(ds[2][0], gray[2])
    assert [int(ds[i][1]) for i in range(4)] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"img00000000\.png is 1x8x8 \(CxHxW\), expected 3x8x8"):
        dmd2.open_image_dataset(path, resolution=8, num_channels=3)
    with pytest.raises(ValueError, match=r"has no labels .*conditional on 10 classes"):
        dmd2.open_image_dataset(path, resolution=8, num_channels=1, num_classes=10)


def test_wrong_resolution_names_file_and_fix(tmp_path):
    path = write_folder(tmp_path / "big", edm_layout(random_images(2, size=16), [0, 1]))
    with pytest.raises(ValueError) as e:
        dmd2.open_image_dataset(path, resolution=8)
    msg = str(e.value)
    assert "00000/img00000000.png" in msg and "3x16x16" in msg and "expected 3x8x8" in msg
    assert "--resolution=8x8" in msg


def test_later_image_of_other_size_is_a_clear_error(tmp_path):
    files = edm_layout(IMAGES[:2] + random_images(1, size=16), [0, 1, 2])
    ds = dmd2.open_image_dataset(write_zip(tmp_path / "mixed.zip", files), resolution=8)
    with pytest.raises(ValueError, match=r"img00000002\.png is \(3, 16, 16\)"):
        ds[2]


@pytest.mark.parametrize("bad_label", [10, -1])
def test_label_out_of_range_names_file(tmp_path, bad_label):
    labels = list(LABELS)
    labels[4] = bad_label
    path = write_zip(tmp_path / "d.zip", edm_layout(IMAGES, labels))
    with pytest.raises(ValueError, match=rf"img00000004\.png has label {bad_label} outside 0\.\.9 \(1 such"):
        dmd2.open_image_dataset(path, resolution=8, num_classes=10)
    lmdb_path = write_lmdb(tmp_path / "l", IMAGES, labels)
    with pytest.raises(ValueError, match=rf"index 4 .*labels_4_data.* has label {bad_label} outside 0\.\.9"):
        dmd2.open_image_dataset(lmdb_path, resolution=8, num_classes=10)
    assert len(dmd2.open_image_dataset(path, resolution=8, num_classes=None)) == 7  # unconditional: no check


def test_missing_path_and_unlabelled_image(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        dmd2.open_image_dataset(str(tmp_path / "nope.zip"), resolution=32)
    msg = str(e.value)
    assert "dataset_tool.py --source=" in msg and f"--dest={tmp_path / 'nope.zip'} --resolution=32x32" in msg
    files = edm_layout(IMAGES[:3], [0, 1, 2])
    files["00000/img00000099.png"] = png_bytes(IMAGES[3])  # an image dataset.json does not mention
    with pytest.raises(ValueError, match=r"dataset\.json has no label for 00000/img00000099\.png"):
        dmd2.open_image_dataset(write_zip(tmp_path / "x.zip", files), resolution=8, num_classes=10)


def test_empty_and_corrupt_datasets(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"empty holds no \.png/\.jpg/\.jpeg/\.webp/\.bmp images; prepare data"):
        dmd2.open_image_dataset(str(tmp_path / "empty"), resolution=8)
    with pytest.raises(ValueError, match=r"e\.zip holds no"):
        dmd2.open_image_dataset(write_zip(tmp_path / "e.zip", {"dataset.json": b'{"labels": null}'}), resolution=8)
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"junk\.zip is not a valid zip"):
        dmd2.open_image_dataset(str(tmp_path / "junk.zip"), resolution=8)
    with pytest.raises(ValueError, match=r"declares 0 images"):
        dmd2.open_image_dataset(write_lmdb(tmp_path / "l0", IMAGES[:1], [0], declared_shape=(0, 3, 8, 8)),
                                resolution=8)
    with pytest.raises(ValueError, match=r"is 3x16x16 \(CxHxW\), expected 3x8x8"):  # declared shape is checked
        dmd2.open_image_dataset(write_lmdb(tmp_path / "l1", random_images(2, size=16), [0, 1]), resolution=8)
    with pytest.raises(ValueError, match=r"images_0_data holds 192 bytes"):
        dmd2.open_image_dataset(write_lmdb(tmp_path / "l2", IMAGES, LABELS, declared_shape=(7, 3, 16, 16)),
                                resolution=16)


def test_lmdb_without_package_says_pip_install(tmp_path, monkeypatch):
    path = write_lmdb(tmp_path / "l", IMAGES, LABELS)
    monkeypatch.setitem(dmd2.LMDBImageDataset.__init__.__globals__, "lmdb", None)
    with pytest.raises(ImportError, match="pip install lmdb"):
        dmd2.open_image_dataset(path, resolution=8)


# ----- batch iterator --------------------------------------------------------------------------------------

class IndexDataset(torch.utils.data.Dataset):
    """Item i is a 1x2x2 image filled with i and label i, so batches reveal which items they hold."""

    def __init__(self, n):
        self.n, self.reads = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        return np.full((1, 2, 2), i, dtype=np.uint8), np.int64(i)


def take(iterator, k):
    return [next(iterator) for _ in range(k)]


def test_batches_values_and_determinism():
    ds = IndexDataset(10)
    a = take(dmd2.real_batches(ds, 3, seed=5), 7)  # 3 batches per epoch: spans 3 epochs
    b = take(dmd2.real_batches(ds, 3, seed=5), 7)
    c = take(dmd2.real_batches(ds, 3, seed=6), 7)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == torch.float32 and ya.dtype == torch.int64 and xa.shape == (3, 1, 2, 2)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa, ya.view(-1, 1, 1, 1).float().expand(-1, 1, 2, 2) / 127.5 - 1)  # x/127.5 - 1
    assert any(not torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))
    epoch0 = torch.cat([y for _, y in a[:3]])
    assert len(set(epoch0.tolist())) == 9  # one epoch = a permutation, last incomplete batch dropped
    assert not torch.equal(epoch0, torch.cat([y for _, y in a[3:6]]))  # reshuffled each epoch
    x, y = next(dmd2.real_batches(IndexDataset(256), 256, seed=0))  # the ends of the uint8 range
    assert (x[y == 0] == -1).all() and (x[y == 255] == 1).all()


def test_ranks_read_slices_of_the_one_process_batch():
    """W processes with batch B read exactly the batches of one process with batch W*B, split in rank order; every
    epoch is a permutation (no image twice), incomplete global batches dropped."""
    n, batch, world = 21, 2, 3  # global batch 6: 3 per epoch, 3 images dropped
    single = [y for _, y in take(dmd2.real_batches(IndexDataset(n), batch * world, seed=3), 7)]
    ranks = [[y for _, y in take(dmd2.real_batches(IndexDataset(n), batch, seed=3, rank=r, world_size=world), 7)]
             for r in range(world)]
    for k in range(7):
        assert torch.equal(torch.cat([ranks[r][k] for r in range(world)]), single[k])
    for epoch in range(2):
        seen = torch.cat(single[3 * epoch: 3 * epoch + 3]).tolist()
        assert len(set(seen)) == 18
    assert torch.cat(single[:3]).tolist() != torch.cat(single[3:6]).tolist()  # a new permutation each epoch
    resumed = [y for _, y in take(dmd2.real_batches(IndexDataset(n), batch, seed=3, rank=2, world_size=world,
                                                    start_batch=4), 3)]
    assert all(torch.equal(u, v) for u, v in zip(resumed, ranks[2][4:]))


def test_resume_equals_continuing_without_decoding_skipped():
    ds = IndexDataset(11)  # 3 batches of 3 per epoch
    full = [y for _, y in take(dmd2.real_batches(ds, 3, seed=1), 10)]
    for k in (0, 2, 3, 7):
        counting = IndexDataset(11)
        resumed = [y for _, y in take(dmd2.real_batches(counting, 3, seed=1, start_batch=k), 10 - k)]
        assert all(torch.equal(u, v) for u, v in zip(full[k:], resumed))
        assert counting.reads == 3 * (10 - k)  # skipped batches are never read
    with pytest.raises(ValueError, match="cannot fill one global batch of 2 x 6"):
        next(dmd2.real_batches(IndexDataset(11), 6, seed=0, world_size=2))


@pytest.mark.parametrize("kind", ["zip", "lmdb"])
def test_reader_in_worker_processes(tmp_path, kind):
    images = random_images(8)
    path = (write_zip(tmp_path / "d.zip", edm_layout(images, list(range(8)))) if kind == "zip" else
            write_lmdb(tmp_path / "l", images, list(range(8))))
    ds = dmd2.open_image_dataset(path, resolution=8)
    serial = take(dmd2.real_batches(ds, 4, seed=2), 3)
    parallel = take(dmd2.real_batches(ds, 4, seed=2, num_workers=2), 3)  # forked after the file was opened
    for (xs, ys), (xp, yp) in zip(serial, parallel):
        assert torch.equal(xs, xp) and torch.equal(ys, yp)
        expected = torch.stack([torch.from_numpy(images[i]) for i in ys]).float() / 127.5 - 1
        assert torch.equal(xs, expected)
    np.testing.assert_array_equal(ds[3][0], images[3])  # the parent's handle still works after the workers


def test_readers_pickle_without_open_handles(tmp_path):
    """Spawned DataLoader workers receive the dataset by pickle: open zip/LMDB handles must not travel."""
    for path in (write_zip(tmp_path / "d.zip", edm_layout(IMAGES, LABELS)), write_lmdb(tmp_path / "l", IMAGES, LABELS)):
        ds = dmd2.open_image_dataset(path, resolution=8, num_classes=10)
        copy = pickle.loads(pickle.dumps(ds))
        np.testing.assert_array_equal(copy[5][0], IMAGES[5])
        assert copy[5][1] == LABELS[5]


# ----- downloads -------------------------------------------------------------------------------------------

PAYLOAD = bytes(range(256)) * 40


@pytest.fixture
def server():
    """A local HTTP server on 127.0.0.1: /file.bin is served whole, /truncated.bin dies after half the bytes."""
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path not in ("/file.bin", "/truncated.bin", "/teacher.pkl"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:len(PAYLOAD) // 2] if self.path == "/truncated.bin" else PAYLOAD)
            self.close_connection = True

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def test_download_cached_and_reused(tmp_path, server, monkeypatch):
    url, requests = server
    cache = tmp_path / "cache"
    path = dmd2.download_cached(f"{url}/file.bin", cache_dir=str(cache))
    assert path == str(cache / "file.bin") and open(path, "rb").read() == PAYLOAD
    assert os.listdir(cache) == ["file.bin"]  # no temp file left behind
    assert dmd2.download_cached(f"{url}/file.bin", cache_dir=str(cache)) == path and len(requests) == 1
    monkeypatch.setenv("DMD2_CACHE", str(tmp_path / "env_cache"))
    assert dmd2.default_cache_dir() == str(tmp_path / "env_cache")
    named = dmd2.download_cached(f"{url}/file.bin", filename="renamed.bin")
    assert named == str(tmp_path / "env_cache" / "renamed.bin") and open(named, "rb").read() == PAYLOAD
    monkeypatch.delenv("DMD2_CACHE")
    assert dmd2.default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "dmd2")


def test_interrupted_download_leaves_nothing(tmp_path, server):
    url, _ = server
    cache = tmp_path / "cache"
    with pytest.raises(dmd2.DownloadError, match=r"could not download .*truncated\.bin.*ContentTooShortError"):
        dmd2.download_cached(f"{url}/truncated.bin", cache_dir=str(cache))
    assert os.listdir(cache) == []
    with pytest.raises(dmd2.DownloadError, match=r"HTTP Error 404"):
        dmd2.download_cached(f"{url}/missing.bin", cache_dir=str(cache))
    assert os.listdir(cache) == []


def test_stale_temp_files_are_ignored_and_cleaned(tmp_path, server):
    url, _ = server
    cache = tmp_path / "cache"
    os.makedirs(cache)
    (cache / "file.bin.old1.part").write_bytes(b"half")
    (cache / "file.bin.new1.part").write_bytes(b"half")  # maybe another process still writing: kept
    old = time.time() - 7200
    os.utime(cache / "file.bin.old1.part", (old, old))
    path = dmd2.download_cached(f"{url}/file.bin", cache_dir=str(cache))
    assert open(path, "rb").read() == PAYLOAD
    assert sorted(os.listdir(cache)) == ["file.bin", "file.bin.new1.part"]


def test_offline_message(tmp_path):
    url = "http://127.0.0.1:1/edm-imagenet-64x64-cond-adm.pkl"
    with pytest.raises(dmd2.DownloadError) as e:
        dmd2.download_cached(url, cache_dir=str(tmp_path))
    msg = str(e.value)
    assert url in msg and "download it elsewhere and pass --teacher PATH" in msg
    assert str(tmp_path / "edm-imagenet-64x64-cond-adm.pkl") in msg
    with pytest.raises(dmd2.DownloadError, match="pass --fid_ref PATH"):
        dmd2.download_cached(url, cache_dir=str(tmp_path), flag="--fid_ref")
    assert os.listdir(tmp_path) == []


def test_resolve_teacher(tmp_path, server, monkeypatch):
    url, _ = server
    requested = []
    fake = lambda u, cache_dir=None, flag=None: requested.append((u, flag)) or "cached"
    with monkeypatch.context() as m:
        m.setitem(dmd2.resolve_file.__globals__, "download_cached", fake)
        assert dmd2.resolve_teacher(None, "imagenet64") == "cached"
        assert dmd2.resolve_teacher(None, "cifar10") == "cached"
        assert dmd2.resolve_fid_ref(None, "imagenet64") == "cached"
    edm = "https://nvlabs-fi-cdn.nvidia.com/edm"
    assert requested == [(f"{edm}/pretrained/edm-imagenet-64x64-cond-adm.pkl", "--teacher"),
                         (f"{edm}/pretrained/edm-cifar10-32x32-cond-vp.pkl", "--teacher"),
                         (f"{edm}/fid-refs/imagenet-64x64.npz", "--fid_ref")]
    path = dmd2.resolve_teacher(f"{url}/teacher.pkl", "imagenet64", cache_dir=str(tmp_path / "c"))
    assert path == str(tmp_path / "c" / "teacher.pkl") and open(path, "rb").read() == PAYLOAD
    assert dmd2.resolve_teacher(path, "whatever") == path
    with pytest.raises(FileNotFoundError, match=r"teacher .*nope\.pkl not found; pass --teacher"):
        dmd2.resolve_teacher(str(tmp_path / "nope.pkl"), "imagenet64")
    with pytest.raises(ValueError, match="no official teacher.*pass --teacher"):
        dmd2.resolve_teacher(None, "toy2d")


# ----- released DMD2 checkpoints ---------------------------------------------------------------------------

def test_dmd2_checkpoint_request(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    assert sorted(dmd2.DMD2_IMAGENET_RUNS.values()) == [1.28, 1.51, 2.61]
    calls = []
    monkeypatch.setattr(hub, "hf_hub_download", lambda **kw: calls.append(kw) or "/hf/pytorch_model.bin")
    run = "imagenet_gan_classifier_genloss3e-3_diffusion1000_lr5e-7_resume_fid1.28_checkpoint_model_548000"
    assert dmd2.download_dmd2_checkpoint(run, cache_dir="/c") == "/hf/pytorch_model.bin"
    assert calls == [dict(repo_id="tianweiy/DMD2", filename=f"model/imagenet/{run}/pytorch_model.bin", cache_dir="/c")]
    with pytest.raises(ValueError, match="unknown DMD2 run .*known: imagenet_gan"):
        dmd2.download_dmd2_checkpoint("fid1.28")


def test_dmd2_checkpoint_offline_message(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")  # a submodule, loaded lazily by huggingface_hub 2
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import time by huggingface_hub
    run = "imagenet_lr2e-6_scratch_fid2.61_checkpoint_model_405500"
    with pytest.raises(dmd2.DownloadError) as e:
        dmd2.download_dmd2_checkpoint(run, cache_dir=str(tmp_path))
    msg = str(e.value)
    assert f"model/imagenet/{run}/pytorch_model.bin" in msg and "tianweiy/DMD2" in msg
    assert f"https://huggingface.co/tianweiy/DMD2/resolve/main/model/imagenet/{run}/pytorch_model.bin" in msg
    assert "pass its local path instead" in msg
