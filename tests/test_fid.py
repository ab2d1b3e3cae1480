"""Tests of the built-in FID (EDM's protocol in edm_net.py, dmd2.py's FID section): pytorch-fid's Inception behind
EDM's and pytorch-fid's preprocessing (against pytorch-fid's own resize and against features recorded from the previous
hand-written network), the TF1 resize (edm_net) against an independent float64 re-computation, statistics against
numpy, the Frechet distance against pytorch-fid and closed forms, the ImageNet-64 protocol (balance, seeds, sharding),
bad input. No downloads: every network gets random weights made here."""
import email.message
import hashlib
import io
import math
import os
import urllib.error
import warnings
import zipfile

import numpy as np
import PIL.Image
import pytest
import pytorch_fid.inception as pfid_inception
import torch
import torch.nn.functional as F
import torchvision
from pytorch_fid.fid_score import calculate_frechet_distance

import dmd2
from dmd2 import INCEPTION_URL, fid_main, fid_of_generator, frechet_distance, load_inception
from edm_net import (FeatureStats, InceptionV3, compute_reference_stats, generator_stats, image_stats, images_to_uint8,
                     iter_image_batches, load_stats, save_stats, tf1_bilinear_resize)

# sha256 of the "name [shape]" lines of pytorch-fid's Inception state dict as listed in
# tests/data/edm_fid_keys.txt, last section (472 entries, generated from pytorch-fid b9c1811 + torchvision 0.29.1).
PYTORCH_FID_KEYS_SHA256 = "9f56d538acfbbf4d75780c6c260373469342bdf5559054ee1075af33cdf5d0ac"


def inception_layout():
    """pytorch-fid's weight-file layout: torchvision's Inception v3 with 1008 classes and no aux head."""
    return torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                           init_weights=False).state_dict()


def random_inception_state(seed=0):
    """pytorch-fid's layout with random values scaled so activations stay O(1) through all 94 conv layers."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in inception_layout().items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith("conv.weight"):
            t = torch.randn(value.shape, generator=g) * math.sqrt(2 / value[0].numel())
        elif name.endswith(("bn.weight", "running_var")):
            t = 0.5 + torch.rand(value.shape, generator=g)
        elif name.endswith(("bn.bias", "running_mean")):
            t = 0.1 * torch.randn(value.shape, generator=g)
        else:
            t = 0.01 * torch.randn(value.shape, generator=g)
        state[name] = t.contiguous()
    return state


def pytorch_fid_net(state, **kwargs):
    """pytorch-fid's InceptionV3 (block 3) with `state` in place of its download."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfid_inception, "load_state_dict_from_url", lambda *args, **kw: state)
        return pfid_inception.InceptionV3([3], **kwargs).eval()


def pytorch_fid_tree(state):
    """pytorch-fid's fid_inception_v3() module tree (torchvision names, fc included) loaded strictly with `state`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfid_inception, "load_state_dict_from_url", lambda *args, **kw: state)
        return pfid_inception.fid_inception_v3()


@pytest.fixture(scope="module")
def weights():
    return random_inception_state()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    smooth = F.interpolate(torch.rand(2, 3, 8, 8, generator=g) * 255, size=(64, 64), mode="bilinear")
    return (smooth + 20 * torch.rand(2, 3, 64, 64, generator=g)).clamp(0, 255).to(torch.uint8)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


# --- the network ------------------------------------------------------------------------------------------------


def test_state_dict_layout_is_pytorch_fid(weights):
    theirs = {k: v for k, v in pytorch_fid_tree(weights).state_dict().items()
              if not k.endswith("num_batches_tracked")}
    assert len(weights) == 472
    assert [(k, v.shape) for k, v in weights.items()] == [(k, v.shape) for k, v in theirs.items()]
    listing = "\n".join(f"{k} {list(v.shape)}" for k, v in weights.items())
    assert hashlib.sha256(listing.encode()).hexdigest() == PYTORCH_FID_KEYS_SHA256
    net = InceptionV3(state=weights)
    assert sum(p.numel() for p in net.parameters()) == 23_850_960 - (2048 * 1008 + 1008)  # all but the 1008-way fc
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 94 and all(m.eps == 1e-3 for m in bns)


def loaded_weights(net):
    """The network's tensors under the weight file's names: pytorch-fid's blocks hold the modules in file order."""
    tensors = [v for k, v in net.net.state_dict().items() if not k.endswith("num_batches_tracked")]
    names = [k for k in inception_layout() if not k.endswith("num_batches_tracked") and not k.startswith("fc.")]
    assert len(tensors) == len(names) == 470
    return dict(zip(names, tensors))


