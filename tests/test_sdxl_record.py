"""Today's SDXL training step, pinned: a replay of the record tests/data/sdxl_step_record.pt (issue 13).

tests/record_sdxl_step.py recorded, from dmd2.sdxl_train_step at commit 37b252e, one TTUR cycle (dfake_gen_update_ratio
2, two iterations: generator turn + critic turn, then a critic turn) of a tiny random SDXL-shaped model in fp32 on
the CPU, for the 4-step backward-simulation generator and the 1-step generator (t = 399), GAN on: every random draw
(kind, shape, arguments, role, values), each logged loss and gradient norm, and at each optimiser step the norm and
first 32 entries of every trainable tensor's gradient (as the optimiser sees it) and updated weights. Here the same
step runs again, single-threaded as recorded, with the recorded draws served in place of torch.randn / randn_like /
randint (record_sdxl_step.RandomDraws; any other use of the global RNG fails the run), and everything is compared.

The replay runs the three UNets in float64 (the GAN head stays float32: GANHead casts its input, as official), so
what it computes does not depend on the CPU's kernels (a float32 replay did: a 2-thread replay, whose convolutions
sum in another order, used more than half of one bound, and another CPU's kernels sum in another order too; the DM
loss, a small difference of two UNet outputs, is the most sensitive). The replay's distance to the record is then the record's own float32 rounding, a constant, plus
the float32 head's rounding (~1e-7 relative, below every bound by 10x and more). Measured: within half of every
bound below (loss_dm of the 1-step run, 1.8e-6 relative, is the closest: 0.36 of its bound).
Tolerances:
  * logged losses and gradient norms: |x - r| <= tol |r|;
  * gradient norms and entries of a network's tensors: |x - r| <= tol (|r| + N), N = that network's recorded total
    gradient norm at that step (a sum with cancellation, e.g. conv_out.bias, is only as exact as N; the biases
    in front of a one-channel-per-group GroupNorm have an analytically zero gradient, ~1e-9 N of rounding);
  * updated weights: |w - r| <= tol |r| + a, with a = 1e-3 lr for entries whose recorded gradient exceeded 1e-4 N at
    every step so far and a = 2 lr per step taken otherwise (AdamW's first steps move each entry by about
    lr sign(g), so an entry whose gradient is rounding noise may step either way); weight norms alike, with
    a sqrt(numel) and the tensor's gradient norm deciding;
  * tol = 5e-6 in the first iteration, 2e-5 in the second (after one optimiser step, which amplifies rounding).

Issue 13 deleted sdxl_train_step: record_sdxl_step.run_cycle now runs the unified path (the tiny UNet as an
EpsDenoiser teacher, Distiller.train_step, InMemoryBatches, Prompts) with the same tiny networks, data, GAN head
initialisation and configuration (record_sdxl_step.unified_config), serving each recorded draw to the call that
plays its role (record_sdxl_step.unified_order; the two draws the old step made and discarded are not served).
The record itself is not re-made: the point is that the new code computes what the old code computed."""
import pytest
import torch

pytest.importorskip("diffusers")  # requirements-sdxl.txt
import dmd2
import record_sdxl_step as rec

RECORD = torch.load(rec.RECORD_PATH, weights_only=True)
TOL = [5e-6, 2e-5]  # by iteration
B, LATENT = 2, [2, 4, 16, 16]


@pytest.fixture(scope="module")
def parts():
    return dmd2.tiny_t2i_parts(sdxl=True, seed=0)


def replay(parts, name, draws):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded (float64 makes the thread count immaterial: this only keeps it the same)
    try:
        return rec.run_cycle(parts, name, draws, float64=True)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def replays(parts):
    return {name: replay(parts, name, RECORD["runs"][name]["draws"]) for name in rec.CONFIGS}


def within(x, r, bound):
    """Mask of |x - r| <= bound (NaN padding counts as equal)."""
    x, r = x.double(), r.double()
    return ((x - r).abs() <= bound) | (r.isnan() & x.isnan())


