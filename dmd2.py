"""DMD2: Improved Distribution Matching Distillation (Yin et al., NeurIPS 2024, arXiv 2405.14867), in one file.

A diffusion teacher (the "real score") is distilled into a one-step or few-step generator G: distribution matching
(Sec. 3) against a "fake score" trained online on G's samples, the two time-scale update rule (Sec. 4.2) in place
of the original DMD's regression loss, a GAN on real data (Sec. 4.3) so G can beat its teacher, and backward
simulation (Sec. 4.5) for few-step generators.

    python dmd2.py                       # embedded default: train a small teacher, distil it, print the table
    python dmd2.py --dataset imagenet64 --data_path imagenet-64x64.zip    # the paper's recipe (GPUs, torchrun)
    python dmd2.py --dataset sdxl --data_path captioned_images/           # SDXL 4-step (also sd15, sdxl-1step, ...)
    python dmd2.py sample --checkpoint runs/shapes/student_1step/checkpoint.pt --out grid.png
    python dmd2.py evaluate --model dmd2-sdxl --coco coco                 # COCO FID, patch FID, CLIP score

Part I (sections 1-7) is the method and lifts out on its own: cut at the PART II banner, it needs torch, numpy, tqdm
and edm_net. Part II is evaluation (8-10), Part III the harness (11-17). "official: X" cites github.com/tianweiy/DMD2.
"""
import argparse
import contextlib
import copy
import dataclasses
import inspect
import json
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import edm_net

# ================================================================================================================
# PART I. THE METHOD: config, noise, losses, GAN head, generators, the denoiser adapter, the distiller
# ================================================================================================================

# ----------------------------------------------------------------------------------------------------------------
# 1. Config and presets: every field is a flag (--name value), its comment the flag's help

@dataclass
class Config:
    dataset: str = "shapes"  # a preset: toy2d | shapes | cifar10 | imagenet64 | sdxl[-1step|-ode] | sd15[-gan]
    out_dir: str = "runs"  # run folders go to out_dir/<dataset>/<run_name>
    run_name: str = ""  # default: derived from the generator steps ("student_1step", ...)
    data_path: str = ""  # EDM zip / image folder / DMD2 LMDB; text-to-image: images with same-named .txt captions
    cache_dir: str = ""  # downloads and embedded teachers; default ~/.cache/dmd2 (env DMD2_CACHE)
    seed: int = 10  # official: --seed 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # bf16 | fp32 | auto (bf16 where the hardware has it; official --use_fp16 means bf16)
    channels_last: bool = False  # NHWC layout; off: on CUDA each GroupNorm forces a layout change (gpu_check measures)
    compile: bool = False  # torch.compile each network's repeated blocks (off: not yet measured faster on a GPU)
    # data and teacher
    resolution: int = 16  # image side in pixels
    num_classes: int = 10  # class-conditional teachers: number of classes
    teacher: str = ""  # path or URL of an EDM pickle; empty: preset default (embedded sets train their own)
    teacher_arch: dict = field(default_factory=dict)  # EDMPrecond kwargs of an embedded teacher (JSON)
    teacher_iters: int = 0  # EDM training iterations of an embedded teacher
    teacher_batch: int = 64  # its batch size
    teacher_lr: float = 1e-3  # its Adam learning rate
    teacher_eval_steps: int = 18  # EDM Heun steps for the teacher row of the table (NFE = 2N-1; EDM: --steps 18)
    model_id: str = ""  # text-to-image teacher: Hugging Face id or local diffusers folder (default: the preset's)
    tiny: bool = False  # text-to-image: random tiny SD-shaped networks instead of the teacher (CPU runs, tests)
    guidance_scale: float = 1.0  # CFG of the real score, applied when > 1 (official: --real_guidance_scale)
    # noise (official: --sigma_min 0.002 --sigma_max 80 --rho 7 --sigma_data 0.5 --num_train_timesteps 1000)
    sigma_min: float = 0.002  # lowest level of the Karras grid
    sigma_max: float = 80.0  # highest level of the Karras grid
    sigma_data: float = 0.5  # EDM's data std in the fake score's loss weight (inf: the SD epsilon MSE)
    rho: float = 7.0  # Karras grid exponent
    num_train_timesteps: int = 1000  # levels of the noise grid
    min_step_percent: float = 0.02  # DM-loss sigma index range (official: --min_step_percent/--max_step_percent)
    max_step_percent: float = 0.98  # upper end of that range
    conditioning_timestep: int = 999  # one-step generator's input level on the grid: 999 = sigma 80 on the Karras
    #                                   grid (official EDM: --conditioning_sigma 80), SDXL 1-step: 399 (official)
    # generator
    students: list = field(default_factory=lambda: [1])  # embedded main job: one K-step student per entry
    no_gan_student: bool = False  # embedded main job: also a 1-step student without the GAN (Table 3's "+ TTUR" row)
    generator_steps: int = 1  # 1 = one-step; K > 1 = K steps on sigmas[999, 999-1000/K, ...] (Sec. 4.4)
    backward_simulation: bool = True  # Sec. 4.5; False = forward-noised real data (Table 4 ablation)
    # losses (Tables 3 and 4 are combinations of these switches)
    dm_loss_weight: float = 1.0  # official: --dm_loss_weight 1; 0 = "w/o distribution matching"
    gan: bool = True  # GAN classifier on real data (Sec. 4.3; official: --gan_classifier)
    gen_cls_loss_weight: float | str = 3e-3  # generator's GAN weight (official ImageNet 3e-3); auto: Distiller docs
    cls_loss_weight: float = 1e-2  # classifier's GAN weight (official: --cls_loss_weight 1e-2)
    diffusion_gan: bool = True  # noise the GAN's inputs (official: --diffusion_gan --diffusion_gan_max_timestep 1000)
    diffusion_gan_max_timestep: int = 1000  # GAN noise levels are drawn from [0, this)
    regression_loss_weight: float = 0.0  # original DMD's LPIPS regression on teacher ODE pairs (DMD: 0.25)
    regression_pairs: int = 0  # number of teacher ODE pairs generated for it
    regression_loss: str = "auto"  # lpips | mse | auto (lpips when its weights are on disk, else mse)
    # optimisation (official: train_edm.py)
    iters: int = 300  # critic iterations (official ImageNet run: ~200k)
    batch_size: int = 32  # per process (official: 40 per GPU x 7)
    generator_lr: float = 2e-6  # official: --generator_lr 2e-6
    guidance_lr: float = 2e-6  # fake score and GAN head (official: --guidance_lr 2e-6)
    dfake_gen_update_ratio: int = 5  # TTUR (Sec. 4.2): critic iterations per generator update; 1 = no TTUR
    warmup_steps: int = 500  # official: --warmup_step 500 (counted in iterations here, see train())
    max_grad_norm: float = 10.0  # official: --max_grad_norm 10
    ema_decay: float = 0.0  # generator EMA per generator update; 0 = off (official: none)
    grad_checkpointing: bool = False  # memory option for one GPU
    micro_batch: int = 0  # memory option: run each batch in chunks of this size, accumulating gradients (0 = whole)
    teacher_bf16_weights: bool = False  # memory option: frozen teacher stored in bf16
    lora_rank: int = 0  # > 0: train LoRA adapters of a text-to-image generator (official: --generator_lora
    lora_alpha: float = 8.0  # --lora_rank 64 --lora_alpha 8)
    generator_init: str = ""  # start G from a generator state dict or run checkpoint (official: --generator_ckpt_path)
    guidance_init: str = ""  # start the fake score from a DMD2 pytorch_model_1.bin (official: --ckpt_only_path)
    engine: str = "ddp"  # several processes: ddp (replicas), fsdp (FSDP2 shards over all), hsdp (shards in a node)
    fsdp_bf16_params: bool = False  # sharded text-to-image UNets gather and compute in bf16 (FSDP2 mixed precision)
    num_workers: int = 4  # data loader processes (official: --num_workers 12)
    dist_timeout: float = 30.0  # minutes a process waits in a collective (e.g. while its node fetches the teacher)
    # logging, checkpoints, evaluation
    log_every: int = 10  # iterations between log lines
    ckpt_every: int = 100  # iterations between checkpoints
    sample_every: int = 100  # iterations between sample grids
    eval_samples: int = 1000  # embedded rungs: samples the table is computed on
    eval_batch: int = 250  # embedded rungs: sampling batch

# Text-to-image (sections 6, 16), the official experiments/ scripts per process (official: x 64 GPUs), bf16: the fake
# score's unweighted epsilon MSE (sigma_data = inf), classifier GAN weight 1e-2 (official --guidance_cls_loss_weight).
T2I = dict(sigma_data=float("inf"), cls_loss_weight=1e-2, log_every=10, ckpt_every=500, sample_every=500)
PRESETS = {
    # 2-D class-conditional mixture; the MLP teacher is trained briefly (300 of ~4,000 its), so it misses the data.
    "toy2d": dict(students=[1, 4], no_gan_student=True, resolution=0, num_classes=4, teacher_iters=300,
                  teacher_batch=256, teacher_lr=1e-3, iters=2000, batch_size=256, generator_lr=3e-4, guidance_lr=3e-4,
                  warmup_steps=20, gen_cls_loss_weight="auto", teacher_eval_steps=18, eval_samples=4000,
                  eval_batch=4000, log_every=20, ckpt_every=200, sample_every=200, precision="fp32"),
    # Embedded default: 16 px shapes, a small ADM teacher; CPU deviations (README): lr 2e-4 (official 2e-6), EMA 0.98.
    "shapes": dict(students=[1], no_gan_student=True, resolution=16, num_classes=10, teacher_iters=1000,
                   teacher_batch=64, teacher_lr=1e-3, iters=2000, batch_size=32, generator_lr=2e-4, guidance_lr=2e-4,
                   warmup_steps=20, ema_decay=0.98, log_every=20, ckpt_every=200, sample_every=500, precision="fp32",
                   teacher_arch=dict(model_type="DhariwalUNet", model_channels=16, channel_mult=[1, 2, 2],
                                     num_blocks=1, attn_resolutions=[], dropout=0.0)),
    # The paper's recipe (official experiments/imagenet/imagenet_gan_classifier_genloss3e-3_diffusion1000_lr2e-6_
    # scratch.sh): batch 40 per GPU, lr 2e-6, ratio 5, GAN 3e-3 / 1e-2, diffusion GAN over 1000 levels, bf16.
    "imagenet64": dict(resolution=64, num_classes=1000, iters=400_000, batch_size=40, log_every=100, ckpt_every=500,
                       sample_every=500, eval_samples=50_000, eval_batch=128),
    # SDXL 4-step (sdxl_cond999_8node_lr5e-7_denoising4step_diffusion1000_gan5e-3_guidance8_noinit_noode_backsim_
    # scratch.sh): backward simulation on [999, 749, 499, 249], CFG 8, GAN 5e-3 / 1e-2, lr 5e-7, ratio 5, 19k its.
    "sdxl": dict(T2I, generator_steps=4, guidance_scale=8.0, gen_cls_loss_weight=5e-3, generator_lr=5e-7,
                 guidance_lr=5e-7, batch_size=2, iters=20_000),
    # SDXL 1-step: z at t = 399, from sdxl-ode's step-2000 G (official: --generator_ckpt_path; ours: --generator_init).
    "sdxl-1step": dict(T2I, conditioning_timestep=399, guidance_scale=8.0, gen_cls_loss_weight=5e-3,
                       generator_lr=5e-7, guidance_lr=5e-7, batch_size=2, iters=24_000),
    # The 1-step model's initialisation (official main/train_sd_ode.py): G at t = 399 regresses the teacher's ODE
    # outputs (CFG 8), LPIPS on decoded images; AdamW 1e-5, no clipping (official flag unused), batch 4, 2k its.
    "sdxl-ode": dict(T2I, conditioning_timestep=399, guidance_scale=8.0, dm_loss_weight=0.0, gan=False, iters=2_000,
                     regression_loss_weight=1.0, regression_pairs=10_000, regression_loss="lpips", batch_size=4,
                     dfake_gen_update_ratio=1, generator_lr=1e-5, max_grad_norm=float("inf")),
    # SD v1.5 in two stages (official experiments/sdv1.5/*.sh, issue #30): 1-step at t = 999, CFG 1.75, ratio 10, batch
    # 32; no GAN at lr 1e-5 (39k its), then GAN 1e-3 / 1e-2 at lr 5e-7 (+5k) from --generator_init/--guidance_init.
    "sd15": dict(T2I, guidance_scale=1.75, dfake_gen_update_ratio=10, gan=False, generator_lr=1e-5, guidance_lr=1e-5,
                 batch_size=32, iters=40_000),
    "sd15-gan": dict(T2I, guidance_scale=1.75, dfake_gen_update_ratio=10, gen_cls_loss_weight=1e-3,
                     generator_lr=5e-7, guidance_lr=5e-7, batch_size=32, iters=5_000),
    # CIFAR-10 on EDM's conditional VP teacher. Not an official DMD2 recipe: the ImageNet values, batch 56 (EDM).
    "cifar10": dict(resolution=32, num_classes=10, iters=200_000, batch_size=56, log_every=100, ckpt_every=500,
                    sample_every=500, eval_samples=50_000, eval_batch=250),
}

def field_help():
    """{field: its comment in Config's source, continuation lines included}: the flags' help texts."""
    helps, name = {}, None
    for line in inspect.getsource(Config).splitlines():
        declared = re.match(r"    (\w+): [^#]*(?:#\s*(.*))?$", line)
        if declared:
            name, helps[declared[1]] = declared[1], declared[2] or ""
        elif re.match(r"    #\s\s", line) and name:  # a continuation (a section heading has one space after #)
            helps[name] += " " + line.strip(" #")
    return helps

def parse_bool(text):
    if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("1", "true", "yes", "on")

def float_or_auto(text):
    try:
        return text if text == "auto" else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None

def json_object(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"model_channels\": 32}}', got {text!r}")
    return value

class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (a pointer to --help, no usage dump) that takes "--lr -1e-3" as a value."""

    def error(self, message):
        raise SystemExit(f"{message} (see python {self.prog} --help)")

    def parse_args(self, argv):
        argv, joined = list(argv), []
        while argv:  # argparse reads only -N and -N.N as numbers: "--flag -1e-3" would be a missing value
            arg = argv.pop(0)
            number = argv and re.fullmatch(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?|-inf", argv[0], re.I)
            joined.append(f"{arg}={argv.pop(0)}" if arg.startswith("--") and "=" not in arg and number else arg)
        return super().parse_args(joined)

def parse_config(argv):
    """Config from a preset (--dataset) and flags (--iters 100 --gan false ...); check_config (section 17) checks it.
    `--dataset NAME --help` lists the flags with that preset's values as their defaults."""
    dataset = argparse.ArgumentParser(add_help=False)
    dataset.add_argument("--dataset", default=Config.dataset)
    name = dataset.parse_known_args([a for a in argv if a not in ("-h", "--help")])[0].dataset
    parser = ArgumentParser(prog="dmd2.py", usage="python dmd2.py [--dataset NAME] [--flag value ...] | sample | "
                            "evaluate | fid ...", description=f"DMD2 distillation. Datasets (presets): "
                            f"{', '.join(PRESETS)} (default {Config.dataset}: nothing to download). Subcommands: "
                            "sample, evaluate, fid (python dmd2.py sample --help). The defaults shown are the "
                            "preset's: python dmd2.py --dataset NAME --help.")
    if name not in PRESETS:
        parser.error(f"unknown dataset {name!r}; choose one of {', '.join(PRESETS)}")
    kinds = {"bool": dict(type=parse_bool, metavar="true|false"), "list": dict(type=int, nargs="+"),
             "dict": dict(type=json_object, metavar="JSON"), "int": dict(type=int), "float": dict(type=float),
             "float | str": dict(type=float_or_auto, metavar="FLOAT|auto"), "str": dict(type=str)}
    helps, preset = field_help(), Config(**PRESETS[name], dataset=name)
    for f in dataclasses.fields(Config):
        kind, default = getattr(f.type, "__name__", str(f.type)), getattr(preset, f.name)  # bool, ..., "float | str"
        text = f"{helps.get(f.name)} (default: {json.dumps(default) if kind in ('list', 'dict') else default})"
        parser.add_argument(f"--{f.name}", default=default, help=text.replace("%", "%%"), **kinds[kind])
    return Config(**vars(parser.parse_args(argv)))

# ----------------------------------------------------------------------------------------------------------------
# 2. Noise levels and conditions: one 1000-level grid shared by every loss (Karras for EDM, DDPM's table for SD)

def karras_sigmas(num_levels=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """The Karras grid, ascending (official: get_sigmas_karras(n=1000, 0.002, 80, rho=7) flipped, EDMGuidance)."""
    ramp = torch.linspace(0, 1, num_levels, dtype=torch.float64)
    inv_rho_min, inv_rho_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho).flip(0).float()  # k-diffusion's, flipped

def noise_grid(cfg, teacher):
    """The 1000 levels every loss draws from: the denoiser's own (EpsDenoiser's DDPM table), else cfg's Karras grid."""
    own = getattr(teacher, "sigmas", None)
    return own if own is not None else karras_sigmas(cfg.num_train_timesteps, cfg.sigma_min, cfg.sigma_max, cfg.rho)

def _per_sample(sigma, x):  # [B] -> [B, 1, ...], broadcasting against x
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))

def onehot(labels, num_classes):
    """Integer labels -> one-hot float rows (official: eye(label_dim)[labels])."""
    return F.one_hot(labels, num_classes).float()

class ClassLabels:
    """One-hot class conditions, uniform for generated batches (official: randint(0, label_dim)); text's: Prompts."""

    def __init__(self, num_classes, device="cpu"):
        self.num_classes, self.device = num_classes, device

    def encode(self, labels):
        return onehot(labels.to(self.device), self.num_classes)

    def sample(self, n, noise):
        return self.encode(noise.randint(0, self.num_classes, n))

    def blank(self, n):
        return torch.zeros(n, self.num_classes, device=self.device)

    def examples(self, n):  # the labels of sample grids
        return torch.arange(n) % self.num_classes

def take(cond, index):
    """Rows `index` (slice or index tensor) of a condition: a tensor, a tuple of tensors or a list of captions."""
    if isinstance(cond, tuple):
        return tuple(c[index] for c in cond)
    if isinstance(cond, list):
        return [cond[i] for i in range(len(cond))[index]] if isinstance(index, slice) else [cond[i] for i in index]
    return cond[index]

# ----------------------------------------------------------------------------------------------------------------
# 3. Losses

def dm_loss(x, pred_real, pred_fake):
    """Distribution matching loss from x0-predictions (official: compute_distribution_matching_loss). Sec. 3, eq. 2:
    grad_theta KL = -E[(s_real - s_fake) dG/dtheta] with scores s(x_t) = (D(x_t) - x_t) / sigma^2, so the gradient on
    x points along p_real - p_fake (p = x - pred), normalised per sample by mean|p_real| (original DMD, eq. 8).
    L = 0.5 * mean((x - (x - grad).detach())^2) hands autograd exactly dL/dx = grad / x.numel(); L's value is moot."""
    with torch.no_grad():
        p_real, p_fake = x - pred_real, x - pred_fake
        weight = p_real.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)  # mean over C,H,W per sample
        grad = torch.nan_to_num((p_real - p_fake) / weight)  # official: torch.nan_to_num(grad)
    return 0.5 * F.mse_loss(x, (x - grad).detach(), reduction="mean")

def distribution_matching_loss(x, labels, real_score, fake_score, sigma, noise):
    """DM loss of a generated batch x (with grad) at per-sample sigma [B] (Distiller.generator_turn). Both scores
    run without gradient, in their output dtype (EpsDenoiser: float64, official .double() predictions)."""
    with torch.no_grad():
        sigma = _per_sample(sigma, x)
        noisy = x + sigma * noise
        pred_real = real_score(noisy, sigma, labels)
        pred_fake = fake_score(noisy, sigma, labels).to(pred_real.dtype)
    return dm_loss(x.to(pred_real.dtype), pred_real, pred_fake).float()

def denoising_loss(net, x, labels, sigma, noise, sigma_data=0.5):
    """EDM's lambda(sigma) |D(x + sigma n) - x|^2, lambda = 1/sigma^2 + 1/sigma_data^2 (EDM Table 1): trains the
    embedded teachers and the fake score on DETACHED generator output, sigma index-uniform (official:
    compute_loss_fake, "snr + 1/sigma_data^2"). sigma_data = inf: the official epsilon MSE,
    as (x0_hat - x0)^2 / sigma^2 = (eps_hat - eps)^2."""
    sigma = _per_sample(sigma, x)
    weight = 1 / sigma ** 2 + 1 / sigma_data ** 2
    return (weight * (net(x + sigma * noise, sigma, labels) - x) ** 2).mean().float()

def gan_generator_loss(logits_fake):
    """Non-saturating GAN loss for G: softplus(-D(G(z))) = -log sigmoid(D) (official: gen_cls_loss)."""
    return F.softplus(-logits_fake).mean()