@pytest.mark.parametrize("with_batch_counters", [False, True])
def test_pytorch_fid_file_loads_strict(tmp_path, weights, with_batch_counters):
    state = dict(weights)
    if with_batch_counters:  # a state dict saved from pytorch-fid's own module carries num_batches_tracked
        state = pytorch_fid_tree(weights).state_dict()
        assert any(k.endswith("num_batches_tracked") for k in state)
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    net = load_inception(str(path))
    assert not net.training and not net.net.training
    for name, value in loaded_weights(net).items():
        assert torch.equal(value, weights[name]), name
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="not pytorch-fid's Inception state dict.*Mixed_7c.branch_pool.conv.weight"):
        load_inception(str(path))


def test_features_equal_pytorch_fid(weights, images):
    ours = InceptionV3("pytorch-fid", weights)(images)
    with torch.no_grad():
        theirs = pytorch_fid_net(weights)(images.float() / 255)[0].flatten(1)
    assert ours.shape == (2, 2048) and ours.dtype == torch.float32
    assert theirs.std() > 0.1  # random weights that keep the signal alive: the comparison is not vacuous
    assert rel_err(ours, theirs) < 1e-4  # float32, F.interpolate vs pytorch-fid's call of it: round-off only


# Features 3, 259, ..., 1795 and the row sums of both images, recorded with the previous hand-written network
# (dmd2.py at 64cf466: batch norm folded into the convolutions, fused 1x1 branches, channels_last) on `weights` and
# `images`. They agree with pytorch-fid's network here to 3.5e-7 of the largest feature (float32 round-off).
RECORDED = {"edm": ([[6.590828, 0.9962059, 0.112322, 11.90491, 5.052039, 0.0, 0.2211944, 2.494463],
                     [6.699601, 0.9028265, 0.2017945, 11.74322, 5.003873, 0.0, 0.1757896, 2.769253]],
                    [3644.94279, 3620.25067]),
            "pytorch-fid": ([[6.648498, 0.9985883, 0.1125452, 12.01831, 5.086661, 0.0, 0.2132528, 2.513535],
                             [6.698493, 0.8915977, 0.1982355, 11.81845, 5.048091, 0.002446913, 0.1797866, 2.806072]],
                            [3664.58135, 3650.97631])}


@pytest.mark.parametrize("mode", ["edm", "pytorch-fid"])
def test_features_unchanged_from_hand_written_network(weights, images, mode):
    features = InceptionV3(mode, weights)(images).double()
    values, sums = map(torch.tensor, RECORDED[mode])
    # different float32 kernels (folded vs unfolded batch norm) differ by round-off: 1e-4 relative is far above it
    assert rel_err(features[:, 3::256], values.double()) < 1e-4
    assert rel_err(features.sum(1), sums.double()) < 1e-4


