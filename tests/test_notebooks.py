"""The notebooks in notebooks/: each runs top to bottom with the quick setting (DMD2_NOTEBOOK_FAST=1, offline, a
fresh cache), and each is committed with the outputs of its full run. No test here asserts a wall-clock time: the
notebooks report theirs, and timings belong in benchmarks/."""
import glob
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
WALL_TIME = re.compile(r"notebook wall time: (\d+) s")


def stdout_of(nb):
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("name") == "stdout")


def test_the_five_walkthroughs_exist():
    names = [os.path.basename(p) for p in NOTEBOOKS]
    assert names == ["01_dmd_gradient.ipynb", "02_table3_one_step.ipynb", "03_table4_few_step.ipynb",
                     "04_imagenet64.ipynb", "05_sdxl.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_with_the_outputs_of_a_full_run(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{path}: not saved from one top-to-bottom run ({counts})"
    assert any(o.output_type == "display_data" for c in code for o in c.outputs), f"{path}: no figure saved"
    assert not any(o.output_type == "error" for c in code for o in c.outputs), f"{path}: committed with an error"
    text = stdout_of(nb)
    assert WALL_TIME.search(text), f"{path}: the full run's wall time is not reported"  # reported, never asserted
    assert "DMD2_NOTEBOOK_FAST" in nb.cells[1].source  # the quick setting is honoured
    assert "PLACEHOLDER" not in "".join(c.source for c in nb.cells)
    assert nb.cells[0].cell_type == "markdown" and "What the run showed" in nb.cells[-1].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_runs_top_to_bottom_quickly(path, tmp_path, monkeypatch):
    if "05_" in path:  # the SDXL walkthrough needs requirements-sdxl.txt, like every SDXL test
        for module in ("diffusers", "transformers", "peft"):
            pytest.importorskip(module, exc_type=ImportError)
    monkeypatch.setenv("DMD2_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("DMD2_NOTEBOOK_OUT", str(tmp_path / "runs"))
    monkeypatch.setenv("DMD2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no retries against an unreachable hub
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOK_DIR}}).execute()
    text = stdout_of(nb)
    assert WALL_TIME.search(text)
    if "01_" in path:
        assert "max |autograd * N" in text and "the teacher is frozen: True" in text  # its cells also assert
    if "04_" in path:
        assert "stand-ins used: teacher, generator, Inception and reference statistics" in text
        fid = float(re.search(r"FID ([\d.]+) over", text).group(1))
        assert fid > 0  # a random generator is far from the reference set


WALKTHROUGHS_WITH_SWEEP = ["02_table3_one_step.ipynb", "03_table4_few_step.ipynb"]


@pytest.mark.parametrize("name", ["01_dmd_gradient.ipynb", *WALKTHROUGHS_WITH_SWEEP, "04_imagenet64.ipynb",
                                  "05_sdxl.ipynb"])
def test_stored_outputs_carry_no_warnings(name):
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    streams = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "stream"]
    assert not [o.text for o in streams if o.name == "stderr"], f"{name}: stderr (warnings) in the stored outputs"
    assert "Warning" not in stdout_of(nb)
    assert "runtime" in nb.cells[0].source.lower() and "DMD2_NOTEBOOK_FAST" in nb.cells[0].source  # stated at the top


def test_the_stored_sweep_has_five_seeds_per_row_and_a_paired_test():
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(NOTEBOOK_DIR), "benchmarks"))
    import ablations
    for table in ablations.TABLES:
        _, rows = ablations.load(table)
        assert set(rows) == set(ablations.TABLES[table]["rows"])
        for row, runs in rows.items():
            assert len(runs) >= 5, f"{table} {row}: {len(runs)} seeds"
            assert all(r["final"]["iters"] == ablations.TABLES[table]["iters"] for r in runs)
    # the test: better in every seed AND beyond the paired t quantile; a single bad seed or a tiny t -> not separated
    assert ablations.paired_test([1, 2, 3, 4, 5], [2, 3, 4, 5, 7])[0] == "better"
    assert ablations.paired_test([1, 2, 3, 4, 5], [2, 3, 4, 5, 4.9])[0] == "not separated"
    assert ablations.paired_test([1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0])[0] == "not separated"  # < 5 seeds
    assert ablations.paired_test([0.9, 0.8, 0.85, 0.95, 0.9], 0.7, lower_is_better=False)[0] == "better"