def gan_discriminator_loss(logits_real, logits_fake):
    """Logistic GAN loss for the classifier: softplus(D(fake)) + softplus(-D(real)) (official: guidance_cls_loss)."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()

# ----------------------------------------------------------------------------------------------------------------
# 4. GAN classifier head on the fake score's bottleneck, with diffusion-GAN noising (Sec. 4.3)

class GANHead(nn.Sequential):
    """One logit per image from the fake score's bottleneck (official: EDMGuidance.cls_pred_branch). ImageNet-64's
    8x8x768: Conv k4 s2 p1, GN32, SiLU, Conv k4 s4, GN32, SiLU, Conv 1x1 (state-dict indices {0,1,3,4,6}, official);
    larger maps get more k4 s2 stages (SDXL's 32x32 mid-block: three, official sd_guidance), vectors 1x1 convs."""

    def __init__(self, channels, in_res):
        groups = math.gcd(min(32, max(1, channels // 4)), channels)  # >= 4 channels a group (EDM's GroupNorm)
        layers, res = [], in_res
        while res > 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.SiLU()]
            res //= 2
        if res not in (1, 4):
            raise ValueError(f"GANHead needs a square bottleneck of side 4 * 2^k or 1, got {in_res}")
        layers += [nn.Conv2d(channels, channels, res, stride=res), nn.GroupNorm(groups, channels), nn.SiLU()]
        super().__init__(*layers, nn.Conv2d(channels, 1, 1))

    def forward(self, features):
        if features.ndim == 2:  # [B, C] features of an MLP
            features = features[:, :, None, None]
        return super().forward(features.float()).flatten(1)  # official: head runs in fp32 on .float() features

def gan_logits(fake_score, head, images, labels, sigma, noise, clean_input=None):
    """Classifier logits [B, 1] of images noised at per-sample sigma (official: compute_cls_logits); the diffusion GAN
    draws sigma = sigmas[randint(0, 1000)], without it clean images (clean_input: how the denoiser reads them)."""
    if clean_input is not None:
        images = clean_input(images)
    sigma = _per_sample(sigma, images)
    return head(fake_score(images + sigma * noise, sigma, labels, return_bottleneck=True))

# ----------------------------------------------------------------------------------------------------------------
# 5. Generators: one-step, few-step (Sec. 4.4), backward simulation (Sec. 4.5)

def generator_sigmas(num_steps, sigmas, conditioning_timestep=999):
    """Input sigmas of a K-step generator. K=1: [sigmas[conditioning_timestep]] (80 on the Karras grid, official EDM:
    --conditioning_sigma 80; t = 399 for SDXL 1-step). K>1: levels 999, 999-1000/K, ...: the paper's SDXL [999, 749,
    499, 249] (official: denoising_step_list), Karras [80, 17.5, 2.50, 0.168] (the EDM code is 1-step only)."""
    if num_steps == 1:
        return sigmas[[conditioning_timestep]]
    levels = torch.arange(len(sigmas) - 1, 0, -(len(sigmas) // num_steps))[:num_steps]
    return sigmas[levels.to(sigmas.device)]

def pure_noise(denoiser, noise, sigma):
    """A generator's first input from unit noise z: sigma z on EDM teachers (official: 80 z), else the denoiser's."""
    own = getattr(denoiser, "pure_noise", None)
    return own(noise, sigma) if own is not None else noise * sigma

def rollout(generator, noise, cond, step_sigmas, k, randn=torch.randn):
    """(x_k, sigma_k) of a K-step generator: x = pure noise, then k times x0 = G(x, sigma_j, cond) re-noised to
    sigma_{j+1} with FRESH noise (official: SDXL sample loop; issue #9: correlated noise gave artifacts)."""
    x = pure_noise(generator, noise, step_sigmas[0])
    for j in range(k):
        x0 = generator(x, step_sigmas[j].expand(x.shape[0]), cond)
        x = x0.float() + step_sigmas[j + 1] * randn(x.shape, device=x.device)
    return x, step_sigmas[k].expand(x.shape[0])

def generate(generator, noise, cond, step_sigmas, randn=torch.randn):
    """Sample with a K-step generator: the last x0 of the rollout. K=1: G(80 z, 80, y) (official demo)."""
    return generator(*rollout(generator, noise, cond, step_sigmas, len(step_sigmas) - 1, randn), cond)

@torch.no_grad()
def backward_simulation(generator, cond, step_sigmas, k, shape, randn=torch.randn):
    """Training input (x_k, sigma_k) of a few-step generator (Sec. 4.5; official: sample_backward): the CURRENT
    generator rolled out without gradient for k steps from fresh noise, k drawn once for the whole batch (official:
    broadcast from rank 0); the generator then runs once with gradient on it, so only that step is trained."""
    return rollout(generator, randn(shape, device=step_sigmas.device), cond, step_sigmas, k, randn)

def noised_real_inputs(generator, real, step_sigmas, k, noise):
    """Table 4's ablation: real data noised to level k [B], k = 0: pure noise (official: prepare_denoising_data)."""
    sigma = step_sigmas[k]
    start = pure_noise(generator, noise, step_sigmas[0])
    return torch.where(_per_sample(k == 0, real), start, real + _per_sample(sigma, real) * noise), sigma

# ----------------------------------------------------------------------------------------------------------------
# 6. Text-to-image teachers (SD v1.5, SDXL): an epsilon-prediction UNet as an EDM denoiser D(x, sigma, cond) -> x0
# What differs from EDMPrecond is looked up on any teacher (EDM's take defaults): sigmas, pure_noise, clean_input, ...

def ddpm_alphas_cumprod(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012):
    """SD v1.5 / SDXL's alphas_cumprod ("scaled_linear" betas) as diffusers computes it, as float64 (official)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0).double()

class _MidBlockReached(Exception):
    """Raised by mid_block_output's hook, carrying the mid block's output."""

class EpsDenoiser(nn.Module):
    """A diffusers UNet2DConditionModel predicting epsilon as an EDM denoiser D(x, sigma, cond) -> x0 (as k-diffusion's
    DiscreteEpsDDPMDenoiser): sigma_t = sqrt((1 - abar_t) / abar_t), the UNet sees x_t = sqrt(abar_t) x at the nearest
    timestep. Official numerics (main/sd_guidance.py, utils.py): x0 from eps in float64; CFG when guidance_scale > 1,
    eps_u from zeros (SDXL) or "" (SD v1.5); bf16 autocast (use_fp16) only under grad (official: fp32 DM fake pass and
    rollout). cond = (embeddings [B, 77, D], pooled [B, P]), plus SDXL's time_ids (official: build_condition_input)."""

    def __init__(self, unet, alphas_cumprod, uncond, resolution=None):
        super().__init__()
        self.unet, self.guidance_scale, self.use_fp16 = unet, 1.0, False
        self.register_buffer("alphas_cumprod", alphas_cumprod.double(), persistent=False)
        self.register_buffer("sigmas", ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt().float(),
                             persistent=False)
        self.register_buffer("uncond_embeds", uncond[0], persistent=False)
        self.register_buffer("uncond_pooled", uncond[1], persistent=False)
        self.time_ids = None if resolution is None else [resolution, resolution, 0, 0, resolution, resolution]
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])  # edm_sampler's range

    def pure_noise(self, noise, sigma):
        """DDPM's x_t = z at the first timestep, whatever it is (official: pure_noise_mask; SDXL 1-step: t = 399)."""
        return noise * (sigma ** 2 + 1).sqrt()

    def clean_input(self, x0):
        """What the UNet reads as clean x0 at t = 0 (official compute_cls_logits without the diffusion GAN), float64."""
        return x0.double() / self.alphas_cumprod[0].sqrt()

    def store_frozen_in_bf16(self):
        self.unet.to(torch.bfloat16)  # official: the real UNet's weights in bf16

    def timestep(self, sigma):
        """The integer timestep of the table entry nearest to each sigma (in log sigma)."""
        return (self.sigmas.log() - sigma.reshape(-1, 1).float().log()).abs().argmin(dim=1)

    def round_sigma(self, sigma):  # edm_sampler's hook: its steps land on the table
        return self.sigmas[self.timestep(sigma)].to(sigma.dtype).reshape(sigma.shape)

    def unet_eps(self, x_t, t, cond):
        (embeds, pooled), dtype, extra = cond, self.unet.dtype, {}
        if self.time_ids is not None:
            ids = torch.tensor([self.time_ids], dtype=dtype, device=x_t.device).expand(len(x_t), -1)
            extra = dict(added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": ids})
        return self.unet(x_t.to(dtype), t, embeds.to(dtype), **extra).sample

    def mid_block_output(self, x_t, t, cond):
        """Up to the mid block: a hook raises its output, so the up blocks never run (official: classify_forward)."""
        def stop(module, args, output):
            raise _MidBlockReached(output)
        handle = self.unet.mid_block.register_forward_hook(stop)
        try:
            self.unet_eps(x_t, t, cond)
        except _MidBlockReached as reached:
            return reached.args[0]
        finally:
            handle.remove()
        raise RuntimeError("the UNet forward never reached unet.mid_block")

    def forward(self, x, sigma, cond, return_bottleneck=False):
        t = self.timestep(sigma).expand(len(x))  # sigma: per sample [B], or one 0-dim value (edm_sampler)
        a = _per_sample(self.alphas_cumprod[t], x)
        x_t = (x.double() * a.sqrt()).float()
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.use_fp16 and torch.is_grad_enabled()):
            if return_bottleneck:
                return self.mid_block_output(x_t, t, cond)
            if self.guidance_scale > 1:  # official: CFG only when the scale is > 1
                uncond = (self.uncond_embeds.expand_as(cond[0]), self.uncond_pooled.expand_as(cond[1]))
                both = tuple(torch.cat(pair) for pair in zip(uncond, cond))
                eps_u, eps_c = self.unet_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
                eps = eps_u + self.guidance_scale * (eps_c - eps_u)
            else:
                eps = self.unet_eps(x_t, t, cond)
        return (x_t.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()

# ----------------------------------------------------------------------------------------------------------------
# 7. The two time-scale update rule (Sec. 4.2): optimisers, one iteration, checkpoints, train()

def make_optimizer(params, lr, fused=None):
    """AdamW(betas 0.9/0.999, weight decay 0.01) (official: train_edm.py), fused when on one CUDA device."""
    params = [p for p in params if p.requires_grad]
    if fused is None:
        fused = len({p.device for p in params}) == 1 and params[0].is_cuda and all(
            type(p.data) is torch.Tensor for p in params)  # not the DTensors of a sharded engine
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.01, fused=fused or None)

def warmup_scheduler(optimizer, warmup_steps):
    """Constant LR after a linear warm-up from 0 (official: diffusers "constant_with_warmup")."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             lambda step: 1.0 if step >= warmup_steps else step / warmup_steps)

class SharedNoise:
    """Noise for the GLOBAL batch, drawn alike on every rank, each keeping its slice: W processes of batch B draw what
    one process of batch W*B draws (deviation: the official code seeds rank r with seed + r)."""

    def __init__(self, seed, rank=0, world_size=1, device="cpu"):
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.gen = torch.Generator(self.device).manual_seed(seed)

    def randn(self, shape, device=None):
        full = torch.randn((shape[0] * self.world_size, *shape[1:]), generator=self.gen, device=self.device)
        return full.chunk(self.world_size)[self.rank]

    def randint(self, low, high, n):
        full = torch.randint(low, high, (n * self.world_size,), generator=self.gen, device=self.device)
        return full.chunk(self.world_size)[self.rank]

    def shared_randint(self, low, high):  # one integer, the same on every rank (official: the backward-simulation k)
        return int(torch.randint(low, high, (1,), generator=self.gen, device=self.device))

def micro_batches(batch_size, micro_batch):
    """Slices of the per-process batch run one at a time (--micro_batch; 0: the whole batch)."""
    size = micro_batch or batch_size
    return [slice(i, i + size) for i in range(0, batch_size, size)]

def accumulate(losses, part, batch_size, logs, trained):
    """Backward of a micro-batch's {key: (weight, loss)} by its share of the batch, no_sync() before the last one."""
    share, last = (part.stop - part.start) / batch_size, part.stop >= batch_size
    with contextlib.ExitStack() as stack:
        for module in trained if not last else ():
            stack.enter_context(getattr(module, "no_sync", contextlib.nullcontext)())
        (share * sum(weight * loss for weight, loss in losses.values())).backward()
    for key, (_, loss) in losses.items():
        logs[key] = logs.get(key, 0.0) + share * loss.detach().float()

def optimizer_step(params, optimizer, cfg, logs, name, step):
    """Clip (official: max_grad_norm 10) and step; one host transfer, and a non-finite loss stops training before it."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # sharded: a DTensor
    values = torch.stack([*logs.values(), grad_norm.to(torch.float32)]).tolist()  # the one sync of this turn
    if not all(map(math.isfinite, values)):
        bad = {k: v for k, v in zip([*logs, "gradient norm"], values) if not math.isfinite(v)}
        raise FloatingPointError(f"{name} is not finite at iteration {step} ({bad}): training stopped and the last "
                                 "good checkpoint was kept. Fix: lower the learning rates, or use --precision fp32.")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(zip(logs, values)), values[-1]

def trainable_copy(denoiser):
    """A trainable copy of the teacher without CFG (official: --initialie_generator; CFG on the real score only)."""
    net = copy.deepcopy(denoiser).train().requires_grad_(True)
    if hasattr(net, "guidance_scale"):
        net.guidance_scale = 1.0
    return net

AUTO_GAN_UPDATES = 10  # generator updates measured by --gen_cls_loss_weight auto (Distiller.measuring_gan_weight)

class Distiller:
    """The three networks of DMD2 and one TTUR iteration (official: EDMUniModel + Trainer.train_one_step). real_score:
    the frozen teacher (owned: pass a copy to reuse it); fake_score: its trainable float32 copy, the GAN head on its
    bottleneck; generator: another copy or the one passed (LoRA); conditions: ClassLabels or Prompts; wrap: an engine
    (network -> module run with gradient); regression_pairs: (noise, conditions, targets), perceptual: its distance."""

    def __init__(self, cfg, teacher, sample_shape, conditions=None, generator=None, wrap=None, regression_pairs=None,
                 perceptual=None, device="cpu", rank=0, world_size=1):
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, torch.device(device)
        self.sample_shape, self.regression_pairs, self.perceptual = tuple(sample_shape), regression_pairs, perceptual
        self.conditions = conditions or ClassLabels(cfg.num_classes, self.device)
        if cfg.lora_rank and generator is None:
            raise ValueError("--lora_rank: pass the generator with its adapters (lora_generator; run_training does)")
        if any(p.dtype != torch.float32 for p in teacher.parameters()):
            raise ValueError("Distiller needs the teacher's float32 weights (its trainable copies are made from them); "
                             "pass cfg.teacher_bf16_weights=True to store the frozen real score in bf16 instead")
        self.real_score = teacher.to(self.device).eval().requires_grad_(False)
        self.fake_score = trainable_copy(self.real_score)
        self.generator = (generator if generator is not None else trainable_copy(self.real_score)).to(self.device)
        if hasattr(self.real_score, "guidance_scale"):
            self.real_score.guidance_scale = cfg.guidance_scale  # CFG on the real score only (official)
        if cfg.teacher_bf16_weights or getattr(self.real_score, "use_fp16", False):
            if hasattr(self.real_score, "store_frozen_in_bf16"):
                self.real_score.store_frozen_in_bf16()
            elif cfg.teacher_bf16_weights:  # memory option: every frozen weight in bf16
                self.real_score.to(torch.bfloat16)
            else:  # bf16 compute: the teacher's casts made once, bit-identical
                edm_net.store_frozen_in_bf16(self.real_score)
        with torch.no_grad():  # the bottleneck's shape decides the GAN head's layers
            probe = torch.zeros(1, *sample_shape, device=self.device), torch.ones(1, device=self.device)
            features = self.fake_score(*probe, self.conditions.blank(1), return_bottleneck=True)
        with torch.random.fork_rng(devices=[]):  # head initialised from cfg.seed: the same on every rank, and
            torch.manual_seed(cfg.seed)           # independent of whatever drew from the global RNG before
            self.head = GANHead(features.shape[1], features.shape[-1] if features.ndim == 4 else 1).to(self.device)
        self.head.requires_grad_(cfg.gan)
        self.ema = copy.deepcopy(self.generator).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
        self.clean_input = None if cfg.diffusion_gan else getattr(self.real_score, "clean_input", None)  # gan_logits
        wrap = wrap or (lambda net: net)
        self.wrapped_generator, self.wrapped_fake_score = wrap(self.generator), wrap(self.fake_score)
        self.wrapped_head = wrap(self.head) if cfg.gan else self.head
        self.critic = nn.ModuleDict(dict(fake_score=self.fake_score, head=self.head))  # one optimiser (official)
        self.critic_params = [p for p in self.critic.parameters() if p.requires_grad]
        self.opt_g = make_optimizer(self.generator.parameters(), cfg.generator_lr)
        self.opt_d = make_optimizer(self.critic_params, cfg.guidance_lr)
        self.sched_g, self.sched_d = (warmup_scheduler(opt, cfg.warmup_steps) for opt in (self.opt_g, self.opt_d))
        self.sigmas = noise_grid(cfg, self.real_score).to(self.device)
        self.step_sigmas = generator_sigmas(cfg.generator_steps, self.sigmas, cfg.conditioning_timestep)
        self.noise = SharedNoise(cfg.seed, rank, world_size, self.device)
        self.auto_norms = [] if cfg.gen_cls_loss_weight == "auto" else None  # [|dL_dm/dx|, |dL_gan/dx|] per update
        self.gan_weight = 0.0 if self.auto_norms is not None else cfg.gen_cls_loss_weight
        self.parts = micro_batches(cfg.batch_size, cfg.micro_batch)
        self.trains_critic = cfg.dm_loss_weight > 0 or cfg.gan  # not the regression-only pretraining (sdxl-ode)
        self.needs_real_data = cfg.gan or (cfg.generator_steps > 1 and not cfg.backward_simulation)
        self.step = 0

    def train_step(self, real=None):
        """One iteration: a generator turn every dfake_gen_update_ratio iterations, then a critic turn on the same
        generated batch (official: COMPUTE_GENERATOR_GRADIENT); noise is drawn per batch, then cut in micro-batches."""
        if real is not None:
            layout = torch.channels_last if self.cfg.channels_last and real[0].ndim == 4 else torch.preserve_format
            real = (real[0].to(self.device, memory_format=layout), self.conditions.encode(real[1]))
        inputs = self.generator_inputs(real) if self.trains_critic else None
        logs = {}
        if self.step % self.cfg.dfake_gen_update_ratio == 0:
            fake, logs = self.generator_turn(inputs)
        elif inputs is not None:
            with torch.no_grad():
                fake = self.generator(*inputs).float()
        if self.trains_critic:
            logs.update(self.critic_turn(fake, inputs[2], real))
            self.sched_d.step()
        self.sched_g.step()  # both advance every iteration: warm-up counts iterations (official generator scheduler)
        self.step += 1
        return logs

    def generator_inputs(self, real):
        """(x, sigma, conditions) to train on: pure noise, backward simulation or noised real data (Table 4)."""
        cfg, shape = self.cfg, (self.cfg.batch_size, *self.sample_shape)
        noised_real = cfg.generator_steps > 1 and not cfg.backward_simulation
        labels = real[1] if noised_real else self.conditions.sample(shape[0], self.noise)
        if cfg.generator_steps == 1:
            return (*rollout(self.generator, self.noise.randn(shape), labels, self.step_sigmas, 0), labels)
        if noised_real:
            k = self.noise.randint(0, cfg.generator_steps, shape[0])
            return (*noised_real_inputs(self.generator, real[0], self.step_sigmas, k, self.noise.randn(shape)), labels)
        k = self.noise.shared_randint(0, cfg.generator_steps)
        self.generator.eval()  # the rollout uses the current generator, deterministically
        x, sigma = backward_simulation(self.generator, labels, self.step_sigmas, k, shape, self.noise.randn)
        self.generator.train()
        return x, sigma, labels

    def gan_noise(self, shape):
        """Diffusion-GAN noise: sigma = sigmas[randint(0, 1000)] per sample; without it sigmas[0], none (official)."""
        t = self.noise.randint(0, self.cfg.diffusion_gan_max_timestep if self.cfg.diffusion_gan else 1, shape[0])
        return self.sigmas[t], self.noise.randn(shape) * float(self.cfg.diffusion_gan)

    def generator_turn(self, inputs):
        """The generator's update with the critic frozen (official: guidance_model.requires_grad_(False)): DM loss
        (Sec. 3), GAN loss (Sec. 4.3), the original DMD's regression loss. Returns (detached generated batch, logs)."""
        cfg, n = self.cfg, self.cfg.batch_size
        shape = (n, *self.sample_shape)
        self.critic.requires_grad_(False)
        draws = {}  # every random number of the turn first, in a fixed order
        if cfg.dm_loss_weight > 0:  # t in [20, 981) by default (official: randint(min_step, min(max_step + 1, T)))
            T = cfg.num_train_timesteps
            t = self.noise.randint(int(cfg.min_step_percent * T), min(int(cfg.max_step_percent * T) + 1, T), n)
            draws["dm"] = (self.sigmas[t], self.noise.randn(shape))
        if cfg.gan:
            draws["gan"] = self.gan_noise(shape)
        if cfg.regression_loss_weight > 0:
            pairs = self.noise.randint(0, len(self.regression_pairs[1]), n).cpu()
        fakes, logs, norms_sq = [], {}, torch.zeros(2, device=self.device)
        measure = self.measuring_gan_weight()
        for part in self.parts:
            losses, fake = {}, None
            if inputs is not None:
                x, sigma, labels = (take(v, part) for v in inputs)
                fake = self.wrapped_generator(x, sigma, labels).float()
                fakes.append(fake.detach())
                if cfg.dm_loss_weight > 0:
                    losses["loss_dm"] = (cfg.dm_loss_weight, distribution_matching_loss(
                        fake, labels, self.real_score, self.fake_score, *(v[part] for v in draws["dm"])))
                if cfg.gan:
                    losses["loss_gan_g"] = (self.gan_weight, gan_generator_loss(gan_logits(
                        self.fake_score, self.head, fake, labels, *(v[part] for v in draws["gan"]), self.clean_input)))
                if measure:  # squared gradient norms on the images of the weighted DM term and the GAN term at 1
                    for i, (key, weight) in enumerate((("loss_dm", cfg.dm_loss_weight), ("loss_gan_g", 1.0))):
                        grad = torch.autograd.grad(losses[key][1], fake, retain_graph=True)[0]
                        norms_sq[i] += ((part.stop - part.start) / n * weight * grad).square().sum()
            if cfg.regression_loss_weight > 0:
                losses["loss_reg"] = (cfg.regression_loss_weight, self.regression_loss(pairs[part]))
            accumulate(losses, part, n, logs, [self.wrapped_generator])
        if measure:
            self.record_gradient_norms(norms_sq)
        logs, grad_norm = optimizer_step(list(self.generator.parameters()), self.opt_g, cfg, logs,
                                         "the generator loss", self.step)
        self.critic.requires_grad_(True)
        self.head.requires_grad_(cfg.gan)
        self.update_ema()
        logs.update(grad_norm_g=grad_norm, **({"gen_cls_loss_weight": self.gan_weight} if cfg.gan else {}))
        return (torch.cat(fakes) if fakes else None), logs

    def critic_turn(self, fake, labels, real):
        """The critic's update (fake score + GAN head, one optimiser; official: guidance_model): the denoising loss on
        the detached batch, sigma index-uniform (official: compute_loss_fake); the GAN loss, real vs fake (Sec. 4.3)."""
        cfg, n = self.cfg, self.cfg.batch_size
        t, noise = self.noise.randint(0, cfg.num_train_timesteps, n), self.noise.randn(fake.shape)
        if cfg.gan:
            gan_real, gan_fake = self.gan_noise(real[0].shape), self.gan_noise(fake.shape)
        logs, critic, head = {}, self.wrapped_fake_score, self.wrapped_head
        for part in self.parts:
            losses = {"loss_fake": (1.0, denoising_loss(critic, fake[part], take(labels, part), self.sigmas[t[part]],
                                                         noise[part], cfg.sigma_data))}
            if cfg.gan:
                logits_real = gan_logits(critic, head, real[0][part], take(real[1], part), *(v[part] for v in gan_real),
                                         self.clean_input)
                logits_fake = gan_logits(critic, head, fake[part], take(labels, part), *(v[part] for v in gan_fake),
                                         self.clean_input)
                losses["loss_gan_d"] = (cfg.cls_loss_weight, gan_discriminator_loss(logits_real, logits_fake))
            accumulate(losses, part, n, logs, [critic, head])
        logs, logs["grad_norm_d"] = optimizer_step(self.critic_params, self.opt_d, cfg, logs, "the critic loss",
                                                   self.step)
        return logs

    @torch.no_grad()
    def update_ema(self):  # per generator update, one foreach kernel (deviation: the official code keeps no EMA)
        if self.ema is not None:
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.generator.parameters()), 1 - self.cfg.ema_decay)

    def measuring_gan_weight(self):
        """--gen_cls_loss_weight auto (the maintainer's rule, tianweiy/DMD2#73): the GAN weight at which the GAN
        term's gradient norm on the generated images equals the DM term's, measured on generator updates
        1..AUTO_GAN_UPDATES at GAN weight 0 (update 0: the fake score equals the teacher, the DM gradient is 0)."""
        return self.cfg.gan and self.auto_norms is not None and len(self.auto_norms) < AUTO_GAN_UPDATES and \
            self.step >= self.cfg.dfake_gen_update_ratio

    def record_gradient_norms(self, norms_sq):
        if self.world_size > 1:  # the same weight on every rank: the mean over ranks of the squared norms
            dist.all_reduce(norms_sq)
            norms_sq /= self.world_size
        self.auto_norms.append(norms_sq.sqrt().tolist())
        if len(self.auto_norms) == AUTO_GAN_UPDATES:
            dm, gan = np.mean(self.auto_norms, axis=0)
            self.gan_weight = float(dm / gan)
            if self.rank == 0:
                print(f"--gen_cls_loss_weight auto: gradient norms on the generated images over generator updates 1-"
                      f"{AUTO_GAN_UPDATES}: DM {dm:.3g}, GAN {gan:.3g} (weight 1) -> GAN weight {self.gan_weight:.3g}")

    def regression_loss(self, pairs):
        """Original DMD's regression loss (DMD Sec. 3.3) on teacher ODE pairs `pairs`: G maps their noise to their
        output (also the SDXL 1-step pretraining, official main/train_sd_ode.py), by `perceptual` (LPIPS) or MSE."""
        noise, labels, target = (take(v, pairs) for v in self.regression_pairs)
        noise, target, labels = noise.to(self.device), target.to(self.device), self.conditions.encode(labels)
        x = self.wrapped_generator(*rollout(self.generator, noise, labels, self.step_sigmas, 0), labels).float()
        return (self.perceptual or F.mse_loss)(x, target)

    def state_dict(self):
        """Everything to resume exactly, via torch.distributed.checkpoint's state-dict API (sharded: this process's)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        generator, opt_g = get_state_dict(self.generator, self.opt_g)
        critic, opt_d = get_state_dict(self.critic, self.opt_d)
        return dict(step=self.step, generator=generator, critic=critic, opt_g=opt_g, opt_d=opt_d,
                    ema=None if self.ema is None else self.ema.state_dict(), sched_g=self.sched_g.state_dict(),
                    sched_d=self.sched_d.state_dict(), noise=self.noise.gen.get_state(), gan_weight=self.gan_weight,
                    auto_norms=self.auto_norms)

    def load_state_dict(self, state):
        from torch.distributed.checkpoint.state_dict import set_state_dict
        set_state_dict(self.generator, self.opt_g, model_state_dict=state["generator"], optim_state_dict=state["opt_g"])
        set_state_dict(self.critic, self.opt_d, model_state_dict=state["critic"], optim_state_dict=state["opt_d"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        self.noise.gen.set_state(state["noise"])
        self.step, self.gan_weight, self.auto_norms = state["step"], state["gan_weight"], state["auto_norms"]

def atomic_save(obj, path):
    """torch.save to a temp file in the same folder, then rename: a kill never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)

