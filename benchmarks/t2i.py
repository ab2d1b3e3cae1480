"""Text-to-image path (SDXL, SD v1.5): cost of a TTUR iteration on tiny SD-shaped networks (CPU), and the memory of
full training worked out on paper from the real model configs.

    python benchmarks/t2i.py [--iters 10]

Measured: seconds per Distiller.train_step (generator + critic turns, critic-only turns, their mean over one
dfake_gen_update_ratio cycle) with the sdxl and sd15 presets on dmd2.tiny_t2i_parts, in fp32 and bf16 autocast, and
the process's peak RSS. On paper: parameter counts of the UNet, text encoders and VAE, built on the meta device from
their published configs (no weights), times bytes per parameter for weights, gradients and AdamW states; and the
activation bytes of dmd2.EpsDenoiser passes (full forward; mid-block bottleneck for the GAN), counted as the tensors
autograd saves for backward during a meta-device pass in bf16 (the autocast compute dtype), with attention counted
as flash / memory-efficient attention stores it. Without and with gradient checkpointing as prepare_network switches
it on (diffusers' checkpointing of every resnet and transformer block of both trained UNets in every pass; official
SD v1.5: generator always, fake UNet in its loss). Per GPU also with the two trained UNets' states sharded over 8
GPUs (FSDP; official SDXL: HYBRID_SHARD within a node). Writes benchmarks/results/t2i.json.
"""
import argparse
import functools
import json
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dmd2.py (after PYTHONPATH)
import dmd2  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json, text_encoder(_2)/config.json, vae/config.json
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, cross_attention_dim=2048,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
# runwayml/stable-diffusion-v1-5: unet/config.json, text_encoder/config.json (CLIP-L only), vae/config.json
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
MODELS = {  # official recipes per GPU (DMD2 experiments/ scripts; shared/reference/t2i_and_scale.md)
    "sdxl": dict(unet=SDXL_UNET, encoders=(CLIP_L, CLIP_BIGG), vae=dict(SD_VAE, sample_size=1024), batch=2,
                 official="64 GPUs x batch 2, FSDP HYBRID_SHARD over the 8 GPUs of a node, no checkpointing"),
    "sd15": dict(unet=SD15_UNET, encoders=(CLIP_L,), vae=dict(SD_VAE, sample_size=512), batch=32,
                 official="64 GPUs x batch 32, DDP with --gradient_checkpointing (generator always, fake UNet in its "
                          "loss); stage 1 without the GAN, stage 2 with it"),
}
TRAINED = 4 + 4 + 8  # bytes per trained parameter: fp32 weights + fp32 grads + AdamW exp_avg, exp_avg_sq
SHARDS = 8  # FSDP over the 8 GPUs of a node (official SDXL: HYBRID_SHARD)
GB = 1e9


def time_iterations(sdxl, preset, precision, iters):
    cfg = dmd2.Config(**{**dmd2.PRESETS[preset], "dataset": preset, "tiny": True, "precision": precision,
                         "batch_size": 2, "warmup_steps": 1, "generator_lr": 1e-4, "guidance_lr": 1e-4})
    parts = dmd2.tiny_t2i_parts(sdxl=sdxl, seed=0)
    captions = [f"image number {i}" for i in range(8)]
    batches = dmd2.InMemoryBatches(torch.randn(8, 4, 16, 16), captions, cfg.batch_size, seed=0)
    teacher = dmd2.prepare_network(parts.teacher(), cfg, torch.device("cpu"))
    distiller = dmd2.Distiller(cfg, teacher, (4, 16, 16),
                               conditions=dmd2.Prompts(captions, parts.tokenizers, parts.text_encoders))
    ratio = cfg.dfake_gen_update_ratio
    for _ in range(ratio):  # warm-up: one full cycle (first calls build oneDNN kernels)
        distiller.train_step(next(batches))
    generator_turns, critic_turns = [], []
    for _ in range(iters):
        turn = generator_turns if distiller.step % ratio == 0 else critic_turns
        real = next(batches)
        start = time.perf_counter()
        distiller.train_step(real)
        turn.append(time.perf_counter() - start)
    gen, critic = sum(generator_turns) / len(generator_turns), sum(critic_turns) / len(critic_turns)
    return {"preset": preset, "generator_iteration_s": gen, "critic_only_iteration_s": critic,
            "mean_iteration_s": (gen + (ratio - 1) * critic) / ratio, "dfake_gen_update_ratio": ratio,
            "iterations_timed": iters}


