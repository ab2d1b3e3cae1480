"""The SDXL path of dmd2.py on tiny random SDXL-shaped networks (CPU, nothing downloaded).

The networks come from dmd2.sdxl_tiny_parts(): SDXL's conditioning layout (2048-d tokens from a 768-d and a 1280-d
CLIP text encoder, 1280-d pooled projection, 6 x 256 micro-conditioning) with 2 UNet levels of 32/64 channels. Its
tokenizers are real transformers CLIPTokenizers built in memory from a character-level vocabulary (no merges), so
prompts go through the same tokenizer -> text encoder code as SDXL's."""
import copy
import math
import os

import numpy as np
import PIL.Image
import pytest
import torch

diffusers = pytest.importorskip("diffusers")  # requirements-sdxl.txt
import dmd2

T_LIST = [999, 749, 499, 249]


@pytest.fixture(scope="module")
def parts():
    return dmd2.sdxl_tiny_parts(seed=0)


@pytest.fixture(scope="module")
def cond(parts):
    embeds, pooled = dmd2.encode_prompts(["a red cat", "two dogs on a hill"], parts.tokenizers, parts.text_encoders)
    return embeds, pooled, dmd2.sdxl_time_ids(parts.resolution, 2)


def tiny_data(n=6):
    g = torch.Generator().manual_seed(1)
    return {"latents": torch.randn(n, 4, 16, 16, generator=g).half(),
            "captions": ["a cat", "a dog", "red car", "blue sky", "green tree", "old house"][:n]}


def hand_alphas_cumprod(t):
    """alpha_bar_t from the scaled_linear betas, all in Python float64."""
    b0, b1 = math.sqrt(0.00085), math.sqrt(0.012)
    return math.prod(1 - (b0 + i * (b1 - b0) / 999) ** 2 for i in range(t + 1))


# --- noise schedule, epsilon -> x0, conditioning ---------------------------------------------------------------


def test_alphas_cumprod_equal_diffusers_scheduler_and_hand_values():
    acp = dmd2.sdxl_alphas_cumprod()
    ddim = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert acp.dtype == torch.float64 and acp.shape == (1000,)
    assert torch.equal(acp, ddim.alphas_cumprod.double())
    for t in (0, 249, 499, 749, 999):
        assert acp[t].item() == pytest.approx(hand_alphas_cumprod(t), rel=2e-6)
    assert acp[999].item() == pytest.approx(0.00466, abs=1e-5)  # not zero-terminal SNR (reference 7.2)


def test_add_noise_and_eps_to_x0_match_hand_computation():
    acp = dmd2.sdxl_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64), torch.randn(3, 4, 2, 2, generator=g,
                                                                                     dtype=torch.float64)
    t = torch.tensor([0, 249, 999])
    x_t = dmd2.ddpm_add_noise(x0, eps, t, acp)
    for i, step in enumerate(t.tolist()):
        a = acp[step].item()  # the table value (itself checked against Python float64 math above)
        torch.testing.assert_close(x_t[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i], rtol=0, atol=1e-12)
        back = (x_t[i] - math.sqrt(1 - a) * eps[i]) / math.sqrt(a)
        torch.testing.assert_close(dmd2.eps_to_x0(x_t, eps, t, acp)[i], back, rtol=0, atol=1e-12)
    recovered = dmd2.eps_to_x0(x_t, eps, t, acp)
    assert recovered.dtype == torch.float64
    torch.testing.assert_close(recovered, x0, rtol=0, atol=1e-11)  # float64 round trip
    x32 = dmd2.eps_to_x0(x_t.float(), eps.float(), t, acp)
    assert x32.dtype == torch.float64  # float32 inputs are converted in float64 too (official get_x0_from_noise)


def test_time_ids_layout():
    ids = dmd2.sdxl_time_ids(1024, 3)
    assert ids.shape == (3, 6) and ids.dtype == torch.float32
    assert ids.tolist() == [[1024, 1024, 0, 0, 1024, 1024]] * 3