def read_checkpoint(path, what="DMD2 checkpoint", fix="Delete it to start over, or pass another --run_name.",
                    error=RuntimeError):
    """A torch file read with weights_only (nothing in it is executed), with a clear error if unreadable."""
    try:
        with open(path, "rb") as f:
            zip_format = f.read(4) == b"PK\x03\x04"  # mmap (pages read on demand) needs torch's zip format
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zip_format)
    except Exception as e:
        raise error(f"{path}: not a readable {what} ({type(e).__name__}: {e}). {fix}") from None

class Checkpoint:
    """A run's checkpoint file, written atomically by rank 0, read weights-only (sharded runs: ShardedCheckpoint)."""

    def __init__(self, path, rank=0):
        self.path, self.rank = path, rank

    def exists(self):
        return os.path.exists(self.path)

    def save(self, state):
        if self.rank == 0:
            atomic_save(state, self.path)

    def load(self, state):  # state: the current one, showing what to read (ShardedCheckpoint)
        return read_checkpoint(self.path)

RESUME_FREE_FIELDS = {"iters", "log_every", "ckpt_every", "sample_every", "eval_samples", "eval_batch", "students",
                      "no_gan_student", "device", "out_dir", "cache_dir", "data_path", "teacher", "num_workers",
                      "dist_timeout", "channels_last", "compile"}

def check_resumable(saved, cfg, path):
    """A run folder resumes only the config that made it (except the fields that don't change the trajectory)."""
    defaults = dataclasses.asdict(Config())  # what a checkpoint written before a field existed implicitly used
    diff = [f"{k}: {saved.get(k, defaults[k])!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
            if k not in RESUME_FREE_FIELDS and saved.get(k, defaults[k]) != v]
    if diff:
        raise ValueError(f"{path} was written with another config ({'; '.join(diff[:4])}). Resume with the same "
                         f"flags, pass another --run_name, or delete the folder.")

class Interrupted(Exception):
    """Ctrl-C or SIGTERM in a training loop, raised at the next iteration boundary once the checkpoint is written."""

@contextlib.contextmanager
def deferred_signals():
    """While a training loop runs, SIGINT / SIGTERM are only noted (the list yielded) so that it can checkpoint."""
    caught = []
    if threading.current_thread() is not threading.main_thread():  # handlers can be set in the main thread only
        yield caught
        return
    previous = {s: signal.signal(s, lambda signum, _: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

def interrupted(caught, device):
    """The signal number if any process of the group caught one, else 0: every process stops at the same iteration."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return caught[0] if caught else 0
    flag = torch.tensor([caught[0] if caught else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())

def train(cfg, distiller, real_batches, run_dir, checkpoint=None, start=None, on_sample=None, rank=0):
    """Train `distiller` to cfg.iters iterations, writing checkpoint and log.jsonl into run_dir; a checkpoint there is
    resumed exactly, else start(distiller) may load earlier weights; Ctrl-C / SIGTERM checkpoints, then Interrupted.
    on_sample(distiller, iteration) every sample_every, on every rank. real_batches: an iterator with state_dict /
    load_state_dict, or None."""
    os.makedirs(run_dir, exist_ok=True)
    checkpoint = checkpoint or Checkpoint(os.path.join(run_dir, "checkpoint.pt"), rank)
    log_path = os.path.join(run_dir, "log.jsonl")

    def run_state():
        return dict(config=dataclasses.asdict(cfg), distiller=distiller.state_dict(),
                    arch=getattr(distiller.generator, "spec", None),  # how `sample` rebuilds it (set by the harness)
                    data=None if real_batches is None else real_batches.state_dict())

    if checkpoint.exists():
        state = checkpoint.load(run_state())
        check_resumable(state["config"], cfg, checkpoint.path)
        distiller.load_state_dict(state["distiller"])
        if real_batches is not None:
            real_batches.load_state_dict(state["data"])
        if rank == 0 and distiller.step < cfg.iters:
            print(f"resuming {run_dir} at iteration {distiller.step}")
    elif start is not None:
        start(distiller)
    if rank == 0 and os.path.exists(log_path):  # drop log lines written after the checkpoint we resume from
        with open(log_path) as f:
            lines = [line for line in f if line.strip() and json.loads(line)["step"] < distiller.step]
        with open(log_path, "w") as f:
            f.writelines(lines)
    bar = tqdm(range(distiller.step, cfg.iters), desc=os.path.basename(run_dir), leave=False, mininterval=2,
               disable=rank != 0 or bool(os.environ.get("TQDM_DISABLE")))  # tqdm skips TQDM_DISABLE given disable=
    t0 = time.time()
    with deferred_signals() as caught:
        for step in bar:
            logs = distiller.train_step(next(real_batches) if distiller.needs_real_data else None)
            done, signum = step + 1 == cfg.iters, interrupted(caught, distiller.device)
            if rank == 0 and (step % cfg.log_every == 0 or done):
                record = dict(step=step, seconds=round(time.time() - t0, 3), lr_g=distiller.sched_g.get_last_lr()[0])
                with open(log_path, "a") as f:
                    f.write(json.dumps({**record, **logs}) + "\n")
                bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k.startswith("loss")})
            if on_sample is not None and ((step + 1) % cfg.sample_every == 0 or done):
                on_sample(distiller, step + 1)
            if (step + 1) % cfg.ckpt_every == 0 or done or signum:
                checkpoint.save(run_state())
            if signum:
                raise Interrupted(f"interrupted at iteration {step + 1} of {run_dir}; run the same command to resume",
                                  signum)
    return distiller

# ================================================================================================================
# PART II. EVALUATION: sampling, metrics, FID (ImageNet-64 protocol), text-to-image protocol
# ================================================================================================================
import functools  # Part II's and Part III's imports
import warnings

import PIL.Image
import scipy.linalg

# ----------------------------------------------------------------------------------------------------------------
# 8. Sampling and the embedded rungs' metrics

@torch.no_grad()
def sample_student(generator, noise, labels, step_sigmas, conditions, batch=256):
    """Student samples of unit noise and labels (or prompts); its re-noising is seeded by the first noise value."""
    was_training = generator.training
    generator.eval()
    device = step_sigmas.device
    rng = torch.Generator(device).manual_seed(int(noise.flatten()[0].abs() * 1e6))
    randn = lambda shape, device=device: torch.randn(shape, generator=rng, device=device)
    out = [generate(generator, noise[i:i + batch].to(device), conditions.encode(labels[i:i + batch]), step_sigmas,
                    randn).float().cpu() for i in range(0, len(labels), batch)]
    generator.train(was_training)
    return torch.cat(out)

@torch.no_grad()
def sample_teacher(teacher, noise, labels, conditions, num_steps=18, batch=256):
    """Teacher samples with EDM's Heun sampler (NFE = 2 num_steps - 1); a DDPM teacher's steps land on its table."""
    device = next(teacher.parameters()).device
    out = [edm_net.edm_sampler(teacher, noise[i:i + batch].to(device), conditions.encode(labels[i:i + batch]),
                               num_steps=num_steps).float().cpu() for i in range(0, len(labels), batch)]
    return torch.cat(out)

def save_samples(samples, labels, path):
    """A PNG of samples: an image grid (one row per 8) or, for 2-D points, a scatter coloured by class."""
    if samples.ndim == 4:
        import torchvision
        grid = torchvision.utils.make_grid(edm_net.images_to_uint8(samples), nrow=8, padding=1)
        return PIL.Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    from matplotlib.figure import Figure
    ax = Figure(figsize=(3.2, 3.2)).subplots()
    ax.scatter(samples[:, 0], samples[:, 1], c=labels, cmap="tab10", s=2, vmin=0, vmax=9)
    ax.set(xlim=(-1.6, 1.6), ylim=(-1.6, 1.6), aspect="equal")
    ax.figure.savefig(path, dpi=100)

def toy2d_metrics(x, labels, seed=123):
    """2-D samples against FRESH true samples: sliced Wasserstein-1 (128 directions), MMD^2 (RBF, bandwidth 0.1),
    modes covered (holding >= 25% of their expected share), accuracy (nearest mode in the sample's class, < 3 std)."""
    rng = torch.Generator().manual_seed(seed)
    ref, _ = toy2d_sample(len(x), rng)
    directions = F.normalize(torch.randn(128, 2, generator=rng), dim=1)
    swd = (torch.sort(x @ directions.T, 0)[0] - torch.sort(ref @ directions.T, 0)[0]).abs().mean()
    k = lambda a, b: torch.exp(-torch.cdist(a[:2000], b[:2000]) ** 2 / (2 * 0.1 ** 2)).mean()  # on 2000 points
    mmd = k(x, x) + k(ref, ref) - 2 * k(x, ref)
    dist, mode = torch.cdist(x, TOY2D_MODES).min(dim=1)
    covered = int((torch.bincount(mode[dist < 0.24], minlength=8) >= 0.25 * len(x) / 8).sum())
    accuracy = ((mode % 4 == labels) & (dist < 0.24)).float().mean()
    return {"SWD": float(swd), "MMD": float(mmd), "modes": covered, "accuracy": float(accuracy)}

@torch.no_grad()
def classifier_features(classifier, images, batch=500):
    """Pooled features and predicted labels of the shapes classifier for float images in [-1, 1]."""
    x = edm_net.images_to_uint8(images).float() / 127.5 - 1  # the evaluated images are the saved uint8 ones
    feats = torch.cat([classifier.features(x[i:i + batch]) for i in range(0, len(x), batch)])
    return feats.double().numpy(), classifier.fc(feats).argmax(1)

def image_metrics(images, labels, classifier, ref_features):
    """FD-cls (Frechet distance in the shapes classifier's features, NOT Inception FID) and class accuracy."""
    feats, preds = classifier_features(classifier, images)
    fd = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref_features.mean(0),
                          np.cov(ref_features, rowvar=False))
    return {"FD-cls": float(fd), "accuracy": float((preds == labels).float().mean())}

# ----------------------------------------------------------------------------------------------------------------
# 9. FID: EDM's protocol (edm_net: Inception, statistics, ImageNet-64 sampling), its weights, the Frechet distance.

INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")  # pytorch-fid's FID_WEIGHTS_URL; 6726825d: SHA-256 prefix

def load_inception(path=None, cache_dir=None, mode="edm", device="cpu"):
    """edm_net.InceptionV3 with pytorch-fid's weights from `path`, else the cache, else downloaded into the cache."""
    if path is None:
        path = download_cached(INCEPTION_URL, cache_dir, flag="--inception", hash_prefix="6726825d")
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: Inception weights not found (get {INCEPTION_URL})")
    state = read_checkpoint(path, "Inception weights file", f"Delete it and download {INCEPTION_URL} again.",
                            ValueError)
    try:
        return edm_net.InceptionV3(mode, state).to(device).eval()
    except (RuntimeError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not pytorch-fid's Inception state dict ({' '.join(str(error).split())[:300]}); "
                         f"expected the file {INCEPTION_URL}") from None

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)) in float64 (EDM fid.py / TTUR)."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, np.float64) for a in (mu1, sigma1, mu2, sigma2))
    d = mu1.shape[0]
    if {mu1.shape, mu2.shape} != {(d,)} or {sigma1.shape, sigma2.shape} != {(d, d)}:
        raise ValueError(f"statistics do not match: {mu1.shape}, {sigma1.shape} vs {mu2.shape}, {sigma2.shape}")
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)  # no `disp`: deprecated in SciPy 1.16, removed in 1.18
    if not np.isfinite(covmean).all():  # e.g. fewer samples than dimensions; retried with eps as pytorch-fid
        warnings.warn(f"frechet_distance: sqrtm is not finite, adding {eps} to the covariance diagonals")
        covmean = scipy.linalg.sqrtm((sigma1 + eps * np.eye(d)) @ (sigma2 + eps * np.eye(d)))
    if np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
        raise ValueError(f"frechet_distance: sqrtm has imaginary components up to "
                         f"{np.abs(covmean.imag).max():.3g}; the statistics are not valid covariances")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))

def fid_of_generator(generate_fn, ref_path, inception=None, feature_dim=2048, device="cpu", **protocol):
    """FID of generate_fn(noise, labels) -> [-1, 1] images against EDM-layout reference statistics (EDM's
    imagenet-64x64.npz for the paper's numbers); `protocol`: edm_net.generator_stats's arguments. Same on every rank."""
    ref_mu, ref_sigma = edm_net.load_stats(ref_path, feature_dim)  # fail before sampling, not after
    inception = inception or load_inception(device=device)
    stats = edm_net.generator_stats(generate_fn, inception, feature_dim=feature_dim, device=device, **protocol)
    return frechet_distance(*stats.mu_sigma(), ref_mu, ref_sigma)

def few_images_warning(count):
    print(f"warning: FID of {count} images: fewer than Inception's 2048 features, the covariance is singular and the "
          "value biased high; use >= 2048 (EDM's protocol: 50,000)", file=sys.stderr)

def fid_main(argv=None):
    """Inception FID (EDM protocol) of an image folder / zip against reference statistics (returned), or reference
    statistics of a dataset (returns None)."""
    parser = ArgumentParser(prog="dmd2.py fid", description=fid_main.__doc__)
    parser.add_argument("--images", help="folder or zip of generated PNG/JPG images")
    parser.add_argument("--ref", help="reference statistics .npz (mu, sigma), e.g. EDM's imagenet-64x64.npz")
    parser.add_argument("--ref_from", "--ref-from", help="statistics of this dataset (dataset_tool zip or folder)")
    parser.add_argument("--out", help="where --ref_from writes its .npz")
    parser.add_argument("--inception", help=f"path of pt_inception-2015-12-05-6726825d.pth (default: the cache, "
                        f"else downloaded from {INCEPTION_URL})")
    parser.add_argument("--cache_dir", "--cache-dir", help="weights cache (default $DMD2_CACHE or ~/.cache/dmd2)")
    parser.add_argument("--mode", default="edm", choices=["edm", "pytorch-fid"], help="preprocessing (default edm)")
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if not ((args.images and args.ref and not args.ref_from) or (args.ref_from and args.out and not args.images)):
        parser.error("use either --images DIR_or_ZIP --ref REF.npz, or --ref_from DATASET --out REF.npz")
    source = args.images or args.ref_from
    problems = [why for why in (no_gpu(args.device), args.out and output_problem(args.out, "--out", args.overwrite),
                                not os.path.exists(source) and f"{source}: no such folder or zip of images",
                                os.path.isdir(source) and not any(files for _, _, files in os.walk(source)) and
                                f"{source}: an empty folder (no images)") if why]
    if problems:  # all before the weights are read or downloaded
        raise SystemExit("; ".join(problems))
    ref = None if args.ref_from else edm_net.load_stats(args.ref)
    inception = load_inception(args.inception, args.cache_dir, args.mode, args.device)
    if args.ref_from:
        edm_net.compute_reference_stats(args.ref_from, args.out, inception, args.batch, device=args.device)
        fid, message = None, f"saved reference statistics of {args.ref_from} to {args.out}"
    else:
        stats = edm_net.image_stats(args.images, inception, args.batch, device=args.device)
        if stats.count < 2048:
            few_images_warning(stats.count)
        fid = frechet_distance(*stats.mu_sigma(), *ref)
        message = f"FID {fid:.4f} ({stats.count} images from {args.images}; reference {args.ref}; mode {args.mode})"
    if edm_net.rank_world()[0] == 0:
        print(message)
    return fid

