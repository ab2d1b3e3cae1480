"""Text-to-image evaluation (dmd2.py section 10) against the libraries that define the protocol: clean-fid (folder
FID), open_clip (CLIP score) and pandas (the official data_process.py subset). CPU, nothing downloaded: the
Inception and CLIP networks are randomly initialised and saved as files, the SDXL student is tiny_t2i_parts()."""
import contextlib
import dataclasses
import functools
import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn as nn

import dmd2
import edm_net

pytest.importorskip("cleanfid")  # requirements-sdxl.txt
from cleanfid import fid as cleanfid_fid  # noqa: E402
from cleanfid.inception_torchscript import InceptionV3W  # noqa: E402

TF = pytest.importorskip("torchvision.transforms.functional")


def official_transform(res=None, patch=False):
    """The official coco_evaluator.resize_and_center_crop, written out with torchvision as the official code does."""
    def transform(array):
        image = PIL.Image.fromarray(array)
        if patch:
            return np.array(TF.center_crop(image, 299) if min(image.size) >= 299 else image)
        return np.array(TF.center_crop(image, min(image.size)).resize((res, res), PIL.Image.LANCZOS))
    return transform


def random_image(rng, height, width):
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


class CleanFIDLayout(nn.Module):
    """clean-fid's TorchScript file layout: the network's `layers` map (x - 128) / 128 at 299 px to [N, 2048, 1, 1]."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        return self.layers(x)


class InceptionLayers(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.features(x)[:, :, None, None]


class TinyFeatures(nn.Module):  # a cheap stand-in with the same interface, for the end-to-end test
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 13, stride=13)
        self.proj = nn.Linear(8 * 23 * 23, 64)  # 64 features: FID's sqrtm stays instant

    def forward(self, x):
        return self.proj(torch.tanh(self.conv(x)).flatten(1))[:, :, None, None]


def save_torchscript(layers, folder):
    with torch.no_grad():
        traced = torch.jit.trace(layers, torch.zeros(1, 3, 299, 299))
    path = os.path.join(folder, "inception-2015-12-05.pt")
    torch.jit.script(CleanFIDLayout(traced)).save(path)
    return path


@pytest.fixture(scope="module")
def inception_files(tmp_path_factory):
    """A randomly initialised Inception saved twice: as a pytorch-fid .pth state dict and as a clean-fid TorchScript
    file. pytorch-fid's weight-file layout is torchvision's Inception v3 with 1008 classes and no aux head."""
    torchvision = pytest.importorskip("torchvision")
    folder = tmp_path_factory.mktemp("inception")
    torch.manual_seed(0)
    tree = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    for m in tree.modules():  # features of order 1 (the default init shrinks them to 1e-8) and non-trivial batch norms
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    torch.save(tree.state_dict(), folder / "random_inception.pth")
    net = edm_net.InceptionV3(state=tree.state_dict()).eval()
    return str(folder / "random_inception.pth"), save_torchscript(InceptionLayers(net), str(folder))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random open_clip model registered from a config (no download), and its weights saved as a file."""
    open_clip = pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("clip")
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                              "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / "dmd2-test-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(folder / "dmd2-test-tiny-clip.json"))
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("dmd2-test-tiny-clip")
    torch.save(model.state_dict(), folder / "tiny_clip.pt")
    return "dmd2-test-tiny-clip", str(folder / "tiny_clip.pt")


