"""The DMD2 method in dmd2.py: losses, GAN head, generators, the TTUR loop, checkpoints and resume."""
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import dmd2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cfg(**overrides):
    """toy2d at test size: a few iterations of every piece of the loop."""
    base = dict(dataset="toy2d", **{**dmd2.PRESETS["toy2d"], "teacher_iters": 30, "iters": 10, "batch_size": 16,
                                   "log_every": 1, "ckpt_every": 5, "sample_every": 1000, "eval_samples": 200,
                                   "warmup_steps": 2})
    return dmd2.Config(**{**base, **overrides})


def toy_teacher(seed=0):
    torch.manual_seed(seed)
    return dmd2.build_network(dict(kind="toy", kwargs=dict(num_classes=4, hidden=32, depth=2))).eval()


def params(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


# ----- noise grid -----------------------------------------------------------------------------------------------

def test_karras_grid_matches_official_values():
    s = dmd2.karras_sigmas()
    assert len(s) == 1000
    assert s[0].item() == pytest.approx(0.002, rel=1e-5) and s[-1].item() == pytest.approx(80.0, rel=1e-6)
    assert bool((s[1:] > s[:-1]).all())
    # sample values listed in the reference (official get_sigmas_karras, flipped)
    for idx, value in [(20, 0.00323), (100, 0.0168), (250, 0.170), (500, 2.53), (750, 17.6), (980, 72.05)]:
        assert s[idx].item() == pytest.approx(value, rel=5e-3)


def test_generator_sigmas_one_and_four_steps():
    s = dmd2.karras_sigmas()
    assert dmd2.generator_sigmas(1, s, 999).tolist() == [80.0]  # official --conditioning_sigma 80
    four = dmd2.generator_sigmas(4, s)
    assert torch.equal(four, s[[999, 749, 499, 249]])  # the paper's [999, 749, 499, 249] on the EDM grid


# ----- losses ---------------------------------------------------------------------------------------------------

def test_dm_loss_gradient_is_the_normalised_score_difference():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    pred_real, pred_fake = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    loss = dmd2.dm_loss(x, pred_real, pred_fake)
    loss.backward()
    p_real, p_fake = x.detach() - pred_real, x.detach() - pred_fake
    grad = (p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)  # official definition
    assert torch.allclose(x.grad, grad / x.numel(), rtol=1e-12, atol=1e-15)
    assert loss.item() == pytest.approx(0.5 * grad.pow(2).mean().item(), rel=1e-12)


def test_dm_loss_maps_nan_to_zero_gradient():
    x = torch.ones(2, 3, requires_grad=True)
    pred = torch.ones(2, 3)  # p_real = 0 -> 0/0 = nan -> nan_to_num -> 0
    dmd2.dm_loss(x, pred, pred).backward()
    assert torch.equal(x.grad, torch.zeros(2, 3))


def test_denoising_loss_uses_edm_weighting():
    net = lambda x, sigma, labels: torch.zeros_like(x)  # D = 0 -> loss = mean(lambda * x^2)
    x = torch.full((2, 1), 0.5)
    sigma = torch.tensor([0.1, 2.0])
    loss = dmd2.denoising_loss(net, x, None, sigma, torch.zeros_like(x))
    weights = 1 / sigma ** 2 + 4
    assert loss.item() == pytest.approx((weights * 0.25).mean().item(), rel=1e-6)


def test_gan_losses_softplus_forms():
    lf, lr = torch.tensor([[0.3], [-1.0]]), torch.tensor([[2.0], [0.1]])
    sp = lambda t: torch.log1p(torch.exp(t))
    assert dmd2.gan_generator_loss(lf).item() == pytest.approx(sp(-lf).mean().item(), rel=1e-6)
    assert dmd2.gan_discriminator_loss(lr, lf).item() == pytest.approx((sp(lf).mean() + sp(-lr).mean()).item(),
                                                                        rel=1e-6)


def test_distribution_matching_loss_gives_no_gradient_to_scores():
    real, fake = toy_teacher(0), toy_teacher(1)
    x = torch.randn(8, 2, requires_grad=True)
    labels = dmd2.onehot(torch.arange(8) % 4, 4)
    loss = dmd2.distribution_matching_loss(x, labels, real, fake, torch.full((8,), 0.5), torch.randn(8, 2))
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*real.parameters(), *fake.parameters()])


