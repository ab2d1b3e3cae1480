"""The text-to-image path: SD v1.5 / SDXL teachers through EpsDenoiser and the one Distiller, on tiny random
SD-shaped networks (CPU, nothing downloaded).

dmd2.tiny_t2i_parts() keeps the conditioning layouts (SDXL: 2048-d tokens from a 768-d and a 1280-d CLIP text encoder,
1280-d pooled projection, 6 x 256 micro-conditioning; SD v1.5: 768-d tokens) with 2 UNet levels of 32/64 channels.
Its tokenizers are real transformers CLIPTokenizers built in memory from a character-level vocabulary, so prompts
go through the same tokenizer -> text encoder code as the real models'. The SDXL training step is also pinned to
the pre-unification code by tests/test_sdxl_record.py."""
import copy
import json
import math
import os
import threading

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")  # requirements-sdxl.txt
import dmd2

T_LIST = [999, 749, 499, 249]


@pytest.fixture(scope="module")
def parts():
    return dmd2.tiny_t2i_parts(sdxl=True, seed=0)


@pytest.fixture(scope="module")
def sd15():
    return dmd2.tiny_t2i_parts(sdxl=False, seed=0)


@pytest.fixture(scope="module")
def cond(parts):
    return dmd2.Prompts([], parts.tokenizers, parts.text_encoders).encode(["a red cat", "two dogs on a hill"])


def hand_alphas_cumprod(t):
    """alpha_bar_t from the scaled_linear betas, all in Python float64."""
    b0, b1 = math.sqrt(0.00085), math.sqrt(0.012)
    return math.prod(1 - (b0 + i * (b1 - b0) / 999) ** 2 for i in range(t + 1))


class RecordingUNet(torch.nn.Module):
    """Stands in for a UNet2DConditionModel: eps = scale x (1 + mean of the token embeddings); records its inputs."""
    dtype = torch.float32

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale, self.calls = scale, []

    def forward(self, x, t, embeds, added_cond_kwargs=None):
        self.calls.append((x, t, embeds, added_cond_kwargs))
        eps = self.scale * x * (1 + embeds.mean(dim=(1, 2)).view(-1, 1, 1, 1))
        return type("Out", (), {"sample": eps})()


def recording_denoiser(scale=1.0, sdxl=True, uncond=None):
    uncond = uncond or (torch.zeros(1, 77, 8), torch.zeros(1, 12 if sdxl else 0))
    return dmd2.EpsDenoiser(RecordingUNet(scale), dmd2.ddpm_alphas_cumprod(), uncond, 1024 if sdxl else None)


# --- the noise table and the adapter's numerics ------------------------------------------------------------------


def test_alphas_cumprod_and_sigma_table_equal_diffusers_and_hand_values():
    acp = dmd2.ddpm_alphas_cumprod()
    ddim = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert acp.dtype == torch.float64 and acp.shape == (1000,)
    assert torch.equal(acp, ddim.alphas_cumprod.double())
    for t in (0, 249, 499, 749, 999):
        assert acp[t].item() == pytest.approx(hand_alphas_cumprod(t), rel=2e-6)
    assert acp[999].item() == pytest.approx(0.00466, abs=1e-5)  # not zero-terminal SNR (reference 7.2)
    den = recording_denoiser()
    sigmas = dmd2.noise_grid(dmd2.Config(dataset="sdxl"), den)
    euler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(sigmas, torch.from_numpy(((1 - euler.alphas_cumprod.numpy()) /
                                                        euler.alphas_cumprod.numpy()) ** 0.5).float())
    assert bool((sigmas[1:] > sigmas[:-1]).all())  # ascending as the Karras grid: index = timestep


def test_adapter_is_the_ddpm_parameterisation_in_float64():
    """D(x, sigma): the UNet sees x_t = sqrt(a) x = sqrt(a) x0 + sqrt(1 - a) n at the integer t of sigma; the output
    is (x_t - sqrt(1 - a) eps) / sqrt(a) in float64 (official get_x0_from_noise), x_t being what the UNet saw."""
    den, acp = recording_denoiser(scale=0.7), dmd2.ddpm_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    cond = (torch.rand(3, 77, 8, generator=g), torch.rand(3, 12, generator=g))
    t = torch.tensor([0, 249, 999])
    sigma = den.sigmas[t]
    out = den(x0 + dmd2._per_sample(sigma, x0) * n, sigma, cond)
    (x_t, t_seen, embeds, added), = den.unet.calls
    assert out.dtype == torch.float64 and torch.equal(t_seen, t) and torch.equal(embeds, cond[0])
    assert added["time_ids"].tolist() == [[1024, 1024, 0, 0, 1024, 1024]] * 3  # SDXL micro-conditioning
    assert torch.equal(added["text_embeds"], cond[1])
    for i, step in enumerate(t.tolist()):
        a = acp[step].item()
        torch.testing.assert_close(x_t[i].double(), math.sqrt(a) * x0[i].double() + math.sqrt(1 - a) * n[i].double(),
                                   rtol=1e-6, atol=1e-6)
        eps = (0.7 * x_t[i] * (1 + cond[0][i].mean())).double()  # the UNet's float32 output
        torch.testing.assert_close(out[i], (x_t[i].double() - math.sqrt(1 - a) * eps) / math.sqrt(a), rtol=1e-12,
                                   atol=1e-12)
    assert den(x0, torch.tensor(0.0123, dtype=torch.float64), cond).shape == x0.shape  # one sigma for all (sampler)
    assert den.unet.calls[-1][1].tolist() == [int(den.timestep(torch.tensor(0.0123)))] * 3
    torch.testing.assert_close(den.round_sigma(den.sigmas[[5, 700]].double() * 1.001), den.sigmas[[5, 700]].double())


def test_cfg_is_standard_form_on_the_real_score_only_with_zero_sdxl_uncond():
    den = recording_denoiser()
    x, sigma = torch.randn(2, 4, 3, 3), den.sigmas[torch.tensor([5, 700])]
    cond = (torch.rand(2, 77, 8) + 0.5, torch.rand(2, 12))
    den.guidance_scale = 8.0
    guided = den(x, sigma, cond)
    (bx, bt, be, bc), = den.unet.calls
    assert torch.equal(be[:2], torch.zeros_like(cond[0])) and torch.equal(be[2:], cond[0])
    assert torch.equal(bc["text_embeds"][:2], torch.zeros_like(cond[1])) and torch.equal(bc["text_embeds"][2:], cond[1])
    assert torch.equal(bx[:2], bx[2:]) and torch.equal(bt[:2], bt[2:])
    x_t = bx[:2]
    eps_c, eps_u = x_t * (1 + cond[0].mean(dim=(1, 2)).view(-1, 1, 1, 1)), x_t  # zero embeddings -> eps_u = x_t
    a = dmd2._per_sample(dmd2.ddpm_alphas_cumprod()[bt[:2]], x)
    expected = (x_t.double() - (1 - a).sqrt() * (eps_u + 8.0 * (eps_c - eps_u)).double()) / a.sqrt()
    torch.testing.assert_close(guided, expected)


