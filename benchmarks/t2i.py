"""SDXL path: cost of a TTUR iteration on the tiny SDXL-shaped networks (CPU), and the memory of full SDXL training
worked out on paper from the real SDXL configs.

    python benchmarks/sdxl.py [--iters 10]

Measured: seconds per TTUR iteration (generator + critic turns, critic-only turns, their mean over a ratio-5 cycle)
in fp32 and bf16 autocast, and the process's peak RSS. On paper: parameter counts of SDXL's UNet, text encoders
and VAE, built on the meta device from their published configs (no weights), times bytes per parameter for weights,
gradients and AdamW states; and activation bytes of one UNet forward at 1024 px, counted as the tensors autograd
saves for backward during a meta-device forward in bf16 (the autocast compute dtype). Writes
benchmarks/results/sdxl.json.
"""
import argparse
import json
import os
import resource
import sys
import time

import torch

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
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SDXL_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=1024)
GB = 1e9


def time_iterations(parts, data, precision, iters):
    cfg = dmd2.SDXLConfig(tiny=True, precision=precision, warmup_steps=1, lr=1e-4)
    torch.manual_seed(0)
    state = dmd2.sdxl_training_state(parts, cfg, torch.device("cpu"))
    for _ in range(cfg.dfake_gen_update_ratio):  # warm-up: one full cycle (first calls build oneDNN kernels)
        dmd2.sdxl_train_step(state, parts, data, cfg)
    generator_turns, critic_turns = [], []
    for _ in range(iters):
        turn = generator_turns if state.step % cfg.dfake_gen_update_ratio == 0 else critic_turns
        start = time.perf_counter()
        dmd2.sdxl_train_step(state, parts, data, cfg)
        turn.append(time.perf_counter() - start)
    gen, critic = sum(generator_turns) / len(generator_turns), sum(critic_turns) / len(critic_turns)
    ratio = cfg.dfake_gen_update_ratio
    return {"generator_iteration_s": gen, "critic_only_iteration_s": critic,
            "mean_iteration_s": (gen + (ratio - 1) * critic) / ratio, "iterations_timed": iters}


def saved_activation_bytes(unet, batch, stop_at_mid=False):
    """Bytes autograd saves for backward in one forward (meta tensors: shapes only), each tensor counted once, less
    the N x N self-attention matrices: on the meta device attention takes the math path, which stores them, while
    GPU training uses flash / memory-efficient attention, which does not."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):  # weights are counted with the parameters
            seen[id(t)] = (t, t.numel() * t.element_size())
        return t
    size = unet.config.sample_size
    x = torch.zeros(batch, 4, size, size, device="meta", dtype=torch.bfloat16, requires_grad=True)
    args = (x, torch.zeros(batch, dtype=torch.long, device="meta"),
            torch.zeros(batch, 77, 2048, device="meta", dtype=torch.bfloat16),
            torch.zeros(batch, 1280, device="meta", dtype=torch.bfloat16),
            torch.zeros(batch, 6, device="meta", dtype=torch.bfloat16))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        (dmd2.unet_mid_features if stop_at_mid else dmd2.unet_eps)(unet, *args)
    square = sum(b for t, b in seen.values() if t.ndim >= 3 and t.shape[-1] == t.shape[-2] >= 1024)
    return sum(b for _, b in seen.values()) - square


def paper_memory():
    """GB of full SDXL training on one device (official 4-step recipe: batch 2, bf16 autocast, no checkpointing)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def count(module, trainable=False):
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        counts = {"unet": count(unet), "text_encoder_clip_l": count(CLIPTextModel(CLIPTextConfig(**CLIP_L))),
                  "text_encoder_bigg": count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))),
                  "vae": count(AutoencoderKL(**SDXL_VAE)), "gan_head": count(dmd2.sdxl_gan_head(unet))}
        counts["generator_lora_r64"] = count(dmd2.add_generator_lora(UNet2DConditionModel(**SDXL_UNET)), True)
    unet = unet.to(torch.bfloat16).requires_grad_(False)  # activations only: the input carries the gradient
    full, mid = saved_activation_bytes(unet, 1), saved_activation_bytes(unet, 1, stop_at_mid=True)
    p, trained, batch = counts["unet"], 4 + 4 + 8, 2  # fp32 weights + fp32 grads + AdamW exp_avg, exp_avg_sq
    mem = {"real_unet_bf16_weights": 2 * p,
           "generator_fp32_weights_grads_adamw": trained * p,
           "fake_unet_fp32_weights_grads_adamw": trained * p,
           "gan_head_fp32_weights_grads_adamw": trained * counts["gan_head"],
           "autocast_bf16_weight_copy_of_the_trained_unet": 2 * p,  # autocast caches it through the backward
           "text_encoders_fp32": 4 * (counts["text_encoder_clip_l"] + counts["text_encoder_bigg"]),
           "vae_fp32": 4 * counts["vae"],  # encodes the dataset once; decodes samples for logging
           # generator turn: generator forward with grad + the fake UNet's down/mid path for the G GAN loss
           "activations_generator_turn": batch * (full + mid),
           # critic turn: fake-loss forward + the real and fake GAN forwards (down/mid), alive until one backward
           "activations_critic_turn": batch * (full + 2 * mid)}
    static = sum(v for k, v in mem.items() if not k.startswith("activations"))
    activations = max(mem["activations_generator_turn"], mem["activations_critic_turn"])
    lora_saving = (trained - 4) * p - trained * counts["generator_lora_r64"]  # frozen base: no grads, no AdamW
    return {"parameters": counts, "gigabytes": {k: v / GB for k, v in mem.items()},
            "unet_forward_activations_gb_batch1": full / GB, "unet_down_mid_activations_gb_batch1": mid / GB,
            "static_gb": static / GB, "peak_gb": (static + activations) / GB,
            "peak_gb_generator_lora": (static + activations - lora_saving) / GB}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    parts = dmd2.sdxl_tiny_parts(0)
    data = {"latents": torch.randn(8, 4, 16, 16).half(), "captions": [f"image number {i}" for i in range(8)]}
    results = {"tiny_fp32": time_iterations(parts, data, "fp32", args.iters),
               "tiny_bf16": time_iterations(parts, data, "bf16", args.iters)}
    results["tiny_bf16_over_fp32_mean_iteration"] = (results["tiny_bf16"]["mean_iteration_s"]
                                                     / results["tiny_fp32"]["mean_iteration_s"])
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["tiny_parameters"] = {"unet": sum(p.numel() for p in parts.unet.parameters()),
                                  "text_encoders": sum(p.numel() for e in parts.text_encoders for p in e.parameters()),
                                  "vae": sum(p.numel() for p in parts.vae.parameters())}
    results["full_sdxl_on_paper"] = paper_memory()
    os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), exist_ok=True)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "sdxl.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
