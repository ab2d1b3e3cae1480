"""What the SDXL training step computed before issue 13 unified it, and the replay of that record through the
unified path (tests/test_sdxl_record.py).

What was recorded, for a tiny random SDXL-shaped model (now dmd2.tiny_t2i_parts(seed=0)) in fp32 on the CPU, through
dmd2.sdxl_train_step: one TTUR cycle (dfake_gen_update_ratio 2, two iterations: generator turn + critic turn, then a
critic turn; warm-up 0, lr 1e-3, batch 2, GAN on) for the 4-step backward-simulation generator ("4step") and the
1-step generator at t = 399 ("1step"):
  * every random draw the step makes, in order: kind (randn / randn_like / randint), shape, arguments, calling
    function, its role in the method (e.g. "dm_t", "gan_real_noise") and its values. The values come from a private
    torch.Generator, not the global one, and the global RNG state is checked to be untouched by the step, so these
    draws are ALL the randomness of the step;
  * each iteration's log (every loss and both gradient norms, as sdxl_train_step returns them);
  * at every optimiser step, for every parameter tensor that optimiser updates (generator; fake UNet + GAN head):
    the gradient as the optimiser sees it (after clipping) and the updated weights, each as its norm (float64) and
    its first 32 flattened entries (NaN-padded for tensors with fewer), and which networks hold no gradient;
  * the data (6 fp16 latents with captions), the GAN head's initial weights' rule (init_gan_head) and fingerprints
    of the initial UNet, GAN head and prompt embeddings, so a changed tiny model is told apart from a changed step.
No network weights are stored. The record was made from commit 37b252e ("DDP: forward_sync_buffers ...") with
torch 2.14.1, diffusers 0.42.1, transformers 5.24.0 (the file's "meta" says the same).

The record is not regenerated from today's code (it pins the old step): the recorder is this file at commit 37b252e.
Here run_cycle() replays the recorded draws through the unified Distiller; tests/test_sdxl_record.py compares."""
import copy
import dataclasses
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dmd2  # noqa: E402

RECORD_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sdxl_step_record.pt")
RECORD = torch.load(RECORD_PATH, weights_only=True) if os.path.exists(RECORD_PATH) else None
HEAD_ENTRIES = 32  # first flattened entries kept per tensor
DRAW_SEED = 29  # private generator of the draws: the 4-step generator turn rolls out k = 3 steps, the next k = 2
CONFIGS = {"4step": dict(steps=4), "1step": dict(steps=1, conditioning_timestep=399)}
COMMON = dict(tiny=True, precision="fp32", lr=1e-3, warmup_steps=0, dfake_gen_update_ratio=2, batch_size=2, gan=True,
              backward_simulation=True, iters=2)


def tiny_data():
    """Six fp16 latents [4, 16, 16] (as a latent cache stores them) with captions."""
    g = torch.Generator().manual_seed(1)
    return {"latents": torch.randn(6, 4, 16, 16, generator=g).half(),
            "captions": ["a cat", "a dog", "red car", "blue sky", "green tree", "old house"]}


@torch.no_grad()
def init_gan_head(head, seed=0):
    """Deterministic initial weights independent of how a head is built: every Conv2d weight and bias, in
    module order, ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) from torch.Generator seeded `seed` (the
    distribution of PyTorch's default Conv2d init); GroupNorm weight 1, bias 0."""
    g = torch.Generator().manual_seed(seed)
    for module in head.modules():
        if isinstance(module, torch.nn.Conv2d):
            bound = 1 / math.sqrt(module.weight[0].numel())
            for p in (module.weight, module.bias):
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64).mul(2 * bound).sub(bound))
        elif isinstance(module, torch.nn.GroupNorm):
            module.weight.fill_(1)
            module.bias.zero_()
    return head


def fingerprint(tensors):
    """{"norm": float64 [n], "head": float32 [n, 32]} of a list of tensors (first 32 flattened entries, NaN-padded)."""
    head = torch.full((len(tensors), HEAD_ENTRIES), float("nan"))
    for i, x in enumerate(tensors):
        flat = x.detach().flatten()[:HEAD_ENTRIES].float()
        head[i, :len(flat)] = flat
    return {"norm": torch.tensor([x.detach().double().norm().item() for x in tensors], dtype=torch.float64),
            "head": head}


