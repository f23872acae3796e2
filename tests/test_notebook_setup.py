"""The notebook's first cell in a fresh runtime, as Colab gives one: jaxgpt not installed, the
working folder on sys.path, jaxgpt's dependencies already there (Colab has jax; here they come
from this environment, so nothing is downloaded).

Each test makes a venv without jaxgpt whose sys.path reaches this environment's packages through
a folder of links (jaxgpt's own entries left out), registers it as a Jupyter kernel and runs the
notebook's first cells in it from a "content" folder, as Colab does. pip installs with
`--no-deps --no-build-isolation --no-index` (set through pip's environment variables): offline,
and only jaxgpt itself.
"""

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "docs" / "lets_build_gpt.py"
OWN = ("jaxgpt", "__editable__", "configs", "_jaxgpt")  # jaxgpt's entries in site-packages


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A venv without jaxgpt that sees this environment's other packages, and its kernel."""
    base = tmp_path_factory.mktemp("fresh")
    overlay = base / "overlay"  # this site-packages, less jaxgpt, as links
    overlay.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(OWN) and entry.suffix != ".pth":
            (overlay / entry.name).symlink_to(entry)
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([python, "-c", where], capture_output=True, text=True,
                          check=True).stdout.strip()
    (Path(site) / "overlay.pth").write_text(f"{overlay}\n")
    kernels = base / "jupyter" / "kernels" / "fresh"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fresh", "language": "python"}))
    return {"base": base, "python": python, "site": Path(site), "jupyter": base / "jupyter"}


@pytest.fixture()
def runtime(fresh, tmp_path, monkeypatch):
    """A clean runtime: the fresh venv with nothing installed yet, an empty working folder."""
    for entry in fresh["site"].iterdir():  # what an earlier test installed
        if entry.name.startswith(OWN):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    content = tmp_path / "content"
    content.mkdir()
    for name in ("PYTHONPATH", "JAXGPT_SOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JUPYTER_PATH", str(fresh["jupyter"]))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PIP_NO_DEPS", "1")
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")  # pip's spelling of --no-build-isolation
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    return {**fresh, "content": content, "tmp": tmp_path}


def checkout_copy(dest: Path) -> Path:
    """What a clone holds, as far as installing it goes."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    dest.mkdir(parents=True)
    for name in ("jaxgpt", "configs"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    return dest


def run_first_cells(runtime, n_code=1, before=""):
    """The notebook's first n_code code cells (after `before`, a cell of its own), run in the
    fresh kernel from the content folder: the outputs of each cell as text."""
    cells = [c for c in jupytext.read(SOURCE).cells if c.cell_type == "code"][:n_code]
    if before:
        cells = [nbformat.v4.new_code_cell(before), *cells]
    nb = nbformat.v4.new_notebook(cells=cells)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="fresh", allow_errors=True,
                                     resources={"metadata": {"path": str(runtime["content"])}})
    client.execute()
    texts = []
    for cell in nb.cells:
        text = ""
        for o in cell.outputs:
            text += o.get("text", "")
            if o.output_type == "error":
                text += "ERROR " + "\n".join(o.traceback)
        texts.append(text)
    return texts


NAMESPACE_PROBE = """import importlib.util
spec = importlib.util.find_spec("jaxgpt")
print("jaxgpt:", "not found" if spec is None else spec.origin or "a namespace package")"""


def assert_installed(runtime, out):
    assert "ERROR" not in out, out
    assert f"jaxgpt from {runtime['site'] / 'jaxgpt'};" in out, out


def test_colab_clone_in_the_working_folder(runtime):
    """Colab: `!git clone URL /content/jaxgpt`; /content is the working folder and on sys.path,
    so the clone's folder imports as a namespace package until jaxgpt is installed."""
    checkout_copy(runtime["content"] / "jaxgpt")
    probe, setup, imports = run_first_cells(runtime, n_code=2, before=NAMESPACE_PROBE)
    assert probe.strip() == "jaxgpt: a namespace package", probe  # the clone's folder
    assert f"pip install '{runtime['content'] / 'jaxgpt'}[plot]'" in setup, setup
    assert_installed(runtime, setup)
    assert "ERROR" not in imports and "jax " in imports, imports  # the next cell's imports work


def test_clone_two_folders_down(runtime):
    checkout_copy(runtime["content"] / "projects" / "jaxgpt")
    (out,) = run_first_cells(runtime)
    assert_installed(runtime, out)


def test_git_url(runtime, monkeypatch):
    if shutil.which("git") is None:
        pytest.skip("no git")
    repo = checkout_copy(runtime["tmp"] / "repo")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "jaxgpt"], check=True)
    monkeypatch.setenv("JAXGPT_SOURCE", f"git+file://{repo}")
    (out,) = run_first_cells(runtime)
    assert f"jaxgpt[plot] @ git+file://{repo}" in out, out
    assert_installed(runtime, out)


def test_wheel_path(runtime, monkeypatch):
    src = checkout_copy(runtime["tmp"] / "src")
    dist = runtime["tmp"] / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(src)], check=True)
    (wheel,) = dist.glob("jaxgpt-*.whl")
    monkeypatch.setenv("JAXGPT_SOURCE", str(wheel))
    (out,) = run_first_cells(runtime)
    assert f"jaxgpt[plot] @ {wheel.as_uri()}" in out, out  # a path with extras: a file:// URL
    assert_installed(runtime, out)


def one_line_error(out):
    """The cell's error: one line, no traceback (after at most the `pip install ...` line)."""
    printed, _, error = out.partition("ERROR ")
    assert printed == "" or re.fullmatch(r"pip install '[^\n]+'\n", printed), out
    assert error.startswith("setup: ") and "\n" not in error.strip(), out
    assert "Traceback" not in out and "\x1b" not in out, out  # no traceback, no colour codes
    return error


def test_nothing_found_says_what_to_run(runtime):
    (out,) = run_first_cells(runtime)
    one_line_error(out)
    assert "!git clone REPOSITORY_URL /content/jaxgpt" in out, out
    assert "%env JAXGPT_SOURCE=" in out, out


def test_a_failing_pip_is_one_line(runtime, monkeypatch):
    monkeypatch.setenv("JAXGPT_SOURCE", f"git+file://{runtime['tmp'] / 'no-such-repo'}")
    (out,) = run_first_cells(runtime)
    one_line_error(out)
    assert "pip could not install" in out, out


def test_a_missing_path_is_one_line(runtime, monkeypatch):
    monkeypatch.setenv("JAXGPT_SOURCE", str(runtime["tmp"] / "jaxgpt-0.1.0-py3-none-any.whl"))
    (out,) = run_first_cells(runtime)
    one_line_error(out)
    assert "no such folder or file" in out, out