# ----------------------------------------------------------------------------------------------------------------
# 10. Text-to-image evaluation (Tables 2, 4, 5): zero-shot COCO-2014 FID, patch FID and CLIP score (official:
# main/coco_eval/coco_evaluator.py, main/sdxl/test_folder_sdxl.py, main/test_folder_sd.py). Centre crop, LANCZOS to
# eval_res, clean-fid's "clean" resize to 299, TorchScript Inception; diffusers pipelines, PNGs on disk (resumable).

T2I_PROTOCOLS = {  # official test scripts: --total_eval_samples, --eval_res, patch_fid, the reference images
    "sdxl": dict(num=10_000, eval_res=512, patch_fid=True, refs="subset"),  # the captions' images (COCO-10k)
    "sd15": dict(num=30_000, eval_res=256, patch_fid=False, refs="all"),  # all of val2014 (official --ref_dir)
}
COCO_SEED = 123  # official sdxl/data_process.py: np.random.seed(123)
CLIP_PREFIX = "A photo depicts "  # official compute_clip_score (after arXiv 2104.08718)
CLIP_RES = 256  # official compute_clip_score: resize_size=256 for SDXL and SD v1.5 alike
CLIP_URL = "https://huggingface.co/laion/CLIP-ViT-g-14-laion2B-s12B-b42K/resolve/main/open_clip_pytorch_model.bin"
CLEANFID_INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                          "inception-2015-12-05.pt")  # clean-fid's TorchScript network (StyleGAN2-ADA)
SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # official: runwayml/stable-diffusion-v1-5 (moved)
DMD2_SD15_FILE = ("model/sdv1.5/laion6.25_sd_baseline_8node_guidance1.75_lr5e-7_seed10_dfake10_diffusion1000_gan1e-3_"
                  "resume_fid8.35_checkpoint_model_041000/pytorch_model.bin")  # released SD v1.5 one-step, FID 8.35

def center_crop(image, size):
    """Centre size x size crop of a PIL image, offsets rounded as torchvision's center_crop (Python round)."""
    left, top = int(round((image.width - size) / 2)), int(round((image.height - size) / 2))
    return image.crop((left, top, left + size, top + size))

def crop_resize(image, res):
    """Centre crop of the long edge, then PIL LANCZOS to res x res (official CenterCropLongEdge + resize)."""
    return center_crop(image, min(image.size)).resize((res, res), PIL.Image.LANCZOS)

def patch_crop(image, size=299):
    """Patch FID: the centre 299 x 299 crop, no resize; smaller images pass unchanged (official patch_fid=True)."""
    return center_crop(image, size) if min(image.size) >= size else image

def open_rgb(path):
    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read image ({type(error).__name__}: {error})") from None

def read_coco_captions(coco):
    """(rows (file_name, caption), image names): official data_process.py's left merge of images and annotations."""
    path = os.path.join(coco, "annotations", "captions_val2014.json")
    if not os.path.isfile(path):
        where = f"{path}: no such file" if os.path.isdir(coco) else f"{coco}: no such COCO folder"
        raise FileNotFoundError(f"{where}; it must hold val2014/ and annotations/captions_val2014.json: unzip "
                                "val2014.zip and annotations_trainval2014.zip from http://images.cocodataset.org/")
    try:
        data = json.load(open(path))
        captions = {}
        for a in data["annotations"]:
            captions.setdefault(a["image_id"], []).append(str(a["caption"]))
        rows = [(im["file_name"], c) for im in data["images"] for c in captions.get(im["id"], [None])]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a COCO captions file ({type(error).__name__}: {error}); expected 'images' "
                         "[{id, file_name}] and 'annotations' [{image_id, caption}]") from None
    return rows, list(dict.fromkeys(name for name, _ in rows))

def coco_caption_subset(rows, num, seed=COCO_SEED):
    """num (file_name, caption), one per image, as official data_process.py draws them (--num N: a prefix of 10k)."""
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(rows))
    _, firsts = np.unique([rows[i][0] for i in order], return_index=True)  # pandas drop_duplicates(keep="first")
    unique = [rows[order[i]] for i in sorted(firsts)]
    if num > len(unique):
        raise ValueError(f"the COCO annotations hold {len(unique)} images, fewer than the {num} asked (--num)")
    subset = [unique[i] for i in rng.permutation(len(unique))[:num]]
    if any(caption is None for _, caption in subset):
        raise ValueError("a sampled COCO image has no caption in the annotation file")
    return subset

def t2i_inception(path=None, cache_dir=None, device="cpu"):
    """(name, [N, 3, 299, 299] in [0, 255] -> [N, 2048]): clean-fid's TorchScript Inception, else pytorch-fid's."""
    name = "inception-2015-12-05.pt"
    found = [path] if path else [os.path.join(cache_dir or default_cache_dir(), name), os.path.join("/tmp", name)]
    script = next((p for p in found if p.endswith(".pt") and os.path.isfile(p)), None)
    if path and path.endswith(".pt") and not script:
        raise FileNotFoundError(f"{path}: no such file (clean-fid's TorchScript Inception is {CLEANFID_INCEPTION_URL})")
    if not script:
        net = load_inception(path, cache_dir, device=device)
        return "pytorch-fid-inception", lambda x: net.features((x - 128) / 128)
    try:
        layers = torch.jit.load(script, map_location=device).eval().layers
    except (RuntimeError, AttributeError) as error:
        raise ValueError(f"{script}: not clean-fid's TorchScript Inception ({str(error).splitlines()[0]}); "
                         f"get {CLEANFID_INCEPTION_URL}") from None
    return "torchscript-inception", lambda x: layers((x.to(device) - 128) / 128).reshape(len(x), -1)

def _on_array(array, transform):  # module level: clean-fid's loader workers pickle it
    return np.asarray(transform(PIL.Image.fromarray(array)))

def t2i_stats(paths, transform, features, dim=2048, batch=32, device="cpu", workers=0, refs=None, name=""):
    """(mu, sigma) of image files after `transform` and clean-fid's "clean" resize, over ranks; cached in refs/."""
    cache = refs and os.path.join(refs, name.replace(" ", "_") + ".npz")
    if cache and os.path.isfile(cache):
        with np.load(cache, allow_pickle=False) as f:
            stored = (str(f["protocol"]), int(f["num"])) if {"protocol", "num"} <= set(f.files) else None
        if stored != (name, len(paths)):
            raise ValueError(f"{cache}: reference statistics of {stored or 'no protocol name or N'}; this evaluation "
                             f"needs {(name, len(paths))}: delete the file or pass another --refs folder")
        return edm_net.load_stats(cache, dim)
    missing = [p for p in paths if not os.path.isfile(p)] if cache else []
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(paths)} reference images are missing (first: "
                                f"{missing[0]}): unzip COCO's val2014.zip into the --coco folder")
    try:
        from cleanfid.fid import get_files_features
    except ImportError:
        raise ImportError("text-to-image FID needs clean-fid: pip install -r requirements-sdxl.txt") from None
    rank, world = edm_net.rank_world()
    stats = edm_net.FeatureStats(dim, device)
    if paths[rank::world]:
        stats.add(get_files_features(paths[rank::world], features, workers, batch, device, mode="clean", verbose=False,
                                     custom_image_tranform=functools.partial(_on_array, transform=transform)))
    mu, sigma = stats.all_reduce().mu_sigma()
    if cache and rank == 0:
        edm_net.save_stats(cache, mu, sigma, protocol=name, num=len(paths))
    return mu, sigma

def load_clip(model_name="ViT-g-14", weights="laion2b_s12b_b42k"):
    """(model, transform, tokenizer) in fp32 (official: open_clip ViT-g-14 laion2b_s12b_b42k, .float())."""
    try:
        import open_clip
    except ImportError:
        raise ImportError("CLIP score needs open_clip_torch: pip install -r requirements-sdxl.txt") from None
    pretrained = open_clip.pretrained
    try:
        if pretrained.is_pretrained_cfg(model_name, weights):
            weights = pretrained.download_pretrained(pretrained.get_pretrained_cfg(model_name, weights))
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights)
    except (OSError, RuntimeError) as error:
        raise RuntimeError(f"cannot load open_clip {model_name} {weights} ({str(error).splitlines()[0]}): download "
                           f"{CLIP_URL} and pass --clip_weights PATH") from None
    return model.float().eval(), preprocess, open_clip.get_tokenizer(model_name)

def _clip_batch(items, preprocess):  # module level: the DataLoader's workers pickle it
    return torch.stack([preprocess(crop_resize(open_rgb(p), CLIP_RES)) for p, _ in items]), [c for _, c in items]

@torch.inference_mode()
def clip_score(paths, captions, clip, batch=32, device="cpu", workers=0):
    """Mean cosine of image and "A photo depicts " + caption embeddings (equal to the official token insertion)."""
    model, preprocess, tokenizer = clip
    model.to(device)
    rank, world = edm_net.rank_world()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    loader = torch.utils.data.DataLoader(list(zip(paths, captions))[rank::world], batch, num_workers=workers,
                                         collate_fn=functools.partial(_clip_batch, preprocess=preprocess))
    for images, texts in loader:
        cos = F.cosine_similarity(model.encode_image(images.to(device)).float(),
                                  model.encode_text(tokenizer([CLIP_PREFIX + c for c in texts]).to(device)).float())
        total += torch.stack([cos.double().sum(), torch.tensor(len(cos), dtype=torch.float64, device=device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0] / total[1])

def _pretrained(cls, model_id, **kwargs):
    try:
        return cls.from_pretrained(model_id, **kwargs)
    except OSError as error:
        raise RuntimeError(f"cannot load {model_id} ({str(error).splitlines()[0]}). On a machine with internet run "
                           f"`hf download {model_id} --local-dir DIR` and pass DIR in its place") from None

def t2i_pipeline(model, steps, guidance, model_id=""):
    """(diffusers pipeline, call kwargs) of --model: student:PATH, dmd2-sdxl[-lora], dmd2-sd15 on LCMScheduler with the
    generator's timesteps; teacher, hf:ID, sdxl-lightning, lcm-sdxl their own (official test_folder_sdxl.py)."""
    diffusers, _ = _hf()
    diffusers.utils.logging.get_logger("diffusers.schedulers.scheduling_lcm").setLevel("ERROR")  # our timesteps
    kind, _, arg = model.partition(":")  # are intended (official README), not a per-batch warning
    sd15 = kind == "dmd2-sd15"
    base = model_id or (SD15_MODEL_ID if sd15 else SDXL_MODEL_ID)
    call = dict(num_inference_steps=steps, guidance_scale=0)
    if kind in ("teacher", "hf"):
        return _pretrained(diffusers.AutoPipelineForText2Image, arg or base), dict(call, guidance_scale=guidance)
    if kind in ("student", "dmd2-sdxl", "dmd2-sdxl-lora", "dmd2-sd15"):
        lora, steps = kind == "dmd2-sdxl-lora", 1 if sd15 else steps
        if not arg and (kind == "student" or steps not in ((4,) if lora else (1, 4))):
            raise ValueError(f"--model {model}: give student:PATH; the released DMD2 SDXL is 1 or 4 steps, LoRA 4")
        state = read_run(arg) if kind == "student" else {}
        if "distiller" in state:
            generator, cfg, parts = load_student(state)
            parts.unet, steps, t = generator.unet.eval(), cfg.generator_steps, cfg.conditioning_timestep
        else:  # the released 1-step SDXL: pure noise at t = 399 (official README)
            parts, t = load_t2i(base, sdxl=not sd15), 999 if sd15 else 399
            path = arg or download_dmd2(DMD2_SD15_FILE if sd15 else DMD2_SDXL_FILES["lora" if lora else steps],
                                        fix=f"pass --model {kind}:PATH")
            if lora:
                fuse_lora(parts, path)
            else:  # student:PATH without "distiller": a UNet state dict
                load_unet_weights(parts.unet, path)
        timesteps = [t] if steps == 1 else list(range(999, 0, -(1000 // steps)))[:steps]  # as generator_sigmas
        scheduler = diffusers.LCMScheduler(steps_offset=1)  # unused by LCM; SD v1.5 pipelines warn on 0
        call = dict(timesteps=timesteps, guidance_scale=0)
    elif kind == "sdxl-lightning":  # SDXL-Lightning's model card: "trailing" timesteps, x0 prediction at 1 step
        parts = load_t2i(base)
        name = "sdxl_lightning_1step_unet_x0" if steps == 1 else f"sdxl_lightning_{steps}step_unet"
        load_unet_weights(parts.unet, arg or download_dmd2(f"{name}.safetensors", "ByteDance/SDXL-Lightning",
                                                           "pass --model sdxl-lightning:PATH"))
        scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(
            base, subfolder="scheduler", timestep_spacing="trailing", prediction_type="sample" if steps == 1 else
            "epsilon")
    elif kind == "lcm-sdxl":
        parts = load_t2i(base)
        parts.unet = _pretrained(diffusers.UNet2DConditionModel, arg or "latent-consistency/lcm-sdxl")
        scheduler = diffusers.LCMScheduler.from_pretrained(base, subfolder="scheduler")
    else:
        raise ValueError(f"unknown --model {model!r}: student:PATH, dmd2-sdxl, dmd2-sdxl-lora, dmd2-sd15, teacher, "
                         "hf:ID, sdxl-lightning or lcm-sdxl")
    return t2i_pipe(parts, scheduler), call

@torch.no_grad()
def t2i_generate(pipe, call, prompts, out_dir, seed=0, batch=4, resolution=None, rank=0, world_size=1):
    """Missing image i of prompts -> out_dir/{i:05d}.png, i = rank (mod world_size), noise seeded seed + i."""
    os.makedirs(out_dir, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor)
    todo = [i for i in range(rank, len(prompts), world_size) if not os.path.exists(f"{out_dir}/{i:05d}.png")]
    for start in tqdm(range(0, len(todo), batch), desc="generate", disable=rank != 0 or not todo):
        index = todo[start:start + batch]
        generators = [torch.Generator().manual_seed(seed + i) for i in index]
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators])
        images = pipe(prompt=[prompts[i] for i in index], latents=latents.to(pipe.device, pipe.unet.dtype),
                      generator=generators, height=resolution, width=resolution, output_type="np", **call).images
        for i, image in zip(index, images):
            tmp = f"{out_dir}/{i:05d}.tmp{os.getpid()}.png"
            PIL.Image.fromarray((image * 255).astype(np.uint8)).save(tmp)  # official: truncated, not rounded
            os.replace(tmp, f"{out_dir}/{i:05d}.png")

def t2i_evaluate_main(args):
    """`evaluate --model MODEL --coco DIR` (images: the PNGs in --out) -> --out/metrics.json, checks first."""
    if not args.coco:
        raise SystemExit("evaluate --model needs --coco DIR (val2014/ and annotations/captions_val2014.json)")
    args.protocol = args.protocol or ("sd15" if args.model.startswith("dmd2-sd15") else "sdxl")
    protocol, teacher = T2I_PROTOCOLS[args.protocol], args.model == "teacher"
    num, res = args.num or protocol["num"], protocol["eval_res"]
    steps = args.steps or (100 if teacher else 4)
    guidance = args.guidance if args.guidance is not None else 6.0 if teacher else 0.0
    out = args.out or os.path.join("runs", "eval", args.model.replace(":", "_").replace("/", "_"))
    rows, all_images = read_coco_captions(args.coco)
    if args.prompts and protocol["refs"] != "all":  # SD v1.5's references are all of val2014: any caption list fits
        raise ValueError("--prompts is for --protocol sd15; SDXL's captions come with their reference images")
    subset = [] if args.prompts else coco_caption_subset(rows, num)  # num (image, caption) pairs
    prompts = open(args.prompts).read().splitlines()[:num] if args.prompts else [caption for _, caption in subset]
    if len(prompts) < num:
        raise ValueError(f"{args.prompts} holds {len(prompts)} captions, fewer than the {num} asked (--num)")
    ref_names = all_images if protocol["refs"] == "all" else [name for name, _ in subset]
    ref_files = [os.path.join(args.coco, "val2014", name) for name in ref_names]
    kinds = {"FID": (f"crop-lanczos{res}", functools.partial(crop_resize, res=res))}
    if protocol["patch_fid"]:
        kinds["patch_FID"] = ("patch299", patch_crop)
    settings = dict(model=args.model, model_id=args.model_id, steps=steps, guidance=guidance, seed=args.seed,
                    resolution=args.resolution, dtype=args.dtype, protocol=args.protocol, prompts=args.prompts)
    settings_path = os.path.join(out, "settings.json")
    saved = json.load(open(settings_path)) if os.path.exists(settings_path) else None
    keys = ("protocol", "prompts") if args.model == "images" else settings  # images: what pairs them with captions
    if saved and any(saved.get(key) != settings[key] for key in keys):
        raise ValueError(f"{out} holds images made with other settings ({settings_path}): pass another --out or "
                         "delete it")
    device = resolve_device(Config(device="auto"))
    with distributed(device) as (rank, world_size, _):
        extractor, features = t2i_inception(args.inception, args.cache_dir, device)
        dim = features(torch.zeros(1, 3, 299, 299)).shape[1]  # 2048; run once now so a bad file fails early
        clip = None if args.no_clip else load_clip(args.clip_model, args.clip_weights)
        refs = args.refs or os.path.join(args.cache_dir or default_cache_dir(), "coco_refs")
        subset_name = f"{num}-of-seed{COCO_SEED}" if protocol["refs"] == "subset" else "all"
        refs_stats = {kind: t2i_stats(ref_files, transform, features, dim, 32, device, args.workers, refs,
                                      f"coco2014-val {subset_name} {transform_name} clean299 {extractor}")
                      for kind, (transform_name, transform) in kinds.items()}
        if args.model != "images":
            pipe, call = t2i_pipeline(args.model, steps, guidance, args.model_id)
            pipe.to(device, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype])
            if rank == 0:
                os.makedirs(out, exist_ok=True)
                with open(settings_path, "w") as f:
                    json.dump(settings, f)
            t2i_generate(pipe, call, prompts, out, args.seed, args.batch, args.resolution, rank, world_size)
            del pipe
            if dist.is_initialized():
                dist.barrier()
        files = [os.path.join(out, f"{i:05d}.png") for i in range(num)]
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"{out} holds {num - len(missing)} of the {num} images asked (first missing: "
                             f"{missing[0]}): generate them (--model ...) or pass a smaller --num")
        metrics = {"N": num, "N_ref": len(ref_files)}
        for kind, (_, transform) in kinds.items():
            stats = t2i_stats(files, transform, features, dim, device=device, workers=args.workers)
            metrics[kind] = frechet_distance(*stats, *refs_stats[kind])
        if clip is not None:
            metrics["clip_score"] = clip_score(files, prompts, clip, device=device, workers=args.workers)
        if rank == 0:
            for kind, (transform_name, _) in kinds.items():
                print(f"{kind.replace('_', ' ')} {metrics[kind]:.3f} (N={num} images of {args.model} vs "
                      f"N={len(ref_files)} COCO-2014 val images; {args.protocol}, {transform_name}, {extractor})")
            if clip is not None:
                print(f"CLIP score {metrics['clip_score']:.4f} (N={num}; {args.clip_model} {args.clip_weights})")
            with open(os.path.join(out, "metrics.json"), "w") as f:
                json.dump(dict(metrics, model=args.model, protocol=args.protocol, inception=extractor), f, indent=1)
        return metrics

# ================================================================================================================
# PART III. THE HARNESS: devices, embedded rungs, real data, downloads, EDM and text-to-image runs, command line
# ================================================================================================================
import datetime  # Part III's imports
import hashlib
import http.client
import sys
import tempfile
import types
import urllib.parse
import urllib.request

try:  # optional: only the official DMD2 LMDB needs it
    import lmdb
except ImportError:
    lmdb = None
try:  # optional: only the released DMD2 checkpoints need it
    import huggingface_hub
except ImportError:
    huggingface_hub = None

# ----------------------------------------------------------------------------------------------------------------
# 11. Devices, precision, engines, checkpoints of process groups, the runs around train(), the cache

def resolve_device(cfg):
    """--device auto: CUDA if there, else the CPU; CUDA means this process's GPU (LOCAL_RANK under torchrun)."""
    name = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if name == "cuda" else torch.device(name)

def use_bf16(cfg, device):
    """bf16 where the hardware has it (official --use_fp16 = bf16 compute with fp32 master weights)."""
    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    if device.type == "cuda":  # native bf16 only (Ampere and newer), not the emulated kind of older GPUs
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()

def prepare_network(net, cfg, device):
    """Device, bf16 (use_fp16), channels_last, gradient checkpointing (official SD: generator, fake UNet in loss)."""
    net = net.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    if hasattr(net, "use_fp16"):
        net.use_fp16 = use_bf16(cfg, device)
    if isinstance(net, edm_net.EDMPrecond):
        edm_net.set_gradient_checkpointing(net, cfg.grad_checkpointing)
    elif cfg.grad_checkpointing and hasattr(net, "unet"):
        net.unet.enable_gradient_checkpointing()
    return net