def test_generator_timesteps():
    assert dmd2.sdxl_generator_timesteps(4) == T_LIST
    assert dmd2.sdxl_generator_timesteps(1) == [399]
    assert dmd2.sdxl_generator_timesteps(1, conditioning_timestep=999) == [999]
    assert dmd2.sdxl_generator_timesteps(2) == [999, 499]


class RecordingUNet(torch.nn.Module):
    """Stands in for a UNet2DConditionModel: eps = x * (1 + mean of the token embeddings); records its inputs."""
    dtype = torch.float32

    def forward(self, x, t, embeds, added_cond_kwargs):
        self.calls = getattr(self, "calls", []) + [(x, t, embeds, added_cond_kwargs)]
        return type("Out", (), {"sample": x * (1 + embeds.mean(dim=(1, 2)).view(-1, 1, 1, 1))})()


def test_cfg_is_standard_form_with_zero_unconditional_embeddings():
    unet = RecordingUNet()
    x, t = torch.randn(2, 4, 3, 3), torch.tensor([5, 700])
    embeds, pooled, ids = torch.rand(2, 77, 8) + 0.5, torch.rand(2, 12), dmd2.sdxl_time_ids(64, 2)
    out = dmd2.cfg_eps(unet, x, t, embeds, pooled, ids, guidance_scale=8.0)
    eps_c, eps_u = x * (1 + embeds.mean(dim=(1, 2)).view(-1, 1, 1, 1)), x  # zero embeddings -> eps_u = x
    torch.testing.assert_close(out, eps_u + 8.0 * (eps_c - eps_u))
    (bx, bt, be, bc), = unet.calls
    assert torch.equal(be[:2], torch.zeros_like(embeds)) and torch.equal(be[2:], embeds)
    assert torch.equal(bc["text_embeds"][:2], torch.zeros_like(pooled)) and torch.equal(bc["text_embeds"][2:], pooled)
    assert torch.equal(bc["time_ids"], torch.cat([ids, ids])) and torch.equal(bt, torch.cat([t, t]))
    assert torch.equal(bx, torch.cat([x, x]))
    unet.calls = []
    torch.testing.assert_close(dmd2.cfg_eps(unet, x, t, embeds, pooled, ids, 1.0), eps_c)
    assert len(unet.calls) == 1 and unet.calls[0][0].shape[0] == 2  # scale 1: one plain call, no uncond branch


def test_encode_prompts_sdxl_layout(parts):
    prompts = ["a red cat", "hello"]
    embeds, pooled = dmd2.encode_prompts(prompts, parts.tokenizers, parts.text_encoders)
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


def test_mid_block_features_stop_before_the_up_blocks(parts, cond):
    embeds, pooled, ids = cond
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 800])
    captured, up_calls = [], []
    h1 = parts.unet.mid_block.register_forward_hook(lambda m, a, o: captured.append(o))
    with torch.no_grad():
        parts.unet(x, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
    h1.remove()
    h2 = parts.unet.up_blocks[0].register_forward_hook(lambda m, a, o: up_calls.append(1))
    with torch.no_grad():
        features = dmd2.unet_mid_features(parts.unet, x, t, embeds, pooled, ids)
    h2.remove()
    assert features.shape == (2, 64, 8, 8) and not up_calls
    torch.testing.assert_close(features, captured[0])
    assert not parts.unet.mid_block._forward_hooks  # the stopping hook is removed
    head = dmd2.sdxl_gan_head(parts.unet)
    assert head(features).shape == (2, 1)


def test_gan_head_for_full_sdxl_is_the_official_layout():
    config = type("C", (), {"block_out_channels": (320, 640, 1280), "sample_size": 128})
    with torch.device("meta"):
        head = dmd2.sdxl_gan_head(type("U", (), {"config": config})())
    convs = [m for m in head if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [(4, 2, 1)] * 3 + [(4, 4, 0), (1, 1, 0)]
    assert all(c.in_channels == 1280 for c in convs) and convs[-1].out_channels == 1
    assert all(m.num_groups == 32 for m in head if isinstance(m, torch.nn.GroupNorm))
    with torch.device("meta"):
        assert head(torch.empty(2, 1280, 32, 32)).shape == (2, 1)  # 32 -> 16 -> 8 -> 4 -> 1


# --- sampler against diffusers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("timesteps", [T_LIST, [399]])
def test_sampler_equals_diffusers_lcm_pipeline(parts, cond, timesteps):
    """LCMScheduler draws its re-noising noise with randn_tensor(shape, generator=...) after every step but the last;
    a generator seeded the same way makes ours draw the same tensors."""
    embeds, pooled, ids = cond
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=parts.vae, text_encoder=parts.text_encoders[0], text_encoder_2=parts.text_encoders[1],
        tokenizer=parts.tokenizers[0], tokenizer_2=parts.tokenizers[1], unet=parts.unet,
        scheduler=diffusers.LCMScheduler())
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=latents.clone(), guidance_scale=0,
                  timesteps=timesteps, height=parts.resolution, width=parts.resolution, output_type="latent",
                  generator=torch.Generator().manual_seed(3)).images
    ours = dmd2.sdxl_sample(parts.unet, embeds, pooled, ids, parts.alphas_cumprod, latents, timesteps,
                            generator=torch.Generator().manual_seed(3))
    assert ours.shape == (2, 4, 16, 16) and ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if len(timesteps) > 1:  # the noise matters: another seed gives another result
        other = dmd2.sdxl_sample(parts.unet, embeds, pooled, ids, parts.alphas_cumprod, latents, timesteps,
                                 generator=torch.Generator().manual_seed(4))
        assert (other - ours).abs().max() > 1e-2


