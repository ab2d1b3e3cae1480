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