def tf1_resize_reference(x, size):
    """TF1 resize_bilinear(align_corners=False) in float64 numpy: out[i, j] interpolates source (i*H/size,
    j*W/size); the lower neighbour is floor, the upper one is clamped to the last row / column."""
    x = np.asarray(x, np.float64)
    h, w = x.shape[-2:]
    ys, xs = np.arange(size) * (h / size), np.arange(size) * (w / size)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    dy, dx = (ys - y0)[:, None], (xs - x0)[None, :]
    out = np.empty(x.shape[:-2] + (size, size))
    for i in range(size):
        for j in range(size):
            top = x[..., y0[i], x0[j]] * (1 - dx[0, j]) + x[..., y0[i], x1[j]] * dx[0, j]
            bottom = x[..., y1[i], x0[j]] * (1 - dx[0, j]) + x[..., y1[i], x1[j]] * dx[0, j]
            out[..., i, j] = top * (1 - dy[i, 0]) + bottom * dy[i, 0]
    return out


@pytest.mark.parametrize("shape,size", [((5, 7), 13), ((64, 64), 299), ((32, 17), 299), ((9, 4), 3)])
def test_tf1_resize_matches_reference(shape, size):
    x = torch.rand((2, 3) + shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 255
    expected = tf1_resize_reference(x.numpy(), size)
    assert np.abs(tf1_bilinear_resize(x, size).numpy() - expected).max() < 1e-9
    assert np.abs(tf1_bilinear_resize(x.float(), size).numpy() - expected).max() < 1e-3


def test_tf1_resize_identity_and_not_pytorch_resize():
    x = torch.randint(0, 256, (1, 3, 299, 299)).float()
    assert torch.equal(tf1_bilinear_resize(x, 299), x)
    small = torch.randint(0, 256, (1, 3, 64, 64)).float()
    half_pixel = F.interpolate(small, size=(299, 299), mode="bilinear", align_corners=False)
    assert (tf1_bilinear_resize(small, 299) - half_pixel).abs().max() > 10  # the two rules genuinely differ


def test_edm_mode_is_tf1_resize_then_128(weights, images):
    net = InceptionV3("edm", weights)
    x = torch.from_numpy((tf1_resize_reference(images.numpy(), 299) - 128) / 128).float()
    with torch.no_grad():
        theirs = pytorch_fid_net(weights, resize_input=False, normalize_input=False)(x)[0].flatten(1)
    assert rel_err(net(images), theirs) < 1e-4  # float32 resize vs float64 reference: round-off only


def test_network_rejects_bad_images(weights):
    net = InceptionV3()
    with pytest.raises(ValueError, match="uint8 images"):
        net(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[1, 4, 8, 8\]"):
        net(torch.zeros(1, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="mode"):
        InceptionV3("tf2")


# --- weights: cache, download, errors ----------------------------------------------------------------------------


def test_corrupt_or_foreign_weights_file(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(ValueError, match="broken.pth.*not a readable Inception weights file"):
        load_inception(str(bad))
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv.weight": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="foreign.pth.*not pytorch-fid's Inception"):
        load_inception(str(foreign))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_inception(str(tmp_path / "missing.pth"))


def test_offline_download_gives_instructions(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(dmd2.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError) as error:
        load_inception(cache_dir=str(tmp_path))
    message = str(error.value)
    assert INCEPTION_URL in message and str(tmp_path) in message and "--inception" in message
    assert os.listdir(tmp_path) == []


class FakeResponse(io.BytesIO):
    def __init__(self, data, fail_after=None):
        super().__init__(data)
        self.fail_after = fail_after
        self.headers = email.message.Message()
        self.headers["Content-Length"] = str(len(data))

    def info(self):
        return self.headers

    def read(self, n=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset")
        return super().read(n if self.fail_after is None else min(n, self.fail_after))


def test_download_is_atomic_hash_checked_and_cached(tmp_path, monkeypatch, weights):
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    data = buffer.getvalue()
    monkeypatch.setattr(dmd2.urllib.request, "urlopen", lambda *a, **k: FakeResponse(data, fail_after=1 << 20))
    with pytest.raises(RuntimeError, match="connection reset"):
        load_inception(cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []  # the interrupted download left nothing behind
    calls = []
    monkeypatch.setattr(dmd2.urllib.request, "urlopen", lambda *a, **k: calls.append(a[0]) or FakeResponse(data))
    digest = hashlib.sha256(data).hexdigest()
    with pytest.raises(dmd2.DownloadError, match=f"SHA-256 {digest} does not start with 6726825d"):
        load_inception(cache_dir=str(tmp_path))  # random weights are not pytorch-fid's file: refused
    assert os.listdir(tmp_path) == [] and calls == [INCEPTION_URL]
    path = dmd2.download_cached(INCEPTION_URL, str(tmp_path), hash_prefix=digest[:8])  # the right hash: kept
    assert os.listdir(tmp_path) == [os.path.basename(INCEPTION_URL)] and len(calls) == 2
    net = load_inception(cache_dir=str(tmp_path))  # now from the cache
    assert len(calls) == 2 and open(path, "rb").read() == data
    assert torch.equal(loaded_weights(net)["Mixed_7c.branch_pool.conv.weight"],
                       weights["Mixed_7c.branch_pool.conv.weight"])


# --- statistics and the Frechet distance -------------------------------------------------------------------------


def random_stats(n, d, seed, shift=0.0):
    f = np.random.default_rng(seed).standard_normal((n, d)) @ np.diag(np.linspace(0.5, 2, d)) + shift
    return f.mean(0), np.cov(f, rowvar=False)


def test_frechet_matches_pytorch_fid_and_closed_forms():
    mu1, s1 = random_stats(300, 64, 0)
    mu2, s2 = random_stats(300, 64, 1, shift=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytorch-fid passes sqrtm's deprecated `disp`
        expected = calculate_frechet_distance(mu1, s1, mu2, s2)
    assert abs(frechet_distance(mu1, s1, mu2, s2) - expected) <= 1e-6 * expected
    a, b = np.linspace(0.1, 3, 32), np.linspace(2, 0.5, 32)
    m1, m2 = np.zeros(32), np.full(32, 0.5)
    closed = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + 32 * 0.25
    assert abs(frechet_distance(m1, np.diag(a), m2, np.diag(b)) - closed) < 1e-10
    assert abs(frechet_distance(m1, np.eye(32), m2 + 0.5, np.eye(32)) - 32.0) < 1e-10  # ||dmu||^2 = 32 * 1^2
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)


def test_frechet_singular_covariances_stay_finite_and_real():
    mu1, s1 = random_stats(10, 64, 2)  # rank 9 < 64
    mu2, s2 = random_stats(12, 64, 3, shift=0.2)
    fid = frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(fid, float) and math.isfinite(fid)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert abs(fid - calculate_frechet_distance(mu1, s1, mu2, s2)) < 1e-6 * fid


def test_frechet_rejects_invalid_statistics():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))  # not a covariance
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_streaming_stats_equal_numpy_and_shards_combine():
    f = np.random.default_rng(4).standard_normal((301, 16)) * 3 + np.arange(16)
    whole = FeatureStats(16)
    for chunk in np.array_split(f, [1, 50, 51, 200]):
        whole.add(torch.from_numpy(chunk))
    mu, sigma = whole.mu_sigma()
    assert whole.count == 301
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-10, atol=1e-10)
    left, right = FeatureStats(16), FeatureStats(16)
    left.add(f[:120])
    right.add(f[120:])
    merged = left.merge(right).all_reduce()  # all_reduce without torch.distributed: unchanged
    np.testing.assert_allclose(merged.mu_sigma()[1], sigma, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        whole.add(np.zeros((3, 8)))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(16).mu_sigma()


def test_stats_file_round_trip_and_errors(tmp_path):
    mu, sigma = random_stats(50, 8, 5)
    path = tmp_path / "ref.npz"
    save_stats(str(path), mu, sigma)
    with np.load(path) as f:
        assert sorted(f.files) == ["mu", "sigma"] and f["sigma"].dtype == np.float64
    mu2, sigma2 = load_stats(str(path), dim=8)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    with pytest.raises(ValueError, match=r"ref.npz.*mu \[2048\].*got mu \[8\]"):
        load_stats(str(path))
    np.savez(tmp_path / "nosigma.npz", mu=mu)
    with pytest.raises(ValueError, match=r"nosigma.npz.*'mu' and 'sigma'.*\['mu'\]"):
        load_stats(str(tmp_path / "nosigma.npz"), dim=8)
    (tmp_path / "garbage.npz").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="garbage.npz.*not a readable"):
        load_stats(str(tmp_path / "garbage.npz"))
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_stats(str(tmp_path / "absent.npz"))


# --- images --------------------------------------------------------------------------------------------------------


def test_images_to_uint8_conventions():
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 3.0])
    edm = images_to_uint8(x)
    assert edm.dtype == torch.uint8
    expected = np.clip(np.floor((x.double().numpy() + 1) * 127.5 + 0.5), 0, 255)  # rounding to nearest
    assert edm.tolist() == expected.astype(int).tolist() == [0, 0, 0, 128, 191, 255, 255, 255]
    assert images_to_uint8(x, "dmd2").tolist() == [0, 0, 0, 127, 191, 254, 255, 255]  # truncation
    ramp = torch.linspace(-1, 1, 2001).bfloat16()  # a bf16 generator output is converted in float32
    assert torch.equal(images_to_uint8(ramp), images_to_uint8(ramp.float()))
    with pytest.raises(ValueError, match="convention"):
        images_to_uint8(x, "round")


def write_images(folder):
    """Five small images: RGB PNG, grayscale PNG, RGB JPG, palette PNG, in nested folders."""
    rng = np.random.default_rng(6)
    arrays = {}
    os.makedirs(folder / "00001", exist_ok=True)
    for i, (name, mode) in enumerate([("00000/a.png", "RGB"), ("00000/b.png", "L"), ("00001/c.png", "RGB"),
                                      ("00001/d.jpg", "RGB"), ("00001/e.png", "P")]):
        os.makedirs((folder / name).parent, exist_ok=True)
        rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        image = PIL.Image.fromarray(rgb[:, :, 0] if mode == "L" else rgb).convert(mode)
        image.save(folder / name)
        arrays[name] = np.asarray(PIL.Image.open(folder / name).convert("RGB")).transpose(2, 0, 1)
    (folder / "dataset.json").write_text("{}")
    return arrays


def test_image_folder_and_zip_reading(tmp_path):
    arrays = write_images(tmp_path / "imgs")
    batches = list(iter_image_batches(str(tmp_path / "imgs"), batch_size=2))
    assert [b.shape[0] for b in batches] == [2, 2, 1] and batches[0].dtype == torch.uint8
    everything = torch.cat(batches)
    for i, name in enumerate(sorted(arrays)):
        assert np.array_equal(everything[i].numpy(), arrays[name]), name  # grayscale repeated, palette as RGB
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as archive:
        for root, _, files in os.walk(tmp_path / "imgs"):
            for f in files:
                archive.write(os.path.join(root, f), os.path.relpath(os.path.join(root, f), tmp_path / "imgs"))
    assert torch.equal(torch.cat(list(iter_image_batches(str(tmp_path / "imgs.zip"), batch_size=3))), everything)
    shards = [torch.cat(list(iter_image_batches(str(tmp_path / "imgs"), 4, rank, 2))) for rank in (0, 1)]
    assert torch.equal(shards[0], everything[0::2]) and torch.equal(shards[1], everything[1::2])


@pytest.mark.parametrize("mode,message", [("I;16", r"uint16 pixels.*8-bit"), ("RGBA", "4 channels"),
                                          ("LA", "2 channels")])
def test_bad_images_are_refused(tmp_path, mode, message):
    os.makedirs(tmp_path / "imgs")
    PIL.Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "imgs" / "0.png")
    image = PIL.Image.new(mode, (4, 4))
    image.save(tmp_path / "imgs" / "1.png")
    with pytest.raises(ValueError, match=f"1.png: {message}"):
        list(iter_image_batches(str(tmp_path / "imgs")))


def test_image_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list(iter_image_batches(str(tmp_path / "nowhere")))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no .png"):
        list(iter_image_batches(str(tmp_path / "empty")))
    os.makedirs(tmp_path / "mixed")
    PIL.Image.new("RGB", (4, 4)).save(tmp_path / "mixed" / "0.png")
    PIL.Image.new("RGB", (5, 4)).save(tmp_path / "mixed" / "1.png")
    with pytest.raises(ValueError, match=r"1.png: size \[3, 4, 5\] differs"):
        list(iter_image_batches(str(tmp_path / "mixed")))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "0.png").write_bytes(b"no png")
    with pytest.raises(ValueError, match="0.png: cannot decode"):
        list(iter_image_batches(str(tmp_path / "bad")))