def test_decode_latents_uint8(parts):
    images = dmd2.decode_latents(parts.vae, torch.randn(2, 4, 16, 16))
    assert images.shape == (2, 128, 128, 3) and images.dtype == np.uint8


# --- generator inputs, losses -----------------------------------------------------------------------------------


def test_generator_input_pure_noise_rules(parts, cond):
    embeds, pooled, ids = cond
    acp = parts.alphas_cumprod
    noise, real = torch.randn(6, 4, 16, 16), torch.randn(6, 4, 16, 16)
    six = (embeds.repeat(3, 1, 1), pooled.repeat(3, 1), ids.repeat(3, 1))
    torch.manual_seed(2)
    x_t, t = dmd2.sdxl_generator_input(parts.unet, T_LIST, noise, *six, acp, backward_simulation=False,
                                       real_latents=real)
    assert set(t.tolist()) <= set(T_LIST) and len(set(t.tolist())) > 1  # per-sample timesteps from the list
    for i, step in enumerate(t.tolist()):
        expected = noise[i] if step == 999 else dmd2.ddpm_add_noise(real[i:i + 1], noise[i:i + 1], t[i:i + 1], acp)[0]
        torch.testing.assert_close(x_t[i], expected)
    x_t, t = dmd2.sdxl_generator_input(parts.unet, [399], noise, *six, acp, backward_simulation=True)
    assert torch.equal(x_t, noise) and t.tolist() == [399] * 6  # 1-step: pure noise labelled 399


def test_dm_loss_vanishes_when_real_and_fake_scores_agree(parts, cond):
    embeds, pooled, ids = cond
    x0 = torch.randn(2, 4, 16, 16, requires_grad=True)
    loss = dmd2.sdxl_dm_loss(x0, parts.unet, parts.unet, embeds, pooled, ids, parts.alphas_cumprod, 1.0)
    loss.backward()
    assert loss.item() == 0 and x0.grad.abs().max() == 0  # same network, same noise and t for both scores
    x0.grad = None
    loss = dmd2.sdxl_dm_loss(x0, parts.unet, parts.unet, embeds, pooled, ids, parts.alphas_cumprod, 8.0)
    loss.backward()
    assert loss.item() > 0 and x0.grad.abs().max() > 0  # CFG on the real score only
    # the gradient is the normalised (p_real - p_fake) / numel of dm_loss: 0.5 * mean(grad^2) = loss
    assert torch.allclose(0.5 * (x0.grad * x0.numel()).pow(2).mean(), loss, rtol=1e-4)


