"""Record what the SDXL training step computes today, so a re-implementation can be held to it (issue 13).

What it records, for a tiny random SDXL-shaped model (dmd2.sdxl_tiny_parts(seed=0)) in fp32 on the CPU, through
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

Regenerate (with dmd2.py as of that commit, which the script checks is committed; about 20 s on one CPU core;
two runs give byte-identical files):
    python tests/record_sdxl_step.py            # writes tests/data/sdxl_step_record.pt
tests/test_sdxl_record.py replays the recorded draws through run_cycle() and compares."""
import argparse
import dataclasses
import math
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dmd2  # noqa: E402

RECORD_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sdxl_step_record.pt")
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


def label_roles(draws, generator_turn):
    """Name each draw of one iteration by its role in the method, from the function that drew it (order within
    that function as in today's code). The GAN logits are drawn for the generator loss (generator turn only),
    then for the real batch and the fake batch of the classifier loss."""
    gan_pairs = (["gan_generator"] if generator_turn else []) + ["gan_real", "gan_fake"]
    per_caller = {"sdxl_train_step": ["gen_index", "real_index", "generator_noise"],
                  "sdxl_generator_input": ["backsim_k"], "sdxl_dm_loss": ["dm_t", "dm_noise"],
                  "sdxl_fake_loss": ["fake_t", "fake_noise"],
                  "sdxl_gan_logits": [f"{who}_{what}" for who in gan_pairs for what in ("t", "noise")]}
    renoise = 0
    for draw in draws:
        caller = draw["caller"]
        if caller == "sdxl_backward_simulation":
            draw["role"] = "backsim_start_noise" if draw["kind"] == "randn" else f"backsim_renoise_{renoise}"
            renoise += draw["kind"] == "randn_like"
        elif per_caller.get(caller):
            draw["role"] = per_caller[caller].pop(0)
        else:
            raise AssertionError(f"unexpected draw {draw['kind']} {draw['shape']} from {caller}")


# --- one TTUR cycle ---------------------------------------------------------------------------------------------


def run_cycle(parts, name, recorded_draws=None):
    """Two iterations of dmd2.sdxl_train_step for CONFIGS[name] on tiny_data(), recording the draws (or replaying
    recorded_draws). Returns {"config", "initial", "draws", "logs", "optimizer_steps", "names", "shapes"}."""
    cfg = dmd2.SDXLConfig(**COMMON, **CONFIGS[name])
    device = torch.device("cpu")
    state = dmd2.sdxl_training_state(parts, cfg, device)
    init_gan_head(state.gan_head)
    nets = {"generator": state.generator, "fake_unet": state.fake_unet, "gan_head": state.gan_head}
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
            steps.append({"iteration": state.step, "optimizer": which,
                          "grads": {net: fingerprint([p.grad for p in ps]) for net, ps in params().items()},
                          "without_grad": [net for net, module in nets.items()
                                           if all(p.grad is None for p in module.parameters())]})

        def after(opt, args, kwargs):
            steps[-1]["weights"] = {net: fingerprint(ps) for net, ps in params().items()}
        optimizer.register_step_pre_hook(before)
        optimizer.register_step_post_hook(after)
    watch(state.opt_g, "generator")
    watch(state.opt_d, "critic")

    data, logs, draws, generator = tiny_data(), [], [], torch.Generator().manual_seed(DRAW_SEED)
    for _ in range(cfg.iters):
        generator_turn = state.step % cfg.dfake_gen_update_ratio == 0
        recorded = None
        if recorded_draws is not None:
            recorded = [d for d in recorded_draws if d["iteration"] == state.step]
        with RandomDraws(recorded, generator) as rng:
            logs.append(dmd2.sdxl_train_step(state, parts, data, cfg))
        if recorded is None:
            label_roles(rng.draws, generator_turn)
            for d in rng.draws:
                d["iteration"] = state.step - 1
            draws += rng.draws
    return {"config": dataclasses.asdict(cfg), "initial": initial, "draws": draws if recorded_draws is None else [],
            "logs": logs, "optimizer_steps": steps, "names": names, "shapes": shapes}


@torch.no_grad()
def embedding_fingerprint(parts):
    embeds, pooled = dmd2.encode_prompts(tiny_data()["captions"], parts.tokenizers, parts.text_encoders)
    return fingerprint([embeds, pooled])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=RECORD_PATH)
    args = parser.parse_args(argv)
    import diffusers
    import transformers
    torch.set_num_threads(1)
    parts = dmd2.sdxl_tiny_parts(seed=0)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = subprocess.run(["git", "-C", root, "log", "-1", "--format=%H %s", "--", "dmd2.py"], capture_output=True,
                            text=True).stdout.strip()
    if subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD", "--", "dmd2.py"]).returncode:
        raise SystemExit("dmd2.py differs from its last commit: record from a committed dmd2.py")
    runs = {name: run_cycle(parts, name) for name in CONFIGS}
    ks = [d["value"].item() for d in runs["4step"]["draws"] if d["role"] == "backsim_k"]
    assert ks == [3, 2], f"DRAW_SEED gives rollout lengths {ks}; want 3 in the generator turn, then 2"
    record = {"meta": {"dmd2_commit": commit, "torch": str(torch.__version__), "diffusers": diffusers.__version__,
                       "transformers": transformers.__version__, "command": "python tests/record_sdxl_step.py",
                       "draw_seed": DRAW_SEED},
              "data": tiny_data(), "embeddings": embedding_fingerprint(parts), "runs": runs}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    torch.save(record, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB) from dmd2.py at {commit}")
    for name, run in runs.items():
        print(name, "draws", [d["role"] for d in run["draws"]])
        print(name, "logs", run["logs"])


if __name__ == "__main__":
    main()