def write_coco(folder, sizes, captions_per_image=(2, 1, 3), seed=0):
    """A COCO-2014 val folder in the official layout; annotation order deliberately not the image order."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder / "val2014")
    os.makedirs(folder / "annotations")
    images, annotations = [], []
    for i, (h, w) in enumerate(sizes):
        name = f"COCO_val2014_{1000 + 7 * i:012d}.jpg"
        random_image(rng, h, w).save(folder / "val2014" / name, quality=90)
        images.append({"id": 1000 + 7 * i, "file_name": name, "height": h, "width": w})
        for k in range(captions_per_image[i % len(captions_per_image)]):
            annotations.append({"id": len(annotations), "image_id": 1000 + 7 * i,
                                "caption": f"a photo number {i} caption {k}"})
    order = rng.permutation(len(annotations))
    data = {"info": {}, "images": images, "annotations": [annotations[j] for j in order]}
    (folder / "annotations" / "captions_val2014.json").write_text(json.dumps(data))
    return str(folder)


# --- image transforms ---------------------------------------------------------------------------------------------


def coordinate_image(height, width):
    """Pixel (y, x) = (y, x, 7): crops can be read off the pixels."""
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return PIL.Image.fromarray(np.stack([y, x, np.full_like(y, 7)], -1).astype(np.uint8))


def test_long_edge_crop_and_patch_crop_on_hand_made_images():
    crop = dmd2.center_crop(coordinate_image(6, 10), 6)  # 4 extra columns: 2 left, 2 right
    assert np.asarray(crop)[0, :, 1].tolist() == [2, 3, 4, 5, 6, 7] and crop.size == (6, 6)
    crop = dmd2.center_crop(coordinate_image(6, 7), 6)  # offset round(0.5) = 0, as torchvision
    assert np.asarray(crop)[0, 0, 1] == 0
    crop = dmd2.center_crop(coordinate_image(9, 6), 6)  # offset round(1.5) = 2
    assert np.asarray(crop)[:, 0, 0].tolist() == [2, 3, 4, 5, 6, 7]
    flat = PIL.Image.new("RGB", (40, 30), (10, 200, 30))
    assert np.unique(np.asarray(dmd2.crop_resize(flat, 16)).reshape(-1, 3), axis=0).tolist() == [[10, 200, 30]]
    image = random_image(np.random.default_rng(1), 330, 420)
    expected = image.crop((45, 0, 375, 330)).resize((64, 64), PIL.Image.LANCZOS)
    np.testing.assert_array_equal(np.asarray(dmd2.crop_resize(image, 64)), np.asarray(expected))
    patch = dmd2.patch_crop(image)
    assert patch.size == (299, 299)
    np.testing.assert_array_equal(np.asarray(patch), np.asarray(image)[16:315, 60:359])  # round(15.5), round(60.5)
    small = random_image(np.random.default_rng(2), 298, 500)
    assert dmd2.patch_crop(small) is small  # too small: passed unchanged to the 299 resize, as the official code
    for h, w in [(330, 420), (301, 300), (500, 333), (298, 500)]:
        image = random_image(np.random.default_rng(h), h, w)
        for ours, theirs in [(dmd2.crop_resize(image, 64), official_transform(64)(np.asarray(image))),
                             (dmd2.patch_crop(image), official_transform(patch=True)(np.asarray(image)))]:
            np.testing.assert_array_equal(np.asarray(ours), theirs)


# --- COCO captions and the subset ---------------------------------------------------------------------------------


def official_subset_with_pandas(annotation_file, n):
    """main/sdxl/data_process.py's steps, run with pandas."""
    pd = pytest.importorskip("pandas")
    data = json.load(open(annotation_file))
    np.random.seed(123)
    df = pd.DataFrame(data["images"]).merge(pd.DataFrame(data["annotations"]), how="left", left_on="id",
                                            right_on="image_id")
    df = df[["file_name", "caption"]].sample(frac=1).drop_duplicates(subset="file_name")
    return list(df.sample(n).itertuples(index=False, name=None))


def test_subset_reproduces_official_data_process(tmp_path):
    sizes = [(20 + i, 30) for i in range(40)]
    coco = write_coco(tmp_path, sizes, captions_per_image=(5, 6, 7, 5, 5))
    rows, names = dmd2.read_coco_captions(coco)
    assert len(names) == 40 and len(rows) == sum((5, 6, 7, 5, 5)[i % 5] for i in range(40))
    subset = dmd2.coco_caption_subset(rows, 12)
    assert len({name for name, _ in subset}) == 12
    assert subset == official_subset_with_pandas(os.path.join(coco, "annotations", "captions_val2014.json"), 12)
    assert dmd2.coco_caption_subset(rows, 5) == subset[:5]  # --num N: a prefix of the official list
    assert dmd2.coco_caption_subset(rows, 12, seed=124) != subset
    with pytest.raises(ValueError, match="hold 40 images, fewer than the 41 asked"):
        dmd2.coco_caption_subset(rows, 41)


# --- FID and CLIP score against the reference libraries -------------------------------------------------------------