# --- the random draws -------------------------------------------------------------------------------------------

_REPLACED = ("randn", "randn_like", "randint")
_FORBIDDEN = ("rand", "rand_like", "randint_like", "randperm", "normal", "multinomial", "bernoulli", "poisson")


def _draw_spec(kind, args, kwargs):
    """(shape, low, high, dtype, device) of a randn / randn_like / randint call."""
    if kind == "randn_like":
        like = args[0]
        return list(like.shape), None, None, kwargs.get("dtype") or like.dtype, kwargs.get("device") or like.device
    device = kwargs.get("device") or "cpu"
    if kind == "randn":
        shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
        return list(kwargs.get("size", shape)), None, None, kwargs.get("dtype") or torch.get_default_dtype(), device
    args = (*args, *(kwargs[k] for k in ("low", "high", "size") if k in kwargs))
    low, high, shape = (0, *args) if len(args) == 2 else args  # randint(high, size) or randint(low, high, size)
    return list(shape), int(low), int(high), kwargs.get("dtype") or torch.int64, device


class RandomDraws:
    """Context that serves torch.randn, torch.randn_like and torch.randint.

    Recording (recorded=None): values from `generator`, a private torch.Generator; each call is appended to
    self.draws as {"kind", "caller", "shape", "low", "high", "dtype", "value", "like"} (like: fingerprint of
    randn_like's argument, the tensor the noise goes with). Replaying: the recorded values are served in the
    order of `recorded` (reorder it by "role" for code that draws in another order) after checking that each call
    asks for the same distribution (normal, or integers in [low, high)), number of values and dtype; randn and
    randn_like count as the same distribution, and the value takes the asked shape. Calls that pass their own
    torch.Generator are served too. Other RNG functions raise, and on exit the global RNG state must be unchanged
    (nothing else, e.g. a dropout, drew random numbers)."""

    def __init__(self, recorded=None, generator=None):
        self.recorded, self.generator, self.draws, self.position = recorded, generator, [], 0

    def __enter__(self):
        self.saved = {name: getattr(torch, name) for name in _REPLACED + _FORBIDDEN}
        for name in _REPLACED:
            setattr(torch, name, self._serve(name))
        for name in _FORBIDDEN:
            setattr(torch, name, self._refuse(name))
        self.rng_state = torch.get_rng_state()
        return self

    def __exit__(self, *exc):
        for name, function in self.saved.items():
            setattr(torch, name, function)
        if exc[0] is None:
            if not torch.equal(torch.get_rng_state(), self.rng_state):
                raise AssertionError("the global RNG was used outside torch.randn/randn_like/randint")
            if self.recorded is not None and self.position != len(self.recorded):
                raise AssertionError(f"{len(self.recorded) - self.position} recorded draws were not used")

    def _refuse(self, name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"torch.{name} is not recorded; add it to record_sdxl_step.RandomDraws")
        return refuse

    def _serve(self, kind):
        def serve(*args, **kwargs):
            shape, low, high, dtype, device = _draw_spec(kind, args, kwargs)
            caller = sys._getframe(1).f_code.co_name
            if self.recorded is None:
                if kind == "randint":
                    value = self.saved["randint"](low, high, shape, generator=self.generator, dtype=dtype)
                else:
                    value = self.saved["randn"](shape, generator=self.generator, dtype=dtype)
                like = fingerprint([args[0]]) if kind == "randn_like" else None  # what the noise is added to
                self.draws.append({"kind": kind, "caller": caller, "shape": shape, "low": low, "high": high,
                                   "dtype": str(dtype), "value": value, "like": like})
                return value.to(device)
            if self.position >= len(self.recorded):
                raise AssertionError(f"draw {self.position} ({kind} {shape} from {caller}) is beyond the record")
            want = self.recorded[self.position]
            asked = ("normal" if low is None else f"integers in [{low}, {high})", math.prod(shape), str(dtype))
            expected = ("normal" if want["low"] is None else f"integers in [{want['low']}, {want['high']})",
                        math.prod(want["shape"]), want["dtype"])
            if asked != expected:
                raise AssertionError(f"draw {self.position} ({want['role']}): recorded {expected} from "
                                     f"{want['caller']}, asked {asked} from {caller}")
            self.position += 1
            return want["value"].clone().reshape(shape).to(device)
        return serve