def mismatches(run, ref):
    """Every quantity of `run` outside its tolerance against the record `ref`, as readable lines."""
    bad = []
    for i, (log, log_ref) in enumerate(zip(run["logs"], ref["logs"], strict=True)):
        if set(log) != set(log_ref):
            bad.append(f"iteration {i}: logged {sorted(log)}, recorded {sorted(log_ref)}")
        for key in sorted(set(log) & set(log_ref)):
            if abs(log[key] - log_ref[key]) > TOL[i] * abs(log_ref[key]):
                bad.append(f"iteration {i} {key}: {log[key]!r}, recorded {log_ref[key]!r}")
    steps = [(s["iteration"], s["optimizer"], sorted(s["grads"]), s["without_grad"]) for s in run["optimizer_steps"]]
    steps_ref = [(s["iteration"], s["optimizer"], sorted(s["grads"]), s["without_grad"])
                 for s in ref["optimizer_steps"]]
    if steps != steps_ref:
        return bad + [f"optimiser steps {steps}, recorded {steps_ref}"]
    lr, resolved, taken = ref["config"]["lr"], {}, {}
    for step, step_ref in zip(run["optimizer_steps"], ref["optimizer_steps"]):
        tol, where = TOL[step_ref["iteration"]], f"iteration {step_ref['iteration']} {step_ref['optimizer']} step"
        for net, g_ref in step_ref["grads"].items():
            g, w, w_ref = step["grads"][net], step["weights"][net], step_ref["weights"][net]
            total = g_ref["norm"].norm().item()
            resolved[net] = resolved.get(net, True) & (g_ref["head"].abs() > 1e-4 * total)
            taken[net] = taken.get(net, 0) + 1
            adam = torch.where(resolved[net], 1e-3 * lr, 2 * lr * taken[net])  # per entry
            checks = [("gradient norm", g["norm"], g_ref["norm"], tol * (g_ref["norm"].abs() + total)),
                      ("gradient", g["head"], g_ref["head"], tol * (g_ref["head"].abs() + total)),
                      ("weight", w["head"], w_ref["head"], tol * w_ref["head"].abs() + adam)]
            for what, x, r, bound in checks:
                for index in (~within(x, r, bound)).nonzero()[:3].tolist():
                    tensor = ref["names"][net][index[0]]
                    bad.append(f"{where}, {net} {tensor} {what}{index[1:]}: {x[tuple(index)].item():.9g}, "
                               f"recorded {r[tuple(index)].item():.9g}")
            sizes = torch.tensor([torch.Size(s).numel() for s in ref["shapes"][net]], dtype=torch.float64)
            tensor_resolved = resolved.setdefault(net + " norm", torch.ones(len(sizes), dtype=torch.bool))
            tensor_resolved &= g_ref["norm"] > 1e-4 * total
            adam = torch.where(tensor_resolved, 1e-3 * lr, 2 * lr * taken[net]) * sizes.sqrt()
            wrong = ~within(w["norm"], w_ref["norm"], tol * w_ref["norm"] + adam)
            if wrong.any():
                bad.append(f"{where}, {net}: weight norms of {int(wrong.sum())} tensors differ, e.g. "
                           f"{ref['names'][net][int(wrong.nonzero()[0])]}")
    return bad


# --- the replay equals the record -------------------------------------------------------------------------------


def test_tiny_model_data_and_embeddings_are_the_recorded_ones(parts, replays):
    """A failure here means the tiny model changed (tiny_t2i_parts, diffusers, transformers), not the step."""
    data = rec.tiny_data()
    assert torch.equal(data["latents"], RECORD["data"]["latents"]) and data["captions"] == RECORD["data"]["captions"]
    embeddings, recorded = rec.embedding_fingerprint(parts), RECORD["embeddings"]
    assert within(embeddings["norm"], recorded["norm"], 5e-6 * recorded["norm"]).all()
    assert within(embeddings["head"], recorded["head"], 5e-6 * (recorded["head"].abs() + 1)).all()
    for name, run in replays.items():
        ref = RECORD["runs"][name]
        assert run["config"] == ref["config"] and run["names"] == ref["names"] and run["shapes"] == ref["shapes"]
        for net, initial in ref["initial"].items():
            assert torch.equal(run["initial"][net]["norm"], initial["norm"]), f"{name} {net}: initial weights"
            assert torch.equal(run["initial"][net]["head"].nan_to_num(7.0), initial["head"].nan_to_num(7.0))


@pytest.mark.parametrize("name", list(rec.CONFIGS))
def test_losses_gradients_and_weights_equal_the_record(replays, name):
    ref = RECORD["runs"][name]
    assert [sorted(log) for log in ref["logs"]] == [
        ["gen_cls_loss", "generator_grad_norm", "guidance_cls_loss", "guidance_grad_norm", "loss_dm", "loss_fake"],
        ["guidance_cls_loss", "guidance_grad_norm", "loss_fake"]]  # generator turn, then critic only
    assert [(s["iteration"], s["optimizer"], sorted(s["grads"]), s["without_grad"])
            for s in ref["optimizer_steps"]] == [(0, "generator", ["generator"], ["fake_unet", "gan_head"]),
                                                 (0, "critic", ["fake_unet", "gan_head"], ["generator"]),
                                                 (1, "critic", ["fake_unet", "gan_head"], ["generator"])]
    assert mismatches(replays[name], ref) == []