def fid_folders(tmp_path):
    rng = np.random.default_rng(3)
    folders = [tmp_path / "a", tmp_path / "b"]
    for k, folder in enumerate(folders):
        folder.mkdir()
        for i, (h, w) in enumerate([(80, 120), (130, 90), (310, 330), (90, 301)]):  # patch: cropped or not
            image = np.asarray(random_image(rng, h, w + k)) // (1 + 3 * k)  # folder b: darker, lower contrast
            PIL.Image.fromarray(image).save(folder / f"{i}.png")
    return folders


def compare_with_cleanfid(folders, script, weights, patch, dim):
    """Our FID of two folders (with each weight file) and clean-fid's compute_fid with its loader of the TorchScript
    file; all use the first `dim` features (2048: all; fewer keeps the 2048 x 2048 sqrtm, half a minute on one core,
    out of the fast tests)."""
    extractor = InceptionV3W(os.path.dirname(script), download=False)  # clean-fid's own loader for its file
    theirs = cleanfid_fid.compute_fid(str(folders[0]), str(folders[1]), mode="clean", num_workers=0, batch_size=4,
                                      device=torch.device("cpu"), verbose=False, use_dataparallel=False,
                                      custom_feat_extractor=lambda x: extractor(x)[:, :dim],
                                      custom_image_tranform=official_transform(64, patch))
    transform = dmd2.patch_crop if patch else functools.partial(dmd2.crop_resize, res=64)
    for path in weights:
        name, features = dmd2.t2i_inception(path)
        assert name == ("torchscript-inception" if path.endswith(".pt") else "pytorch-fid-inception")
        stats = [dmd2.t2i_stats(sorted(str(p) for p in f.iterdir()), transform, lambda x: features(x)[:, :dim], dim,
                                batch=3, workers=2 if path.endswith(".pt") else 0) for f in folders]
        ours = dmd2.frechet_distance(*stats[0], *stats[1])
        assert ours == pytest.approx(theirs, rel=1e-6) and theirs > 10  # 122.6 / 107.7 at 64 features


@pytest.mark.parametrize("patch", [False, True])
def test_folder_fid_equals_cleanfid(tmp_path, inception_files, patch):
    compare_with_cleanfid(fid_folders(tmp_path), inception_files[1], inception_files, patch, dim=64)


@pytest.mark.slow
def test_folder_fid_equals_cleanfid_all_2048_features(tmp_path, inception_files):
    compare_with_cleanfid(fid_folders(tmp_path), inception_files[1], inception_files[1:], patch=False, dim=2048)


def test_clip_score_equals_direct_open_clip(tmp_path, tiny_clip):
    open_clip = pytest.importorskip("open_clip")
    model, preprocess, tokenizer = dmd2.load_clip(*tiny_clip)
    rng = np.random.default_rng(4)
    paths, captions = [], ["a red bus on a street", "Two dogs playing.", "word " * 80]  # the last one is cut at 77
    for i, (h, w) in enumerate([(300, 200), (256, 256), (120, 500)]):
        paths.append(str(tmp_path / f"{i}.png"))
        random_image(rng, h, w).save(paths[-1])
    ours = dmd2.clip_score(paths, captions, (model, preprocess, tokenizer), batch=2, workers=2)
    with torch.no_grad():
        image = torch.stack([preprocess(TF.center_crop(PIL.Image.open(p).convert("RGB"), min(PIL.Image.open(p).size))
                                        .resize((256, 256), PIL.Image.LANCZOS)) for p in paths])
        a = model.encode_image(image)
        b = model.encode_text(open_clip.tokenize(["A photo depicts " + c for c in captions]))
        direct = ((a / a.norm(dim=1, keepdim=True)) * (b / b.norm(dim=1, keepdim=True))).sum(1).mean()
    assert ours == pytest.approx(float(direct), abs=1e-6) and abs(ours) > 1e-3


def test_prefixed_tokens_equal_the_official_token_insertion():
    """Official compute_clip_score: tokenize(caption, truncate) then insert the 3 tokens of "A photo depicts" after
    <start>, cut to 77 and put <end> last when the cut removed it. Equal to tokenising the prefixed text."""
    open_clip = pytest.importorskip("open_clip")
    captions = ["a cat", "word " * 72, "word " * 73, "word " * 74, "word " * 75, "word " * 90, "A  Dog,  RUNNING!"]
    tokens = open_clip.tokenize(captions)
    prefix = open_clip.tokenize(["A photo depicts "])[:, 1:4].expand(len(captions), -1)
    official = torch.cat([tokens[:, :1], prefix, tokens[:, 1:]], dim=1)[:, :77]
    last = official[:, 76:77].clone()
    last[last > 0] = 49407
    official = torch.cat([official[:, :76], last], dim=1)
    assert torch.equal(open_clip.get_tokenizer("ViT-g-14")([dmd2.CLIP_PREFIX + c for c in captions]), official)