class SavedBytes(TorchFunctionMode):
    """Bytes autograd saves for backward (meta tensors: shapes only), each tensor counted once, weights excluded
    (counted with the parameters). Attention: on the meta device scaled_dot_product_attention takes the math path,
    which stores the N x N probabilities; GPU training uses flash / memory-efficient attention, which saves q, k, v,
    the output and an fp32 logsumexp [B, heads, N], so that is what is counted for it.

    checkpoint_func (diffusers' enable_gradient_checkpointing hook) counts a checkpointed region as
    torch.utils.checkpoint keeps it: its inputs only; the largest region's own saved tensors are kept in
    `recompute`, the extra memory of recomputing one region at a time in the backward."""

    def __init__(self):
        super().__init__()
        self.saved, self.recompute, self.current = {}, 0, None

    def pack(self, t):
        if self.current is not None and not isinstance(t, torch.nn.Parameter):
            self.current[id(t)] = (t, t.numel() * t.element_size())
        return t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # the math path's saves: dropped
            out = func(*args, **(kwargs or {}))
        if out.requires_grad and self.current is not None:
            q = args[0]
            for t in (*args[:3], out):
                self.pack(t)
            self.current[("logsumexp", id(out))] = (None, q.shape[:-1].numel() * 4)
        return out

    def checkpoint_func(self, module, *args):
        outer, self.current = self.current, {}
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            module(*args)  # the region's saves, as its recomputation rebuilds them in the backward
        self.recompute = max(self.recompute, self.total(self.current))
        self.current = outer
        for t in args:
            if isinstance(t, torch.Tensor):
                self.pack(t)
        self.current = None  # checkpoint's own hooks hold nothing; attention inside is not counted either
        out = torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
        self.current = outer
        return out

    @staticmethod
    def total(saved):
        return sum(b for _, b in saved.values())

    def count(self, pass_, *args):
        self.saved, self.recompute = {}, 0
        with self, torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            out = pass_(*args)
        self.current = None
        return self.total(self.saved), self.recompute, out

    def __enter__(self):
        self.current = self.saved
        return super().__enter__()


def activation_bytes(model, unet_factory, checkpointing=False):
    """Per-image activation bytes of the passes of one iteration: a trained UNet's full forward, a trained UNet's
    down/mid path (GAN, critic turn), a frozen UNet's down/mid path (GAN, generator turn: only the input carries the
    gradient), and with checkpointing the recomputation peak; also the bottleneck's channels and side."""
    with torch.device("meta"):
        unet = unet_factory().to(torch.bfloat16)
    counter = SavedBytes()
    if checkpointing:  # as prepare_network: diffusers' checkpointing of every resnet and transformer block
        unet.enable_gradient_checkpointing(counter.checkpoint_func)
    sdxl = len(model["encoders"]) == 2
    uncond = (torch.zeros(1, 77, unet.config.cross_attention_dim), torch.zeros(1, 1280 if sdxl else 0))
    resolution = model["vae"]["sample_size"] if sdxl else None
    denoiser = dmd2.EpsDenoiser(unet, dmd2.ddpm_alphas_cumprod(), uncond, resolution).to("meta")
    size = unet.config.sample_size
    # EpsDenoiser.forward = its UNet pass (unet_eps; mid_block_output for return_bottleneck) inside bf16 autocast,
    # which has no meta device: the passes are called directly on bf16 weights, the dtype autocast computes in.
    args = (torch.zeros(1, 4, size, size, device="meta", requires_grad=True),
            denoiser.timestep(torch.ones(1, device="meta")),
            (torch.zeros(1, 77, unet.config.cross_attention_dim, device="meta"),
             torch.zeros(1, 1280 if sdxl else 0, device="meta")))
    unet.requires_grad_(True)
    full, recompute_full, _ = counter.count(denoiser.unet_eps, *args)
    mid, recompute_mid, features = counter.count(denoiser.mid_block_output, *args)
    unet.requires_grad_(False)
    mid_frozen, recompute_frozen, _ = counter.count(denoiser.mid_block_output, *args)
    return {"full_trained": full, "mid_trained": mid, "mid_frozen": mid_frozen,
            "recompute_peak": max(recompute_full, recompute_mid, recompute_frozen)}, tuple(features.shape[1:])