def test_sd15_uncond_is_the_empty_prompt_and_has_no_pooled_part(sd15):
    teacher = sd15.teacher()
    prompts = dmd2.Prompts([], sd15.tokenizers, sd15.text_encoders)
    embeds, pooled = prompts.encode(["a cat", ""])
    assert embeds.shape == (2, 77, 768) and pooled.shape == (2, 0) and teacher.time_ids is None
    ids = sd15.tokenizers[0]([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        last = sd15.text_encoders[0](ids)[0]  # official SD v1.5: CLIPTextModel(...)[0], the last hidden state
    torch.testing.assert_close(teacher.uncond_embeds, last)
    torch.testing.assert_close(embeds[1:], last)


def test_encode_prompts_sdxl_layout(parts):
    prompts = ["a red cat", "hello"]
    embeds, pooled = dmd2.Prompts([], parts.tokenizers, parts.text_encoders).encode(prompts)
    assert embeds.shape == (2, 77, 2048) and pooled.shape == (2, 1280)
    ids1 = parts.tokenizers[0](prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids2 = parts.tokenizers[1](prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids2[1, -1] == parts.tokenizers[1].convert_tokens_to_ids("!")  # bigG tokenizer pads with "!"
    with torch.no_grad():
        out1 = parts.text_encoders[0](ids1, output_hidden_states=True)
        out2 = parts.text_encoders[1](ids2, output_hidden_states=True)
    torch.testing.assert_close(embeds[..., :768], out1.hidden_states[-2])  # penultimate layer, not the last
    torch.testing.assert_close(embeds[..., 768:], out2.hidden_states[-2])
    assert not torch.allclose(embeds[..., :768], out1.last_hidden_state)
    torch.testing.assert_close(pooled, out2.text_embeds)


def test_bottleneck_is_the_mid_block_output_and_stops_there(parts, cond):
    den = parts.teacher()
    x, sigma = torch.randn(2, 4, 16, 16), den.sigmas[torch.tensor([3, 800])]
    captured, up_calls = [], []
    h1 = parts.unet.mid_block.register_forward_hook(lambda m, a, o: captured.append(o))
    with torch.no_grad():
        den(x, sigma, cond)
    h1.remove()
    h2 = parts.unet.up_blocks[0].register_forward_hook(lambda m, a, o: up_calls.append(1))
    with torch.no_grad():
        features = den(x, sigma, cond, return_bottleneck=True)
    h2.remove()
    assert features.shape == (2, 64, 8, 8) and not up_calls
    torch.testing.assert_close(features, captured[0])
    assert not parts.unet.mid_block._forward_hooks  # the stopping hook is removed
    assert dmd2.GANHead(64, 8)(features).shape == (2, 1)


def test_gan_head_for_full_sdxl_and_sd15_is_the_official_layout():
    """SDXL mid block 1280 x 32 x 32: k4s2 x3, k4s4, 1x1; SD v1.5 1280 x 8 x 8: k4s2, k4s4, 1x1 (reference 7.9)."""
    for side, stride2 in ((32, 3), (8, 1)):
        with torch.device("meta"):
            head = dmd2.GANHead(1280, side)
        convs = [m for m in head if isinstance(m, torch.nn.Conv2d)]
        assert [(c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == \
            [(4, 2, 1)] * stride2 + [(4, 4, 0), (1, 1, 0)]
        assert all(c.in_channels == 1280 for c in convs) and convs[-1].out_channels == 1
        assert all(m.num_groups == 32 for m in head if isinstance(m, torch.nn.GroupNorm))
        with torch.device("meta"):
            assert head(torch.empty(2, 1280, side, side)).shape == (2, 1)


# --- sampling -----------------------------------------------------------------------------------------------------


def test_generator_timesteps_on_the_ddpm_table(parts):
    sigmas = parts.teacher().sigmas
    assert torch.equal(dmd2.generator_sigmas(4, sigmas), sigmas[T_LIST])  # official denoising_step_list
    assert torch.equal(dmd2.generator_sigmas(1, sigmas, 399), sigmas[[399]])  # SDXL 1-step: t = 399
    assert torch.equal(dmd2.generator_sigmas(2, sigmas), sigmas[[999, 499]])


@pytest.mark.parametrize("timesteps", [T_LIST, [399]])
def test_sampler_equals_diffusers_lcm_pipeline(parts, cond, timesteps):
    """Our generate() through the adapter equals LCMScheduler, which draws its re-noising noise with
    randn_tensor(shape, generator=..., dtype=the UNet output's) after every step but the last; pure noise enters at
    the first timestep.

    The UNet runs in float64 on both sides: in float32 the difference depended on the CPU's convolution kernels
    (1.9e-5 on an AMD EPYC without AVX-512, within 1e-5 elsewhere). What is left is float32 rounding that is the
    same on every CPU (elementwise IEEE operations): the adapter rounds each UNet input x_t to float32 (u = 2^-24
    relative), LCMScheduler steps with float32 alphas_cumprod (u each) and keeps x_t in float64; x0 = (x_t - sqrt(1 - a)
    eps) / sqrt(a) amplifies these by 1 / sqrt(a) <= 15 (t = 999) and the next steps by the random UNet's gain:
    measured |diff| <= 1.0e-6 (1 + |x|) = 17 u (1 + |x|) for 4 steps. Bound 1e-5 (1 + |x|); float64 kernels
    contribute ~1e-13. A UNet timestep off by one (t + 1) gives 4e-2, a wrong noise or formula 1e-2 and more."""
    p = copy.deepcopy(parts)
    for net in (p.unet, *p.text_encoders):  # the pipeline casts prompt_embeds to text_encoder_2.dtype
        net.double()
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    pipe = dmd2.t2i_pipe(p, diffusers.LCMScheduler())
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt_embeds=cond[0].double(), pooled_prompt_embeds=cond[1].double(), latents=latents.clone(),
                  guidance_scale=0, timesteps=timesteps, height=p.resolution, width=p.resolution,
                  output_type="latent", generator=torch.Generator().manual_seed(3)).images
    den = p.teacher()
    sigmas = den.sigmas[timesteps]

    def ours(seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return dmd2.generate(den, latents, cond, sigmas,
                                 lambda shape, device=None: torch.randn(shape, generator=g, dtype=torch.float64))
    x0 = ours(3)
    assert theirs.dtype == x0.dtype == torch.float64
    assert x0.shape == (2, 4, 16, 16) and x0.abs().max() > 0.1
    torch.testing.assert_close(x0, theirs, rtol=1e-5, atol=1e-5)
    if len(timesteps) > 1:  # the noise matters: another seed gives another result
        assert (ours(4) - x0).abs().max() > 1e-2


def test_decode_latents(parts):
    images = dmd2.decode_latents(parts.vae, torch.randn(2, 4, 16, 16))
    assert images.shape == (2, 3, 128, 128) and images.dtype == torch.float32


# --- losses and generator inputs ------------------------------------------------------------------------------------


def test_pure_noise_convention_and_noised_real_inputs(parts):
    den = parts.teacher()
    sigmas = dmd2.generator_sigmas(4, den.sigmas)
    noise, real = torch.randn(6, 4, 16, 16), torch.randn(6, 4, 16, 16)
    k = torch.tensor([0, 1, 2, 3, 0, 2])
    x, sigma = dmd2.noised_real_inputs(den, real, sigmas, k, noise)
    a = dmd2.ddpm_alphas_cumprod()[[T_LIST[i] for i in k]].view(-1, 1, 1, 1)
    x_t = x.double() * a.sqrt()  # what the UNet sees
    for i in range(6):
        expected = noise[i] if k[i] == 0 else a[i].sqrt() * real[i] + (1 - a[i]).sqrt() * noise[i]
        torch.testing.assert_close(x_t[i].float(), expected.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(sigma, sigmas[k])
    z = torch.randn(2, 4, 16, 16)
    one = dmd2.generator_sigmas(1, den.sigmas, 399)
    x = dmd2.pure_noise(den, z, one[0])
    torch.testing.assert_close((x.double() * dmd2.ddpm_alphas_cumprod()[399].sqrt()).float(), z)  # x_t = z at 399
    assert torch.equal(dmd2.pure_noise(None, z, torch.tensor(80.0)), z * 80)  # EDM teachers: sigma z


def test_dm_loss_vanishes_when_real_and_fake_scores_agree(parts, cond):
    den = parts.teacher()
    x0 = torch.randn(2, 4, 16, 16, requires_grad=True)
    sigma, noise = den.sigmas[torch.tensor([30, 900])], torch.randn(2, 4, 16, 16)
    loss = dmd2.distribution_matching_loss(x0, cond, den, den, sigma, noise)
    loss.backward()
    assert loss.item() == 0 and x0.grad.abs().max() == 0  # same network, same noise and t for both scores
    x0.grad = None
    real = copy.copy(den)
    real.guidance_scale = 8.0
    loss = dmd2.distribution_matching_loss(x0, cond, real, den, sigma, noise)
    loss.backward()
    assert loss.item() > 0 and x0.grad.abs().max() > 0  # CFG on the real score only
    # the gradient is the normalised (p_real - p_fake) / numel of dm_loss: 0.5 * mean(grad^2) = loss
    assert torch.allclose(0.5 * (x0.grad * x0.numel()).pow(2).mean(), loss, rtol=1e-4)


def test_fake_loss_is_the_official_unweighted_epsilon_mse_at_sigma_data_inf(parts, cond):
    """denoising_loss with sigma_data = inf weights by 1/sigma^2: |x0_hat - x0|^2 / sigma^2 = |eps_hat - eps|^2."""
    den = parts.teacher()
    fake = copy.deepcopy(den).requires_grad_(True)
    x0 = torch.randn(2, 4, 16, 16, requires_grad=True)
    t, noise = torch.tensor([0, 640]), torch.randn(2, 4, 16, 16)
    loss = dmd2.denoising_loss(fake, x0.detach(), cond, den.sigmas[t], noise, sigma_data=math.inf)
    acp = dmd2.ddpm_alphas_cumprod()[t].view(-1, 1, 1, 1)
    x_t = (acp.sqrt() * x0.detach().double() + (1 - acp).sqrt() * noise.double()).float()
    with torch.no_grad():
        eps = fake.unet(x_t, t, cond[0], added_cond_kwargs={"text_embeds": cond[1],
                                                            "time_ids": torch.tensor([[128, 128, 0, 0, 128, 128]] * 2,
                                                                                     dtype=torch.float32)}).sample
    official = F.mse_loss(eps.float(), noise)  # official compute_loss_fake (SD path)
    assert loss.item() == pytest.approx(official.item(), rel=2e-5)
    loss.backward()
    assert x0.grad is None and fake.unet.conv_in.weight.grad is not None  # the generator output is detached
    weighted = dmd2.denoising_loss(fake, x0.detach(), cond, den.sigmas[t], noise, sigma_data=0.5)
    assert weighted.item() > official.item() * 1.01  # EDM's 1/sigma_data^2 term is what inf removes


def test_backward_simulation_renoises_with_fresh_independent_noise():
    """Through the adapter: x_k for the next step is sqrt(a') x0 + sqrt(1 - a') n with n fresh and independent of
    every earlier input (official issue #9)."""
    den = recording_denoiser(scale=0.0)  # eps = 0: x0 = x_t / sqrt(a)
    cond = (torch.zeros(8, 77, 8), torch.zeros(8, 12))
    sigmas = dmd2.generator_sigmas(4, den.sigmas)
    acp = dmd2.ddpm_alphas_cumprod()
    torch.manual_seed(0)
    x_k, sigma_k = dmd2.backward_simulation(den, cond, sigmas, 3, (8, 4, 32, 32))
    inputs = [(c[0], int(c[1][0])) for c in den.unet.calls]
    assert [t for _, t in inputs] == T_LIST[:3] and torch.equal(sigma_k, sigmas[3].expand(8))
    assert abs(inputs[0][0].std().item() - 1) < 0.02  # pure noise at t = 999
    x_next = (x_k.double() * acp[249].sqrt()).float()
    steps = [*inputs, (x_next, 249)]
    for j in range(1, len(steps)):
        (x_prev, t_prev), (x_now, t_now) = steps[j - 1], steps[j]
        fresh = (x_now - (acp[t_now] / acp[t_prev]).sqrt().float() * x_prev) / (1 - acp[t_now]).sqrt().float()
        assert abs(fresh.std().item() - 1) < 0.02
        for earlier, _ in steps[:j]:
            assert abs(torch.corrcoef(torch.stack([fresh.flatten(), earlier.flatten()]))[0, 1]) < 0.03


# --- the Distiller on text-to-image teachers --------------------------------------------------------------------------


def tiny_latents(n=6):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 4, 16, 16, generator=g).half(),
            ["a cat", "a dog", "red car", "blue sky", "green tree", "old house"][:n])


def t2i_distiller(parts, **overrides):
    cfg = dmd2.Config(**{**dmd2.PRESETS["sdxl" if parts.sdxl else "sd15"], "dataset": "sdxl" if parts.sdxl else "sd15",
                         "sigma_data": math.inf, "precision": "fp32", "batch_size": 2, "warmup_steps": 0,
                         "generator_lr": 1e-4, "guidance_lr": 1e-4, **overrides})
    latents, captions = tiny_latents()
    torch.manual_seed(0)
    teacher = dmd2.prepare_network(parts.teacher(), cfg, torch.device("cpu"))
    d = dmd2.Distiller(cfg, teacher, (4, 16, 16), conditions=dmd2.Prompts(captions, parts.tokenizers, parts.text_encoders),
                       generator=dmd2.lora_generator(teacher, cfg) if cfg.lora_rank else None)
    return d, dmd2.InMemoryBatches(latents, captions, cfg.batch_size, cfg.seed)


def grads_of(*modules):
    return [p.grad for m in modules for p in m.parameters()]


def test_train_iteration_gradients_reach_only_the_generator(parts):
    d, real = t2i_distiller(copy.deepcopy(parts), dfake_gen_update_ratio=5)
    frozen = [d.real_score, *parts.text_encoders, parts.vae]
    seen = {}
    d.opt_g.register_step_pre_hook(lambda *a: seen.__setitem__("g", (grads_of(d.generator),
                                                                     grads_of(d.fake_score, d.head, *frozen))))
    d.opt_d.register_step_pre_hook(lambda *a: seen.__setitem__("d", (grads_of(d.fake_score, d.head),
                                                                     grads_of(d.generator, *frozen))))
    real_before = [p.clone() for p in d.real_score.parameters()]
    assert (d.real_score.guidance_scale, d.fake_score.guidance_scale, d.generator.guidance_scale) == (8.0, 1.0, 1.0)
    log = d.train_step(next(real))
    assert {"loss_dm", "loss_gan_g", "grad_norm_g", "loss_fake", "loss_gan_d", "grad_norm_d"} <= set(log)
    assert all(np.isfinite(v) for v in log.values())
    trained, untouched = seen["g"]
    assert all(g is not None for g in trained) and sum(g.abs().sum() for g in trained) > 0
    assert all(g is None for g in untouched)  # fake UNet, head, real UNet, text encoders, VAE: no gradient
    trained, untouched = seen["d"]
    assert sum(g.abs().sum() for g in trained if g is not None) > 0 and all(g is None for g in untouched)
    assert all(torch.equal(a, b) for a, b in zip(real_before, d.real_score.parameters()))
    assert all(p.requires_grad for p in d.fake_score.parameters())  # re-enabled after the generator turn
    log = d.train_step(next(real))  # step 1 of ratio 5: critic only
    assert set(log) == {"loss_fake", "loss_gan_d", "grad_norm_d"} and d.step == 2


def test_backward_simulation_gradient_only_through_the_last_step(parts):
    d, real = t2i_distiller(copy.deepcopy(parts), dfake_gen_update_ratio=1, gan=False)
    calls = []
    d.generator.unet.register_forward_hook(
        lambda m, args, out: calls.append((torch.is_grad_enabled(), int(args[1][0]), out.sample.requires_grad)))
    ks = set()
    for _ in range(6):
        calls.clear()
        d.train_step()
        generator_calls = calls[:next(i for i, c in enumerate(calls) if c[0]) + 1]  # up to the one with gradient
        *rollout, last = generator_calls
        ks.add(len(rollout))
        assert [c[1] for c in rollout] == T_LIST[:len(rollout)] and not any(c[0] or c[2] for c in rollout)
        assert last == (True, T_LIST[len(rollout)], True)  # the one step with gradient, at t_k
    assert len(ks) >= 2  # several rollout lengths were exercised


def test_bf16_lora_checkpointing_iteration_trains_only_adapters(parts):
    d, real = t2i_distiller(copy.deepcopy(parts), precision="bf16", lora_rank=4, lora_alpha=4, grad_checkpointing=True,
                            warmup_steps=0)
    assert d.real_score.unet.dtype == torch.bfloat16 and d.fake_score.unet.dtype == torch.float32
    assert d.generator.unet.dtype == torch.float32 and d.generator.unet.is_gradient_checkpointing
    assert all(s["exp_avg"].dtype == torch.float32 for s in d.opt_d.state.values())
    trainable = [n for n, p in d.generator.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    base_before = {n: p.clone() for n, p in d.generator.named_parameters() if "lora" not in n}
    lora_before = {n: p.clone() for n, p in d.generator.named_parameters() if "lora" in n}
    log = d.train_step(next(real))
    assert np.isfinite(log["loss_dm"]) and np.isfinite(log["loss_fake"])
    params = dict(d.generator.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in base_before.items())
    assert any(not torch.equal(params[n], p) for n, p in lora_before.items())
    assert all(s["exp_avg"].dtype == torch.float32 for s in d.opt_g.state.values())


class DrawLog:
    """Wraps a SharedNoise: every draw's values, in order, for an independent re-computation."""

    def __init__(self, noise):
        self.noise, self.values = noise, []

    def __getattr__(self, name):
        method = getattr(self.noise, name)

        def draw(*args, **kwargs):
            value = method(*args, **kwargs)
            self.values.append(value.clone() if torch.is_tensor(value) else value)
            return value
        return draw


def test_sd15_iteration_equals_the_official_formulas(sd15):
    """One TTUR iteration (generator turn, then critic turn) of a tiny SD v1.5-shaped model, GAN on, against the
    official SD path written out in epsilon space (main/sd_guidance.py, main/sd_unified_model.py): pure noise at
    t = 999, x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) in float64; DM loss at t ~ [20, 981) with CFG 1.75 standard form
    on the empty-prompt encoding, normalised by mean|x0 - pred_real|; fake loss the unweighted eps MSE; diffusion-GAN
    logits on the mid block at t ~ [0, 1000); same draws, same initial weights.

    Both sides run the three UNets in float64, so no float32 convolution enters the DM loss or the gradients: the
    DM loss is ill-conditioned (the fake score starts as the teacher, so p_real - p_fake is the CFG term 0.75
    (eps_c - eps_u), a small difference of two large UNet outputs: in float32 it depends on the CPU's convolution
    kernels, 1.6e-5 relative on AMX against 1e-5). What is left is float32 rounding that is the same on every CPU
    (IEEE +, *, sqrt are correctly rounded elementwise): the UNet inputs x_t are float32 on both sides (the adapter
    forms x_t = sqrt(a) (x0 + sigma n) with two roundings, add_noise with one: |dx_t| <= 3 u |x_t|, u = 2^-24), the
    generator output and the DM gradient are float32 (official .float()). A perturbation 3 u of x_t moves a smooth
    function of it, the CFG difference included, by O(10 u) relative; float64 kernels add ~1e-13. So: losses to
    rel 1e-5 (= 170 u; measured: 2e-7 and less), gradients to 1e-5 of their total norm (measured: 3e-8). The GAN
    head stays float32 (GANHead casts its input: official), but its logits enter only the well-conditioned softplus
    losses and, weighted by 1e-3 / 1e-2, the gradients. A wrong CFG form (cond + s (cond - uncond)) moves loss_dm
    by a factor (s / (s - 1))^2 = 5.4."""
    parts = copy.deepcopy(sd15)
    d, real = t2i_distiller(parts, gan=True, gen_cls_loss_weight=1e-3, cls_loss_weight=1e-2,
                            dfake_gen_update_ratio=10, guidance_scale=1.75, max_grad_norm=1e9)
    for net in (d.generator.unet, d.fake_score.unet, d.real_score.unet):
        net.double()  # in place: the optimisers hold the same Parameter objects; EpsDenoiser casts inputs to it
    nets = {k: copy.deepcopy(v) for k, v in (("gen", d.generator.unet), ("fake", d.fake_score.unet),
                                              ("real", d.real_score.unet), ("head", d.head))}
    d.noise = DrawLog(d.noise)
    state = real.rng.get_state()
    grads = {}
    d.opt_g.register_step_pre_hook(lambda *a: grads.__setitem__("g", [p.grad.clone() for p in d.generator.parameters()]))
    d.opt_d.register_step_pre_hook(lambda *a: grads.__setitem__("d", [p.grad.clone() for p in d.critic_params]))
    log = d.train_step(next(real))
    real.rng.set_state(state)
    real_latents, real_captions = next(real)
    gen_index, noise, t_dm, noise_dm, t_g, noise_g, t_f, noise_f, t_r, noise_r, t_ff, noise_ff = d.noise.values

    acp = dmd2.ddpm_alphas_cumprod()
    prompts = dmd2.Prompts([], parts.tokenizers, parts.text_encoders)
    captions = tiny_latents()[1]
    embeds = prompts.encode([captions[i] for i in gen_index.tolist()])[0]
    uncond = prompts.encode([""])[0].expand_as(embeds)

    def eps(unet, x_t, t, e):  # float32 inputs (as the adapter's) to the float64 UNet
        return unet(x_t.double(), t, e.double()).sample

    def x0_of(x_t, e, t):  # official get_x0_from_noise
        a = acp[t].view(-1, 1, 1, 1)
        return (x_t.double() - (1 - a).sqrt() * e.double()) / a.sqrt()

    def add_noise(x0, n, t):  # official scheduler.add_noise
        a = acp[t].view(-1, 1, 1, 1)
        return (a.sqrt() * x0.double() + (1 - a).sqrt() * n.double()).float()

    def mid(unet, x_t, t, e):
        feats = []
        h = unet.mid_block.register_forward_hook(lambda m, a, o: feats.append(o))
        unet(x_t.double(), t, e.double())
        h.remove()
        return feats[0]

    t999 = torch.full((2,), 999)
    x0 = x0_of(noise, eps(nets["gen"], noise, t999, embeds), t999).float()  # pure noise input at t = 999
    with torch.no_grad():
        x_t = add_noise(x0, noise_dm, t_dm)
        pred_fake = x0_of(x_t, eps(nets["fake"], x_t, t_dm, embeds), t_dm)
        e_u, e_c = eps(nets["real"], x_t, t_dm, uncond), eps(nets["real"], x_t, t_dm, embeds)
        pred_real = x0_of(x_t, e_u + 1.75 * (e_c - e_u), t_dm)
        p_real, p_fake = x0.double() - pred_real, x0.double() - pred_fake
        grad = (p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    loss_dm = 0.5 * F.mse_loss(x0.double(), (x0.double() - grad).detach())
    logit_g = nets["head"](mid(nets["fake"], add_noise(x0, noise_g, t_g), t_g, embeds).float())
    loss_gan_g = F.softplus(-logit_g).mean()
    (loss_dm.float() + 1e-3 * loss_gan_g).backward()
    assert log["loss_dm"] == pytest.approx(loss_dm.item(), rel=1e-5)
    assert log["loss_gan_g"] == pytest.approx(loss_gan_g.item(), rel=1e-5)
    for ours, theirs in zip(grads["g"], [p.grad for p in nets["gen"].parameters()]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * float(log["grad_norm_g"]))

    fake_in = x0.detach()
    loss_fake = F.mse_loss(eps(nets["fake"], add_noise(fake_in, noise_f, t_f), t_f, embeds), noise_f.double())
    real_embeds = prompts.encode(real_captions)[0]
    logit_r = nets["head"](mid(nets["fake"], add_noise(real_latents, noise_r, t_r), t_r, real_embeds).float())
    logit_f = nets["head"](mid(nets["fake"], add_noise(fake_in, noise_ff, t_ff), t_ff, embeds).float())
    loss_gan_d = F.softplus(logit_f).mean() + F.softplus(-logit_r).mean()
    for p in [*nets["fake"].parameters(), *nets["head"].parameters()]:
        p.grad = None
    (loss_fake + 1e-2 * loss_gan_d).backward()
    assert log["loss_fake"] == pytest.approx(loss_fake.item(), rel=1e-5)
    assert log["loss_gan_d"] == pytest.approx(loss_gan_d.item(), rel=1e-5)
    theirs = [p.grad for p in [*nets["fake"].parameters(), *nets["head"].parameters()] if p.requires_grad]
    for ours, reference in zip(grads["d"], theirs):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5 * float(log["grad_norm_d"]))


# --- CFG only on the real score, only above 1; the GAN head without diffusion GAN ------------------------------------


def sd15_config(**overrides):
    """The sd15 preset for the tiny model (fp32 on the CPU, batch 2, no warm-up)."""
    return dmd2.Config(**{**dmd2.PRESETS["sd15"], "dataset": "sd15", "sigma_data": math.inf, "precision": "fp32",
                          "batch_size": 2, "warmup_steps": 0, "generator_lr": 1e-4, "guidance_lr": 1e-4, **overrides})


def direct_x0(den, x, sigma, cond, guidance=None):
    """x0 of the UNet called directly (SD v1.5: no added conditions), in the UNet's dtype (float64 here), at the
    adapter's float32 x_t: the conditional prediction, or uncond + guidance (cond - uncond) with the empty prompt."""
    t = den.timestep(sigma).expand(len(x))
    a = dmd2.ddpm_alphas_cumprod()[t].view(-1, 1, 1, 1)
    x_t = (x.double() * a.sqrt()).float().double()
    eps = den.unet(x_t, t, cond[0].double()).sample
    if guidance is not None:
        eps_u = den.unet(x_t, t, den.uncond_embeds.double().expand_as(cond[0])).sample
        eps = eps_u + guidance * (eps - eps_u)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def test_cfg_only_above_guidance_scale_one(sd15):
    """Official (main/sd_guidance.py): classifier-free guidance only when the scale is > 1. Scales 0.5 and 0 return
    exactly the plain conditional prediction (that of scale 1, bitwise: the same code path); 2 returns
    uncond + 2 (cond - uncond) with the empty-prompt encoding. The UNet runs in float64, so the comparison with the
    direct computation is free of float32 kernels: 1e-6 covers a float32 rounding of x_t more or less (u |x_t| / sqrt(a)),
    while the CFG term 2 (cond - uncond) - cond differs by (cond - uncond) sqrt(1 - a) / sqrt(a) >~ 1e-4 here."""
    parts = copy.deepcopy(sd15)
    parts.unet.double()
    den = parts.teacher()
    cond = dmd2.Prompts([], parts.tokenizers, parts.text_encoders).encode(["a red cat", "two dogs on a hill"])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = den.sigmas[torch.tensor([300, 700])]
    out = {}
    with torch.no_grad():
        for scale in (1.0, 0.5, 0.0, 2.0):
            den.guidance_scale = scale
            out[scale] = den(x, sigma, cond)
        plain, guided = direct_x0(den, x, sigma, cond), direct_x0(den, x, sigma, cond, guidance=2.0)
    torch.testing.assert_close(out[1.0], plain, rtol=1e-6, atol=1e-6)
    for scale in (0.5, 0.0):
        assert torch.equal(out[scale], out[1.0]), \
            f"guidance_scale {scale}: {(out[scale] - out[1.0]).abs().max().item():.3g} from the conditional prediction"
    torch.testing.assert_close(out[2.0], guided, rtol=1e-6, atol=1e-6)
    assert (guided - plain).abs().max() > 1e-4  # CFG at 2 is not the conditional prediction: the test is not vacuous


def test_fake_score_and_generator_never_get_cfg(sd15):
    """Only the real score guides (official: real_guidance_scale on the real UNet; the fake UNet and the generator
    run without CFG), whatever scale the teacher handed to the Distiller carried."""
    parts = copy.deepcopy(sd15)
    teacher = parts.teacher()
    teacher.guidance_scale = 3.0
    cfg = sd15_config(guidance_scale=1.75)
    d = dmd2.Distiller(cfg=cfg, teacher=teacher, sample_shape=(4, 16, 16),
                       conditions=dmd2.Prompts(["a cat", "a dog"], parts.tokenizers, parts.text_encoders))
    assert d.real_score.guidance_scale == 1.75
    assert (d.fake_score.guidance_scale, d.generator.guidance_scale) == (1, 1)
    cond = dmd2.Prompts([], parts.tokenizers, parts.text_encoders).encode(["a red cat", "two dogs on a hill"])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    for net in (d.fake_score, d.generator):  # behaviourally: the conditional prediction, float64 as above
        net.unet.double()
        sigma = net.sigmas[torch.tensor([300, 700])]
        with torch.no_grad():
            torch.testing.assert_close(net(x, sigma, cond), direct_x0(net, x, sigma, cond), rtol=1e-6, atol=1e-6)


def test_gan_without_diffusion_gan_classifies_the_clean_latents_at_timestep_zero(sd15, monkeypatch):
    """Without the diffusion GAN (official sd_guidance compute_cls_logits: timesteps zeros, noisy_image = image) the
    GAN head's features are the UNet's mid block on the latent x itself at t = 0, not on sqrt(alpha_bar_0) x
    (= 0.99957 x, the EDM scaling x = x0 + sigma_0 n with n = 0 read through the adapter). Recorded through one
    train_step (generator turn: the generated batch; critic turn: the real batch, then the generated one). The real
    latents are float16 values (exact in float32); the adapter may reach x_t = x only up to rounding (x_t =
    fl32(x' sqrt(a_0)) with x' = x / sqrt(a_0) formed in float64: within 1 ulp, 6e-8 |x|), so 1e-6 max|x|, still
    700 times below the 4.3e-4 |x| of the scaled input."""
    parts = copy.deepcopy(sd15)
    cfg = sd15_config(gan=True, diffusion_gan=False, gen_cls_loss_weight=1e-3, cls_loss_weight=1e-2,
                      dfake_gen_update_ratio=1)
    latents, captions = tiny_latents()
    d = dmd2.Distiller(cfg=cfg, teacher=parts.teacher(), sample_shape=(4, 16, 16),
                       conditions=dmd2.Prompts(captions, parts.tokenizers, parts.text_encoders))
    calls, original = [], dmd2.EpsDenoiser.mid_block_output

    def recording(self, x_t, t, cond):
        calls.append((x_t.detach().clone(), t.detach().clone()))
        return original(self, x_t, t, cond)
    monkeypatch.setattr(dmd2.EpsDenoiser, "mid_block_output", recording)
    batch = next(dmd2.InMemoryBatches(latents, captions, cfg.batch_size, cfg.seed))
    log = d.train_step(batch)
    assert {"loss_gan_g", "loss_gan_d"} <= set(log)
    assert len(calls) == 3, [tuple(x.shape) for x, _ in calls]  # generated (G turn), real, generated (critic turn)
    assert all(t.tolist() == [0] * len(t) for _, t in calls), [t.tolist() for _, t in calls]
    real = batch[0].float()
    scale = real.abs().max().item()
    torch.testing.assert_close(calls[1][0].float(), real, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(calls[2][0], calls[0][0], rtol=0, atol=0)  # the same generated batch, both turns


# --- data, checkpoints, released weights ----------------------------------------------------------------------------


def write_folder(folder, n=3):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        PIL.Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 30, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"picture number {i}\n")
    return folder


def test_latents_are_encoded_once_memory_mapped_and_refreshed(parts, tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "data")
    latents, captions = dmd2.encode_latents(str(folder), parts.vae, 128)
    assert isinstance(latents, np.memmap) and latents.shape == (3, 4, 16, 16) and latents.dtype == np.float16
    assert captions == ["picture number 0", "picture number 1", "picture number 2"]
    image = dmd2.load_image(str(folder / "img1.png"), 128)
    with torch.no_grad():  # the latents are the VAE's posterior sample times the scaling factor
        mean = parts.vae.encode(image[None]).latent_dist.mean * parts.vae.config.scaling_factor
    assert image.shape == (3, 128, 128) and -1 <= image.min() < image.max() <= 1
    ours = torch.from_numpy(np.array(latents)).float()
    assert (ours[1] - mean[0]).abs().mean() < (ours[0] - mean[0]).abs().mean()
    monkeypatch.setattr(parts.vae, "encode", lambda x: pytest.fail("re-encoded although stored"))
    again, _ = dmd2.encode_latents(str(folder), parts.vae, 128)
    assert np.array_equal(again, latents)
    batches = dmd2.InMemoryBatches(again, captions, 4, seed=0)
    x, c = next(batches)
    assert x.dtype == torch.float32 and x.shape == (4, 4, 16, 16) and len(c) == 4 and set(c) <= set(captions)
    (folder / "img2.txt").write_text("a new caption")
    with pytest.raises(pytest.fail.Exception, match="re-encoded"):
        dmd2.encode_latents(str(folder), parts.vae, 128)  # a changed caption invalidates the store


def test_data_errors_name_the_file(parts, tmp_path):
    folder = write_folder(tmp_path / "data")
    os.remove(folder / "img1.txt")
    with pytest.raises(FileNotFoundError, match=r"img1\.png has no caption.*img1\.txt"):
        dmd2.read_captioned_folder(str(folder))
    (folder / "img1.txt").write_text("  a caption with spaces \n")
    assert dmd2.read_captioned_folder(str(folder))[1] == (str(folder / "img1.png"), "a caption with spaces")
    (folder / "img0.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"img0\.png: cannot read image"):
        dmd2.encode_latents(str(folder), parts.vae, 128)
    with pytest.raises(FileNotFoundError, match="no images"):
        dmd2.read_captioned_folder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        dmd2.read_captioned_folder(str(tmp_path / "missing"))


def test_offline_loading_errors_say_what_to_download(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match=r"cannot load .*no-sdxl-here .*hf download .*no-sdxl-here --local-dir DIR"):
        dmd2.load_t2i(str(tmp_path / "no-sdxl-here"))
    import huggingface_hub

    def offline(repo_id, filename, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection and not in the cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(dmd2.DownloadError, match=r"hf download tianweiy/DMD2 dmd2_sdxl_4step_unet_fp16\.bin"):
        dmd2.download_dmd2(dmd2.DMD2_SDXL_FILES[4])


def test_released_unet_file_loads_strictly(parts, tmp_path):
    unet = copy.deepcopy(parts.unet)
    state = {k: v.half() + 1 for k, v in unet.state_dict().items()}  # an fp16 state dict like the release
    torch.save(state, tmp_path / "unet_fp16.bin")
    dmd2.load_unet_weights(unet, str(tmp_path / "unet_fp16.bin"))
    assert unet.dtype == torch.float32 and torch.equal(unet.conv_in.weight, state["conv_in.weight"].float())
    del state["conv_in.weight"]
    torch.save(state, tmp_path / "broken.bin")
    with pytest.raises(RuntimeError, match="conv_in.weight"):
        dmd2.load_unet_weights(unet, str(tmp_path / "broken.bin"))


def test_fuse_lora_file(parts, cond, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    x, sigma = torch.randn(2, 4, 16, 16), parts.teacher().sigmas[torch.tensor([999, 249])]
    adapted = copy.deepcopy(parts.unet)
    torch.manual_seed(5)
    adapted.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=dmd2.SDXL_LORA_TARGETS, init_lora_weights=False))
    diffusers.StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(adapted))
    fresh = dmd2.tiny_t2i_parts(seed=0)
    with torch.no_grad():
        expected = dmd2.T2IParts(adapted, fresh.text_encoders, fresh.tokenizers, fresh.vae,
                                 fresh.alphas_cumprod).teacher()(x, sigma, cond)
        base = fresh.teacher()(x, sigma, cond)
        dmd2.fuse_lora(fresh, str(tmp_path / "pytorch_lora_weights.safetensors"))
        fused = fresh.teacher()(x, sigma, cond)
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)


# --- the command line ---------------------------------------------------------------------------------------------


def test_cli_runs_resumes_exactly_and_samples(tmp_path):
    """python dmd2.py --dataset sdxl --tiny true: the same run folder as the EDM rungs (checkpoint, log, curves,
    sample grids, unet.bin); re-running with more iterations resumes and equals an uninterrupted run."""
    folder = str(write_folder(tmp_path / "data", n=4))
    common = ["--dataset", "sdxl", "--tiny", "true", "--data_path", folder, "--precision", "fp32", "--generator_lr",
              "1e-4", "--guidance_lr", "1e-4", "--warmup_steps", "2", "--dfake_gen_update_ratio", "2", "--log_every",
              "1", "--ckpt_every", "2", "--sample_every", "2", "--batch_size", "2"]
    straight = dmd2.main([*common, "--iters", "3", "--out_dir", str(tmp_path / "a")])
    dmd2.main([*common, "--iters", "2", "--out_dir", str(tmp_path / "b")])
    resumed = dmd2.main([*common, "--iters", "3", "--out_dir", str(tmp_path / "b")])
    assert straight.step == resumed.step == 3
    for a, b in [(straight.generator, resumed.generator), (straight.fake_score, resumed.fake_score),
                 (straight.head, resumed.head)]:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    run = tmp_path / "b" / "sdxl" / "student_4step"
    assert {"checkpoint.pt", "log.jsonl", "curves.png", "samples_000002.png", "samples_000003.png", "unet.bin"} <= \
        set(os.listdir(run))
    records = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["step"] for r in records] == [0, 1, 2] and "loss_dm" in records[0]
    assert os.path.isdir(os.path.join(folder, ".dmd2_latents_128"))
    out = tmp_path / "grid.png"
    dmd2.main(["sample", "--checkpoint", str(tmp_path / "a" / "sdxl" / "student_4step" / "checkpoint.pt"),
               "--prompt", "a cat", "--prompt", "a dog", "--num", "2", "--out", str(out)])
    assert PIL.Image.open(out).size == (4 * 129 + 1, 130)  # 2 prompts x 2 images in a row, 1 px padding
    with pytest.raises(SystemExit):
        dmd2.cli(["--dataset", "sdxl", "--tiny", "true"])  # no --data_path: one line, exit 2


def test_ode_pretraining_then_the_one_step_run_starts_from_it(tmp_path):
    """sdxl-ode (official main/train_sd_ode.py): the generator at t = 399 regresses the teacher's CFG-8 ODE outputs
    from their noise; no critic is trained. sdxl-1step --generator_init then starts from its generator."""
    folder = str(write_folder(tmp_path / "data", n=4))
    common = ["--tiny", "true", "--data_path", folder, "--precision", "fp32", "--out_dir", str(tmp_path / "runs"),
              "--batch_size", "2", "--log_every", "1", "--warmup_steps", "0", "--cache_dir", str(tmp_path / "cache")]
    ode = dmd2.main(["--dataset", "sdxl-ode", *common, "--regression_pairs", "4", "--teacher_eval_steps", "2",
                     "--regression_loss", "mse", "--iters", "4", "--generator_lr", "1e-3", "--eval_batch", "4"])
    run = tmp_path / "runs" / "sdxl-ode" / "student_1step"
    records = [json.loads(line) for line in open(run / "log.jsonl")]
    assert all("loss_reg" in r and "loss_fake" not in r and "loss_dm" not in r for r in records)
    teacher = dmd2.tiny_t2i_parts(seed=10).teacher()
    assert all(torch.equal(a, b) for a, b in zip(ode.fake_score.state_dict().values(), teacher.state_dict().values()))
    captions = [c for _, c in dmd2.read_captioned_folder(folder)]
    noise, prompts, target = dmd2.teacher_ode_pairs(ode.cfg, teacher, dmd2.Prompts(captions, None, None),
                                                    (4, 16, 16))
    assert noise.shape == target.shape == (4, 4, 16, 16) and len(prompts) == 4  # read back from the cache
    parts = dmd2.tiny_t2i_parts(seed=10)
    cond = dmd2.Prompts([], parts.tokenizers, parts.text_encoders).encode(prompts)
    sigma = teacher.sigmas[399].expand(4)
    with torch.no_grad():
        errors = [F.mse_loss(net(dmd2.pure_noise(net, noise, sigma[0]), sigma, cond).float(), target).item()
                  for net in (teacher, ode.generator.eval())]
    assert errors[1] < 0.95 * errors[0]  # the regression moved the generator towards the teacher's ODE outputs
    teacher = parts.teacher()
    teacher.guidance_scale = 8.0
    start = (teacher.sigma_max ** 2 + 1) ** 0.5 / teacher.sigma_max  # the ODE starts from pure noise x_t = z
    expected = dmd2.sample_teacher(teacher, noise * start, prompts,
                                   dmd2.Prompts([], parts.tokenizers, parts.text_encoders), 2, 4)
    torch.testing.assert_close(target, expected)
    cfg = dmd2.parse_config(["--dataset", "sdxl-1step", *common])
    d = dmd2.Distiller(cfg, dmd2.tiny_t2i_parts(seed=10).teacher(), (4, 16, 16),
                       conditions=dmd2.Prompts(["a"], parts.tokenizers, parts.text_encoders))
    dmd2.initialise_from(d, str(run / "checkpoint.pt"))
    assert all(torch.equal(a, b) for a, b in zip(d.generator.state_dict().values(), ode.generator.state_dict().values()))
    assert d.generator.unet is not d.real_score.unet and d.step_sigmas.tolist() == [float(d.sigmas[399])]


@pytest.mark.parametrize("micro_batch", [0, 1])
def test_torchrun_two_processes_equal_one_process(tmp_path, micro_batch):
    """torchrun --nproc_per_node 2 at batch 1 == one process at batch 2 on the text-to-image path (DDP over the
    EpsDenoiser copies, prompts and real latents sliced from the global batch, one backward-simulation step)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = str(write_folder(tmp_path / "data", n=4))

    def run(out, batch, nproc):
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
        args = ["--dataset", "sdxl", "--tiny", "true", "--data_path", folder, "--out_dir", str(tmp_path / out),
                "--batch_size", str(batch), "--iters", "3", "--dfake_gen_update_ratio", "2", "--warmup_steps", "0",
                "--generator_lr", "1e-3", "--guidance_lr", "1e-3", "--device", "cpu", "--precision", "fp32",
                "--micro_batch", str(micro_batch if nproc > 1 else 0)]
        done = subprocess.run([sys.executable, *launcher, "dmd2.py", *args], cwd=root, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        return torch.load(tmp_path / out / "sdxl" / "student_4step" / "checkpoint.pt", weights_only=True)["distiller"]
    two, one = run("two", 1, 2), run("one", 2, 1)
    teacher = dmd2.tiny_t2i_parts(seed=10).teacher().state_dict()
    assert two["step"] == one["step"] == 3
    for name, prefix in (("generator", ""), ("critic", "fake_score.")):  # the critic: fake_score.* and head.*
        ours = {k[len(prefix):]: v for k, v in one[name].items() if k.startswith(prefix)}
        diff = torch.cat([(two[name][prefix + k] - v).abs().flatten() for k, v in ours.items()]).mean()
        update = torch.cat([(v - teacher[k]).abs().flatten() for k, v in ours.items()]).mean()
        assert update > 1e-5 and diff < 1e-3 * update, (name, float(diff), float(update))


def test_killed_text_to_image_run_resumes_by_itself(tmp_path):
    """Kill `python dmd2.py --dataset sdxl --tiny true ...` after its first checkpoint; the same command resumes."""
    import subprocess
    import sys
    import time
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = str(write_folder(tmp_path / "data", n=4))
    command = [sys.executable, "dmd2.py", "--dataset", "sdxl", "--tiny", "true", "--data_path", folder, "--out_dir",
               str(tmp_path / "runs"), "--batch_size", "2", "--iters", "40", "--ckpt_every", "5", "--precision", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    ckpt = tmp_path / "runs" / "sdxl" / "student_4step" / "checkpoint.pt"
    proc = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600  # generous: a loaded machine is slow; the loop ends at the first checkpoint
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert ckpt.exists(), "no checkpoint was written before the kill"
    step_at_kill = torch.load(ckpt, weights_only=True)["distiller"]["step"]
    assert 0 < step_at_kill < 40
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming {ckpt.parent} at iteration {step_at_kill}" in done.stdout
    assert torch.load(ckpt, weights_only=True)["distiller"]["step"] == 40


def test_two_nodes_encoding_one_shared_folder_at_once_both_get_the_latents(parts, tmp_path, monkeypatch):
    """Nodes whose local rank 0 share a data folder encode it at the same time: each writes its own temporary files
    and renames them, so neither clobbers the other's file nor maps one being written (the fixed name "latents.npy.part"
    did both: the two-node HSDP test failed with "mmap length is greater than file size")."""
    folder = write_folder(tmp_path / "data")
    both_writing, encode = threading.Barrier(2, timeout=60), parts.vae.encode

    def encode_when_both_write(x):  # each batch waits for the other writer: both files are open at once
        if threading.current_thread().name.startswith("node"):
            both_writing.wait()
        return encode(x)
    monkeypatch.setattr(parts.vae, "encode", encode_when_both_write)
    results, errors = {}, []

    def node(r):
        try:
            results[r] = np.array(dmd2.encode_latents(str(folder), parts.vae, 128)[0])
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=node, args=(r,), name=f"node{r}") for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results[0].shape == (3, 4, 16, 16) and np.array_equal(results[0], results[1])
    assert np.array_equal(np.load(folder / ".dmd2_latents_128" / "latents.npy"), results[0])
