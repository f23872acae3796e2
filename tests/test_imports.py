"""jaxgpt's import graph, read from the source with `ast`: no cycle, and no jaxgpt module
imported inside a function (where a cycle would hide), in the package and in the command lines
(train.py, sample.py). Optional third-party packages (torch, wandb, matplotlib,
huggingface_hub, ...) may still be imported lazily."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxgpt"
SCRIPTS = ("train.py", "sample.py")


def jaxgpt_imports(node) -> set[str]:
    """The jaxgpt modules an Import / ImportFrom node names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from jaxgpt import step` names a module; `from jaxgpt.model import GPT` a module too
        names = ([f"{node.module}.{a.name}" for a in node.names] if node.module == "jaxgpt"
                 else [node.module])
    else:
        return set()
    return {n.split(".")[1] for n in names if n.startswith("jaxgpt.")}


def module_imports(path) -> tuple[set[str], set[str]]:
    """(jaxgpt modules a file imports at the top level, those it imports inside a def/class)."""
    tree = ast.parse(Path(path).read_text(), str(path))
    top, nested = set(), set()
    for stmt in tree.body:
        for node in ast.walk(stmt):
            names = jaxgpt_imports(node)
            inside = isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            (nested if inside else top).update(names)
    return top, nested


def graph():
    """{module: (modules imported at the top level, modules imported inside a def/class)}."""
    return {path.stem: module_imports(path) for path in sorted(PACKAGE.glob("*.py"))}


def find_cycle(edges: dict) -> list[str] | None:
    """A cycle of the directed graph as a list of nodes, or None (depth-first search)."""
    state = {}  # node -> "open" while on the stack, "done" after

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_the_graph_reader_sees_imports_and_cycles():
    """The checks below can fail: the reader finds a function-level import and a cycle."""
    tree = ast.parse("from jaxgpt import a, b\nimport jaxgpt.c\n"
                     "def f():\n    from jaxgpt.d import x\n")
    found = [jaxgpt_imports(n) for n in ast.walk(tree) if jaxgpt_imports(n)]
    assert found == [{"a", "b"}, {"c"}, {"d"}]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_function_level_import_of_a_jaxgpt_module():
    nested = {m: sorted(n) for m, (_, n) in graph().items() if n}
    assert not nested, f"import these at the top of the module instead: {nested}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_command_lines_import_jaxgpt_at_the_top(script):
    top, nested = module_imports(ROOT / script)
    assert {"cli"} <= top <= set(graph()), top  # jaxgpt modules that exist, the CLI's among them
    assert not nested, f"{script}: import these at the top instead: {sorted(nested)}"


def test_the_import_graph_has_no_cycle():
    edges = {m: top - {m} for m, (top, _) in graph().items()}
    assert set(edges) >= {"model", "step", "batches", "checkpoint", "pretrained", "training"}
    cycle = find_cycle(edges)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_compiled_side_imports_only_the_model_optimizer_and_mesh():
    """step.py is what checkpoint and pretrained build on: it must not import the loop."""
    top, _ = graph()["step"]
    assert top <= {"model", "dtype", "optim", "parallel", "errors"}, top
