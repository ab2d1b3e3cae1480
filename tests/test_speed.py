"""Issue 24's speed changes compute what the plain code computes: --compile (regional torch.compile) against eager,
the fused AdamW kernel against torch's default, the foreach EMA against a per-parameter loop. Timings are measured
in benchmarks/gpu_check.py, never asserted here."""
import copy
import functools

import pytest
import torch

import dmd2
import edm_net

ARCH = dict(img_resolution=8, img_channels=3, label_dim=4, model_type="DhariwalUNet", model_channels=16,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)


def tiny_distiller(**overrides):
    torch.manual_seed(0)
    teacher = edm_net.EDMPrecond(**ARCH).eval()
    cfg = dmd2.Config(**{**dmd2.PRESETS["shapes"], "resolution": 8, "num_classes": 4, "batch_size": 4,
                         "dfake_gen_update_ratio": 2, "warmup_steps": 0, **overrides})
    return dmd2.Distiller(cfg, teacher, (3, 8, 8))


def iterate(distiller, n):
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    logs = [distiller.train_step((images, torch.arange(4))) for _ in range(n)]
    weights = {f"{name}.{k}": v.detach().clone() for name in ("generator", "fake_score", "head", "ema")
               for k, v in getattr(distiller, name).state_dict().items()}
    return logs, weights


def assert_close(a, b, tol):
    (logs_a, weights_a), (logs_b, weights_b) = a, b
    for la, lb in zip(logs_a, logs_b):
        assert la.keys() == lb.keys()
        for key in la:
            assert abs(la[key] - lb[key]) <= tol * max(1.0, abs(la[key])), key
    assert weights_a.keys() == weights_b.keys()
    worst = max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a)
    assert worst <= tol, worst


def compiled_against_eager(backend):
    torch._dynamo.reset()
    eager = iterate(tiny_distiller(), 3)  # generator turn, critic turn, generator turn: forward and backward of all
    distiller = tiny_distiller()
    dmd2.compile_networks(distiller.real_score, distiller.fake_score, distiller.generator, backend=backend)
    compiled = iterate(distiller, 3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled graphs ran, not eager code
    assert_close(eager, compiled, 1e-5)
    assert set(distiller.generator.state_dict()) == set(tiny_distiller().generator.state_dict())  # names unchanged


def test_compiled_iteration_equals_eager():
    """Dynamo's capture and AOT autograd's forward/backward graphs (backend aot_eager): every block traced whole."""
    compiled_against_eager("aot_eager")


@pytest.mark.slow
def test_inductor_compiled_iteration_equals_eager():
    """The generated kernels themselves (inductor, the default backend; ~3 minutes of C++ compilation on CPU)."""
    compiled_against_eager("inductor")


def test_fused_adamw_equals_the_default_kernel(monkeypatch):
    """On CUDA make_optimizer fuses AdamW into one kernel; its weights after six iterations equal the default's."""
    default = iterate(tiny_distiller(ema_decay=0.9), 6)
    assert not tiny_distiller().opt_g.defaults["fused"]  # CPU parameters: torch's default kernel
    monkeypatch.setattr(dmd2, "make_optimizer", functools.partial(dmd2.make_optimizer, fused=True))
    fused_distiller = tiny_distiller(ema_decay=0.9)
    assert fused_distiller.opt_g.defaults["fused"] and fused_distiller.opt_d.defaults["fused"]
    assert_close(default, iterate(fused_distiller, 6), 1e-6)


def test_foreach_ema_equals_the_per_parameter_update():
    distiller = tiny_distiller(ema_decay=0.9)
    iterate(distiller, 2)
    with torch.no_grad():
        for p in distiller.generator.parameters():  # EMA and generator apart, so the update moves something
            p.add_(torch.randn_like(p))
    expected = copy.deepcopy(distiller.ema)
    with torch.no_grad():
        for p_ema, p in zip(expected.parameters(), distiller.generator.parameters()):
            p_ema.copy_(p_ema + (1 - 0.9) * (p - p_ema))
    distiller.update_ema()
    for (name, a), b in zip(distiller.ema.named_parameters(), expected.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
