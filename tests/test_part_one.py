"""Part I of dmd2.py (the method) is a unit: cut at the PART II banner it imports and trains on its own, and it uses
no name that dmd2.py defines after it."""
import ast
import inspect
import os
import shutil
import subprocess
import sys

import torch

import dmd2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANNER = "# " + "=" * 112 + "\n# PART II"


def part_one_source():
    with open(os.path.join(ROOT, "dmd2.py")) as f:
        source = f.read()
    assert BANNER in source
    return source, source[:source.index(BANNER)]


ARCH = dict(img_resolution=8, img_channels=3, label_dim=4, model_type="DhariwalUNet", model_channels=16,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)


def three_iterations(module, out=None):
    """Three TTUR iterations (one generator turn, GAN on) of a tiny EDMPrecond teacher; losses and weights."""
    import edm_net
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = edm_net.EDMPrecond(**ARCH).eval()
    cfg = module.Config(**{**module.PRESETS["shapes"], "resolution": 8, "num_classes": 4, "batch_size": 4,
                           "warmup_steps": 0, "dfake_gen_update_ratio": 3, "ema_decay": 0.0})
    distiller = module.Distiller(cfg, teacher, (3, 8, 8))
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    logs = [distiller.train_step((images, torch.arange(4))) for _ in range(3)]
    weights = {f"{name}.{k}": v for name in ("generator", "fake_score", "head")
               for k, v in getattr(distiller, name).state_dict().items()}
    return logs, weights


def test_part_one_lifts_out_and_trains_like_dmd2(tmp_path):
    _, part_one = part_one_source()
    (tmp_path / "method.py").write_text(part_one)
    shutil.copy(os.path.join(ROOT, "edm_net.py"), tmp_path / "edm_net.py")
    (tmp_path / "lifted.py").write_text(
        "import importlib.util, sys\n"
        "import torch\n"
        "assert importlib.util.find_spec('dmd2') is None, 'dmd2 must not be importable here'\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import method\n"
        f"ARCH = {ARCH!r}\n"
        + inspect.getsource(three_iterations) +
        "torch.save(three_iterations(method), 'result.pt')\n")
    done = subprocess.run([sys.executable, "-I", "lifted.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)  # -I: no PYTHONPATH, no current folder on sys.path
    assert done.returncode == 0, done.stderr[-3000:]
    alone_logs, alone_weights = torch.load(tmp_path / "result.pt", weights_only=True)
    logs, weights = three_iterations(dmd2)
    assert alone_logs == logs and "loss_gan_g" in logs[0] and "loss_gan_d" in logs[2]
    assert weights.keys() == alone_weights.keys()
    assert all(torch.equal(weights[k], alone_weights[k]) for k in weights)


def test_part_one_names_nothing_defined_after_it():
    source, part_one = part_one_source()
    last_line = part_one.count("\n")
    tree = ast.parse(source)
    later = {}
    for node in tree.body:
        if node.lineno > last_line:
            targets = [node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
                [t for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            for target in targets:
                later.setdefault(getattr(target, "name", getattr(target, "id", None)), node.lineno)
    defined_early = {getattr(n, "name", None) for n in tree.body if n.lineno <= last_line}
    used = []
    for top in (n for n in tree.body if n.lineno <= last_line):
        local = {a.arg for n in ast.walk(top) if isinstance(n, ast.arguments)
                 for a in [*n.posonlyargs, *n.args, *n.kwonlyargs, n.vararg, n.kwarg] if a is not None}
        local |= {n.id for n in ast.walk(top) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        local |= {n.name for n in ast.walk(top) if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n is not top}
        used += [(n.id, n.lineno) for n in ast.walk(top) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
                 and n.id not in local]
    offending = sorted({(name, line) for name, line in used if name in later and name not in defined_early})
    assert not offending, f"Part I uses names defined after it: {offending}"
    assert last_line <= 950, f"Part I is lines 1-{last_line} of dmd2.py (at most 950)"
