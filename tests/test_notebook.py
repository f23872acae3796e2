"""The lecture notebook never rots: its .ipynb and .py halves agree, and every cell runs.

The run uses JAXGPT_NOTEBOOK_SMALL=1 (small models, few steps) and the real text from
JAXGPT_SHAKESPEARE when set (.ci/run sets it), else a generated text: no network needed.
"""

import importlib
import math
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
    images = sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
    assert images >= 4  # the averages, the story's curves, the heat maps, the recipes' curves
    assert "same logits" in texts  # your modules == jaxgpt.model.GPT (attention="heads")


def test_the_notebook_writes_the_lectures_modules_itself():
    source = SOURCE.read_text()
    for name in ("BigramLanguageModel", "Head", "MultiHeadAttention", "FeedForward", "Block",
                 "GPTLanguageModel", "CausalSelfAttention"):
        assert re.search(rf"^class {name}\(nn\.Module\):", source, re.M), name
    for n in (1, 2, 3, 4):
        assert f"### EX{n}:" in source and "Try it first" in source


def test_solutions_start_hidden_in_jupyter_and_colab():
    """Jupyter hides a cell's code with jupyter.source_hidden, Colab with cellView "form" (the
    cell's `# @title` line is what it shows)."""
    solutions = [c for c in jupytext.read(NOTEBOOK).cells if "@title EX" in c.source]
    assert len(solutions) == 4
    for c in solutions:
        assert c.metadata.get("cellView") == "form", c.source[:40]
        assert c.metadata.get("jupyter", {}).get("source_hidden") is True, c.source[:40]
        assert c.source.startswith("# @title EX"), c.source[:40]


# a figure in prose is either attributed (the lecture's, nanoGPT's, a paper's) or a value the
# notebook computed: then its outputs hold it (to the digits the prose gives) or a recipe sets it
ATTRIBUTED = re.compile(r"lecture|nanoGPT|reports|OpenAI|GPT-3|paper|Su et al", re.I)


def prose_numbers(markdown: str):
    """(number, sentence) for each decimal number outside code spans in a markdown text."""
    text = re.sub(r"`[^`]*`", "", markdown)
    for sentence in re.split(r"(?<=[.!?:])\s+|\n(?=[-|#])", text):
        for number in re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", sentence):
            yield number, sentence


def recipe_values() -> set[float]:
    from configs import addition, lecture, lecture_cpu, shakespeare_cpu
    values = set()
    for recipe in (addition, lecture, lecture_cpu, shakespeare_cpu):
        values |= {v for v in recipe.get_config().to_dict().values() if isinstance(v, float)}
    return values


def test_no_figure_in_the_prose_contradicts_the_outputs():
    nb = jupytext.read(NOTEBOOK)
    outputs = " ".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
                       for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    printed = [float(x) for x in re.findall(r"-?\d+\.\d+", outputs)]
    recipes = recipe_values()
    for cell in (c for c in nb.cells if c.cell_type == "markdown"):
        for number, sentence in prose_numbers(cell.source):
            if ATTRIBUTED.search(sentence):
                continue
            digits = len(number.split(".")[1])
            value = float(number)
            assert value in recipes or any(math.isclose(round(p, digits), value)
                                           for p in printed), \
                f"{number!r} in {sentence.strip()[:120]!r}: not in the outputs nor a recipe's"
        assert not re.search(r"\b\d+(\.\d+)? ?(s|seconds|minutes)\b", cell.source), \
            "timings belong in computed outputs, not in the prose"


def test_run_times_stated_up_front_are_the_saved_runs():
    """The intro's table of run times (minutes on the CPU) against the last cell's printed
    seconds per part, from the same run as the saved outputs."""
    nb = jupytext.read(NOTEBOOK)
    intro = next(c.source for c in nb.cells if "How long it takes" in c.source)
    rows = dict(re.findall(r"^\| (.+?) \| (.+?) \|$", intro, re.M))
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    printed = {name.strip(): float(seconds) for seconds, name in re.findall(
        r"^\s*([\d.]+) s  (.+)$", "".join(o.get("text", "") for o in last.outputs), re.M)}
    assert "in all (every cell)" in rows and "in all (every cell)" in printed
    for part, seconds in printed.items():
        assert part in rows, f"{part!r} is missing from the table up front"
        stated = rows[part]
        if stated == "under a minute":
            assert seconds < 60, (part, seconds)
        else:
            minutes = float(re.fullmatch(r"(\d+) min", stated).group(1))
            assert abs(minutes - seconds / 60) <= max(1, 0.2 * seconds / 60), \
                (part, stated, seconds)


def test_prose_numbers_finds_what_it_checks():
    found = dict(prose_numbers("A val loss of 1.48 `x = 0.5` here. Then 2.07: done"))
    assert set(found) == {"1.48", "2.07"}


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
    root = DOCS.parent
    paths = set(re.findall(r"(?<![\w/.])((?:docs|configs|jaxgpt|tests)/[\w/]+\.(?:py|md|ipynb))",
                           text))
    assert len(paths) > 10
    for path in paths:
        assert (root / path).is_file(), path
    for doc in ("lecture.md", "lets_build_gpt.py"):  # links between the docs
        for link in re.findall(r"\]\(([\w./]+\.(?:md|ipynb|py))\)", (DOCS / doc).read_text()):
            assert (DOCS / link).is_file(), f"{doc} links {link}"
