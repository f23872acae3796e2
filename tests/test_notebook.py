"""The lecture notebook never rots: its .ipynb and .py halves agree, and every cell runs.

The run uses JAXGPT_NOTEBOOK_SMALL=1 (small models, few steps) and the real text from
JAXGPT_SHAKESPEARE when set (.ci/run sets it), else a generated text: no network needed.
"""

import importlib
import os
import re
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

from tests.conftest import SHAKESPEARE  # noqa: E402  after the importorskips

DOCS = Path(__file__).resolve().parents[1] / "docs"
SOURCE, NOTEBOOK = DOCS / "lets_build_gpt.py", DOCS / "lets_build_gpt.ipynb"


def cells(path):
    return [(c.cell_type, c.source.strip()) for c in jupytext.read(path).cells]


def test_ipynb_and_py_are_in_sync():
    """Edit either half, then `jupytext --sync docs/lets_build_gpt.py` to update the other."""
    py, ipynb = cells(SOURCE), cells(NOTEBOOK)
    assert len(py) == len(ipynb), "cell counts differ: run jupytext --sync docs/lets_build_gpt.py"
    for i, (a, b) in enumerate(zip(py, ipynb)):
        assert a == b, f"cell {i} differs: run jupytext --sync docs/lets_build_gpt.py"


def test_committed_notebook_has_outputs_from_a_full_run():
    nb = jupytext.read(NOTEBOOK)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "re-run it top to bottom and save"
    assert all(o.get("output_type") != "error" for c in code for o in c.get("outputs", []))
    texts = "".join(o.get("text", "") for c in code for o in c.get("outputs", []))
    assert "trained 2000 steps" in texts, "saved outputs must come from the documented settings"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))


def test_every_cell_runs(tmp_path, monkeypatch):
    if SHAKESPEARE:
        text = SHAKESPEARE
    else:
        from tests.conftest import synthetic_text
        text = tmp_path / "input.txt"
        text.write_text(synthetic_text(50_000) + "\nhii there\n")  # the lecture's example
    monkeypatch.setenv("JAXGPT_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("JAXGPT_SHAKESPEARE", str(text))
    monkeypatch.setenv("HOME", str(tmp_path))  # nothing written outside tmp_path
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(DOCS.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    nb = jupytext.read(SOURCE)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(DOCS)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    outputs = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "trained 30 steps" in outputs


def test_lecture_table_names_code_and_tests_that_exist():
    """docs/lecture.md, the notebook and README cite `module.name` and `test_x.py::test_y`:
    all exist."""
    text = ((DOCS / "lecture.md").read_text() + SOURCE.read_text()
            + (DOCS.parent / "README.md").read_text())
    tests = set(re.findall(r"(test_\w+\.py)::(test_\w+)", text))
    assert len(tests) > 20
    for file, name in tests:
        assert f"def {name}(" in (DOCS.parent / "tests" / file).read_text(), f"{file}::{name}"
    modules = ("model|data|datasets|batches|tokenizer|step|training|hooks|optim|"
               "sampling|plot|bench|checkpoint|pretrained|convert|parallel")
    code = set(re.findall(rf"`(?:jaxgpt\.)?({modules})\.(\w+)(?![\w(])", text))  # no calls
    assert len(code) > 15
    files = {"py", "json", "jsonl", "bin", "txt", "png", "pt", "pkl", "safetensors"}
    for module, name in code - {(m, n) for m, n in code if n in files}:  # model.safetensors
        assert hasattr(importlib.import_module(f"jaxgpt.{module}"), name), f"{module}.{name}"