def test_fake_loss_does_not_reach_the_generator_output(parts, cond):
    embeds, pooled, ids = cond
    x0 = torch.randn(2, 4, 16, 16, requires_grad=True)
    fake = copy.deepcopy(parts.unet).requires_grad_(True)
    loss = dmd2.sdxl_fake_loss(fake, x0, embeds, pooled, ids, parts.alphas_cumprod)
    assert loss.item() > 0 and loss.grad_fn is not None
    loss.backward()
    assert x0.grad is None and fake.conv_in.weight.grad is not None


# --- TTUR iteration -------------------------------------------------------------------------------------------


def grads_of(*modules):
    return [p.grad for m in modules for p in m.parameters()]


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_train_iteration_gradients_reach_only_the_generator(parts):
    cfg = dmd2.SDXLConfig(tiny=True, precision="fp32", lr=1e-4, warmup_steps=1)
    torch.manual_seed(0)
    state = dmd2.sdxl_training_state(parts, cfg, torch.device("cpu"))
    frozen = [state.real_unet, parts.unet, parts.vae, *parts.text_encoders]
    seen = {}

    def spy(name, optimizer, check):
        step = optimizer.step
        def wrapped(*a, **k):
            seen[name] = check()
            return step(*a, **k)
        optimizer.step = wrapped
    spy("g", state.opt_g, lambda: (grads_of(state.generator), grads_of(state.fake_unet, state.gan_head, *frozen)))
    spy("d", state.opt_d, lambda: (grads_of(state.fake_unet, state.gan_head), grads_of(state.generator, *frozen)))
    real_before = [p.clone() for p in state.real_unet.parameters()]
    log = dmd2.sdxl_train_step(state, parts, tiny_data(), cfg)
    assert set(log) == {"loss_dm", "gen_cls_loss", "generator_grad_norm", "loss_fake", "guidance_cls_loss",
                        "guidance_grad_norm"} and all(np.isfinite(v) for v in log.values())
    trained, untouched = seen["g"]
    assert all(g is not None for g in trained) and sum(g.abs().sum() for g in trained) > 0
    assert all(g is None for g in untouched)  # fake UNet, head, real UNet, text encoders, VAE: no gradient
    trained, untouched = seen["d"]
    assert sum(g.abs().sum() for g in trained if g is not None) > 0 and all(g is None for g in untouched)
    assert all(torch.equal(a, b) for a, b in zip(real_before, state.real_unet.parameters()))
    assert all(p.requires_grad for p in state.fake_unet.parameters())  # re-enabled after the generator turn
    log = dmd2.sdxl_train_step(state, parts, tiny_data(), cfg)  # step 1 of ratio 5: critic only
    assert set(log) == {"loss_fake", "guidance_cls_loss", "guidance_grad_norm"} and state.step == 2


def test_backward_simulation_gradient_only_through_the_last_step(parts):
    cfg = dmd2.SDXLConfig(tiny=True, precision="fp32", dfake_gen_update_ratio=1, gan=False)
    torch.manual_seed(1)
    state = dmd2.sdxl_training_state(parts, cfg, torch.device("cpu"))
    calls = []
    state.generator.register_forward_hook(
        lambda m, args, out: calls.append((torch.is_grad_enabled(), args[1][0].item(), out.sample.requires_grad)))
    ks = set()
    for _ in range(6):
        calls.clear()
        dmd2.sdxl_train_step(state, parts, tiny_data(), cfg)
        *rollout, last = calls
        k = len(rollout)
        ks.add(k)
        assert [c[1] for c in rollout] == T_LIST[:k] and not any(c[0] or c[2] for c in rollout)
        assert last == (True, T_LIST[k], True)  # the one step with gradient, at t_k
    assert len(ks) >= 2  # several rollout lengths were exercised


class ZeroEpsUNet(torch.nn.Module):
    """eps = 0, so x0 = x_t / sqrt(a_t); records its inputs."""
    dtype = torch.float32

    def forward(self, x, t, embeds, added_cond_kwargs):
        self.inputs = getattr(self, "inputs", []) + [(x.clone(), t[0].item())]
        return type("Out", (), {"sample": torch.zeros_like(x)})()