# --- the protocol, with a cheap stand-in for Inception -----------------------------------------------------------

PROJECTION = torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def toy_features(images):
    assert images.dtype == torch.uint8
    return images.flatten(1).double() @ PROJECTION / 255


def toy_generate(noise, labels):
    return torch.tanh(noise + 0.3 * labels.view(-1, 1, 1, 1))


def protocol_stats(batch_size, rank=None, world_size=None, log=None):
    def generate(noise, labels):
        if log is not None:
            log.append((noise.clone(), labels.clone()))
        return toy_generate(noise, labels)
    return generator_stats(generate, toy_features, num_samples=40, num_classes=4, batch_size=batch_size, seed=3,
                           noise_shape=(3, 8, 8), rank=rank, world_size=world_size, feature_dim=16)


def test_protocol_balanced_seeded_and_batch_independent():
    log = []
    single = protocol_stats(7, log=log)
    labels = torch.cat([l for _, l in log])
    noise = torch.cat([n for n, _ in log])
    assert single.count == 40 and labels.tolist() == [i % 4 for i in range(40)]
    assert torch.bincount(labels).tolist() == [10, 10, 10, 10]
    assert torch.equal(noise[13], torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(3 + 13)))
    mu, sigma = single.mu_sigma()
    features = toy_features(images_to_uint8(toy_generate(noise, labels))).numpy()
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-10, atol=1e-12)
    other_mu, other_sigma = protocol_stats(40).mu_sigma()
    np.testing.assert_allclose(other_mu, mu, rtol=1e-12)
    np.testing.assert_allclose(other_sigma, sigma, rtol=1e-12, atol=1e-12)