def compile_networks(*networks, **compile_kwargs):
    """--compile: each repeated block (EDM's UNetBlock, diffusers' _repeated_blocks, else the network), in place."""
    config = torch._dynamo.config  # past its recompile limit dynamo would run the blocks eager: raised, made to raise
    config.recompile_limit = max(config.recompile_limit, 1024)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)
    config.fail_on_recompile_limit_hit = True
    for net in networks:
        kinds = {edm_net.UNetBlock.__name__, *[b for m in net.modules() for b in getattr(m, "_repeated_blocks", ())]}
        for block in [m for m in net.modules() if type(m).__name__ in kinds] or [net]:
            block.compile(fullgraph=True, **compile_kwargs)

@contextlib.contextmanager
def distributed(device, timeout_minutes=30.0):
    """(rank, world_size, local_rank) of torchrun's group (NCCL on CUDA, else gloo; ended on exit), else (0, 1, 0)."""
    world_size, local_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", 0))
    if world_size == 1 or dist.is_initialized():  # one process, or a group the caller made
        yield (dist.get_rank(), dist.get_world_size(), local_rank) if world_size > 1 else (0, 1, 0)
        return
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes),
                            device_id=device if cuda else None)
    try:
        yield dist.get_rank(), world_size, local_rank
    finally:
        dist.destroy_process_group()

def engine(cfg, world_size, device):
    """Distiller's `wrap` (network -> module with no_sync()): ddp (official: accelerate's DDP), fsdp: FSDP2 over all
    processes, hsdp: sharded within a node, replicated across nodes (official SDXL: accelerate FSDP HYBRID_SHARD)."""
    if cfg.engine == "ddp":  # buffers are constants here: synced at init, not per forward
        return (lambda net: net) if world_size == 1 else lambda net: nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    shape = (world_size // local, local) if cfg.engine == "hsdp" else (world_size,)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard")[-len(shape):])
    return functools.partial(shard, mesh=mesh, bf16_params=cfg.fsdp_bf16_params)

def shard(module, mesh, bf16_params=False):
    """FSDP2 on each block, then the root (official: FSDP, size-based wrapping); fp32, or bf16 gathers and compute."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(**dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_params else {})
    blocks = []
    if hasattr(module, "unet"):  # EpsDenoiser: the diffusers UNet's down, mid and up blocks, then the UNet
        blocks = [*module.unet.down_blocks, module.unet.mid_block, *module.unet.up_blocks, module.unet]
    elif isinstance(module, edm_net.EDMPrecond):
        blocks = [*module.model.enc.values(), *module.model.dec.values()]
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh)

    @contextlib.contextmanager
    def no_sync():
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    module.no_sync = no_sync
    return module

def agree_on_checkpoint(path, world_size=1):
    """Whether a run resumes from path, as rank 0 sees it; a rank seeing another file or none stops all in one line."""
    mine = "none"
    if os.path.exists(path):  # size, SHA-256 of the first and last MiB (a torch zip ends with its records' CRC-32s)
        size, chunk = os.path.getsize(path), 1 << 20
        with open(path, "rb") as f:
            head = f.read(chunk)
            f.seek(max(0, size - chunk))
            mine = f"{size}:{hashlib.sha256(head + f.read()).hexdigest()[:16]}"
    digests = [mine] * world_size
    if world_size > 1:
        dist.all_gather_object(digests, mine)
    resume = digests[0] != "none"
    if others := [r for r, d in enumerate(digests) if d != digests[0]]:
        seen = "another checkpoint" if digests[others[0]] != "none" else "none"
        raise SystemExit(f"{path}: ranks {others} see {seen} than rank 0 ({'resuming' if resume else 'starting fresh'})"
                         "; put --out_dir on a filesystem shared by every node, or copy the run folder to each node.")
    return resume

class GroupCheckpoint(Checkpoint):
    """checkpoint.pt of DDP replicas: every rank must see the same file (agree_on_checkpoint)."""

    def __init__(self, path, rank=0, world_size=1):
        super().__init__(path, rank)
        self.world_size = world_size

    def exists(self):
        return agree_on_checkpoint(self.path, self.world_size)

def recover_checkpoint(path):
    """After a kill between ShardedCheckpoint.save's two renames, the newest complete folder (run.json) back as path."""
    for candidate in (path + ".tmp", path + ".old"):
        if not os.path.exists(path) and os.path.exists(os.path.join(candidate, "run.json")):
            os.replace(candidate, path)

class ShardedCheckpoint(GroupCheckpoint):
    """A torch.distributed.checkpoint folder of every process's shards, complete with run.json (written last), only
    then replacing the previous one (official FSDP: parameters only, no exact resume); resumes at one world size."""

    def exists(self):
        if self.rank == 0:
            recover_checkpoint(self.path)
        dist.barrier()
        return agree_on_checkpoint(os.path.join(self.path, "run.json"), self.world_size)

    def save(self, state):
        import shutil
        import torch.distributed.checkpoint as dcp
        tmp, old = self.path + ".tmp", self.path + ".old"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        dcp.save(state, checkpoint_id=tmp)
        if self.rank == 0:
            with open(os.path.join(tmp, "run.json"), "w") as f:
                json.dump(dict(config=state["config"], arch=state["arch"], world_size=self.world_size,
                               step=state["distiller"]["step"]), f)
            if os.path.exists(self.path):
                os.replace(self.path, old)
            os.replace(tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def load(self, state):
        import torch.distributed.checkpoint as dcp
        with open(os.path.join(self.path, "run.json")) as f:
            info = json.load(f)
        if info["world_size"] != self.world_size:
            raise SystemExit(f"{self.path} was written by {info['world_size']} processes, this run has "
                             f"{self.world_size}: resume with the same number (torchrun --nproc_per_node), or pass "
                             "another --run_name")
        state = dict(distiller=state["distiller"], data=state["data"])
        try:
            dcp.load(state, checkpoint_id=self.path)
        except (Exception, dcp.api.CheckpointException) as e:  # a missing or truncated shard file
            raise RuntimeError(f"{self.path}: cannot read this sharded checkpoint ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]}). A shard file is missing or corrupt: delete the "
                               "folder to start over, or pass another --run_name") from None
        return dict(state, config=info["config"])

def checkpoint_path(run_dir, cfg):
    """A run folder's checkpoint: checkpoint.pt, or with a sharded engine the folder checkpoint/ (with run.json)."""
    return os.path.join(run_dir, "checkpoint.pt" if cfg.engine == "ddp" else "checkpoint")

def generator_weights(distiller):
    """The generator's (or its EMA's) whole float32 weights on the CPU; sharded, every process must call this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    net = distiller.ema or distiller.generator
    weights = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.float().cpu() for k, v in weights.items()}

def load_weights(module, state, path, prefix=""):
    """Strictly load state's entries under prefix (removed) into module (FSDP2: every process keeps its shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    options = StateDictOptions(full_state_dict=True, strict=False)
    missing, unexpected = set_model_state_dict(module, state, options=options)
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit the network (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"prefix {prefix!r}); is it a checkpoint of the same architecture?")

def initialise_from(distiller, generator_path="", guidance_path=""):
    """Earlier weights, fresh optimisers (official --generator_ckpt_path / --ckpt_only_path, e.g. the FID 1.28 run),
    from a run's checkpoint, a released generator (model.*, or a UNet) or guidance (fake_unet.*, cls_pred_branch.*)."""
    if generator_path:
        state, net = read_run(generator_path), distiller.generator
        if state.get("sharded"):
            state = gather_sharded(generator_path, "distiller.generator.")
        elif "distiller" in state:  # its EMA if kept
            state = state["distiller"]["ema"] or state["distiller"]["generator"]
        else:  # a released file: the EDMPrecond's or the diffusers UNet's state dict
            net = getattr(net, "unet", net)
        load_weights(net, state, generator_path)
        if distiller.ema is not None:  # the EMA starts from the loaded generator, not from the teacher
            distiller.ema.load_state_dict(distiller.generator.state_dict())
    if guidance_path:
        state = read_run(guidance_path)
        if state.get("sharded"):
            state = gather_sharded(guidance_path, "distiller.critic.")
        elif "distiller" in state:
            state = state["distiller"]["critic"]
        else:  # the released DMD2 guidance layout
            state = {("fake_score." if k.startswith("fake_unet.") else "head.") + k.split(".", 1)[1]: v
                     for k, v in state.items() if k.startswith(("fake_unet.", "cls_pred_branch."))}
        load_weights(distiller.fake_score, state, guidance_path, "fake_score.")
        if any(k.startswith("head.") for k in state):
            load_weights(distiller.head, state, guidance_path, "head.")

def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

def plot_curves(records, path):
    """Loss curves, one panel per logged quantity, on a bare Figure (no pyplot: a notebook's backend is left alone)."""
    from matplotlib.figure import Figure
    keys = [k for k in ("loss_dm", "loss_fake", "loss_gan_g", "loss_gan_d", "loss_reg", "grad_norm_g")
            if any(k in r for r in records)]
    fig = Figure(figsize=(3.2 * len(keys), 2.6))
    for ax, key in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys):
        steps, values = zip(*[(r["step"], r[key]) for r in records if key in r])
        ax.plot(steps, values, lw=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        if key in ("loss_fake", "grad_norm_g") and min(values) > 0:  # a log scale needs positive values
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)

def perceptual_loss(kind, device, decode=None):
    """The regression loss's distance: LPIPS(VGG) for lpips (auto: if torchvision's VGG16 is on disk), or None (MSE)."""
    vgg_file = os.path.join(torch.hub.get_dir(), "checkpoints", "vgg16-397923af.pth")
    if kind == "mse" or (kind == "auto" and not os.path.exists(vgg_file)):
        if kind == "auto":
            print(f"regression loss: LPIPS needs {vgg_file} (torchvision VGG16); using mean squared error instead")
        return None
    import lpips
    net = lpips.LPIPS(net="vgg", verbose=False).to(device).eval().requires_grad_(False)

    def distance(x, target):
        if decode is not None:  # latents to images (official: taesdxl)
            x, target = decode(x), decode(target)
        size = (224, 224) if x.shape[-1] < 224 else x.shape[-2:]  # original DMD: upsampled to 224
        return net(F.interpolate(x, size, mode="bilinear"), F.interpolate(target, size, mode="bilinear")).mean()
    return distance

def build_network(spec):
    """A network from the spec checkpoints carry (`sample` rebuilds the generator): kind edm or toy, and kwargs."""
    net = edm_net.EDMPrecond(**spec["kwargs"]) if spec["kind"] == "edm" else ToyDenoiser(**spec["kwargs"])
    net.spec = spec
    return net

def run_training(cfg, teacher, real, sample_shape, run_dir, device="cpu", rank=0, world_size=1, conditions=None,
                 decode=None, regression_pairs=None, perceptual=None, show=None):
    """train() as every rung runs it (engine, checkpoint, LoRA, inits); grids to `show` (decode: latents -> images)."""
    sharded = cfg.engine != "ddp" and world_size > 1
    generator = lora_generator(teacher.to(device), cfg) if cfg.lora_rank else None
    distiller = Distiller(cfg, teacher, sample_shape, conditions, generator, engine(cfg, world_size, device),
                          regression_pairs, perceptual, device, rank, world_size)
    if cfg.compile:
        compile_networks(distiller.real_score, distiller.fake_score, distiller.generator)
    checkpoint = (ShardedCheckpoint if sharded else GroupCheckpoint)(checkpoint_path(run_dir, cfg), rank, world_size)
    show_noise = torch.randn((16, *sample_shape), generator=torch.Generator().manual_seed(cfg.seed + 1))
    show_labels = distiller.conditions.examples(16)

    def on_sample(d, iteration):
        if rank == 0 or sharded:  # sharded networks sample on every process
            samples = sample_student(d.ema or d.generator, show_noise, show_labels, d.step_sigmas, d.conditions)
            if decode is not None:
                samples = decode(samples)
            if rank == 0:
                (show or save_samples)(samples, show_labels, os.path.join(run_dir, f"samples_{iteration:06d}.png"))

    start = functools.partial(initialise_from, generator_path=cfg.generator_init, guidance_path=cfg.guidance_init)
    train(cfg, distiller, real, run_dir, checkpoint, start, on_sample, rank)
    if rank == 0:
        plot_curves(read_log(os.path.join(run_dir, "log.jsonl")), os.path.join(run_dir, "curves.png"))
    return distiller

def cache_path(cfg, kind, settings):
    """A file in the cache named by what made it (so a changed recipe never reuses a stale file)."""
    folder = cfg.cache_dir or default_cache_dir()
    os.makedirs(folder, exist_ok=True)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(folder, f"{kind}-{digest}.pt")

# ----------------------------------------------------------------------------------------------------------------
# 12. The embedded rungs: data made in code (seeded, nothing to download), a teacher and a classifier trained here
# (and cached), then students, then the table

TOY2D_MODES = torch.stack([torch.cos(torch.arange(8) * 2 * math.pi / 8),
                           torch.sin(torch.arange(8) * 2 * math.pi / 8)], 1)  # the 8 mode centres

def toy2d_sample(n, rng=None, device="cpu"):
    """8 Gaussian modes (std 0.08) on the unit circle; class c owns modes c and c+4 (dropping one: mode collapse)."""
    labels = torch.randint(0, 4, (n,), generator=rng, device=device)
    mode = labels + 4 * torch.randint(0, 2, (n,), generator=rng, device=device)
    return TOY2D_MODES.to(device)[mode] + 0.08 * torch.randn(n, 2, generator=rng, device=device), labels

SHAPE_NAMES = ["disk", "square", "triangle", "ring", "plus", "cross", "diamond", "bars", "half-disk", "frame"]

def shapes_dataset(num_images, resolution=16, seed=0, supersample=4):
    """uint8 [N, 3, R, R] images, int64 labels: SHAPE_NAMES placed, sized, turned, coloured at random; anti-aliased."""
    def hsv_to_rgb(h, s, v):
        k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
        return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)
    rs = np.random.RandomState(seed)
    labels = rs.randint(0, len(SHAPE_NAMES), num_images)
    grid = (np.arange(resolution * supersample) + 0.5) / (resolution * supersample) * 2 - 1  # pixel centres in [-1, 1]
    ys, xs = np.meshgrid(grid, grid, indexing="ij")
    images = np.empty((num_images, 3, resolution, resolution), np.uint8)
    for i, label in enumerate(labels):
        cx, cy, size, angle = rs.uniform([-0.25, -0.25, 0.45, -0.25], [0.25, 0.25, 0.7, 0.25])
        dx, dy = (xs - cx) / size, (ys - cy) / size
        u, v = math.cos(angle) * dx + math.sin(angle) * dy, math.sin(angle) * dx - math.cos(angle) * dy  # v: up
        r2, au, av = u * u + v * v, np.abs(u), np.abs(v)
        box = np.maximum(au, av)
        a, b = np.abs(u + v) / math.sqrt(2), np.abs(u - v) / math.sqrt(2)  # the plus sign turned 45 degrees
        mask = [r2 < 1, box < 0.8, (v > -0.7) & (v < 0.9 - 1.8 * au), (r2 < 1) & (r2 > 0.36),  # SHAPE_NAMES
                ((au < 0.3) & (av < 1)) | ((av < 0.3) & (au < 1)), ((a < 0.3) & (b < 1)) | ((b < 0.3) & (a < 1)),
                au + av < 1, (av > 0.25) & (av < 0.7) & (au < 0.9), (r2 < 1) & (v > 0), (box < 0.9) & (box > 0.55),
                ][label].astype(np.float32)
        mask = mask.reshape(resolution, supersample, resolution, supersample).mean(axis=(1, 3))
        fg = hsv_to_rgb(rs.uniform(), rs.uniform(0.6, 1.0), rs.uniform(0.75, 1.0))
        bg = hsv_to_rgb(rs.uniform(), rs.uniform(0.2, 0.8), rs.uniform(0.0, 0.35))
        rgb = mask[None] * fg[:, None, None] + (1 - mask[None]) * bg[:, None, None]
        images[i] = np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))

class InMemoryBatches:
    """Seeded batches, with replacement, of tensors or a memory-mapped array and labels (or captions)."""

    def __init__(self, images, labels, global_batch, seed, rank=0, world_size=1):
        self.images, self.labels = images, labels
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.rng = torch.Generator().manual_seed(seed)

    def state_dict(self):
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state):
        self.rng.set_state(state["rng"])

    def __next__(self):
        idx = torch.randint(0, len(self.labels), (self.global_batch,), generator=self.rng)
        idx = idx.chunk(self.world_size)[self.rank]  # every rank draws the global batch: W processes = one, W x batch
        images = torch.as_tensor(self.images[idx.numpy()])  # of a memory-mapped array (t2i latents), only these rows
        images = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()  # official: x/255*2-1
        return images, take(self.labels, idx)

class Toy2DBatches(InMemoryBatches):
    """Fresh samples of the true 2-D distribution for every batch: Toy2DBatches(global_batch, seed, rank, world)."""
    __init__ = functools.partialmethod(InMemoryBatches.__init__, None, None)

    def __next__(self):
        return tuple(t.chunk(self.world_size)[self.rank] for t in toy2d_sample(self.global_batch, self.rng))