# --- generation and the command line --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny random SDXL-shaped 4-step student saved as a `dmd2.py --dataset sdxl --tiny true` run checkpoint."""
    pytest.importorskip("diffusers")
    folder = tmp_path_factory.mktemp("student")
    spec = dict(model_id="", sdxl=True, tiny=True, seed=0)
    generator = dmd2.t2i_parts(spec).teacher()
    config = dataclasses.asdict(dmd2.Config(**{**dmd2.PRESETS["sdxl"], "dataset": "sdxl", "tiny": True, "seed": 0}))
    torch.save({"config": config, "arch": {"kind": "t2i", "kwargs": spec},
                "distiller": {"generator": generator.state_dict(), "ema": None, "step": 0}}, folder / "checkpoint.pt")
    return str(folder / "checkpoint.pt")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco"), [(240, 320), (320, 240), (300, 300), (200, 150), (310, 400),
                                                        (128, 128)])


@pytest.fixture(scope="module")
def tiny_inception(tmp_path_factory):
    torch.manual_seed(0)
    return save_torchscript(TinyFeatures(), str(tmp_path_factory.mktemp("tiny_inception")))


def test_generation_is_per_sample_seeded_sharded_and_resumable(tmp_path, student):
    pipe, call = dmd2.t2i_pipeline(f"student:{student}", 4, 0)
    assert call == {"timesteps": [999, 749, 499, 249], "guidance_scale": 0}
    prompts = ["a cat", "a dog", "red car", "blue sky", "green tree"]
    dmd2.t2i_generate(pipe, call, prompts, str(tmp_path / "one"), seed=5, batch=3)
    for rank in (0, 1):
        dmd2.t2i_generate(pipe, call, prompts, str(tmp_path / "two"), seed=5, batch=2, rank=rank, world_size=2)
    names = [f"{i:05d}.png" for i in range(5)]
    assert sorted(os.listdir(tmp_path / "one")) == sorted(os.listdir(tmp_path / "two")) == names
    read = lambda folder, name: np.asarray(PIL.Image.open(tmp_path / folder / name)).astype(int)  # noqa: E731
    for name in names:
        assert read("one", name).shape == (128, 128, 3)
        assert np.abs(read("one", name) - read("two", name)).max() <= 1  # batch / process independent
    assert np.abs(read("one", names[0]) - read("one", names[1])).max() > 10
    first = read("one", names[2])
    os.remove(tmp_path / "one" / names[2])
    before = {n: os.path.getmtime(tmp_path / "one" / n) for n in names if n != names[2]}
    dmd2.t2i_generate(pipe, call, prompts, str(tmp_path / "one"), seed=5, batch=3)  # resume: only the missing one
    assert {n: os.path.getmtime(tmp_path / "one" / n) for n in before} == before
    assert np.abs(read("one", names[2]) - first).max() <= 1


def test_student_pipeline_equals_our_sampler(tmp_path, student):
    """The pipeline path of `evaluate` gives the images of dmd2's own SDXL sampler: the pipeline's prompt encoding,
    the per-sample generator (latents first, then LCM's re-noising draws) and decoding; within one grey level
    ((x / 2 + 0.5) x 255 vs (x + 1) x 127.5 before truncation)."""
    pipe, call = dmd2.t2i_pipeline(f"student:{student}", 4, 0)
    dmd2.t2i_generate(pipe, call, ["a red cat", "two dogs"], str(tmp_path), seed=9, batch=2)
    for i, prompt in enumerate(["a red cat", "two dogs"]):
        generator = torch.Generator().manual_seed(9 + i)
        latents = torch.randn(4, 16, 16, generator=generator)[None]
        parts = dmd2.T2IParts(pipe.unet, (pipe.text_encoder, pipe.text_encoder_2), (pipe.tokenizer, pipe.tokenizer_2),
                              pipe.vae, dmd2.ddpm_alphas_cumprod())
        denoiser = parts.teacher()
        cond = dmd2.Prompts([], parts.tokenizers, parts.text_encoders).encode([prompt])
        step_sigmas = dmd2.generator_sigmas(4, denoiser.sigmas)
        with torch.no_grad():
            x0 = dmd2.generate(denoiser, latents, cond, step_sigmas,
                               lambda shape, device=None: torch.randn(shape, generator=generator))
        image = (dmd2.decode_latents(pipe.vae, x0)[0] + 1) * 127.5  # official: clamp, then truncate
        ours = image.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy().astype(int)
        assert np.abs(np.asarray(PIL.Image.open(tmp_path / f"{i:05d}.png")).astype(int) - ours).max() <= 1