def test_record_is_sensitive_to_how_draws_are_routed(parts):
    """The comparison fails when the real and fake GAN batches swap their noise draws (a routing slip a refactor
    could make), and a draw of another shape or distribution stops the replay."""
    ref = RECORD["runs"]["1step"]
    swapped = [dict(d) for d in ref["draws"]]
    real, fake = (next(i for i, d in enumerate(swapped) if d["role"] == role and d["iteration"] == 0)
                  for role in ("gan_real_noise", "gan_fake_noise"))
    swapped[real]["value"], swapped[fake]["value"] = swapped[fake]["value"], swapped[real]["value"]
    bad = mismatches(replay(parts, "1step", swapped), ref)
    assert any("guidance_cls_loss" in line for line in bad) and any("gan_head" in line for line in bad)
    assert not any("loss_dm" in line or "generator step" in line for line in bad)  # the generator turn came first
    wrong = [dict(d) for d in ref["draws"]]
    dm_t = next(i for i, d in enumerate(wrong) if d["role"] == "dm_t")
    wrong[dm_t]["low"] = 0
    with pytest.raises(AssertionError, match=r"draw \d+ \(dm_t\): recorded \('integers in \[0, 981\)'"):
        replay(parts, "1step", wrong)


def test_comparison_flags_a_gradient_or_weight_off_by_1e_4():
    ref = RECORD["runs"]["4step"]
    for part in ("grads", "weights"):
        steps = [{**s, part: {**s[part], "generator": {k: v * (1 + 1e-4) for k, v in s[part]["generator"].items()}}}
                 if s["optimizer"] == "generator" else s for s in ref["optimizer_steps"]]
        bad = mismatches({**ref, "optimizer_steps": steps}, ref)
        assert bad and all(line.startswith("iteration 0 generator step, generator") for line in bad)
        if part == "grads":
            assert any("conv_in.weight gradient norm" in line for line in bad)
        else:
            assert any("conv_in.weight weight[" in line for line in bad) and any("weight norms" in line for line in bad)
    assert mismatches(ref, ref) == []


# --- the recorded draws are the official recipe's -----------------------------------------------------------------


def roles(draws, iteration):
    return [d["role"] for d in draws if d["iteration"] == iteration]


@pytest.mark.parametrize("name, num_steps", [("4step", 4), ("1step", 1)])
def test_recorded_draws_follow_the_official_recipe(name, num_steps):
    """Official SD recipe (main/sd_guidance.py, main/sd_unified_model.py): DM-loss t ~ randint(20, 981)
    (--min/max_step_percent 0.02/0.98), fake-loss and diffusion-GAN t ~ randint(0, 1000), one backward-simulation
    index k ~ randint(0, K) for the whole batch with fresh noise at each re-noising, separate noise and timesteps
    for the real and the fake GAN batch, two data loaders (generator prompts, real images)."""
    draws = RECORD["runs"][name]["draws"]
    data = RECORD["data"]
    by_role = {}
    for d in draws:
        by_role.setdefault(d["role"], []).append(d)
    ks = [d["value"].item() for d in by_role["backsim_k"]]
    for iteration, generator_turn in ((0, True), (1, False)):
        k = ks[iteration]
        expected = (["gen_index", "real_index", "generator_noise", "backsim_k", "backsim_start_noise"]
                    + [f"backsim_renoise_{j}" for j in range(k)]
                    + (["dm_t", "dm_noise", "gan_generator_t", "gan_generator_noise"] if generator_turn else [])
                    + ["fake_t", "fake_noise", "gan_real_t", "gan_real_noise", "gan_fake_t", "gan_fake_noise"])
        assert roles(draws, iteration) == expected
    assert ks == ([3, 2] if num_steps == 4 else [0, 0])  # the 4-step record covers two rollout lengths
    for d in by_role["backsim_k"]:
        assert (d["kind"], d["low"], d["high"], d["shape"]) == ("randint", 0, num_steps, [])  # one k per batch
    for role, low, high in [("dm_t", 20, 981), ("fake_t", 0, 1000), ("gan_generator_t", 0, 1000),
                            ("gan_real_t", 0, 1000), ("gan_fake_t", 0, 1000), ("gen_index", 0, 6),
                            ("real_index", 0, 6)]:
        for d in by_role[role]:
            assert (d["kind"], d["low"], d["high"], d["shape"], d["dtype"]) == ("randint", low, high, [B],
                                                                                "torch.int64")
            assert low <= d["value"].min() and d["value"].max() < high
    noises = [d for d in draws if d["low"] is None]
    assert all(d["shape"] == LATENT and d["dtype"] == "torch.float32" for d in noises)
    values = torch.stack([d["value"].flatten() for d in noises])
    assert (torch.corrcoef(values).abs() - torch.eye(len(values))).max() < 0.15  # every noise draw is fresh
    for iteration in (0, 1):
        real, fake = (next(d for d in by_role[role] if d["iteration"] == iteration)
                      for role in ("gan_real_noise", "gan_fake_noise"))
        real_index = next(d for d in by_role["real_index"] if d["iteration"] == iteration)["value"]
        real_batch = rec.fingerprint([data["latents"][real_index].float()])
        assert torch.equal(real["like"]["norm"], real_batch["norm"])  # the real GAN noise goes with the real batch
        assert not torch.equal(fake["like"]["norm"], real_batch["norm"])
        t_real, t_fake = (next(d for d in by_role[role] if d["iteration"] == iteration)["value"]
                          for role in ("gan_real_t", "gan_fake_t"))
        assert not torch.equal(t_real, t_fake)