class ToyDenoiser(nn.Module):
    """MLP denoiser of 2-D points, EDM-preconditioned; return_bottleneck=True: the last hidden layer (GAN head)."""

    def __init__(self, num_classes=4, hidden=256, depth=4, emb=32):
        super().__init__()
        self.num_classes, self.sigma_data = num_classes, 0.5
        self.register_buffer("freqs", torch.exp(-math.log(1e4) * torch.arange(emb // 2) / (emb // 2)))
        widths = [2 + emb + num_classes] + [hidden] * (depth - 1)  # the inputs of depth Linear + SiLU layers
        self.trunk = nn.Sequential(*[m for width in widths for m in (nn.Linear(width, hidden), nn.SiLU())])
        self.out = nn.Linear(hidden, 2)

    def forward(self, x, sigma, class_labels, return_bottleneck=False):
        x = x.float()  # as EDMPrecond: the sampler works in float64, the network in float32
        sigma = sigma.reshape(-1, 1).float().expand(x.shape[0], 1)
        c_skip, c_out, c_in, c_noise = edm_net.edm_precondition(sigma, self.sigma_data)
        angles = c_noise * self.freqs * 100
        h = self.trunk(torch.cat([c_in * x, angles.cos(), angles.sin(), class_labels.float()], dim=1))
        return h if return_bottleneck else c_skip * x + c_out * self.out(h)

def embedded_teacher(cfg, batches, sample_shape, device):
    """Trained (or cached) with the EDM loss: Adam, 100 warm-up iterations, EMA half-life min(500 kimg, 5% of the
    images seen) (EDM: --ema 0.5 Mimg, ema_rampup_ratio 0.05); a resumable partial state every 500 iterations."""
    spec = (dict(kind="toy", kwargs=dict(num_classes=cfg.num_classes)) if cfg.dataset == "toy2d" else
            dict(kind="edm", kwargs=dict(img_resolution=cfg.resolution, img_channels=sample_shape[0],
                                         label_dim=cfg.num_classes, **cfg.teacher_arch)))
    settings = dict(spec=spec, iters=cfg.teacher_iters, batch=cfg.teacher_batch, lr=cfg.teacher_lr, seed=cfg.seed,
                    dataset=cfg.dataset, resolution=cfg.resolution, ema="edm")
    path = cache_path(cfg, f"teacher-{cfg.dataset}", settings)
    partial = path + ".partial"
    net = prepare_network(build_network(spec), cfg, device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    if os.path.exists(path):
        ema.load_state_dict(read_checkpoint(path)["ema"])
        return ema
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.teacher_lr)
    scheduler = warmup_scheduler(optimizer, 100)
    rng, start = torch.Generator(device).manual_seed(cfg.seed), 0
    resumable = dict(net=net, ema=ema, opt=optimizer, sched=scheduler, data=batches)
    if os.path.exists(partial):
        state = read_checkpoint(partial)
        for key, obj in resumable.items():
            obj.load_state_dict(state[key])
        rng.set_state(state["rng"])
        start = state["step"]
    if cfg.compile:
        compile_networks(net)
    print(f"training the {cfg.dataset} teacher: {cfg.teacher_iters} iterations" + (f", from {start}" if start else "")
          + f" (cached for later runs in {path})")
    with deferred_signals() as caught:
        for step in tqdm(range(start, cfg.teacher_iters), desc="teacher (EDM loss)", initial=start,
                         total=cfg.teacher_iters, leave=False, mininterval=2,
                         disable=bool(os.environ.get("TQDM_DISABLE"))):
            x, labels = next(batches)
            x, labels = x.to(device), onehot(labels.to(device), cfg.num_classes)
            sigma = (torch.randn(x.shape[0], device=device, generator=rng) * 1.2 - 1.2).exp()  # EDM P_mean, P_std
            loss = denoising_loss(net, x, labels, sigma, torch.randn(x.shape, device=device, generator=rng))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"teacher loss is {loss.item()} at iteration {step}; lower --teacher_lr")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            decay = 0.5 ** (cfg.teacher_batch / min(500_000, (step + 1) * cfg.teacher_batch * 0.05))  # half-life
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)
            if caught or ((step + 1) % 500 == 0 and step + 1 < cfg.teacher_iters):
                states = {key: obj.state_dict() for key, obj in resumable.items()}
                atomic_save(dict(step=step + 1, rng=rng.get_state(), **states), partial)
            if caught:
                raise Interrupted(f"interrupted at teacher iteration {step + 1}; run the same command to resume",
                                  caught[0])
    atomic_save(dict(ema=ema.state_dict()), path)
    if os.path.exists(partial):
        os.remove(partial)
    return ema

def shapes_classifier(cfg, images, labels):
    """The metric's CNN, trained (or cached) with AdamW 2e-3 for 3 epochs from seed 0 whatever --seed is (one yardstick
    for every run): its pooled `features` define "FD-cls" (NOT Inception FID), its accuracy stands for CLIP score."""
    path = cache_path(cfg, "classifier-shapes", dict(n=len(labels), resolution=cfg.resolution, seed=0, epochs=3))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential()  # net.features, then net.fc
        net.features = nn.Sequential(*[m for cin, cout, stride in ((3, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2))
                                       for m in (nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())],
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten())
        net.fc = nn.Linear(128, cfg.num_classes)
    if os.path.exists(path):
        net.load_state_dict(read_checkpoint(path))
        return net.eval()
    print(f"training the metric's classifier: 3 epochs (cached for later runs in {path})")
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    rng = torch.Generator().manual_seed(0)
    for _ in range(3):
        for idx in torch.randperm(len(labels), generator=rng).split(128):
            loss = F.cross_entropy(net(images[idx].float() / 127.5 - 1), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    atomic_save(net.state_dict(), path)
    return net.eval()

def embedded_rung(cfg):
    """What every run of an embedded rung shares: device, data, teacher, evaluation noise and labels, metrics, floor."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg)
    n = cfg.eval_samples
    eval_labels = torch.arange(n) % cfg.num_classes  # class-balanced, as the official ImageNet evaluation
    if cfg.dataset == "toy2d":
        sample_shape, batches = (2,), Toy2DBatches  # batches(global_batch, seed)
        metrics = lambda x, labels=eval_labels: toy2d_metrics(x, labels)
        floor_data = toy2d_sample(n, torch.Generator().manual_seed(cfg.seed + 5))
    else:
        print(f"making the shapes data: 20,000 training images of {cfg.resolution} px, {n} + {n} for the metrics")
        images, labels = shapes_dataset(20_000, cfg.resolution, seed=0)
        sample_shape, batches = tuple(images.shape[1:]), functools.partial(InMemoryBatches, images, labels)
        classifier = shapes_classifier(cfg, images, labels)
        reference = shapes_dataset(n, cfg.resolution, seed=1)[0].float() / 127.5 - 1
        ref_features, _ = classifier_features(classifier, reference)
        metrics = lambda x, labels=eval_labels: image_metrics(x, labels, classifier, ref_features)
        floor_images, floor_labels = shapes_dataset(n, cfg.resolution, seed=2)
        floor_data = (floor_images.float() / 127.5 - 1, floor_labels)
    eval_noise = torch.randn((n, *sample_shape), generator=torch.Generator().manual_seed(cfg.seed + 2))
    t0, cpu0 = time.time(), time.process_time()
    teacher = embedded_teacher(cfg, batches(cfg.teacher_batch, cfg.seed), sample_shape, device)
    print(f"teacher ready ({time.time() - t0:.0f} s wall, {time.process_time() - cpu0:.0f} s CPU)")
    return types.SimpleNamespace(cfg=cfg, device=device, sample_shape=sample_shape, teacher=teacher, metrics=metrics,
                                 real_batches=lambda batch_size: batches(batch_size, cfg.seed + 3),
                                 eval_noise=eval_noise, eval_labels=eval_labels, floor_data=floor_data)

def floor_row(rung):
    """The table's floor: the metrics of a real set disjoint from the reference and training sets."""
    return dict(model="real data (second set: the floor)", NFE="", **rung.metrics(*rung.floor_data), images_per_s="")

def teacher_fingerprint(teacher):
    """A cache key for a teacher's weights (their sum in float64): cached results of another teacher are not reused."""
    return sum(float(p.double().sum()) for p in teacher.parameters())

def evaluate_teacher(rung):
    """The teacher's row (EDM Heun, cfg.teacher_eval_steps steps) and samples, cached (with the first images_per_s)."""
    cfg, steps = rung.cfg, rung.cfg.teacher_eval_steps
    settings = dict(teacher=teacher_fingerprint(rung.teacher), steps=steps, n=cfg.eval_samples, seed=cfg.seed)
    path = cache_path(cfg, f"teacher-eval-{cfg.dataset}", settings)
    if os.path.exists(path):
        state = read_checkpoint(path)
        return state["row"], state["samples"]
    start = time.time()
    samples = sample_teacher(rung.teacher, rung.eval_noise, rung.eval_labels, ClassLabels(cfg.num_classes, rung.device),
                             steps, cfg.eval_batch)
    row = dict(model=f"teacher (EDM Heun, {steps} steps)", NFE=2 * steps - 1, **rung.metrics(samples),
               images_per_s=len(samples) / (time.time() - start))
    atomic_save(dict(row=row, samples=samples), path)
    return row, samples

def distil(cfg, rung, run_dir, name=None, show=None):
    """Train (or resume, or reload) one student with cfg and evaluate it: (results row, its samples, the Distiller)."""
    print(f"{run_dir}: a {cfg.generator_steps}-step student, {cfg.iters} iterations" + " without GAN" * (not cfg.gan))
    pairs = teacher_ode_pairs(cfg, rung.teacher, ClassLabels(cfg.num_classes, rung.device),
                              rung.sample_shape) if cfg.regression_loss_weight > 0 else None
    distiller = run_training(cfg, copy.deepcopy(rung.teacher), rung.real_batches(cfg.batch_size), rung.sample_shape,
                             run_dir, rung.device, regression_pairs=pairs,
                             perceptual=perceptual_loss(cfg.regression_loss, rung.device) if pairs else None,
                             show=show)  # a copy of the teacher: the Distiller owns the one it gets
    start, steps = time.time(), cfg.generator_steps
    print(f"{run_dir}: {distiller.step} iterations trained; sampling {cfg.eval_samples} for its row")
    samples = sample_student(distiller.ema or distiller.generator, rung.eval_noise, rung.eval_labels,
                             distiller.step_sigmas, distiller.conditions, cfg.eval_batch)
    row = dict(model=name or f"DMD2 student, {steps} step{'s' * (steps > 1)}", NFE=steps, **rung.metrics(samples),
               images_per_s=len(samples) / (time.time() - start))
    return row, samples, distiller

def run_embedded(cfg):
    """Teacher, one student per cfg.students, the table (out_dir/<dataset>/results.md and results.json)."""
    root = os.path.join(cfg.out_dir, cfg.dataset)
    students = [(cfg.run_name or f"student_{k}step", dataclasses.replace(cfg, generator_steps=k), None)
                for k in cfg.students]
    if cfg.no_gan_student:  # the same 1-step student without real data: how much of its gain the GAN brings
        students.append(((cfg.run_name or "student_1step") + "_no_gan",
                         dataclasses.replace(cfg, generator_steps=1, gan=False), "DMD without GAN, 1 step"))
    for folder, student_cfg, _ in students:  # a run folder of another config, or a bad start file: before any work
        if os.path.exists(path := os.path.join(root, folder, "checkpoint.pt")):
            check_resumable(read_checkpoint(path)["config"], student_cfg, path)
    [read_run(path) for path in (cfg.generator_init, cfg.guidance_init) if path]
    os.makedirs(root, exist_ok=True)
    rung = embedded_rung(cfg)
    t0, cpu0 = time.time(), time.process_time()
    print(f"the teacher's row: EDM Heun, {cfg.teacher_eval_steps} steps, {cfg.eval_samples} samples")
    row, samples = evaluate_teacher(rung)
    print(f"teacher row ready ({time.time() - t0:.0f} s wall, {time.process_time() - cpu0:.0f} s CPU)")
    rows = [row]
    save_samples(samples[:64], rung.eval_labels[:64], os.path.join(root, "teacher_samples.png"))
    for folder, student_cfg, name in students:
        run_dir = os.path.join(root, folder)
        t0, cpu0 = time.time(), time.process_time()
        row, samples, _ = distil(student_cfg, rung, run_dir, name)
        print(f"{row['model']} ready ({time.time() - t0:.0f} s wall, {time.process_time() - cpu0:.0f} s CPU)")
        rows.append(row)
        save_samples(samples[:64], rung.eval_labels[:64], os.path.join(run_dir, "eval_samples.png"))
    rows.append(floor_row(rung))
    table = results_table(rows)
    print(table)
    for name, text in (("results.md", table + "\n"), ("results.json", json.dumps(rows, indent=1))):
        with open(os.path.join(root, name), "w") as f:
            f.write(text)
    return rows

def teacher_ode_pairs(cfg, teacher, conditions, sample_shape):
    """Cached (noise, labels or prompts, output) pairs of the teacher's Heun sampler: the original DMD's regression
    loss (its Sec. 3.3), SDXL 1-step pretraining (official: generate_noise_image_pairs_laion_sdxl.py, 10k pairs, CFG 8,
    zero unconditional embeddings). DDPM teachers start at x_t = z, t = 999; deviation: Heun, not 50-step Euler."""
    captions = getattr(conditions, "captions", None)
    settings = dict(n=cfg.regression_pairs, steps=cfg.teacher_eval_steps, seed=cfg.seed,
                    teacher=teacher_fingerprint(teacher))
    if captions is not None:
        settings.update(cfg=cfg.guidance_scale, captions=hashlib.sha256("\n".join(captions).encode()).hexdigest())
    path = cache_path(cfg, f"odepairs-{cfg.dataset}", settings)
    if os.path.exists(path):
        state = read_checkpoint(path)
        return state["noise"], state["labels"], state["target"]
    rng = torch.Generator().manual_seed(cfg.seed + 4)
    noise = torch.randn((cfg.regression_pairs, *sample_shape), generator=rng)
    labels = torch.randint(0, cfg.num_classes if captions is None else len(captions), (cfg.regression_pairs,),
                           generator=rng)
    start = 1.0
    if captions is not None:  # a DDPM teacher: edm_sampler's first input sigma_max z made DDPM's pure noise x_t = z
        labels = [captions[i] for i in labels.tolist()]
        teacher.eval().guidance_scale = cfg.guidance_scale  # reset to 1 below: the Distiller sets its own
        start = (teacher.sigma_max ** 2 + 1) ** 0.5 / teacher.sigma_max  # (EpsDenoiser.pure_noise)
    target = sample_teacher(teacher, noise * start, labels, conditions, cfg.teacher_eval_steps, cfg.eval_batch)
    if captions is not None:
        teacher.guidance_scale = 1.0
    atomic_save(dict(noise=noise, labels=labels, target=target), path)
    return noise, labels, target

def results_table(rows):
    """A markdown table of result rows (one column per key; floats to 4 significant digits)."""
    keys = [k for k in rows[0] if k != "model"]
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

# ----------------------------------------------------------------------------------------------------------------
# 13. Real images: EDM dataset_tool zips / folders and the official DMD2 LMDB, read as (uint8 CHW image, int64
# label); they feed only the GAN discriminator, without augmentation (official lmdb_dataset.py)

_LMDB_ENVS = {}  # real path -> (lmdb environment, pid that opened it)

class LMDBImageDataset(torch.utils.data.Dataset):
    """The official DMD2 LMDB (main/data/create_imagenet_lmdb.py; reference 1.4): keys `images_{i}_data` (raw
    uint8 CHW bytes), `labels_{i}_data` (int64 bytes), `images_shape` = "N C H W". Labels are read up front."""

    def __init__(self, path):
        if lmdb is None:
            raise ImportError(f"{path} is an LMDB; reading it needs the lmdb package: pip install lmdb")
        self.path = path
        try:
            env = self._environment()
        except lmdb.Error as e:
            raise ValueError(f"{path}: cannot open as LMDB ({e}); re-create or re-download it") from None
        with env.begin() as txn:
            shape = txn.get(b"images_shape")
            if shape is None:
                raise ValueError(f"{path}: no 'images_shape' key, so not the official DMD2 LMDB layout "
                                 "(main/data/create_imagenet_lmdb.py); or pass the dataset_tool zip instead")
            count, *shape = (int(s) for s in shape.decode().split())
            self.image_shape = tuple(shape)
            if count == 0:
                raise ValueError(f"{path}: LMDB declares 0 images; {edm_net.PREPARE_HINT}")
            first = txn.get(b"images_0_data")
            if first is None or len(first) != math.prod(self.image_shape):
                raise ValueError(f"{path}: images_0_data holds {0 if first is None else len(first)} bytes, but "
                                 f"images_shape declares {self.image_shape} uint8; the LMDB is corrupt, re-create it")
            labels = [txn.get(f"labels_{i}_data".encode()) for i in range(count)]
        bad = next((i for i, b in enumerate(labels) if b is None or len(b) != 8), None)
        if bad is not None:
            raise ValueError(f"{path}: labels_{bad}_data is missing or not one int64; corrupt LMDB, re-create it")
        self.labels = np.frombuffer(b"".join(labels), dtype=np.int64)

    def _environment(self):
        # one environment per path and process, never used across a fork: a forked worker closes its inherited copy
        key = os.path.realpath(self.path)
        env, pid = _LMDB_ENVS.get(key, (None, None))
        if pid != os.getpid():
            if env is not None:
                env.close()
            env = lmdb.open(self.path, readonly=True, lock=False, readahead=False, meminit=False)
            _LMDB_ENVS[key] = (env, os.getpid())
        return env

    def describe(self, index):
        return f"{self.path} index {index} (keys images_{index}_data / labels_{index}_data)"

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        with self._environment().begin() as txn:
            data = txn.get(f"images_{index}_data".encode())
        return np.frombuffer(data, np.uint8).reshape(self.image_shape).copy(), self.labels[index]  # copy: writable

def open_image_dataset(path, resolution, num_channels=3, num_classes=None):
    """An EDM dataset_tool .zip / folder or an official DMD2 LMDB, checked against the model's shape and classes."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"dataset {path} not found; prepare it with EDM's dataset_tool: `python dataset_tool.py --source=<image "
            f"folder or cifar-10-python.tar.gz> --dest={path} --resolution={resolution}x{resolution}` (ImageNet: "
            "add --transform=center-crop), or for ImageNet-64 unzip the official DMD2 LMDB https://huggingface.co/"
            "tianweiy/DMD2/resolve/main/data/imagenet/imagenet-64x64_lmdb.zip")
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "data.mdb")):
        dataset = LMDBImageDataset(path)
    elif os.path.isdir(path) or path.lower().endswith(".zip"):
        dataset = edm_net.EDMImageDataset(path)
    else:
        raise ValueError(f"{path} is neither a .zip, a folder of images nor an LMDB directory; {edm_net.PREPARE_HINT}")
    shape, expected = "x".join(map(str, dataset.image_shape)), f"{num_channels}x{resolution}x{resolution}"
    if shape != expected:
        raise ValueError(f"{dataset.describe(0)} is {shape} (CxHxW), expected {expected}; re-run dataset_tool with "
                         f"--resolution={resolution}x{resolution} (and {num_channels}-channel source images) or pick "
                         "the matching preset")
    if num_classes is not None and dataset.labels is None:
        raise ValueError(f'{path} has no labels (dataset.json missing or "labels": null) but the model is '
                         f"conditional on {num_classes} classes; run dataset_tool on a labelled source")
    bad = np.flatnonzero((dataset.labels < 0) | (dataset.labels >= num_classes)) if num_classes is not None else []
    if len(bad):
        raise ValueError(f"{dataset.describe(bad[0])} has label {dataset.labels[bad[0]]} outside 0..{num_classes - 1} "
                         f"({len(bad)} such images); the data does not match the preset's {num_classes} classes")
    return dataset

def real_batches(dataset, batch_size, seed, rank=0, world_size=1, num_workers=0, start_batch=0):
    """Infinite (float32 images in [-1, 1], int64 labels) of this rank: epoch e is a permutation seeded seed + e cut
    into global batches of world_size x batch_size (official: DataLoader(shuffle=True, drop_last=True) sharded by
    accelerate); batch k depends only on (seed, k, rank, world_size, len(dataset)): resume skips without reading."""
    global_batch = batch_size * world_size
    batches_per_epoch = len(dataset) // global_batch
    if batches_per_epoch == 0:
        raise ValueError(f"{len(dataset)} images cannot fill one global batch of {world_size} x {batch_size}; "
                         "use a smaller batch size or more data")
    epoch, skip = divmod(start_batch, batches_per_epoch)
    while True:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
        order = order[:batches_per_epoch * global_batch].view(batches_per_epoch, world_size, batch_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=order[skip:, rank].flatten().tolist(),
                                             drop_last=True, num_workers=num_workers)
        for images, labels in loader:
            yield images.to(torch.float32) / 127.5 - 1, labels.to(torch.int64)  # official: x/255*2-1
        epoch, skip = epoch + 1, 0

class FileBatches:
    """real_batches with a state for checkpoints: the number of batches consumed (a resumed run reads on exactly)."""

    def __init__(self, dataset, batch_size, seed, rank=0, world_size=1, num_workers=4):
        self.read = functools.partial(real_batches, dataset, batch_size, seed, rank, world_size, num_workers)
        self.load_state_dict({"consumed": 0})

    def __next__(self):
        self.consumed += 1
        return next(self.batches)

    def state_dict(self):
        return {"consumed": self.consumed}

    def load_state_dict(self, state):
        self.consumed = state["consumed"]
        self.batches = self.read(start_batch=self.consumed)

# ----------------------------------------------------------------------------------------------------------------
# 14. Downloads: teacher pickles, FID statistics, released DMD2 checkpoints

DMD2_HF_REPO = "tianweiy/DMD2"
DMD2_IMAGENET_RUNS = {  # folder under model/imagenet/ -> ImageNet-64 FID (official README model zoo, reference 9.1)
    "imagenet_gan_classifier_genloss3e-3_diffusion1000_lr2e-6_scratch_fid1.51_checkpoint_model_193500": 1.51,
    "imagenet_lr2e-6_scratch_fid2.61_checkpoint_model_405500": 2.61,
    "imagenet_gan_classifier_genloss3e-3_diffusion1000_lr5e-7_resume_fid1.28_checkpoint_model_548000": 1.28,
}

class DownloadError(RuntimeError):
    pass

def default_cache_dir():
    return os.environ.get("DMD2_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dmd2")

def download_cached(url, cache_dir=None, filename=None, flag="--teacher", hash_prefix=None):
    """Local path of url in the cache; a download is renamed into place once whole and its SHA-256 fits hash_prefix."""
    cache_dir = cache_dir or default_cache_dir()
    filename = filename or os.path.basename(urllib.parse.urlparse(url).path)
    path = os.path.join(cache_dir, filename)
    if os.path.isfile(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    for name in os.listdir(cache_dir):  # a live download keeps writing to its temp file; an hour-old one is dead
        if name.startswith(filename + ".") and name.endswith(".part"):
            with contextlib.suppress(OSError):  # removed meanwhile by another process
                if time.time() - os.path.getmtime(os.path.join(cache_dir, name)) > 3600:
                    os.remove(os.path.join(cache_dir, name))
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=filename + ".", suffix=".part")
    os.close(fd)
    try:
        with tqdm(unit="B", unit_scale=True, desc=filename, disable=None) as bar:
            def progress(blocks, block_size, total):
                bar.total = total if total > 0 else None
                bar.update(blocks * block_size - bar.n)
            urllib.request.urlretrieve(url, tmp, progress)  # raises on a short body (torch.hub's download does not)
        if hash_prefix:
            with open(tmp, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            if not digest.startswith(hash_prefix):
                raise OSError(f"its SHA-256 {digest} does not start with {hash_prefix}")
        os.replace(tmp, path)
    except (OSError, http.client.HTTPException) as e:  # URLError, ContentTooShortError, timeouts, resets, hash
        raise DownloadError(f"could not download {url} ({type(e).__name__}: {e}). If this machine is offline, "
                            f"download it elsewhere and pass {flag} PATH, or place it at {path}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path

def resolve_file(spec, dataset, cache_dir=None, *, urls, what, flag):
    """spec None -> download the official file of the dataset; an http(s) URL -> download it; else a local path."""
    spec = spec or urls.get(dataset)
    if spec is None:
        raise ValueError(f"no official {what} for this dataset; pass {flag} PATH or URL")
    if spec.startswith(("http://", "https://")):
        return download_cached(spec, cache_dir, flag=flag)
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"{what} {spec} not found; pass {flag} with an existing file or an http(s) URL")
    return spec

# resolve_teacher(spec, dataset, cache_dir=None): the EDM teacher pickle; resolve_fid_ref: its FID statistics (.npz)
resolve_teacher = functools.partial(resolve_file, urls=edm_net.TEACHER_URLS, what="teacher", flag="--teacher")
resolve_fid_ref = functools.partial(resolve_file, urls=edm_net.FID_REF_URLS, what="FID reference", flag="--fid_ref")

def download_dmd2(filename, repo=DMD2_HF_REPO, fix="pass its local path instead", cache_dir=None):
    """Local path of a file of a Hugging Face repo (default: the released DMD2 checkpoints), downloaded if absent."""
    url = f"https://huggingface.co/{repo}/resolve/main/{filename}"
    if huggingface_hub is None:
        raise ImportError(f"downloading {url} needs huggingface_hub: pip install huggingface_hub")
    try:
        return huggingface_hub.hf_hub_download(repo_id=repo, filename=filename, cache_dir=cache_dir)
    except (OSError, ValueError) as e:  # offline, LocalEntryNotFoundError, HTTP errors
        raise DownloadError(f"could not fetch {filename} from Hugging Face repo {repo} ({type(e).__name__}). If "
                            f"offline, download {url} elsewhere (`hf download {repo} {filename}`) and {fix}") from None

def download_dmd2_checkpoint(run_name, cache_dir=None):
    """Local path of a released DMD2 ImageNet-64 generator (plain EDMPrecond state dict, keys model.*)."""
    if run_name not in DMD2_IMAGENET_RUNS:
        raise ValueError(f'unknown DMD2 run {run_name!r}; known: {", ".join(DMD2_IMAGENET_RUNS)}')
    return download_dmd2(f"model/imagenet/{run_name}/pytorch_model.bin", cache_dir=cache_dir)

# ----------------------------------------------------------------------------------------------------------------
# 15. The EDM rungs (cifar10, imagenet64): official teacher, real data on disk, one or many processes

def once_per_node(local_rank, fn, *args):
    """fn(*args) on every process, first on the node's local rank 0 while the others wait (downloads, caches)."""
    if local_rank == 0:
        fn(*args)
    if dist.is_initialized():
        dist.barrier()
    return fn(*args)

def start_run(cfg):
    """(run folder, device) of a rung on real data, after the checks due before any process group or download."""
    run_dir = os.path.join(cfg.out_dir, cfg.dataset, cfg.run_name or f"student_{cfg.generator_steps}step")
    for flag, path in (("--generator_init", cfg.generator_init), ("--guidance_init", cfg.guidance_init)):
        if path and not os.path.exists(path):
            raise SystemExit(f"{flag} {path}: no such file (a state dict: the released pytorch_model.bin layout)")
    if cfg.engine != "ddp" and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise SystemExit(f"--engine {cfg.engine} shards the networks over processes: launch with torchrun "
                         "--nproc_per_node N (N >= 2), or use --engine ddp")
    pt, folder = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "checkpoint")
    saved = read_checkpoint(pt) if os.path.exists(pt) else read_run(folder) if os.path.exists(folder) else None
    if saved is not None:  # either kind of checkpoint, read without its networks
        check_resumable(saved["config"], cfg, run_dir)
    device = resolve_device(cfg)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = device.type == "cuda"  # official: TF32
    return run_dir, device

def run_edm(cfg):
    """Distil the official EDM teacher (--teacher; NVIDIA's pickle by default) on real data, in one process or many."""
    run_dir, device = start_run(cfg)
    needs_real = cfg.gan or (cfg.generator_steps > 1 and not cfg.backward_simulation)
    if needs_real and not cfg.data_path:
        raise SystemExit(f"--dataset {cfg.dataset} trains its GAN on real images: pass --data_path (an EDM dataset_tool"
                         f" zip or folder, or the official DMD2 LMDB), or --gan false. {edm_net.PREPARE_HINT}")
    dataset = open_image_dataset(cfg.data_path, cfg.resolution, 3, cfg.num_classes) if needs_real else None
    torch.backends.cudnn.benchmark = device.type == "cuda"  # official: cuDNN picks its fastest kernels
    with distributed(device, cfg.dist_timeout) as (rank, world_size, local_rank):
        torch.manual_seed(cfg.seed)
        path = once_per_node(local_rank, resolve_teacher, cfg.teacher or None, cfg.dataset, cfg.cache_dir or None)
        teacher = edm_net.load_edm_pickle(path, dropout=0.0,  # official: get_edm_network, dropout 0.0
                                          expect=dict(img_resolution=cfg.resolution, label_dim=cfg.num_classes))
        teacher.spec = dict(kind="edm", kwargs=edm_net.init_kwargs(teacher))
        teacher = prepare_network(teacher, cfg, device)
        real = FileBatches(dataset, cfg.batch_size, cfg.seed, rank, world_size, cfg.num_workers) if needs_real else None
        distiller = run_training(cfg, teacher, real, (3, *[cfg.resolution] * 2), run_dir, device, rank, world_size)
        weights = generator_weights(distiller)
        if rank == 0:
            atomic_save(weights, os.path.join(run_dir, "pytorch_model.bin"))  # keys model.*: the released layout
            print(f"generator written to {run_dir}/pytorch_model.bin; evaluate it with: python dmd2.py evaluate "
                  f"--generator {run_dir}/pytorch_model.bin --dataset {cfg.dataset}")
    return distiller

# ----------------------------------------------------------------------------------------------------------------
# 16. The text-to-image rungs (sdxl, sdxl-1step, sdxl-ode, sd15, sd15-gan): diffusers models, captioned images
# encoded once into memory-mapped latents; diffusers, transformers, peft imported inside (requirements-sdxl.txt).

SDXL_MODEL_ID = "stabilityai/stable-diffusion-xl-base-1.0"  # official: --model_id
DMD2_SDXL_FILES = {4: "dmd2_sdxl_4step_unet_fp16.bin", 1: "dmd2_sdxl_1step_unet_fp16.bin",
                   "lora": "dmd2_sdxl_4step_lora_fp16.safetensors"}
SDXL_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                     "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]  # official

def _hf():
    try:
        import diffusers
        import peft  # noqa: F401
        import transformers
    except ImportError as e:
        raise ImportError(f"the text-to-image path needs diffusers, transformers, peft and safetensors ({e}): "
                          "pip install -r requirements-sdxl.txt") from None
    return diffusers, transformers

class Prompts:
    """Captions -> (prompt embeddings, pooled) by the frozen text encoders; sample() draws real captions (official)."""

    def __init__(self, captions, tokenizers, text_encoders):
        self.captions, self.tokenizers, self.text_encoders = captions, tokenizers, text_encoders

    @torch.no_grad()
    def encode(self, prompts):
        sdxl, hidden = len(self.text_encoders) == 2, []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=sdxl)
            hidden.append(out.hidden_states[-2] if sdxl else out[0])  # SDXL: penultimate (official sdxl_text_encoder)
        pooled = out[0] if sdxl else hidden[0].new_zeros(len(ids), 0)  # SDXL: encoder 2's projection [B, 1280]
        return torch.cat(hidden, dim=-1).float(), pooled.float()  # [B, 77, 768]; SDXL: 768 (CLIP-L) + 1280 (bigG)

    def sample(self, n, noise):
        return self.encode([self.captions[i] for i in noise.randint(0, len(self.captions), n).tolist()])

    def blank(self, n):
        return self.encode([""] * n)

    def examples(self, n):  # the prompts of sample grids
        return [self.captions[i % len(self.captions)] for i in range(n)]