# --- one TTUR cycle ---------------------------------------------------------------------------------------------

# The recorded configuration (sdxl_train_step's SDXLConfig, in the record's "config") and the Config fields that
# carry the same knobs in the unified path.
RECORD_TO_CONFIG = {"steps": "generator_steps", "conditioning_timestep": "conditioning_timestep",
                    "backward_simulation": "backward_simulation", "real_guidance_scale": "guidance_scale",
                    "dm_loss_weight": "dm_loss_weight", "gan": "gan", "gen_cls_loss_weight": "gen_cls_loss_weight",
                    "guidance_cls_loss_weight": "cls_loss_weight", "dfake_gen_update_ratio": "dfake_gen_update_ratio",
                    "lr": "generator_lr", "warmup_steps": "warmup_steps", "max_grad_norm": "max_grad_norm",
                    "batch_size": "batch_size", "iters": "iters", "precision": "precision", "seed": "seed",
                    "tiny": "tiny", "device": "device", "log_every": "log_every", "ckpt_every": "ckpt_every"}
LOG_NAMES = {"loss_dm": "loss_dm", "loss_gan_g": "gen_cls_loss", "grad_norm_g": "generator_grad_norm",
             "loss_fake": "loss_fake", "loss_gan_d": "guidance_cls_loss", "grad_norm_d": "guidance_grad_norm"}


def unified_config(recorded):
    """The dmd2.Config of a recorded SDXLConfig dict: same knobs, plus what the old step hard-coded: the DM index
    range [20, 981) (--min/max_step_percent 0.02/0.98), the unweighted epsilon MSE (sigma_data = inf), the diffusion
    GAN over 1000 levels, one learning rate for both sides."""
    assert (recorded["min_step"], recorded["max_step"]) == (20, 980) and not recorded["lora"]
    assert not recorded["gradient_checkpointing"] and recorded["lr"] > 0
    cfg = dmd2.Config(dataset="sdxl", **{new: recorded[old] for old, new in RECORD_TO_CONFIG.items()})
    return dataclasses.replace(cfg, guidance_lr=recorded["lr"], sigma_data=math.inf, min_step_percent=0.02,
                               max_step_percent=0.98, diffusion_gan=True, diffusion_gan_max_timestep=1000,
                               ema_decay=0.0, micro_batch=0)


def unified_order(draws, k, steps, generator_turn):
    """One iteration's recorded draws, ordered as the unified path draws them, without the two the old step drew
    and then discarded (the rollout's last re-noising, replaced by generator_noise when x0 is re-noised to t_k; and,
    when there is no rollout, its fresh start, replaced by pure noise). The unified backward simulation re-noises
    its last x0 to t_k itself, with the draw the old step called generator_noise; a 1-step generator draws no k."""
    by_role = {d["role"]: d for d in draws}
    if steps == 1:
        rollout = ["generator_noise"]
    else:
        rollout = ["backsim_k"] + (["generator_noise"] if k == 0 else
                                   ["backsim_start_noise"] + [f"backsim_renoise_{j}" for j in range(k - 1)]
                                   + ["generator_noise"])
    roles = (["real_index", "gen_index"] + rollout
             + (["dm_t", "dm_noise", "gan_generator_t", "gan_generator_noise"] if generator_turn else [])
             + ["fake_t", "fake_noise", "gan_real_t", "gan_real_noise", "gan_fake_t", "gan_fake_noise"])
    return [by_role[role] for role in roles]