def test_protocol_sharding_equals_single_process():
    mu, sigma = protocol_stats(6).mu_sigma()
    shards, logs = [], []
    for rank in range(2):
        logs.append([])
        shards.append(protocol_stats(6, rank, 2, logs[-1]))
    for log in logs:  # every rank is class-balanced: 5 label cycles of 4 each
        assert torch.bincount(torch.cat([l for _, l in log])).tolist() == [5, 5, 5, 5]
    merged = shards[0].merge(shards[1])
    assert merged.count == 40
    np.testing.assert_allclose(merged.mu_sigma()[0], mu, rtol=1e-12)
    np.testing.assert_allclose(merged.mu_sigma()[1], sigma, rtol=1e-12, atol=1e-12)
    logs = [[] for _ in range(3)]  # 10 label cycles over 3 ranks: 3, 3 and 4 whole cycles
    for rank in range(3):
        protocol_stats(5, rank, 3, logs[rank])
    labels = [torch.cat([l for _, l in log]) for log in logs]
    assert [torch.bincount(l, minlength=4).tolist() for l in labels] == [[3] * 4, [3] * 4, [4] * 4]
    noise = torch.cat([n for log in logs for n, _ in log])
    assert torch.equal(noise, torch.cat([n for n, _ in protocol_log(40)]))  # the union is the single run
    with pytest.raises(ValueError, match="multiple of num_classes"):
        generator_stats(toy_generate, toy_features, num_samples=42, num_classes=4)