@dataclass
class T2IParts:
    """A text-to-image model's pieces: the teacher UNet, its frozen text encoders and VAE, the noise table."""
    unet: nn.Module
    text_encoders: tuple  # SD v1.5: (CLIPTextModel,); SDXL: (CLIPTextModel, CLIPTextModelWithProjection)
    tokenizers: tuple
    vae: nn.Module
    alphas_cumprod: torch.Tensor  # float64 [1000]

    @property
    def sdxl(self):
        return len(self.text_encoders) == 2

    @property
    def resolution(self):  # pixels: SDXL 128 latent x 8 = 1024, SD v1.5 64 x 8 = 512
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def teacher(self):
        """The teacher UNet as a denoiser (not copied: the Distiller makes the real score of it)."""
        uncond = ((torch.zeros(1, 77, self.unet.config.cross_attention_dim), torch.zeros(1, 1280)) if self.sdxl
                  else Prompts([], self.tokenizers, self.text_encoders).blank(1))
        return EpsDenoiser(self.unet, self.alphas_cumprod, uncond, self.resolution if self.sdxl else None)

    def to(self, device):
        for module in (self.unet, self.vae, *self.text_encoders):
            module.to(device)
        return self

def load_t2i(model_id, sdxl=True):
    """SD v1.5 or SDXL from a Hugging Face id or a diffusers folder, frozen, fp32 (official: .float())."""
    diffusers, transformers = _hf()
    suffixes = ("", "_2") if sdxl else ("",)
    encoders = tuple(_pretrained(cls, model_id, subfolder=f"text_encoder{s}") for cls, s in
                     zip((transformers.CLIPTextModel, transformers.CLIPTextModelWithProjection), suffixes))
    tokenizers = tuple(_pretrained(transformers.CLIPTokenizer, model_id, subfolder=f"tokenizer{s}") for s in suffixes)
    unet = _pretrained(diffusers.UNet2DConditionModel, model_id, subfolder="unet").float()
    vae = _pretrained(diffusers.AutoencoderKL, model_id, subfolder="vae").float()
    scheduler = _pretrained(diffusers.DDIMScheduler, model_id, subfolder="scheduler")
    for module in (unet, vae, *encoders):
        module.requires_grad_(False).eval()
    return T2IParts(unet, encoders, tokenizers, vae, scheduler.alphas_cumprod.double())

def tiny_t2i_parts(sdxl=True, seed=0):
    """Random SD-shaped networks for a CPU (tests, --tiny true): 128 px -> 4 x 16 x 16 latents, character tokenizers."""
    diffusers, transformers = _hf()
    torch.manual_seed(seed)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizers = (transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
                  transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="!"))
    text = dict(vocab_size=len(vocab), intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    encoders = (transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_size=768, hidden_act="quick_gelu",
                                                                       pad_token_id=text["eos_token_id"], **text)),)
    if sdxl:
        encoders += (transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            hidden_size=1280, projection_dim=1280, hidden_act="gelu", pad_token_id=vocab["!"], **text)),)
    added = dict(addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816) if sdxl else {}  # 6 x 256 time ids + 1280 pooled
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=sdxl, cross_attention_dim=2048 if sdxl else 768, **added)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=128, scaling_factor=0.13025 if sdxl else 0.18215)  # the SDXL / SD v1.5 VAE scaling factors
    for module in (unet, vae, *encoders):
        module.requires_grad_(False).eval()
    return T2IParts(unet, encoders, tokenizers[:len(encoders)], vae, ddpm_alphas_cumprod())

def t2i_parts(spec):
    """The model a run was made with, from its spec {"model_id", "sdxl", "tiny", "seed"} (checkpoints keep it)."""
    return tiny_t2i_parts(spec["sdxl"], spec["seed"]) if spec["tiny"] else load_t2i(spec["model_id"], spec["sdxl"])

def load_unet_weights(unet, path):
    """Strictly load a UNet state dict (.safetensors, or .bin such as dmd2_sdxl_4step_unet_fp16.bin) into `unet`."""
    from safetensors.torch import load_file
    unet.load_state_dict(load_file(path) if path.endswith(".safetensors") else
                         torch.load(path, map_location="cpu", weights_only=True))

def add_generator_lora(unet, rank=64, alpha=8):
    """LoRA, base weights frozen (official: --generator_lora, LoraConfig(r=64, lora_alpha=8) on SDXL_LORA_TARGETS)."""
    _hf()
    from peft import LoraConfig
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=SDXL_LORA_TARGETS))
    return unet

def lora_generator(teacher, cfg):
    """The generator of a LoRA run (--lora_rank): a trainable copy of the teacher with adapters."""
    generator = trainable_copy(teacher)
    add_generator_lora(generator.unet, cfg.lora_rank, cfg.lora_alpha)
    return generator

def t2i_pipe(parts, scheduler):
    """A diffusers pipeline (SD v1.5 or SDXL) around the parts."""
    diffusers, _ = _hf()
    common = dict(vae=parts.vae, text_encoder=parts.text_encoders[0], tokenizer=parts.tokenizers[0], unet=parts.unet,
                  scheduler=scheduler)
    if parts.sdxl:
        return diffusers.StableDiffusionXLPipeline(text_encoder_2=parts.text_encoders[1],
                                                   tokenizer_2=parts.tokenizers[1], **common)
    return diffusers.StableDiffusionPipeline(safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False, **common)

def fuse_lora(parts, path):
    """Fuse a LoRA file into parts.unet (official README: load_lora_weights, fuse_lora(lora_scale=1.0))."""
    pipe = t2i_pipe(parts, _hf()[0].LCMScheduler())
    pipe.load_lora_weights(path)
    pipe.fuse_lora(lora_scale=1.0)

def read_captioned_folder(folder):
    """[(image path, caption)]: every png/jpg/jpeg/webp/bmp in `folder` with its caption in a same-named .txt."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder (--data_path wants a folder of images with .txt captions)")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(edm_net.IMAGE_EXTENSIONS))
    if not names:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(edm_net.IMAGE_EXTENSIONS)})): the GAN needs them")
    items = []
    for name in names:
        caption_file = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
        if not os.path.exists(caption_file):
            raise FileNotFoundError(f"{os.path.join(folder, name)} has no caption: write it to {caption_file}")
        items.append((os.path.join(folder, name), open(caption_file, encoding="utf-8").read().strip()))
    return items

def load_image(path, resolution):
    """An RGB image as [3, res, res] in [-1, 1]: centre square crop, LANCZOS resize (official latents: /255*2-1)."""
    image = crop_resize(open_rgb(path), resolution)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1

@torch.no_grad()
def encode_latents(folder, vae, resolution, batch_size=8):
    """(latents, captions) of `folder`, encoded once into .dmd2_latents_<res>/, memory-mapped; redone on any change."""
    items = read_captioned_folder(folder)
    key = dict(files=[f"{os.path.basename(p)}:{os.path.getsize(p)}" for p, _ in items],
               captions=[c for _, c in items], resolution=resolution)
    store = os.path.join(folder, f".dmd2_latents_{resolution}")
    index_path, array_path = os.path.join(store, "index.json"), os.path.join(store, "latents.npy")
    with contextlib.suppress(FileNotFoundError), open(index_path) as f:
        if json.load(f) == key:
            return np.load(array_path, mmap_mode="r"), key["captions"]
    os.makedirs(store, exist_ok=True)
    device, side = next(vae.parameters()).device, resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    fd, tmp = tempfile.mkstemp(dir=store, suffix=".part")  # a name of its own: nodes sharing the folder encode at once
    os.close(fd)
    array = np.lib.format.open_memmap(tmp, "w+", np.float16, (len(items), vae.config.latent_channels, side, side))
    rng = torch.Generator(device).manual_seed(0)  # the posterior samples: the same store on every machine
    for i in range(0, len(items), batch_size):
        images = torch.stack([load_image(p, resolution) for p, _ in items[i:i + batch_size]]).to(device, vae.dtype)
        array[i:i + len(images)] = (vae.encode(images).latent_dist.sample(generator=rng) *
                                    vae.config.scaling_factor).half().cpu().numpy()  # official generate_vae_latents.py
    array.flush()
    del array
    os.replace(tmp, array_path)  # renames: a reader maps a complete file, and the index comes last
    with open(tmp + ".json", "w") as f:
        json.dump(key, f)
    os.replace(tmp + ".json", index_path)
    return np.load(array_path, mmap_mode="r"), key["captions"]

def decode_latents(vae, latents):
    """Latents -> images in [-1, 1] (official: vae.decode(z / scaling_factor); the SDXL VAE overflows in fp16)."""
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float()

def run_t2i(cfg):
    """Distil SD v1.5 or SDXL on the captioned images of --data_path; at the end rank 0 exports the generator."""
    sdxl = cfg.dataset.startswith("sdxl")
    spec = dict(model_id=cfg.model_id or (SDXL_MODEL_ID if sdxl else SD15_MODEL_ID), sdxl=sdxl, tiny=cfg.tiny,
                seed=cfg.seed)
    run_dir, device = start_run(cfg)
    read_captioned_folder(cfg.data_path)  # checked before any model is loaded
    with distributed(device, cfg.dist_timeout) as (rank, world_size, local_rank):
        parts = t2i_parts(spec).to(device)
        latents, captions = once_per_node(local_rank, encode_latents, cfg.data_path, parts.vae, parts.resolution)
        if rank == 0:
            print(f"{len(captions)} captioned images -> latents {tuple(latents.shape)}")
        conditions = Prompts(captions, parts.tokenizers, parts.text_encoders)
        teacher = prepare_network(parts.teacher(), cfg, device)
        teacher.spec = dict(kind="t2i", kwargs=spec)
        parts.unet = None  # the teacher UNet now lives only in the Distiller's real score
        sample_shape = tuple(latents.shape[1:])
        pairs = teacher_ode_pairs(cfg, teacher, conditions, sample_shape) if cfg.regression_pairs else None
        perceptual = None
        if pairs:  # official: LPIPS through the tiny autoencoder madebyollin/taesdxl (taesd for SD v1.5)
            vae = parts.vae if cfg.tiny else _pretrained(_hf()[0].AutoencoderTiny,
                                                         "madebyollin/taesdxl" if sdxl else "madebyollin/taesd")
            vae.to(device).requires_grad_(False).eval()
            perceptual = perceptual_loss(cfg.regression_loss, device, functools.partial(decode_latents, vae))
        real = InMemoryBatches(latents, captions, cfg.batch_size * world_size, cfg.seed, rank, world_size)
        distiller = run_training(cfg, teacher, real, sample_shape, run_dir, device, rank, world_size, conditions,
                                 functools.partial(decode_latents, parts.vae), pairs, perceptual)
        weights = generator_weights(distiller)
        if rank == 0:
            export_generator(weights, distiller.real_score.unet.config, cfg, run_dir, parts.sdxl)
    return distiller

def export_generator(weights, unet_config, cfg, run_dir, sdxl=True):
    """unet.bin (the released dmd2_sdxl_*_unet layout) and unet/ (from_pretrained), or a LoRA run's adapters."""
    diffusers, _ = _hf()
    unet = diffusers.UNet2DConditionModel.from_config(unet_config)
    if cfg.lora_rank:
        add_generator_lora(unet, cfg.lora_rank, cfg.lora_alpha)
    unet.load_state_dict({k[len("unet."):]: v for k, v in weights.items()})
    if cfg.lora_rank:
        from peft.utils import get_peft_model_state_dict
        pipeline = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
        pipeline.save_lora_weights(run_dir, unet_lora_layers=get_peft_model_state_dict(unet))
        print(f"generator LoRA written to {run_dir}/pytorch_lora_weights.safetensors")
        return
    atomic_save(unet.state_dict(), os.path.join(run_dir, "unet.bin"))
    unet.save_pretrained(os.path.join(run_dir, "unet"))
    print(f"generator UNet written to {run_dir}/unet.bin and {run_dir}/unet/; sample it with: python dmd2.py sample "
          f"--checkpoint {checkpoint_path(run_dir, cfg)} --prompt TEXT")

# ----------------------------------------------------------------------------------------------------------------
# 17. Command line: python dmd2.py [--dataset NAME] [--flag value ...] | sample | evaluate | fid

def no_gpu(device, flag="--device"):
    return f"{flag} {device}: this machine has no CUDA GPU; use {flag} cpu" if (
        device.startswith("cuda") and not torch.cuda.is_available()) else None

def positive_int(text):
    if not re.fullmatch(r"\d+", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)

def output_problem(path, flag, overwrite=False):
    """Why an output file or folder cannot be made (it exists and no --overwrite; no writable folder), or None."""
    if os.path.exists(path) and not overwrite:
        return f"{flag} {path} exists: pass --overwrite to replace it, or another {flag}"
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent != os.path.abspath(path) and (not os.path.isdir(parent) or not os.access(parent, os.W_OK)):
        return f"{flag} {path}: cannot be written ({parent} is not a writable folder)"