def test_backward_simulation_renoises_with_fresh_independent_noise():
    acp, unet = dmd2.sdxl_alphas_cumprod(), ZeroEpsUNet()
    cond = (torch.zeros(8, 77, 16), torch.zeros(8, 12), torch.zeros(8, 6))
    torch.manual_seed(0)
    x0 = dmd2.sdxl_backward_simulation(unet, T_LIST, 3, *cond, acp, (8, 4, 32, 32))
    (x_a, t_a), (x_b, t_b), (x_c, t_c) = unet.inputs
    assert [t_a, t_b, t_c] == T_LIST[:3]
    torch.testing.assert_close(x0, (x_c.double() / acp[t_c].sqrt()).float())  # the last rollout x0
    for (x_prev, t_prev), (x_next, t_next) in [((x_a, t_a), (x_b, t_b)), ((x_b, t_b), (x_c, t_c))]:
        fresh = (x_next - (acp[t_next] / acp[t_prev]).sqrt().float() * x_prev) / (1 - acp[t_next]).sqrt().float()
        assert abs(fresh.std().item() - 1) < 0.02  # x_next = sqrt(a') x0 + sqrt(1 - a') n with n ~ N(0, I)
        for earlier in (x_a, x_prev):
            assert abs(torch.corrcoef(torch.stack([fresh.flatten(), earlier.flatten()]))[0, 1]) < 0.03


def test_bf16_lora_checkpointing_iteration_trains_only_adapters(parts):
    cfg = dmd2.SDXLConfig(tiny=True, precision="bf16", lora=True, lora_rank=4, lora_alpha=4, warmup_steps=1,
                          gradient_checkpointing=True)
    torch.manual_seed(0)
    state = dmd2.sdxl_training_state(parts, cfg, torch.device("cpu"))
    assert state.real_unet.dtype == torch.bfloat16 and state.fake_unet.dtype == torch.float32
    assert state.generator.is_gradient_checkpointing and not state.fake_unet.is_gradient_checkpointing
    assert state.opt_g.param_groups[0]["initial_lr"] == pytest.approx(5e-5)  # official LoRA lr, both sides
    assert state.opt_d.param_groups[0]["initial_lr"] == pytest.approx(5e-5)
    for group in state.opt_g.param_groups:  # past the warm-up's zero learning rate at step 0
        group["lr"] = group["initial_lr"]
    trainable = [n for n, p in state.generator.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    base_before = {n: p.clone() for n, p in state.generator.named_parameters() if "lora" not in n}
    lora_before = {n: p.clone() for n, p in state.generator.named_parameters() if "lora" in n}
    log = dmd2.sdxl_train_step(state, parts, tiny_data(), cfg)
    assert np.isfinite(log["loss_dm"]) and np.isfinite(log["loss_fake"])
    assert not state.fake_unet.is_gradient_checkpointing  # switched on only inside its loss (official)
    params = dict(state.generator.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in base_before.items())
    assert any(not torch.equal(params[n], p) for n, p in lora_before.items())
    ckpt = dmd2.sdxl_checkpoint(state, cfg)
    assert ckpt["generator"] and all("lora" in k for k in ckpt["generator"])


def test_fuse_lora_file(parts, cond, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    embeds, pooled, ids = cond
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([999, 249])
    adapted = copy.deepcopy(parts.unet)
    torch.manual_seed(5)
    adapted.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=dmd2.SDXL_LORA_TARGETS, init_lora_weights=False))
    diffusers.StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(adapted))
    fresh = dmd2.sdxl_tiny_parts(seed=0)
    with torch.no_grad():
        expected = dmd2.unet_eps(adapted, x, t, embeds, pooled, ids)
        base = dmd2.unet_eps(fresh.unet, x, t, embeds, pooled, ids)
        dmd2.fuse_lora(fresh, str(tmp_path / "pytorch_lora_weights.safetensors"))
        fused = dmd2.unet_eps(fresh.unet, x, t, embeds, pooled, ids)
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)


# --- data, checkpoints, command line ----------------------------------------------------------------------------


def write_folder(folder, n=3):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        PIL.Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 30, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"picture number {i}\n")
    return folder