def protocol_log(batch_size):
    log = []
    protocol_stats(batch_size, log=log)
    return log


def distributed_worker(rank, store, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        mu, sigma = protocol_stats(6).mu_sigma()  # rank and world size from torch.distributed
        np.savez(f"{out}{rank}.npz", mu=mu, sigma=sigma)
    finally:
        torch.distributed.destroy_process_group()


def test_protocol_under_torch_distributed(tmp_path):
    torch.multiprocessing.spawn(distributed_worker, args=(str(tmp_path / "store"), str(tmp_path / "rank")),
                                nprocs=2)
    mu, sigma = protocol_stats(6).mu_sigma()
    for rank in range(2):
        with np.load(tmp_path / f"rank{rank}.npz") as f:
            np.testing.assert_allclose(f["mu"], mu, rtol=1e-12)
            np.testing.assert_allclose(f["sigma"], sigma, rtol=1e-12, atol=1e-12)


def test_fid_of_generator_and_reference_stats(tmp_path):
    write_images(tmp_path / "imgs")
    for name in ("00000/a.png", "00000/b.png", "00001/c.png", "00001/d.jpg", "00001/e.png"):  # 8x8 for toy_features
        image = PIL.Image.open(tmp_path / "imgs" / name).convert("RGB").resize((8, 8))
        image.save(tmp_path / "imgs" / name)
    ref_path = str(tmp_path / "ref.npz")
    mu, sigma = compute_reference_stats(str(tmp_path / "imgs"), ref_path, toy_features, batch_size=2, feature_dim=16)
    features = toy_features(torch.cat(list(iter_image_batches(str(tmp_path / "imgs"))))).numpy()
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(load_stats(ref_path, 16)[1], np.cov(features, rowvar=False), rtol=1e-10, atol=1e-12)
    fid = fid_of_generator(toy_generate, ref_path, toy_features, num_samples=40, num_classes=4, batch_size=16, seed=3,
                           noise_shape=(3, 8, 8), feature_dim=16)
    assert fid == pytest.approx(frechet_distance(*protocol_stats(16).mu_sigma(), mu, sigma), rel=1e-9)
    assert fid > 1
    stats = image_stats(str(tmp_path / "imgs"), toy_features, feature_dim=16)
    assert stats.count == 5


def test_cli_argument_errors(tmp_path):
    for argv in ([], ["--images", "x"], ["--ref-from", "x"], ["--images", "x", "--ref", "r", "--ref-from", "y"]):
        with pytest.raises(SystemExit):
            fid_main(argv)
    write_images(tmp_path / "imgs")
    with pytest.raises(FileNotFoundError, match="absent.npz: reference statistics not found"):
        fid_main(["--images", str(tmp_path / "imgs"), "--ref", str(tmp_path / "absent.npz")])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit, match="an empty folder"):
        fid_main(["--images", str(tmp_path / "empty"), "--ref", str(tmp_path / "absent.npz")])


@pytest.mark.slow
def test_cli_end_to_end_with_inception(tmp_path, weights):
    """Real Inception (random weights) and 2048-d sqrtm: minutes on 2 CPU cores."""
    torch.save(weights, tmp_path / "w.pth")
    write_images(tmp_path / "imgs")
    ref = str(tmp_path / "ref.npz")
    assert fid_main(["--ref-from", str(tmp_path / "imgs"), "--out", ref, "--inception", str(tmp_path / "w.pth"),
                     "--device", "cpu"]) is None
    fid = fid_main(["--images", str(tmp_path / "imgs"), "--ref", ref, "--inception", str(tmp_path / "w.pth"),
                    "--device", "cpu", "--batch", "2"])
    assert abs(fid) < 1e-3 * np.trace(load_stats(ref)[1])