def test_every_model_kind_builds_its_pipeline_and_generates(tmp_path, monkeypatch):
    """The branches of t2i_pipeline offline: SDXL base is the tiny model (a saved pipeline folder for --model_id /
    hf:ID, load_t2i patched), every downloaded UNet file is a tiny state dict; the files asked for are recorded."""
    diffusers = pytest.importorskip("diffusers")
    parts = dmd2.tiny_t2i_parts(seed=0)
    euler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             steps_offset=1, timestep_spacing="leading")  # SDXL base's scheduler
    diffusers.StableDiffusionXLPipeline(
        vae=parts.vae, text_encoder=parts.text_encoders[0], text_encoder_2=parts.text_encoders[1],
        tokenizer=parts.tokenizers[0], tokenizer_2=parts.tokenizers[1], unet=parts.unet,
        scheduler=euler).save_pretrained(tmp_path / "sdxl")
    torch.save(parts.unet.state_dict(), tmp_path / "unet.bin")
    parts.unet.save_pretrained(tmp_path / "lcm_unet")
    asked = []
    monkeypatch.setattr(dmd2, "load_t2i", lambda model_id, sdxl=True: dmd2.tiny_t2i_parts(seed=0))
    monkeypatch.setattr(dmd2, "download_dmd2", lambda name, repo=dmd2.DMD2_HF_REPO, fix="": asked.append(
        f"{repo}/{name}") or str(tmp_path / "unet.bin"))
    base = str(tmp_path / "sdxl")
    cases = [(f"hf:{base}", 2, 6.0, "EulerDiscreteScheduler", dict(num_inference_steps=2, guidance_scale=6.0)),
             ("dmd2-sdxl", 1, 0, "LCMScheduler", dict(timesteps=[399], guidance_scale=0)),
             ("sdxl-lightning", 4, 0, "EulerDiscreteScheduler", dict(num_inference_steps=4, guidance_scale=0)),
             ("sdxl-lightning", 1, 0, "EulerDiscreteScheduler", dict(num_inference_steps=1, guidance_scale=0)),
             (f"lcm-sdxl:{tmp_path / 'lcm_unet'}", 4, 0, "LCMScheduler", dict(num_inference_steps=4, guidance_scale=0))]
    for i, (model, steps, guidance, scheduler, call) in enumerate(cases):
        pipe, kwargs = dmd2.t2i_pipeline(model, steps, guidance, model_id=base)
        assert type(pipe.scheduler).__name__ == scheduler and kwargs == call, model
        if model == "sdxl-lightning":  # SDXL-Lightning's model card: trailing timesteps; x0 prediction at 1 step
            assert pipe.scheduler.config.timestep_spacing == "trailing"
            assert pipe.scheduler.config.prediction_type == ("sample" if steps == 1 else "epsilon")
        dmd2.t2i_generate(pipe, kwargs, ["a cat"], str(tmp_path / f"out{i}"), seed=1)
        assert PIL.Image.open(tmp_path / f"out{i}" / "00000.png").size == (128, 128)
    assert asked == ["tianweiy/DMD2/dmd2_sdxl_1step_unet_fp16.bin",
                     "ByteDance/SDXL-Lightning/sdxl_lightning_4step_unet.safetensors",
                     "ByteDance/SDXL-Lightning/sdxl_lightning_1step_unet_x0.safetensors"]
    with pytest.raises(ValueError, match="released DMD2 SDXL is 1 or 4 steps"):
        dmd2.t2i_pipeline("dmd2-sdxl", 2, 0)
    with pytest.raises(ValueError, match="give student:PATH"):
        dmd2.t2i_pipeline("student", 4, 0)