def check_config(cfg):
    """Every flag is honoured on the rung it is given to or refused here, and every range checked, before any work."""
    preset = Config(**PRESETS[cfg.dataset], dataset=cfg.dataset)
    embedded, t2i = cfg.dataset in ("toy2d", "shapes"), cfg.dataset.startswith(("sdxl", "sd15"))
    regression, steps = cfg.regression_loss_weight > 0, cfg.students if embedded else [cfg.generator_steps]
    unused = [  # (flags, meaningless when, why)
        ("generator_steps", embedded, "the embedded main job trains one student per entry: use --students 4"),
        ("data_path teacher", embedded, "the embedded rungs make their data in code and train their own teacher"),
        ("num_workers dist_timeout", embedded, "the embedded rungs run in one process and read no files"),
        ("num_classes", embedded, f"the {cfg.dataset} data has {preset.num_classes} classes"),
        ("teacher_arch precision resolution channels_last grad_checkpointing", cfg.dataset == "toy2d",
         "toy2d's networks are fp32 MLPs on 2-D points"),
        ("students no_gan_student eval_samples teacher_iters teacher_batch teacher_lr teacher_arch", not embedded,
         "only for the embedded main job (toy2d, shapes): use --generator_steps K, and `python dmd2.py evaluate`"),
        ("eval_batch teacher_eval_steps", not embedded and not regression,
         "only for the embedded rungs' table and the regression loss's teacher ODE pairs"),
        ("regression_loss_weight", not embedded and not t2i, "teacher ODE pairs are made on toy2d, shapes, sdxl.."),
        ("regression_pairs regression_loss", not regression, "only with --regression_loss_weight > 0"),
        ("teacher resolution num_classes sigma_min sigma_max rho num_workers", t2i, "a text-to-image teacher is "
         "--model_id, with its own resolution, prompts and DDPM noise table; its latents are held in memory"),
        ("cache_dir", t2i and not regression, "text-to-image models download into the Hugging Face cache (HF_HOME)"),
        ("guidance_scale tiny lora_rank model_id", not t2i, "only for text-to-image teachers (--dataset sdxl, "
         "sdxl-1step, sdxl-ode, sd15, sd15-gan); the EDM teachers have no unconditional branch or LoRA here"),
        ("lora_alpha", cfg.lora_rank == 0, "only with --lora_rank > 0"),
        ("backward_simulation", max(steps) == 1, "it makes the inputs of few-step students (--students 4 or "
         "--generator_steps 4)"),
        ("cls_loss_weight gen_cls_loss_weight diffusion_gan diffusion_gan_max_timestep", not cfg.gan,
         "a GAN setting, with --gan false"),
        ("min_step_percent max_step_percent sigma_data num_train_timesteps", cfg.dm_loss_weight <= 0 and not cfg.gan,
         "no DM loss and no GAN: the fake score is not trained"),
    ]
    given = lambda names: [f"--{k}" for k in names.split() if getattr(cfg, k) != getattr(preset, k)]  # not the preset's
    problems = [f"{', '.join(given(names))}: {why}" for names, refused, why in unused if refused and given(names)]
    auto_gan = cfg.gan and cfg.gen_cls_loss_weight == "auto"
    rules = [  # (refused when, why)
        (regression and (max(steps) > 1 or cfg.regression_pairs < 1),
         "the regression loss is for one-step students: use --students 1 and --regression_pairs N"),
        (cfg.gan and cfg.cls_loss_weight <= 0, "--gan true needs --cls_loss_weight > 0"),
        (auto_gan and cfg.dm_loss_weight <= 0,
         "--gen_cls_loss_weight auto matches the DM term's gradient norm: it needs --dm_loss_weight > 0"),
        (auto_gan and cfg.iters < 2 * AUTO_GAN_UPDATES * cfg.dfake_gen_update_ratio, f"--gen_cls_loss_weight auto "
         f"is measured over the first {AUTO_GAN_UPDATES} generator updates: --iters {cfg.iters} would train with "
         f"GAN weight 0 for most of the run; use --iters >= {2 * AUTO_GAN_UPDATES * cfg.dfake_gen_update_ratio} "
         "or a number (e.g. 3e-3)"),
        (cfg.dm_loss_weight <= 0 and not cfg.gan and not regression,
         "the generator has no loss: enable the DM loss, the GAN or the regression loss"),
        (cfg.micro_batch < 0 or (cfg.micro_batch and cfg.batch_size % cfg.micro_batch),
         f"--micro_batch {cfg.micro_batch} must divide --batch_size {cfg.batch_size} (or be 0: no micro-batching)"),
        (min(cfg.students + [cfg.generator_steps]) < 1 or cfg.dfake_gen_update_ratio < 1,
         "--students, --generator_steps and --dfake_gen_update_ratio must be >= 1"),
        (cfg.precision not in ("auto", "bf16", "fp32"), f"--precision {cfg.precision} is not one of auto, bf16, fp32"),
        (cfg.engine not in ("ddp", "fsdp", "hsdp"), f"--engine {cfg.engine} is not one of ddp, fsdp, hsdp"),
        (cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"),
         f"--device {cfg.device} is not one of auto, cpu, cuda, cuda:N"),
        (cfg.engine in ("fsdp", "hsdp") and (cfg.ema_decay > 0 or embedded), f"--engine {cfg.engine}: not with "
         "--ema_decay (the EMA copy is not sharded) nor on the embedded rungs (one process)"),
        (cfg.fsdp_bf16_params and (cfg.engine == "ddp" or not t2i),
         "--fsdp_bf16_params is for sharded text-to-image runs: --engine fsdp or hsdp, --dataset sdxl.."),
        (cfg.regression_loss not in ("auto", "lpips", "mse"), f"--regression_loss {cfg.regression_loss} is not one "
         "of auto, lpips, mse"),
        (not 0 <= cfg.min_step_percent < cfg.max_step_percent <= 1,
         "--min_step_percent and --max_step_percent must satisfy 0 <= min < max <= 1"),
        (not 0 <= cfg.conditioning_timestep < cfg.num_train_timesteps,
         f"--conditioning_timestep {cfg.conditioning_timestep} is not a grid level 0..{cfg.num_train_timesteps - 1}"),
        (not 1 <= cfg.diffusion_gan_max_timestep <= cfg.num_train_timesteps, f"--diffusion_gan_max_timestep "
         f"{cfg.diffusion_gan_max_timestep} must be in 1..--num_train_timesteps {cfg.num_train_timesteps}"),
        (not 0 < cfg.sigma_min < cfg.sigma_max < math.inf,
         f"--sigma_min {cfg.sigma_min} and --sigma_max {cfg.sigma_max} must be finite with 0 < min < max"),
        (not 0 <= cfg.ema_decay < 1, f"--ema_decay {cfg.ema_decay} must be in [0, 1) (0 = no EMA)"),
        (cfg.gen_cls_loss_weight != "auto" and not cfg.gen_cls_loss_weight >= 0,
         f"--gen_cls_loss_weight {cfg.gen_cls_loss_weight} must be >= 0 or auto"),
        (embedded and cfg.teacher_iters < 1, f"--teacher_iters {cfg.teacher_iters} must be >= 1: an untrained "
         "teacher would be distilled"),
        (embedded and cfg.eval_samples < 100 * (1 + (cfg.dataset == "shapes")), f"--eval_samples {cfg.eval_samples}: "
         "the metrics need at least 100 samples (shapes: 200, more than its classifier's 128 features)"),
        (cfg.dataset == "shapes" and (cfg.resolution < 8 or cfg.resolution % 2 ** (len(cfg.teacher_arch.get(
            "channel_mult", [1])) - 1)), f"--resolution {cfg.resolution}: shapes' U-Net needs >= 8 pixels, divisible "
         "by 2 per downsampling (channel_mult)"),
        *[(path and not os.path.exists(path), f"--{k} {path}: no such file") for k, path in (
            ("generator_init", cfg.generator_init), ("guidance_init", cfg.guidance_init))],
        (os.path.basename(cfg.run_name) != cfg.run_name or cfg.run_name in (".", ".."),
         f"--run_name {cfg.run_name}: a folder name (no / or ..): a run stays inside --out_dir"),
        *[(bool(why), why) for why in (no_gpu(cfg.device), output_problem(cfg.out_dir, "--out_dir", overwrite=True))],
    ]
    problems += [why for refused, why in rules if refused]
    bounds = [("must be a positive integer", lambda v: v >= 1, "batch_size iters log_every ckpt_every sample_every "
               "eval_samples eval_batch teacher_batch num_train_timesteps teacher_eval_steps num_classes"),
              ("must be a finite number > 0", lambda v: 0 < v < math.inf, "generator_lr guidance_lr teacher_lr "
               "dist_timeout lora_alpha rho"),
              ("must be > 0", lambda v: v > 0, "max_grad_norm sigma_data"),
              ("must be >= 1 (1 = no guidance)", lambda v: v >= 1, "guidance_scale"),
              ("must be >= 0", lambda v: v >= 0, "warmup_steps num_workers lora_rank seed dm_loss_weight "
               "cls_loss_weight regression_loss_weight regression_pairs")]
    problems += [f"--{k} {getattr(cfg, k)} {why}" for why, ok, names in bounds for k in names.split()
                 if not ok(getattr(cfg, k))]
    if embedded and cfg.dataset == "shapes" and not problems:
        try:  # a wrong key or shape of --teacher_arch, found now rather than after the data and classifier
            build_network(dict(kind="edm", kwargs=dict(img_resolution=cfg.resolution, img_channels=3,
                                                       label_dim=cfg.num_classes, **cfg.teacher_arch)))
        except Exception as e:
            problems.append(f"--teacher_arch {json.dumps(cfg.teacher_arch)}: {type(e).__name__}: {e}")
    if problems:
        raise SystemExit("config error: " + "; ".join(problems))

def read_run(path):
    """A run's checkpoint.pt, or a sharded run's checkpoint/ folder (its run.json; load_student gathers the rest)."""
    if not os.path.isdir(path):
        fix = "Pass the checkpoint.pt of a dmd2.py run folder (or a sharded run's checkpoint/)."
        return read_checkpoint(path, fix=fix)
    if not os.path.exists(os.path.join(path, "run.json")):
        raise ValueError(f"{path} is a folder without run.json: not a (complete) sharded dmd2.py checkpoint")
    with open(os.path.join(path, "run.json")) as f:
        info = json.load(f)
    return dict(config=info["config"], arch=info["arch"], sharded=path,
                distiller=dict(step=info["step"], ema=None, generator=None))

def gather_sharded(path, prefix):
    """The whole tensors named prefix* of a sharded checkpoint folder, prefix removed, in this one process."""
    import torch.distributed.checkpoint as dcp
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
               if k.startswith(prefix) and hasattr(m, "size")}
    dcp.load(tensors, checkpoint_id=path, no_dist=True)
    return {k[len(prefix):]: v for k, v in tensors.items()}

def load_student(state):
    """(generator, Config, text-to-image parts or None) of read_run's checkpoint: the student (its EMA if kept)."""
    cfg, spec = Config(**state["config"]), state["arch"]
    parts = t2i_parts(spec["kwargs"]) if spec["kind"] == "t2i" else None
    generator = parts.teacher() if parts else build_network(spec)
    if parts and cfg.lora_rank:
        add_generator_lora(generator.unet, cfg.lora_rank, cfg.lora_alpha)
    weights = state["distiller"]["ema"] or state["distiller"]["generator"]  # neither in a sharded run: gathered
    generator.load_state_dict(weights or gather_sharded(state["sharded"], "distiller.generator."))
    return generator.eval(), cfg, parts

def load_generator(path, dataset):
    """(generator, steps) of our checkpoint.pt or a pytorch_model.bin (keys model.*: released DMD2's, run_edm's)."""
    state = read_run(path)
    if "distiller" in state:
        generator, cfg, _ = load_student(state)
        return generator, cfg.generator_steps
    config = {"imagenet64": edm_net.imagenet64_config(dropout=0.0), "cifar10": edm_net.cifar10_config(dropout=0.0)}
    if dataset not in config:
        raise SystemExit(f"{path} is a plain state dict: pass --dataset imagenet64 or cifar10 for its architecture")
    return edm_net.load_edm_state_dict(state, config[dataset], name=path).eval(), 1

def sample_main(argv):
    """A run's student with our sampler (a grid PNG), or a text-to-image model through its diffusers pipeline
    (t2i_pipeline; released DMD2 weights from Hugging Face), one PNG per image in the folder --out."""
    parser = ArgumentParser(prog="dmd2.py sample", description=sample_main.__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint.pt of a dmd2.py run")
    source.add_argument("--model", help="a text-to-image model, as `evaluate --model`")
    parser.add_argument("--prompt", action="append", default=[], help="text-to-image: a prompt (repeat for more)")
    parser.add_argument("--num", type=positive_int, help="images (default 64), or images per prompt (default 1)")
    parser.add_argument("--steps", type=positive_int, default=4, help="--model: sampling steps")
    parser.add_argument("--model_id", default="", help="--model: base model id or folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="grid PNG or a folder for it (default samples.png); --model: the "
                        "images' folder (default samples)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing images")
    args = parser.parse_args(argv)
    prompts = [p for p in args.prompt for _ in range(args.num or 1)]
    out = args.out or ("samples" if args.model else "samples.png")
    if not args.model and os.path.isdir(out):
        out = os.path.join(out, "samples.png")
    problems = [why for why in (
        args.model and not prompts and "sample --model needs --prompt TEXT",
        not args.model and not out.lower().endswith(".png") and f"--out {out}: a .png file or an existing folder",
        args.model and os.path.isdir(out) and os.listdir(out) and not args.overwrite and
        f"--out {out} has files: pass --overwrite to replace its images, or another --out",
        output_problem(out, "--out", args.overwrite or bool(args.model)),
        args.checkpoint and not os.path.exists(args.checkpoint) and
        f"{args.checkpoint}: no such checkpoint (it is run_dir/checkpoint.pt of a dmd2.py run)") if why]
    if problems:
        raise SystemExit("; ".join(problems))
    if args.model:
        t2i_generate(*t2i_pipeline(args.model, args.steps, 0.0, args.model_id), prompts, out, args.seed)
        print(f"wrote {len(prompts)} images to {out}/")
        return
    state = read_run(args.checkpoint)
    if not {"config", "distiller", "arch"} <= set(state):
        raise ValueError(f"{args.checkpoint} is a torch file but not a dmd2.py run checkpoint (it has "
                         f"{sorted(state)[:4]}); pass run_dir/checkpoint.pt of a run")
    generator, cfg, parts = load_student(state)
    if parts and not prompts:
        raise SystemExit(f"{args.checkpoint} is a text-to-image student: pass --prompt TEXT")
    conditions = Prompts(prompts, parts.tokenizers, parts.text_encoders) if parts else ClassLabels(cfg.num_classes)
    labels = conditions.examples(len(prompts) if parts else args.num or 64)
    shape = ((parts.unet.config.in_channels, *[parts.unet.config.sample_size] * 2) if parts else
             (2,) if cfg.dataset == "toy2d" else (generator.img_channels, *[generator.img_resolution] * 2))
    noise = torch.randn((len(labels), *shape), generator=torch.Generator().manual_seed(args.seed))
    step_sigmas = generator_sigmas(cfg.generator_steps, noise_grid(cfg, generator), cfg.conditioning_timestep)
    samples = sample_student(generator, noise, labels, step_sigmas, conditions)
    save_samples(decode_latents(parts.vae, samples) if parts else samples, labels, out)
    print(f"wrote {out}: {len(labels)} samples of a {cfg.generator_steps}-step student at iteration "
          f"{state['distiller']['step']}")

def evaluate_main(argv):
    """--released / --generator: a one-step EDM generator's sample grid and FID under the ImageNet-64 protocol (50
    per class, per-sample seeds, EDM's uint8 mapping and Inception preprocessing), sharded under torchrun.
    --model: a text-to-image model on COCO-2014 (FID, patch FID, CLIP score; section 10)."""
    parser = ArgumentParser(prog="dmd2.py evaluate", description=evaluate_main.__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--released", choices=sorted(DMD2_IMAGENET_RUNS), help="a released DMD2 ImageNet run")
    source.add_argument("--generator", help="our checkpoint.pt or a plain generator state dict (keys model.*)")
    source.add_argument("--model", help="student:PATH, dmd2-sdxl, dmd2-sdxl-lora, dmd2-sd15, teacher, hf:ID, "
                        "sdxl-lightning, lcm-sdxl (t2i_pipeline), or images: evaluate the PNGs already in --out")
    parser.add_argument("--num", type=positive_int, help="samples (default 50,000, a multiple of the class count; "
                        "--model: 10k for sdxl, 30k for sd15, a prefix of the list)")
    parser.add_argument("--batch", type=positive_int,
                        help="batch (default 128, official --eval_batch_size; --model: 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inception", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: cache); "
                        "--model: also clean-fid's inception-2015-12-05.pt")
    parser.add_argument("--cache_dir", default=None, help="downloads (default $DMD2_CACHE or ~/.cache/dmd2)")
    edm = parser.add_argument_group("--released / --generator only")
    edm.add_argument("--dataset", choices=["imagenet64", "cifar10"], help="default imagenet64")
    edm.add_argument("--ref", help="reference statistics .npz (default: EDM's for the dataset, downloaded)")
    edm.add_argument("--grid", help="sample grid PNG (default generator_grid.png)")
    edm.add_argument("--overwrite", action="store_true", help="replace an existing --grid")
    t2i = parser.add_argument_group("--model only")
    t2i.add_argument("--coco", help="folder with val2014/ and annotations/captions_val2014.json")
    t2i.add_argument("--protocol", choices=sorted(T2I_PROTOCOLS), help="default sd15 for dmd2-sd15, else sdxl")
    t2i.add_argument("--prompts", help="sd15 only: a caption file, one per line (official: "
                     "main/coco_eval/captions_coco14_test.txt)")
    t2i.add_argument("--out", help="image folder (default runs/eval/<model>)")
    t2i.add_argument("--refs", help="reference statistics cache (default <cache>/coco_refs)")
    t2i.add_argument("--steps", type=positive_int, help="sampling steps (default 4; teacher 100 as in the paper)")
    t2i.add_argument("--guidance", type=float, help="CFG scale (default 0; teacher 6, official --guidance_scale)")
    t2i.add_argument("--model_id", help="base model id or folder (default SDXL / SD v1.5 base)")
    t2i.add_argument("--resolution", type=int, help="generated image size (default: the pipeline's)")
    t2i.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default fp32 (official)")
    t2i.add_argument("--workers", type=int, help="image-loading processes (default min(8, CPUs))")
    t2i.add_argument("--clip_model", help="default ViT-g-14")
    t2i.add_argument("--clip_weights", help=f"a tag or a file (default laion2b_s12b_b42k, {CLIP_URL})")
    t2i.add_argument("--no_clip", action="store_true", help="skip the CLIP score")
    args = parser.parse_args(argv)
    other = t2i if args.model is None else edm
    given = [a.option_strings[0] for a in other._group_actions if getattr(args, a.dest) not in (None, False)]
    if given:
        raise SystemExit(f"{', '.join(given)}: not with {'--model' if args.model else '--released / --generator'} "
                         f"(see python dmd2.py evaluate --help)")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # metrics in exact float32
    if args.model is not None:
        defaults = dict(batch=4, prompts="", out="", refs="", model_id="", dtype="fp32",  # official --eval_batch_size 4
                        clip_model="ViT-g-14", clip_weights="laion2b_s12b_b42k", workers=min(8, os.cpu_count() or 1))
        vars(args).update({k: v for k, v in defaults.items() if getattr(args, k) is None})
        return t2i_evaluate_main(args)
    args.num, args.batch = args.num or 50_000, args.batch or 128
    args.dataset, args.grid = args.dataset or "imagenet64", args.grid or "generator_grid.png"
    problems = [why for why in (
        args.released and args.dataset != "imagenet64" and f"--dataset {args.dataset}: the released DMD2 generators "
        "are ImageNet-64 ones", output_problem(args.grid, "--grid", args.overwrite),
        *[path and not path.startswith(("http://", "https://")) and not os.path.exists(path) and
          f"{flag} {path}: no such file" for flag, path in (("--generator", args.generator), ("--ref", args.ref),
                                                              ("--inception", args.inception))]) if why]
    if problems:  # before any download
        raise SystemExit("; ".join(problems))
    if args.num < 2048:
        few_images_warning(args.num)
    device = resolve_device(Config(device="auto"))
    with distributed(device) as (rank, _, local_rank):
        return evaluate_generator(args, device, rank, local_rank)

def evaluate_generator(args, device, rank=0, local_rank=0):
    """`evaluate --released / --generator` on one process of the group: downloads once per node, a grid, the FID."""
    path = args.generator or once_per_node(local_rank, download_dmd2_checkpoint, args.released, args.cache_dir)
    generator, steps = load_generator(path, args.dataset)  # a bad file is found before the reference is fetched
    ref = once_per_node(local_rank, resolve_fid_ref, args.ref, args.dataset, args.cache_dir)
    generator = generator.to(device)
    generator.use_fp16 = use_bf16(Config(), device)  # the official configs' fp16: bf16 where the hardware has it
    num_classes, res = generator.label_dim, generator.img_resolution
    step_sigmas = generator_sigmas(steps, karras_sigmas().to(device))

    @torch.no_grad()
    def generate_fn(noise, labels):  # unit noise of shape (steps, 3, R, R) per sample: one slice per step
        noise = noise.to(device).reshape(len(labels), steps, 3, res, res)
        draws = iter(noise.unbind(1)[1:])
        return generate(generator, noise[:, 0], onehot(labels.to(device), num_classes), step_sigmas,
                        lambda shape, device=None: next(draws))

    if rank == 0:
        grid_noise = torch.randn(64, steps * 3, res, res, generator=torch.Generator().manual_seed(args.seed))
        labels = torch.arange(64) * (num_classes // 64 or 1) % num_classes
        save_samples(generate_fn(grid_noise, labels).cpu(), labels, args.grid)
        print(f"wrote {args.grid}")
    inception = load_inception(args.inception, args.cache_dir, device=device)
    fid = fid_of_generator(generate_fn, ref, inception, num_samples=args.num, num_classes=num_classes,
                           batch_size=args.batch, seed=args.seed, noise_shape=(steps * 3, res, res), device=device)
    if rank == 0:
        print(f"FID {fid:.4f} ({args.num} samples, {path} against {ref})")
    return fid

def main(argv):
    commands = {"sample": sample_main, "evaluate": evaluate_main, "fid": fid_main}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    cfg = parse_config(argv)
    check_config(cfg)
    if cfg.dataset in ("toy2d", "shapes"):
        return run_embedded(cfg)
    return run_t2i(cfg) if cfg.dataset.startswith(("sdxl", "sd15")) else run_edm(cfg)

def cli(argv):
    """The one error path: a user error (bad flag, missing or malformed file, offline download, non-finite loss) is
    one line on stderr naming cause and fix, exit status 2, no traceback (DMD2_DEBUG=1 shows it); Ctrl-C / SIGTERM
    one line too, exit status 128 + the signal's number, after the training loop has written its checkpoint."""
    try:
        main(argv)
    except Interrupted as e:  # the checkpoint is written
        print(f"dmd2.py: {e.args[0]}", file=sys.stderr)
        sys.exit(128 + e.args[1])
    except KeyboardInterrupt:
        print("dmd2.py: interrupted before any training began (nothing to save)", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise  # argparse's own exits (--help: 0, usage errors: 2) and exits with a status
        print(f"dmd2.py: error: {e.code}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, OSError, RuntimeError, ImportError, FloatingPointError) as e:  # user errors
        if os.environ.get("DMD2_DEBUG"):
            raise
        print(f"dmd2.py: error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)

if __name__ == "__main__":
    cli(sys.argv[1:])