def paper_memory(name):
    """GB of full training on one GPU with the official batch, bf16 autocast: whole and with the two trained UNets'
    states sharded over 8 GPUs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model, batch = MODELS[name], MODELS[name]["batch"]

    def count(module, trainable=False):
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)
    make_unet = functools.partial(UNet2DConditionModel, **model["unet"])
    plain, features = activation_bytes(model, make_unet)
    checkpointed, _ = activation_bytes(model, make_unet, checkpointing=True)
    with torch.device("meta"):
        counts = {"unet": count(make_unet()), "text_encoder_clip_l": count(CLIPTextModel(CLIPTextConfig(**CLIP_L))),
                  "vae": count(AutoencoderKL(**model["vae"])), "gan_head": count(dmd2.GANHead(features[0],
                                                                                               features[-1]))}
        if len(model["encoders"]) == 2:
            counts["text_encoder_bigg"] = count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)))
        counts["generator_lora_r64"] = count(dmd2.add_generator_lora(make_unet()), True)
    p, text = counts["unet"], counts["text_encoder_clip_l"] + counts.get("text_encoder_bigg", 0)
    states = {"real_unet_bf16_weights": 2 * p,
              "generator_fp32_weights_grads_adamw": TRAINED * p,
              "fake_unet_fp32_weights_grads_adamw": TRAINED * p,
              "gan_head_fp32_weights_grads_adamw": TRAINED * counts["gan_head"],
              "autocast_bf16_weight_copy_of_the_trained_unet": 2 * p,  # autocast caches it through the backward
              "text_encoders_fp32": 4 * text,
              "vae_fp32": 4 * counts["vae"]}  # encodes the dataset once; decodes samples for logging

    def turns(a, recompute=0):
        # generator turn: generator forward with grad + the frozen fake UNet's down/mid path for the G GAN loss;
        # critic turn: fake-loss forward + the real and fake GAN forwards (down/mid), alive until one backward;
        # without the GAN (SD v1.5 stage 1) one full trained forward per turn
        gan = {"activations_generator_turn": batch * (a["full_trained"] + a["mid_frozen"] + recompute),
               "activations_critic_turn": batch * (a["full_trained"] + 2 * a["mid_trained"] + recompute)}
        return gan, {"activations_either_turn": batch * (a["full_trained"] + recompute)}
    with_gan, without_gan = turns(plain)
    with_gan_ckpt, without_gan_ckpt = turns({k: checkpointed[k] for k in plain}, checkpointed["recompute_peak"])
    static = sum(states.values())
    sharded_static = static - states["generator_fp32_weights_grads_adamw"] - states[
        "fake_unet_fp32_weights_grads_adamw"] + 2 * TRAINED * p / SHARDS
    lora_saving = (TRAINED - 4) * p - TRAINED * counts["generator_lora_r64"]  # frozen base: no grads, no AdamW

    def peak(base, acts):
        return (base + max(acts.values())) / GB
    result = {"official": model["official"], "batch_per_gpu": batch, "resolution_px": model["vae"]["sample_size"],
              "parameters": counts, "gan_head_input": list(features),
              "gigabytes": {k: v / GB for k, v in {**states, **with_gan}.items()},
              "per_image_activation_gb": {k: v / GB for k, v in plain.items() if k != "recompute_peak"},
              "per_image_activation_gb_checkpointed": {k: v / GB for k, v in checkpointed.items()},
              "static_gb": static / GB,
              "peak_gb": peak(static, with_gan),
              "peak_gb_checkpointed": peak(static, with_gan_ckpt),
              "peak_gb_generator_lora": peak(static - lora_saving, with_gan),
              "trained_unets_state_gb_per_gpu_sharded_8": 2 * TRAINED * p / SHARDS / GB,
              "peak_gb_per_gpu_sharded_8": peak(sharded_static, with_gan),
              "peak_gb_per_gpu_sharded_8_checkpointed": peak(sharded_static, with_gan_ckpt)}
    if name == "sd15":  # stage 1 (39k of the 44k iterations) trains no GAN head
        head = states["gan_head_fp32_weights_grads_adamw"]
        result["peak_gb_stage1_without_gan"] = peak(static - head, without_gan)
        result["peak_gb_stage1_without_gan_checkpointed"] = peak(static - head, without_gan_ckpt)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    results = {}
    for name, sdxl, preset in (("sdxl", True, "sdxl"), ("sd15", False, "sd15")):
        tiny = dmd2.tiny_t2i_parts(sdxl=sdxl, seed=0)
        results[f"tiny_{name}"] = {
            "fp32": time_iterations(sdxl, preset, "fp32", args.iters),
            "bf16": time_iterations(sdxl, preset, "bf16", args.iters),
            "parameters": {"unet": sum(p.numel() for p in tiny.unet.parameters()),
                           "text_encoders": sum(p.numel() for e in tiny.text_encoders for p in e.parameters()),
                           "vae": sum(p.numel() for p in tiny.vae.parameters())}}
        timed = results[f"tiny_{name}"]
        timed["bf16_over_fp32_mean_iteration"] = timed["bf16"]["mean_iteration_s"] / timed["fp32"]["mean_iteration_s"]
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["full_sdxl_on_paper"] = paper_memory("sdxl")
    results["full_sd15_on_paper"] = paper_memory("sd15")
    os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), exist_ok=True)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "t2i.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