def evaluate_args(coco, out, refs, inception, clip, *extra):
    return ["evaluate", "--coco", coco, "--out", str(out), "--refs", str(refs), "--inception", inception,
            "--clip_model", clip[0], "--clip_weights", clip[1], "--batch", "2", "--workers", "0", *extra]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, student, coco, tiny_inception, tiny_clip):
    """`evaluate` of the tiny student on 4 COCO prompts: (arguments, metrics, printed lines)."""
    folder = tmp_path_factory.mktemp("evaluated")
    args = [*evaluate_args(coco, folder / "out", folder / "refs", tiny_inception, tiny_clip), "--model",
            f"student:{student}", "--num", "4"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        metrics = dmd2.main(args)
    return args, metrics, printed.getvalue().strip().splitlines()


def test_evaluate_student_end_to_end(evaluated):
    args, metrics, printed = evaluated
    out, refs = args[args.index("--out") + 1], args[args.index("--refs") + 1]
    assert sorted(os.listdir(out)) == [f"{i:05d}.png" for i in range(4)] + ["metrics.json", "settings.json"]
    assert set(metrics) == {"N", "N_ref", "FID", "patch_FID", "clip_score"} and metrics["N"] == metrics["N_ref"] == 4
    assert metrics["FID"] > 0 and metrics["patch_FID"] > 0 and -1 <= metrics["clip_score"] <= 1
    assert [line.split(" (")[0].rsplit(" ", 1)[0] for line in printed] == ["FID", "patch FID", "CLIP score"]
    assert all("N=4" in line for line in printed)
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["FID"] == metrics["FID"] and saved["clip_score"] == metrics["clip_score"]
    names = sorted(os.listdir(refs))
    assert names == ["coco2014-val_4-of-seed123_crop-lanczos512_clean299_torchscript-inception.npz",
                     "coco2014-val_4-of-seed123_patch299_clean299_torchscript-inception.npz"]
    with np.load(os.path.join(refs, names[0])) as f:
        assert str(f["protocol"]) == names[0][:-4].replace("_", " ") and int(f["num"]) == 4
        assert f["mu"].shape == (64,) and f["sigma"].shape == (64, 64)
    # the images already there: evaluated again without generation, same numbers from the cached references
    assert dmd2.main([*args[:-4], "--model", "images", "--num", "4"]) == metrics


def test_evaluate_under_torchrun_equals_one_process(tmp_path, evaluated):
    """Two processes started as torchrun starts them (RANK / WORLD_SIZE / MASTER_* environment, gloo on CPU): the
    statistics are sharded and reduced, every rank returns the single-process FIDs. (Sharded generation: the
    generation test; the CLIP score's reduction is left out: open_clip's import alone takes 10 s per process.)"""
    args, metrics, _ = evaluated
    args = [*args[:-4], "--model", "images", "--num", "4", "--no_clip"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "import dmd2, json, sys; print(json.dumps(dmd2.main(sys.argv[1:])))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", code, *args], cwd=root, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", OMP_NUM_THREADS="1",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=root))
             for r in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0].startswith("FID ") and "N=4" in outputs[0] and not outputs[1].startswith("FID")  # rank 0 prints
    for output in outputs:
        ranked = json.loads(output.strip().splitlines()[-1])
        assert ranked.keys() == metrics.keys() - {"clip_score"} and ranked["N"] == 4
        for key in ("FID", "patch_FID"):
            assert ranked[key] == pytest.approx(metrics[key], rel=1e-6), key  # other batches: float32 features