def run_cycle(parts, name, recorded_draws, float64=False):
    """Two iterations for CONFIGS[name] on tiny_data() through the unified path (the tiny UNet as an EpsDenoiser
    teacher, dmd2.Distiller.train_step, real batches from dmd2.InMemoryBatches, prompts from dmd2.Prompts), with
    the recorded draws served in place of torch's random functions. Returns {"config", "initial", "draws", "logs", "optimizer_steps",
    "names", "shapes"}, with logs under the record's names."""
    recorded_cfg = dict(RECORD["runs"][name]["config"])
    cfg = unified_config(recorded_cfg)
    data = tiny_data()
    teacher = copy.deepcopy(parts.teacher()) if float64 else parts.teacher()  # the real score's UNet is the teacher's
    distiller = dmd2.Distiller(cfg, teacher, (4, 16, 16), conditions=dmd2.Prompts(
        data["captions"], parts.tokenizers, parts.text_encoders))
    real = dmd2.InMemoryBatches(data["latents"], data["captions"], cfg.batch_size, cfg.seed)
    init_gan_head(distiller.head)
    if float64:  # the three UNets (GANHead computes in float32 whatever its input: official)
        for unet in (distiller.generator.unet, distiller.fake_score.unet, distiller.real_score.unet):
            unet.double()
    nets = {"generator": distiller.generator.unet, "fake_unet": distiller.fake_score.unet, "gan_head": distiller.head}
    names = {net: [n for n, p in module.named_parameters() if p.requires_grad] for net, module in nets.items()}
    shapes = {net: [list(p.shape) for p in module.parameters() if p.requires_grad] for net, module in nets.items()}
    owner = {id(p): (net, n) for net, module in nets.items() for n, p in module.named_parameters()}
    initial = {net: fingerprint([p for p in module.parameters() if p.requires_grad]) for net, module in nets.items()}
    steps = []

    def watch(optimizer, which):
        def params():
            found = {}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    net, n = owner[id(p)]
                    found.setdefault(net, {})[n] = p
            return {net: [found[net][n] for n in names[net]] for net in found}

        def before(opt, args, kwargs):
            steps.append({"iteration": distiller.step, "optimizer": which,
                          "grads": {net: fingerprint([p.grad for p in ps]) for net, ps in params().items()},
                          "without_grad": [net for net, module in nets.items()
                                           if all(p.grad is None for p in module.parameters())]})

        def after(opt, args, kwargs):
            steps[-1]["weights"] = {net: fingerprint(ps) for net, ps in params().items()}
        optimizer.register_step_pre_hook(before)
        optimizer.register_step_post_hook(after)
    watch(distiller.opt_g, "generator")
    watch(distiller.opt_d, "critic")

    logs = []
    for _ in range(cfg.iters):
        generator_turn = distiller.step % cfg.dfake_gen_update_ratio == 0
        draws = [d for d in recorded_draws if d["iteration"] == distiller.step]
        k = next((d["value"].item() for d in draws if d["role"] == "backsim_k"), 0)
        with RandomDraws(unified_order(draws, k, cfg.generator_steps, generator_turn)):
            log = distiller.train_step(next(real))
        logs.append({LOG_NAMES[key]: value for key, value in log.items() if key in LOG_NAMES})
    return {"config": {**recorded_cfg, **{old: getattr(cfg, new) for old, new in RECORD_TO_CONFIG.items()},
                       "real_guidance_scale": cfg.guidance_scale},
            "initial": initial, "draws": [], "logs": logs, "optimizer_steps": steps, "names": names, "shapes": shapes}


@torch.no_grad()
def embedding_fingerprint(parts):
    embeds, pooled = dmd2.Prompts([], parts.tokenizers, parts.text_encoders).encode(tiny_data()["captions"])
    return fingerprint([embeds, pooled])


def main():
    raise SystemExit("The record was made by this script and dmd2.sdxl_train_step at commit 37b252e; both changed "
                     "since (issue 13 replaced the step by the unified Distiller). To re-record, check out that commit:"
                     " git worktree add /tmp/rec 37b252e && cd /tmp/rec && python tests/record_sdxl_step.py")


if __name__ == "__main__":
    main()