# ----- GAN head -------------------------------------------------------------------------------------------------

def test_gan_head_on_adm_bottleneck_matches_official_layout():
    head = dmd2.GANHead(768, 8)
    keys = sorted({k.split(".")[0] for k in head.state_dict()})
    assert keys == ["0", "1", "3", "4", "6"]  # official cls_pred_branch.{0,1,3,4,6}
    assert head[0].weight.shape == (768, 768, 4, 4) and head[0].stride == (2, 2)
    assert head[3].stride == (4, 4) and head[6].weight.shape == (1, 768, 1, 1)
    assert head(torch.randn(2, 768, 8, 8, dtype=torch.bfloat16)).shape == (2, 1)
    assert len(dmd2.GANHead(1280, 32)) == 3 * 3 + 3 + 1  # SDXL mid-block: three k4 s2 stages, then k4 s4
    assert dmd2.GANHead(64, 1)(torch.randn(5, 64)).shape == (5, 1)
    with pytest.raises(ValueError, match="square bottleneck"):
        dmd2.GANHead(64, 6)


# ----- generators and backward simulation -----------------------------------------------------------------------

class CountingGenerator(torch.nn.Module):
    """x0 = scale * x / sigma: records every call and whether autograd was on."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x, sigma, labels):
        self.calls.append((float(sigma.reshape(-1)[0]), torch.is_grad_enabled()))
        return self.scale * x / dmd2._per_sample(sigma, x)


def test_backward_simulation_rolls_out_current_generator_without_grad():
    step_sigmas = dmd2.generator_sigmas(4, dmd2.karras_sigmas())
    gen = CountingGenerator()
    torch.manual_seed(0)
    x, sigma = dmd2.backward_simulation(gen, None, step_sigmas, 3, (4, 2))
    assert [c[0] for c in gen.calls] == pytest.approx(step_sigmas[:3].tolist())
    assert not any(c[1] for c in gen.calls)  # the rollout has no autograd graph
    assert torch.equal(sigma, step_sigmas[3].expand(4)) and not x.requires_grad
    # the rollout uses the current weights: with scale 0 every x0 is 0, so x_3 is pure noise at sigma_3
    with torch.no_grad():
        gen.scale.zero_()
    torch.manual_seed(0)
    noise = [torch.randn(4, 2) for _ in range(4)]
    torch.manual_seed(0)
    x0, _ = dmd2.backward_simulation(gen, None, step_sigmas, 3, (4, 2))
    assert torch.allclose(x0, step_sigmas[3] * noise[3])
    x_k0, s_k0 = dmd2.backward_simulation(gen, None, step_sigmas, 0, (4, 2))
    assert s_k0[0] == step_sigmas[0] and x_k0.std() > 10  # k = 0: pure noise at sigma 80


def test_few_step_training_gets_gradient_only_through_last_step():
    cfg = tiny_cfg(generator_steps=4, gan=False, dfake_gen_update_ratio=1)
    d = dmd2.Distiller(cfg, toy_teacher(), (2,))
    calls = []
    d.generator.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    d.noise.gen.manual_seed(3)
    d.noise.randint(0, cfg.num_classes, cfg.batch_size)  # the labels, drawn first by train_step
    k = d.noise.shared_randint(0, 4)  # the step index the next iteration will draw
    d.noise.gen.manual_seed(3)
    d.train_step()
    assert calls == [False] * k + [True]


def test_noised_real_inputs_level_zero_is_pure_noise():
    step_sigmas = dmd2.generator_sigmas(4, dmd2.karras_sigmas())
    real, noise = torch.ones(4, 2), torch.randn(4, 2)
    x, sigma = dmd2.noised_real_inputs(None, real, step_sigmas, torch.tensor([0, 1, 2, 3]), noise)
    assert torch.allclose(x[0], noise[0] * 80.0)
    assert torch.allclose(x[2], 1 + step_sigmas[2] * noise[2])
    assert torch.equal(sigma, step_sigmas)


# ----- the TTUR loop ----------------------------------------------------------------------------------------------

def test_ttur_generator_steps_once_per_ratio_and_teacher_untouched():
    cfg = tiny_cfg(dfake_gen_update_ratio=5)
    teacher = toy_teacher()
    before = params(teacher)
    d = dmd2.Distiller(cfg, teacher, (2,))
    real = dmd2.Toy2DBatches(cfg.batch_size, 0)
    g_steps = []
    for i in range(11):
        g_before = params(d.generator)
        logs = d.train_step(next(real))
        changed = any(not torch.equal(g_before[k], v) for k, v in d.generator.state_dict().items())
        g_steps.append(changed)
        assert ("loss_dm" in logs) == (i % 5 == 0)
        # the critic step never leaves gradients on the generator, and none reach the teacher
        assert all(p.grad is None for p in d.generator.parameters())
        assert all(p.grad is None for p in d.real_score.parameters())
    assert g_steps == [i % 5 == 0 and i > 0 for i in range(11)]  # step 0 runs at warm-up lr 0 (constant_with_warmup)
    assert d.opt_g.state_dict()["state"][0]["step"] == 3  # AdamW stepped at iterations 0, 5, 10
    assert d.opt_d.state_dict()["state"][0]["step"] == 11
    assert all(torch.equal(before[k], v) for k, v in d.real_score.state_dict().items())


def test_generator_loss_does_not_train_the_critic():
    cfg = tiny_cfg(dfake_gen_update_ratio=1, warmup_steps=0)
    d = dmd2.Distiller(cfg, toy_teacher(), (2,))
    grads = {}
    orig = dmd2.optimizer_step

    def spy(params_, optimizer, *args):
        name = "the generator loss" if optimizer is d.opt_g else "the critic loss"
        grads[name] = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in d.critic_params]
        return orig(params_, optimizer, *args)
    dmd2.optimizer_step = spy
    try:
        d.train_step(next(dmd2.Toy2DBatches(cfg.batch_size, 0)))
    finally:
        dmd2.optimizer_step = orig
    assert not any(grads["the generator loss"])  # critic frozen while the generator learns
    assert all(grads["the critic loss"])


def test_nan_loss_stops_without_touching_the_checkpoint(tmp_path):
    cfg = tiny_cfg(iters=10, ckpt_every=5)
    real = dmd2.Toy2DBatches(cfg.batch_size, 0)
    dmd2.run_training(cfg, toy_teacher(), real, (2,), str(tmp_path), show=lambda *a: None)
    ckpt = tmp_path / "checkpoint.pt"
    saved = ckpt.read_bytes()

    class NaNBatches(dmd2.Toy2DBatches):
        def __next__(self):
            x, y = super().__next__()
            return x * float("nan"), y
    with pytest.raises(FloatingPointError, match="the critic loss is not finite at iteration 10.*last good checkpoint"):
        dmd2.run_training(dataclasses.replace(cfg, iters=20), toy_teacher(), NaNBatches(cfg.batch_size, 0), (2,),
                   str(tmp_path), show=lambda *a: None)
    assert ckpt.read_bytes() == saved


def tiny_image_teacher():
    torch.manual_seed(0)
    return dmd2.build_network(dict(kind="edm", kwargs=dict(
        img_resolution=8, img_channels=3, label_dim=4, model_type="DhariwalUNet", model_channels=16,
        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0))).eval()


@pytest.mark.parametrize("setting", ["toy2d", "toy2d 4-step", "toy2d regression", "edm 8px"])
@pytest.mark.parametrize("micro_batch", [1, 2])
def test_micro_batching_equals_the_whole_batch(setting, micro_batch, monkeypatch):
    """Micro-batches accumulate the whole batch's gradients. The networks update with SGD here: AdamW's first steps
    divide each gradient by its own size, so a component that cancels to ~0 would step by +-lr on round-off alone
    (its sign set by the summation order, i.e. the CPU's kernels); SGD keeps a gradient's round-off a round-off."""
    monkeypatch.setattr(dmd2, "make_optimizer", lambda params, lr: torch.optim.SGD(
        [p for p in params if p.requires_grad], lr=lr))
    cfg = tiny_cfg(batch_size=4, warmup_steps=0, diffusion_gan=True, gan=True, generator_lr=0.05, guidance_lr=0.05,
                   generator_steps=4 if "4-step" in setting else 1)  # SGD steps large enough to see a wrong gradient
    if "regression" in setting:
        pairs = (torch.randn(8, 2), torch.arange(8) % 4, torch.randn(8, 2))
        cfg = dataclasses.replace(cfg, regression_loss_weight=0.25, regression_pairs=8, regression_loss="mse")
    teacher, shape = toy_teacher(), (2,)
    real = lambda: dmd2.Toy2DBatches(cfg.batch_size, 0)
    if setting == "edm 8px":
        cfg = dataclasses.replace(cfg, num_classes=4, channels_last=False)
        teacher, shape = tiny_image_teacher(), (3, 8, 8)
        images = torch.rand(16, 3, 8, 8) * 2 - 1
        real = lambda: dmd2.InMemoryBatches(images, torch.arange(16) % 4, cfg.batch_size, 0)
    runs = []
    for mb in (0, micro_batch):
        d = dmd2.Distiller(dataclasses.replace(cfg, micro_batch=mb), copy.deepcopy(teacher), shape,
                           regression_pairs=pairs if "regression" in setting else None)
        batches = real()
        runs.append((d, [d.train_step(next(batches)) for _ in range(cfg.dfake_gen_update_ratio + 1)]))  # 2 G steps
    (whole, whole_logs), (micro, micro_logs) = runs
    for name in ("generator", "fake_score", "head"):
        a, b = getattr(whole, name).state_dict(), getattr(micro, name).state_dict()
        assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 2e-5, name
    assert whole_logs[0].keys() == micro_logs[0].keys() and "loss_dm" in whole_logs[0]
    for w, m in zip(whole_logs, micro_logs):
        assert all(w[k] == pytest.approx(m[k], rel=1e-4, abs=1e-6) for k in w), (w, m)


def test_micro_batch_must_divide_the_batch():
    with pytest.raises(SystemExit, match="--micro_batch 3 must divide --batch_size 4"):
        dmd2.check_config(dmd2.parse_config(["--dataset", "toy2d", "--batch_size", "4", "--micro_batch", "3"]))
    assert dmd2.parse_config(["--dataset", "toy2d", "--batch_size", "4", "--micro_batch", "2"]).micro_batch == 2
    assert [(s.start, s.stop) for s in dmd2.micro_batches(6, 2)] == [(0, 2), (2, 4), (4, 6)]
    assert dmd2.micro_batches(6, 0) == [slice(0, 6)]


def test_auto_gan_weight_equalises_the_gradient_norms_on_the_images(monkeypatch):
    """--gen_cls_loss_weight auto (tianweiy/DMD2#73): GAN term off on update 0 (fake score = teacher, DM gradient 0)
    and while updates 1..AUTO_GAN_UPDATES are measured; then weight = mean |dL_dm/dx| / mean |dL_gan/dx|. The DM norm
    is checked against the paper's gradient by hand: dL/dx = (p_real - p_fake) / mean|p_real| / N."""
    monkeypatch.setattr(dmd2, "AUTO_GAN_UPDATES", 3)
    by_hand, dm_loss = [], dmd2.dm_loss

    def spy(x, pred_real, pred_fake):
        p_real, p_fake = x.detach() - pred_real, x.detach() - pred_fake
        grad = (p_real - p_fake) / p_real.abs().mean(dim=1, keepdim=True) / x.numel()
        by_hand.append(float(grad.norm()))
        return dm_loss(x, pred_real, pred_fake)
    monkeypatch.setattr(dmd2, "dm_loss", spy)
    cfg = tiny_cfg(gen_cls_loss_weight="auto", dfake_gen_update_ratio=1, warmup_steps=0)
    d, batches = dmd2.Distiller(cfg, toy_teacher(), (2,)), dmd2.Toy2DBatches(cfg.batch_size, 0)
    logs = [d.train_step(next(batches)) for _ in range(5)]
    assert [r["gen_cls_loss_weight"] for r in logs[:3]] == [0.0, 0.0, 0.0] and by_hand[0] == 0.0
    assert [dm for dm, _ in d.auto_norms] == pytest.approx(by_hand[1:4], rel=1e-5)
    dm, gan = torch.tensor(d.auto_norms).mean(0).tolist()
    assert d.gan_weight == pytest.approx(dm / gan, rel=1e-6) and d.gan_weight > 0
    assert logs[3]["gen_cls_loss_weight"] == logs[4]["gen_cls_loss_weight"] == d.gan_weight


def test_auto_gan_weight_resumes_and_micro_batches(monkeypatch, tmp_path):
    monkeypatch.setattr(dmd2, "AUTO_GAN_UPDATES", 3)
    cfg = tiny_cfg(gen_cls_loss_weight="auto", dfake_gen_update_ratio=1, warmup_steps=0, batch_size=4, iters=6,
                   ckpt_every=2)
    run = lambda c, folder: dmd2.run_training(c, toy_teacher(), dmd2.Toy2DBatches(c.batch_size, 0), (2,),
                                       str(tmp_path / folder), show=lambda *a: None)
    full = run(cfg, "full")
    run(dataclasses.replace(cfg, iters=2), "resumed")  # killed in the middle of the measurement
    resumed = run(cfg, "resumed")
    micro = run(dataclasses.replace(cfg, micro_batch=2), "micro")
    assert resumed.gan_weight == full.gan_weight and resumed.auto_norms == full.auto_norms
    assert torch.allclose(torch.tensor(micro.auto_norms), torch.tensor(full.auto_norms), rtol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(full.generator.parameters(), resumed.generator.parameters()))


def test_auto_gan_weight_on_the_command_line():
    assert dmd2.parse_config(["--dataset", "toy2d", "--gen_cls_loss_weight", "auto"]).gen_cls_loss_weight == "auto"
    assert dmd2.parse_config(["--gen_cls_loss_weight", "0.01"]).gen_cls_loss_weight == 0.01
    assert dmd2.parse_config(["--dataset", "imagenet64"]).gen_cls_loss_weight == 3e-3  # official fixed weight
    with pytest.raises(SystemExit):
        dmd2.check_config(dmd2.parse_config(["--gen_cls_loss_weight", "big"]))
    with pytest.raises(SystemExit, match="auto matches the DM term's gradient norm"):
        dmd2.check_config(dmd2.parse_config(["--gen_cls_loss_weight", "auto", "--dm_loss_weight", "0"]))


def test_resume_is_bit_identical(tmp_path):
    cfg = tiny_cfg(iters=12, ckpt_every=4, generator_steps=4, ema_decay=0.9)
    full = dmd2.run_training(cfg, toy_teacher(), dmd2.Toy2DBatches(cfg.batch_size, 0), (2,), str(tmp_path / "a"),
                      show=lambda *a: None)
    dmd2.run_training(dataclasses.replace(cfg, iters=8), toy_teacher(), dmd2.Toy2DBatches(cfg.batch_size, 0), (2,),
               str(tmp_path / "b"), show=lambda *a: None)
    resumed = dmd2.run_training(cfg, toy_teacher(), dmd2.Toy2DBatches(cfg.batch_size, 0), (2,), str(tmp_path / "b"),
                         show=lambda *a: None)
    for name in ("generator", "fake_score", "head", "ema"):
        a, b = getattr(full, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    log = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert [r["step"] for r in log] == list(range(12))  # no duplicated lines after the resume


def test_cached_teacher_gives_the_same_students(tmp_path):
    """The second run loads teacher and teacher row from the cache (no sampling, so no draws from the global RNG);
    its students must still equal the first run's: the GAN head is initialised from cfg.seed alone."""
    cfg = tiny_cfg(students=[1, 2], cache_dir=str(tmp_path / "cache"), eval_samples=64, teacher_eval_steps=3)
    first = dmd2.run_embedded(dataclasses.replace(cfg, out_dir=str(tmp_path / "first")))
    torch.randn(7)  # whatever ran before must not matter either
    second = dmd2.run_embedded(dataclasses.replace(cfg, out_dir=str(tmp_path / "second")))
    assert [r["model"] for r in first] == [r["model"] for r in second] == [
        "teacher (EDM Heun, 3 steps)", "DMD2 student, 1 step", "DMD2 student, 2 steps", "DMD without GAN, 1 step",
        "real data (second set: the floor)"]
    for a, b in zip(first, second):
        assert {k: v for k, v in a.items() if k != "images_per_s"} == {k: v for k, v in b.items() if k != "images_per_s"}


def test_resume_refuses_another_config(tmp_path):
    cfg = tiny_cfg(iters=5)
    dmd2.run_training(cfg, toy_teacher(), dmd2.Toy2DBatches(16, 0), (2,), str(tmp_path), show=lambda *a: None)
    with pytest.raises(ValueError, match="another config.*generator_lr"):
        dmd2.run_training(dataclasses.replace(cfg, generator_lr=0.5), toy_teacher(), dmd2.Toy2DBatches(16, 0), (2,),
                   str(tmp_path), show=lambda *a: None)


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="checkpoint.pt: not a readable DMD2 checkpoint"):
        dmd2.run_training(tiny_cfg(), toy_teacher(), dmd2.Toy2DBatches(16, 0), (2,), str(tmp_path), show=lambda *a: None)


def test_shapes_metric_classifier_is_one_yardstick_for_every_seed(tmp_path):
    """FD-cls compares runs of different seeds: its classifier must not depend on --seed or on the global RNG."""
    images, labels = dmd2.shapes_dataset(256, 16, seed=0)
    weights = []
    for seed, cache in ((10, "a"), (11, "b"), (12, "a")):  # (12, "a"): loaded from the cache seed 10 wrote
        cfg = dmd2.Config(seed=seed, cache_dir=str(tmp_path / cache))
        torch.manual_seed(seed)  # as embedded_rung does before building the classifier
        weights.append(dmd2.shapes_classifier(cfg, images, labels).state_dict())
    assert len(os.listdir(tmp_path / "a")) == 1
    for other in weights[1:]:
        assert all(torch.equal(weights[0][k], other[k]) for k in weights[0])


# ----- command line -----------------------------------------------------------------------------------------------

def test_cli_presets_flags_and_errors():
    cfg = dmd2.parse_config(["--dataset", "toy2d", "--iters", "7", "--gan", "false", "--students", "1", "4"])
    assert (cfg.iters, cfg.gan, cfg.students, cfg.num_classes) == (7, False, [1, 4], 4)
    assert dmd2.parse_config([]).dataset == "shapes"
    with pytest.raises(SystemExit, match="unknown dataset 'mnist'; choose one of toy2d, shapes"):
        dmd2.parse_config(["--dataset", "mnist"])
    with pytest.raises(SystemExit, match="regression loss is for one-step"):
        dmd2.check_config(dmd2.parse_config(["--dataset", "toy2d", "--regression_loss_weight", "0.25"]))
    with pytest.raises(SystemExit, match="no loss"):
        dmd2.check_config(dmd2.parse_config(["--dataset", "toy2d", "--gan", "false", "--dm_loss_weight", "0"]))


def run_cli(args, tmp_path, **popen):
    env = {**os.environ, "DMD2_CACHE": str(tmp_path / "cache"), "PYTHONPATH": ROOT}
    cmd = [sys.executable, os.path.join(ROOT, "dmd2.py"), "--dataset", "toy2d", "--out_dir", str(tmp_path / "runs"),
           "--teacher_iters", "20", "--students", "1", "--iters", "120", "--batch_size", "8", "--ckpt_every", "10",
           "--eval_samples", "100", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_killed_run_resumes_by_itself(tmp_path):
    ckpt = tmp_path / "runs" / "toy2d" / "student_1step" / "checkpoint.pt"
    proc = run_cli([], tmp_path)
    deadline = time.time() + 600  # generous: a loaded machine is slow; the loop ends at the first checkpoint
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert ckpt.exists(), "no checkpoint was written before the kill"
    step_at_kill = torch.load(ckpt, weights_only=True)["distiller"]["step"]
    assert 0 < step_at_kill < 120
    out, _ = run_cli([], tmp_path).communicate(timeout=900)
    assert f"resuming {ckpt.parent} at iteration {step_at_kill}" in out
    assert torch.load(ckpt, weights_only=True)["distiller"]["step"] == 120
    assert "| DMD2 student, 1 step |" in out
    # sampling from the finished checkpoint
    grid = tmp_path / "grid.png"
    subprocess.run([sys.executable, os.path.join(ROOT, "dmd2.py"), "sample", "--checkpoint", str(ckpt), "--out",
                    str(grid), "--num", "32"], check=True, capture_output=True)
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----- memory options and released-weight starts -------------------------------------------------------------

def test_teacher_bf16_weights_keeps_trainable_networks_and_adam_in_fp32():
    """Only the frozen real score is bf16; the copies train in fp32 (a bf16 copy at lr 2e-6 barely moves)."""
    cfg = tiny_cfg(num_classes=4, resolution=8, teacher_bf16_weights=True, generator_lr=2e-6, guidance_lr=2e-6,
                   warmup_steps=0, batch_size=4, dfake_gen_update_ratio=1, gan=False)
    teacher = tiny_image_teacher()
    with torch.no_grad():  # as if trained: EDM's zero-initialised output layers would block every other gradient
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = dmd2.Distiller(cfg, teacher, (3, 8, 8))
    d.train_step()  # the critic moves off the teacher, so the next DM gradient is not zero
    before = params(d.generator)
    d.train_step()
    assert {p.dtype for p in d.real_score.parameters()} == {torch.bfloat16}
    for net in (d.generator, d.fake_score, d.head):
        assert {p.dtype for p in net.parameters()} == {torch.float32}
    for opt in (d.opt_g, d.opt_d):
        assert {t.dtype for s in opt.state.values() for t in s.values() if t.ndim} == {torch.float32}
    changed = [(v != before[k]).float().mean() for k, v in d.generator.state_dict().items() if v.is_floating_point()]
    assert float(sum(changed) / len(changed)) > 0.5  # most weights took the step (bf16 copies: ~0.1%)
    with pytest.raises(ValueError, match="float32 weights"):
        dmd2.Distiller(cfg, tiny_image_teacher().to(torch.bfloat16), (3, 8, 8))


def test_ema_starts_from_the_generator_init(tmp_path):
    teacher = toy_teacher()
    released = toy_teacher(seed=1)
    torch.save(released.state_dict(), tmp_path / "pytorch_model.bin")
    d = dmd2.Distiller(tiny_cfg(ema_decay=0.99), teacher, (2,))
    dmd2.initialise_from(d, str(tmp_path / "pytorch_model.bin"))
    for k, v in released.state_dict().items():
        assert torch.equal(d.generator.state_dict()[k], v) and torch.equal(d.ema.state_dict()[k], v), k


def test_max_step_percent_one_trains():
    d = dmd2.Distiller(tiny_cfg(max_step_percent=1.0, batch_size=64), toy_teacher(), (2,))
    images, labels = dmd2.toy2d_sample(64, torch.Generator().manual_seed(0))
    assert math.isfinite(d.train_step((images, labels))["loss_dm"])