def test_bad_input_one_clear_line(tmp_path, coco, student, tiny_inception, tiny_clip):
    def run(*extra, coco=coco, out=tmp_path / "out", refs=tmp_path / "refs"):
        return dmd2.main([*evaluate_args(coco, out, refs, tiny_inception, tiny_clip, "--no_clip"), *extra])

    def fails(error, match, *extra, **kwargs):
        with pytest.raises(error, match=match) as info:
            run(*extra, **kwargs)
        assert "\n" not in str(info.value)

    fails(FileNotFoundError, "no such COCO folder.*val2014.zip", "--model", "images", coco=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    fails(FileNotFoundError, r"captions_val2014.json: no such file", "--model", "images", coco=str(tmp_path / "empty"))
    other = tmp_path / "other"
    (other / "annotations").mkdir(parents=True)
    (other / "annotations" / "captions_val2014.json").write_text(json.dumps({"images": [{"id": 1}],
                                                                               "annotations": []}))
    fails(ValueError, "not a COCO captions file.*file_name", "--model", "images", coco=str(other))
    fails(ValueError, "hold 6 images, fewer than the 7 asked", "--model", "images", "--num", "7")
    broken = tmp_path / "broken"
    write_coco(broken, [(50, 60), (60, 50), (70, 70)])
    os.remove(broken / "val2014" / sorted(os.listdir(broken / "val2014"))[1])
    fails(FileNotFoundError, "1 of the 3 reference images are missing", "--model", "images", "--num", "3",
          coco=str(broken), refs=tmp_path / "refs_broken")
    (tmp_path / "refs_bad").mkdir()
    good = dmd2.main(["evaluate", "--model", f"student:{student}", "--coco", coco, "--num", "3", "--no_clip",
                      "--out", str(tmp_path / "out3"), "--refs", str(tmp_path / "refs_bad"), "--inception",
                      tiny_inception, "--protocol", "sd15"])
    assert good["N"] == 3 and good["N_ref"] == 6 and "patch_FID" not in good  # SD v1.5: every val2014 image
    ref = next((tmp_path / "refs_bad").iterdir())
    with np.load(ref) as f:
        mu, sigma = f["mu"], f["sigma"]
    edm_net.save_stats(str(ref), mu, sigma, protocol="coco2014-val all crop-lanczos512 clean299 torchscript-inception",
                    num=6)
    fails(ValueError, "reference statistics of .*crop-lanczos512.* needs .*crop-lanczos256", "--model", "images",
          "--num", "3", "--protocol", "sd15", out=tmp_path / "out3", refs=tmp_path / "refs_bad")
    edm_net.save_stats(str(ref), mu, sigma)  # EDM's layout without the protocol's name and N
    fails(ValueError, "no protocol name or N", "--model", "images", "--num", "3", "--protocol", "sd15",
          out=tmp_path / "out3", refs=tmp_path / "refs_bad")
    os.remove(tmp_path / "out3" / "00001.png")
    fails(ValueError, "holds 2 of the 3 images asked", "--model", "images", "--num", "3", "--protocol", "sd15",
          out=tmp_path / "out3")
    fails(ValueError, "other settings", "--model", f"student:{student}", "--num", "3", "--protocol", "sd15",
          "--seed", "1", out=tmp_path / "out3")
    fails(ValueError, "other settings", "--model", "images", "--num", "3", "--protocol", "sdxl", out=tmp_path / "out3")
    (tmp_path / "captions.txt").write_text("a cat on a mat\ntwo dogs\n")
    fails(ValueError, "--prompts is for --protocol sd15", "--model", "images", "--num", "2", "--prompts",
          str(tmp_path / "captions.txt"))
    fails(ValueError, "captions.txt holds 2 captions, fewer than the 3 asked", "--model", "images", "--num", "3",
          "--protocol", "sd15", "--prompts", str(tmp_path / "captions.txt"))
    fails(ValueError, "unknown --model", "--model", "nonsense", "--num", "3", out=tmp_path / "out4")
    fails(FileNotFoundError, "none.pt: no such file.*inception-2015-12-05.pt", "--model", "images", "--num", "3",
          "--inception", str(tmp_path / "none.pt"))


def test_offline_messages_name_the_file_to_download(tmp_path, monkeypatch):
    open_clip = pytest.importorskip("open_clip")

    def offline(cfg, *args, **kwargs):
        raise FileNotFoundError("Failed to download file (open_clip_pytorch_model.bin): no connection")
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", offline)
    with pytest.raises(RuntimeError, match=r"download https://huggingface.co/laion/CLIP-ViT-g-14-laion2B-s12B-b42K/"
                                           r"resolve/main/open_clip_pytorch_model.bin and pass --clip_weights PATH"):
        dmd2.load_clip()  # fails before building the network
    pytest.importorskip("diffusers")
    with pytest.raises(RuntimeError, match=r"hf download .*none --local-dir DIR"):
        dmd2.t2i_pipeline(f"hf:{tmp_path / 'none'}", 4, 0.0)
    with pytest.raises(FileNotFoundError, match=r"none.pt: no such file \(clean-fid's TorchScript Inception is "
                                                r"https://nvlabs-fi-cdn.*inception-2015-12-05.pt\)"):
        dmd2.t2i_inception(str(tmp_path / "none.pt"))
