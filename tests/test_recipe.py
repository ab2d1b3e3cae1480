"""The recipe pinned: TTUR iterations of Distiller.train_step against an independent float64 re-computation from the
official formulas (reference/dmd2_official.md), with every random draw recorded, and the presets against the official
scripts. Each test here fails for a plausible recipe bug that the self-consistency tests (micro-batch vs whole batch,
N processes vs one, resumed vs straight) cannot see."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dmd2

NUM_CLASSES, BATCH = 4, 64  # toy2d: 4 classes


class TinyDenoiser(nn.Module):
    """An EDM-preconditioned MLP on 2-D points that computes in its parameters' dtype (so it runs in float64 too)."""

    def __init__(self, hidden=16, sigma_data=0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.inp = nn.Linear(2 + 1 + NUM_CLASSES, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 2)

    def forward(self, x, sigma, labels, return_bottleneck=False):
        dtype = self.inp.weight.dtype
        x, sd = x.to(dtype), self.sigma_data
        s = torch.as_tensor(sigma, device=x.device).to(dtype).reshape(-1, 1).expand(len(x), 1)
        c_skip, c_out = sd ** 2 / (s ** 2 + sd ** 2), s * sd / (s ** 2 + sd ** 2).sqrt()  # EDM Table 1
        c_in, c_noise = 1 / (s ** 2 + sd ** 2).sqrt(), s.log() / 4
        h = torch.tanh(self.mid(torch.tanh(self.inp(torch.cat([c_in * x, c_noise, labels.to(dtype)], 1)))))
        return h if return_bottleneck else c_skip * x + c_out * self.out(h)


class RecordingNoise(dmd2.SharedNoise):
    """SharedNoise that records every draw: (kind, arguments, value)."""

    def __init__(self, seed):
        super().__init__(seed)
        self.draws = []

    def randn(self, shape, device=None):
        value = super().randn(shape, device)
        self.draws.append(("randn", tuple(shape), value.clone()))
        return value

    def randint(self, low, high, n):
        value = super().randint(low, high, n)
        self.draws.append(("randint", (low, high, n), value.clone()))
        return value


def recipe_cfg(**overrides):
    """toy2d with the official ImageNet losses, weights and noise ranges; large learning rates and a small clip norm
    so that warm-up, clipping and Adam all visibly act within three iterations."""
    return dmd2.Config(**{**dmd2.PRESETS["toy2d"], "dataset": "toy2d", "num_classes": NUM_CLASSES,
                          "batch_size": BATCH, "students": [1], "generator_lr": 1e-2, "guidance_lr": 2e-2,
                          "warmup_steps": 2, "dfake_gen_update_ratio": 2, "gen_cls_loss_weight": 3e-3,
                          "max_grad_norm": 0.05, "ema_decay": 0.9, **overrides})


def official_draws(cfg, generator_turn):
    """The draws of one iteration, in order (official EDMUniModel / EDMGuidance): labels, generator input noise; on a
    generator turn the DM loss index in [20, 980] and its noise, then the generator's GAN-logit index and noise;
    then the critic's denoising index over all 1000 levels and noise, and SEPARATE diffusion-GAN draws for the real
    and the fake batch, each index in [0, 1000)."""
    n, shape = cfg.batch_size, (cfg.batch_size, 2)
    draws = [("randint", (0, NUM_CLASSES, n)), ("randn", shape)]
    if generator_turn:
        draws += [("randint", (20, 981, n)), ("randn", shape), ("randint", (0, 1000, n)), ("randn", shape)]
    draws += [("randint", (0, 1000, n)), ("randn", shape)]
    draws += [("randint", (0, 1000, n)), ("randn", shape)] * 2
    return draws


def karras64(n=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return ((sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho).flip(0)


class AdamW64:
    """AdamW written out (Loshchilov & Hutter; torch.optim.AdamW's update): decoupled decay p *= 1 - lr wd, bias-
    corrected moments, p -= lr m_hat / (sqrt(v_hat) + eps). Official: AdamW(betas 0.9/0.999, weight_decay 0.01)."""

    def __init__(self, params, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        self.params, self.betas, self.eps, self.wd, self.t = list(params), betas, eps, weight_decay, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, lr):
        self.t += 1
        b1, b2 = self.betas
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            p.mul_(1 - lr * self.wd)
            m.mul_(b1).add_((1 - b1) * g)
            v.mul_(b2).add_((1 - b2) * g * g)
            p.sub_(lr * (m / (1 - b1 ** self.t)) / ((v / (1 - b2 ** self.t)).sqrt() + self.eps))
            p.grad = None


def clip64(params, max_norm):
    """Official --max_grad_norm 10: scale all gradients of one optimiser by min(1, max_norm / (total norm + 1e-6))."""
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    for p in params:
        p.grad.mul_(min(1.0, max_norm / (float(total) + 1e-6)))
    return float(total)


class Reference:
    """The three networks, the head, the optimisers and the EMA in float64, trained by the official formulas."""

    def __init__(self, distiller, cfg):
        as64 = lambda m: copy.deepcopy(m).double()
        self.cfg, self.sigmas = cfg, karras64()
        self.gen, self.fake, self.real, self.head = (as64(distiller.generator), as64(distiller.fake_score),
                                                     as64(distiller.real_score), as64(distiller.head))
        self.ema = as64(distiller.generator)
        self.critic = [*self.fake.parameters(), *self.head.parameters()]
        self.opt_g, self.opt_d = AdamW64(self.gen.parameters()), AdamW64(self.critic)
        self.grad_norms = []

    def logits(self, x, sigma, noise, labels):
        """Diffusion GAN: the head on the fake score's bottleneck at x + sigma n (official compute_cls_logits)."""
        features = self.fake(x + sigma[:, None] * noise, sigma, labels, return_bottleneck=True)
        return nn.Sequential.forward(self.head, features[:, :, None, None]).flatten(1)

    def iteration(self, i, draws):
        cfg, s = self.cfg, self.sigmas
        lr_factor = min(1.0, i / cfg.warmup_steps)  # constant_with_warmup: factor step / warmup at scheduler step i
        labels = F.one_hot(draws.pop(0), NUM_CLASSES).double()
        sigma_in = s[cfg.conditioning_timestep].expand(len(labels))  # level 999 of the grid: sigma 80
        z = draws.pop(0).double() * sigma_in[0]
        if i % cfg.dfake_gen_update_ratio == 0:
            x = self.gen(z, sigma_in, labels)
            t, noise = draws.pop(0), draws.pop(0).double()
            sigma = s[t][:, None]
            with torch.no_grad():  # DMD loss gradient on x: (p_real - p_fake) / mean|p_real|, divided by x.numel()
                p_real = x - self.real(x + sigma * noise, sigma, labels)
                p_fake = x - self.fake(x + sigma * noise, sigma, labels)
                grad_dm = (p_real - p_fake) / p_real.abs().mean(dim=1, keepdim=True) / x.numel()
            t, noise = draws.pop(0), draws.pop(0).double()
            loss_gan = F.softplus(-self.logits(x, s[t], noise, labels)).mean()  # non-saturating generator loss
            grad_gan, = torch.autograd.grad(loss_gan, x, retain_graph=True)
            x.backward(cfg.dm_loss_weight * grad_dm + cfg.gen_cls_loss_weight * grad_gan)
            self.grad_norms.append(clip64(list(self.gen.parameters()), cfg.max_grad_norm))
            self.opt_g.step(cfg.generator_lr * lr_factor)
            with torch.no_grad():  # EMA = d * ema + (1 - d) * generator
                for pe, p in zip(self.ema.parameters(), self.gen.parameters()):
                    pe.copy_(cfg.ema_decay * pe + (1 - cfg.ema_decay) * p)
            fake = x.detach()
        else:
            with torch.no_grad():
                fake = self.gen(z, sigma_in, labels)
        t, noise = draws.pop(0), draws.pop(0).double()
        sigma = s[t][:, None]  # fake score: EDM weighting 1/sigma^2 + 1/sigma_data^2, index uniform over [0, 1000)
        loss_fake = ((1 / sigma ** 2 + 1 / cfg.sigma_data ** 2)
                     * (self.fake(fake + sigma * noise, sigma, labels) - fake) ** 2).mean()
        t_real, noise_real, t_fake, noise_fake = draws.pop(0), draws.pop(0).double(), draws.pop(0), draws.pop(0).double()
        real_images, real_labels = self.real_batch
        loss_d = (F.softplus(self.logits(fake, s[t_fake], noise_fake, labels)).mean()
                  + F.softplus(-self.logits(real_images, s[t_real], noise_real, real_labels)).mean())
        (loss_fake + cfg.cls_loss_weight * loss_d).backward()
        self.grad_norms.append(clip64(self.critic, cfg.max_grad_norm))
        self.opt_d.step(cfg.guidance_lr * lr_factor)
        assert not draws


def run_both(cfg, iterations=3, monkeypatch=None):
    """Run Distiller.train_step and the reference side by side; returns (distiller, reference, clip max_norms)."""
    torch.manual_seed(0)
    distiller = dmd2.Distiller(cfg, TinyDenoiser(), (2,))
    distiller.noise = RecordingNoise(cfg.seed)
    reference = Reference(distiller, cfg)
    real = dmd2.InMemoryBatches(*dmd2.toy2d_sample(512, torch.Generator().manual_seed(1)),
                                BATCH, seed=5)
    clip_norms = []
    if monkeypatch is not None:
        clip = torch.nn.utils.clip_grad_norm_
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                            lambda params, max_norm, **kw: clip_norms.append(max_norm) or clip(params, max_norm, **kw))
    for i in range(iterations):
        images, labels = next(real)
        distiller.noise.draws.clear()
        distiller.train_step((images, labels))
        recorded = distiller.noise.draws
        expected = official_draws(cfg, i % cfg.dfake_gen_update_ratio == 0)
        assert [(kind, args) for kind, args, _ in recorded] == expected, f"iteration {i}: draws differ from the recipe"
        reference.real_batch = (images.double(), F.one_hot(labels, NUM_CLASSES).double())
        reference.iteration(i, [value for _, _, value in recorded])
        assert distiller.sched_g.get_last_lr()[0] == pytest.approx(cfg.generator_lr * min(1, (i + 1) / cfg.warmup_steps))
        assert distiller.sched_d.get_last_lr()[0] == pytest.approx(cfg.guidance_lr * min(1, (i + 1) / cfg.warmup_steps))
    return distiller, reference, clip_norms


def assert_close(module, module64, what):
    for (name, p), p64 in zip(module.named_parameters(), module64.parameters()):
        assert torch.allclose(p.double(), p64, rtol=1e-4, atol=2e-6), f"{what}.{name}: max diff " \
            f"{(p.double() - p64).abs().max():.3g}"


def test_ttur_iterations_equal_the_official_formulas_in_float64(monkeypatch):
    cfg = recipe_cfg()
    distiller, reference, clip_norms = run_both(cfg, iterations=3, monkeypatch=monkeypatch)
    initial = Reference(dmd2.Distiller(cfg, (torch.manual_seed(0), TinyDenoiser())[1], (2,)), cfg)
    for module, module64, start, what in [(distiller.generator, reference.gen, initial.gen, "generator"),
                                          (distiller.fake_score, reference.fake, initial.fake, "fake_score"),
                                          (distiller.head, reference.head, initial.head, "head"),
                                          (distiller.ema, reference.ema, initial.ema, "ema")]:
        assert_close(module, module64, what)
        moved = max((p - p0).abs().max() for p, p0 in zip(module64.parameters(), start.parameters()))
        assert moved > 1e-4, f"{what} did not move: the comparison would be vacuous"
    assert_close(distiller.real_score, initial.real, "real_score")  # the teacher never changes
    # Clipping acted (norms above max_norm) and used the configured norm for each optimiser, in turn order.
    assert clip_norms == [cfg.max_grad_norm] * 5  # iterations 0 and 2: generator + critic; iteration 1: critic
    assert max(reference.grad_norms) > cfg.max_grad_norm


def test_the_tolerance_has_margin_over_any_cpus_round_off(monkeypatch):
    """CPUs' float32 kernels differ by a few ulp, which AdamW's normalisation could amplify: every gradient perturbed by
    1e-5 relative (about 100 float32 ulp) before clipping still meets assert_close, so no CPU's kernels cross it."""
    clip, gen = torch.nn.utils.clip_grad_norm_, torch.Generator().manual_seed(0)

    def perturbed(params, max_norm, **kw):
        params = list(params)
        for p in params:
            p.grad.mul_(1 + 1e-5 * torch.randn(p.grad.shape, generator=gen))
        return clip(params, max_norm, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", perturbed)
    distiller, reference, _ = run_both(recipe_cfg(), iterations=3)
    for module, module64, what in [(distiller.generator, reference.gen, "generator"),
                                   (distiller.fake_score, reference.fake, "fake_score"),
                                   (distiller.head, reference.head, "head"), (distiller.ema, reference.ema, "ema")]:
        assert_close(module, module64, what)


def test_ema_decay_direction_and_no_ema_without_decay(monkeypatch):
    cfg = recipe_cfg(ema_decay=0.5, generator_lr=5e-2)
    distiller, reference, _ = run_both(cfg, iterations=3)
    assert_close(distiller.ema, reference.ema, "ema")
    gen, ema = distiller.generator.out.bias, distiller.ema.out.bias
    assert not torch.allclose(gen, ema)  # the EMA lags behind the generator
    assert dmd2.Distiller(recipe_cfg(ema_decay=0.0), TinyDenoiser(), (2,)).ema is None


@pytest.mark.parametrize("max_step_percent, high", [(0.98, 981), (1.0, 1000), (0.999, 1000), (0.5, 501)])
def test_dm_loss_index_range_is_clamped_like_the_official_code(max_step_percent, high):
    """official: randint(min_step, min(max_step + 1, T)) with max_step = int(max_step_percent * T)."""
    cfg = recipe_cfg(max_step_percent=max_step_percent, min_step_percent=0.0287)
    torch.manual_seed(0)
    distiller = dmd2.Distiller(cfg, TinyDenoiser(), (2,))
    distiller.noise = RecordingNoise(cfg.seed)
    images, labels = dmd2.toy2d_sample(BATCH, torch.Generator().manual_seed(1))
    distiller.train_step((images, labels))
    assert distiller.noise.draws[2][1] == (int(0.0287 * 1000), high, BATCH)  # int(28.7) = 28; round would give 29


def test_presets_equal_the_official_scripts():
    """experiments/imagenet/imagenet_gan_classifier_genloss3e-3_diffusion1000_lr2e-6_scratch.sh and train_edm.py
    defaults (reference/dmd2_official.md sections 5 and 10)."""
    official = dict(generator_lr=2e-6, guidance_lr=2e-6, batch_size=40, resolution=64, num_classes=1000, seed=10,
                    dfake_gen_update_ratio=5, cls_loss_weight=1e-2, gan=True, gen_cls_loss_weight=3e-3,
                    diffusion_gan=True, diffusion_gan_max_timestep=1000, warmup_steps=500, min_step_percent=0.02,
                    max_step_percent=0.98, num_train_timesteps=1000, sigma_max=80.0, sigma_min=0.002,
                    sigma_data=0.5, rho=7.0, conditioning_timestep=999, max_grad_norm=10.0, ema_decay=0.0,
                    dm_loss_weight=1.0, regression_loss_weight=0.0, generator_steps=1, backward_simulation=True,
                    teacher_bf16_weights=False)
    for dataset in ("imagenet64", "cifar10"):
        cfg = dmd2.Config(**dmd2.PRESETS[dataset])
        expected = {**official, **(dict(resolution=32, num_classes=10, batch_size=56) if dataset == "cifar10" else {})}
        got = {k: getattr(cfg, k) for k in expected}
        assert got == expected, {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    assert dmd2.use_bf16(dmd2.Config(**dmd2.PRESETS["imagenet64"]), torch.device("cpu")) in (True, False)
    assert math.isclose(dmd2.karras_sigmas()[980].item(), 72.05, rel_tol=1e-3)  # the DM range's top sigma