def test_latent_dataset_encodes_once_and_caches(parts, tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "data")
    data = dmd2.sdxl_latent_dataset(str(folder), parts.vae, 128)
    assert data["latents"].shape == (3, 4, 16, 16) and data["latents"].dtype == torch.float16
    assert data["captions"] == ["picture number 0", "picture number 1", "picture number 2"]
    assert os.path.exists(folder / ".dmd2_sdxl_latents_128.pt")
    image = dmd2.load_image(str(folder / "img1.png"), 128)
    with torch.no_grad():  # the latents are the VAE's posterior sample times the scaling factor
        mean = parts.vae.encode(image[None]).latent_dist.mean * parts.vae.config.scaling_factor
    assert image.shape == (3, 128, 128) and -1 <= image.min() < image.max() <= 1
    assert (data["latents"][1].float() - mean[0]).abs().mean() < (data["latents"][0].float() - mean[0]).abs().mean()
    monkeypatch.setattr(parts.vae, "encode", lambda x: pytest.fail("re-encoded although cached"))
    again = dmd2.sdxl_latent_dataset(str(folder), parts.vae, 128)
    assert torch.equal(again["latents"], data["latents"])
    (folder / "img2.txt").write_text("a new caption")
    with pytest.raises(pytest.fail.Exception, match="re-encoded"):
        dmd2.sdxl_latent_dataset(str(folder), parts.vae, 128)  # a changed caption invalidates the cache


def test_data_errors_name_the_file(parts, tmp_path):
    folder = write_folder(tmp_path / "data")
    os.remove(folder / "img1.txt")
    with pytest.raises(FileNotFoundError, match=r"img1\.png has no caption.*img1\.txt"):
        dmd2.read_captioned_folder(str(folder))
    (folder / "img1.txt").write_text("  a caption with spaces \n")
    assert dmd2.read_captioned_folder(str(folder))[1] == (str(folder / "img1.png"), "a caption with spaces")
    (folder / "img0.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"img0\.png: cannot read this image"):
        dmd2.sdxl_latent_dataset(str(folder), parts.vae, 128)
    with pytest.raises(FileNotFoundError, match="no images"):
        dmd2.read_captioned_folder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        dmd2.read_captioned_folder(str(tmp_path / "missing"))


def test_offline_loading_errors_say_what_to_download(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match=r"hf download stabilityai/stable-diffusion-xl-base-1.0.*--model_id"):
        dmd2.load_sdxl(str(tmp_path / "no-sdxl-here"))
    import huggingface_hub

    def offline(repo_id, filename, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection and not in the cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(RuntimeError, match=r"hf download tianweiy/DMD2 dmd2_sdxl_4step_unet_fp16\.bin.*--checkpoint"):
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


def test_train_cli_resumes_exactly_and_samples(tmp_path):
    folder = str(write_folder(tmp_path / "data", n=4))
    common = ["--tiny", "true", "--data", folder, "--precision", "fp32", "--lr", "1e-4", "--warmup_steps", "2",
              "--dfake_gen_update_ratio", "2", "--log_every", "1", "--ckpt_every", "100"]
    straight = dmd2.sdxl_main(["train", *common, "--iters", "3", "--out_dir", str(tmp_path / "a")])
    dmd2.sdxl_main(["train", *common, "--iters", "2", "--out_dir", str(tmp_path / "b")])
    resumed = dmd2.sdxl_main(["train", *common, "--iters", "3", "--out_dir", str(tmp_path / "b"),
                              "--resume", str(tmp_path / "b" / "checkpoint.pt")])
    assert straight.step == resumed.step == 3
    for a, b in [(straight.generator, resumed.generator), (straight.fake_unet, resumed.fake_unet),
                 (straight.gan_head, resumed.gan_head)]:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    out = tmp_path / "samples"
    dmd2.sdxl_main(["sample", "--checkpoint", str(tmp_path / "a" / "checkpoint.pt"), "--prompt", "a cat", "--num", "2",
                    "--out", str(out)])
    images = sorted(os.listdir(out))
    assert images == ["000.png", "001.png"] and PIL.Image.open(out / "000.png").size == (128, 128)
    with pytest.raises(SystemExit):
        dmd2.sdxl_main(["train", "--tiny", "true"])  # --data is required
