"""Start-up as JAX users expect: JAX's distributed variables, a TPU VM slice joining without a
flag, the persistent compilation cache (and the line saying it was used), out of memory as one
line, and libtpu's presence changing nothing on a CPU."""

import os
import subprocess
import sys

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from jaxgpt import compile_cache, parallel, training
from jaxgpt.errors import UserError
from tests.conftest import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAXGPT_COORDINATOR",
            "JAXGPT_NUM_PROCESSES", "JAXGPT_PROCESS_ID", "JAXGPT_DISTRIBUTED",
            "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def joined(monkeypatch):
    """jax.distributed.initialize replaced by a recorder: [(args, kwargs)] of each call."""
    calls = []
    for name in JAX_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    return calls


def test_jax_own_variables_start_a_multi_process_run(joined, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert parallel.initialize_distributed()
    assert joined == [(("10.0.0.2:1234", 4, 3), {})]
    monkeypatch.setenv("JAXGPT_PROCESS_ID", "1")  # jaxgpt's own name wins over JAX's
    parallel.initialize_distributed()
    assert joined[-1] == (("10.0.0.2:1234", 4, 1), {})


def test_a_multi_host_tpu_slice_joins_without_a_flag(joined, monkeypatch):
    assert not parallel.initialize_distributed()  # this CPU machine: single process, no call
    assert joined == []
    monkeypatch.setattr(parallel, "tpu_chips_here", lambda: True)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-n-0,t1v-n-1,t1v-n-2,t1v-n-3")
    assert parallel.tpu_slice_workers() == 4
    assert parallel.initialize_distributed()
    assert joined == [((), {})]  # JAX discovers the slice itself
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # one host: nothing to join
    assert not parallel.initialize_distributed() and len(joined) == 1


def test_the_cache_directory(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    home = os.path.expanduser("~")
    assert compile_cache.directory("runs/x") == os.path.join(home, ".cache/jaxgpt/jax_cache")
    assert compile_cache.directory("gs://b/runs/gpt2") == "gs://b/runs/jax_cache"
    monkeypatch.setenv(compile_cache.ENV, "/tmp/c")
    assert compile_cache.directory("gs://b/runs/gpt2") == "/tmp/c"
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.directory("runs/x") is None
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/tmp/jax")  # JAX's own variable first
    assert compile_cache.directory("runs/x") == "/tmp/jax"


def test_a_second_run_loads_the_training_step_from_the_cache(tmp_path, text_file, monkeypatch,
                                                              capsys):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cache"))
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # tiny programs too
    jax_cache.reset_cache()
    try:
        config = tiny(text_file, max_iters=2, eval_interval=2, steps_per_call=2)
        training.train(config, str(tmp_path / "a"))
        first = capsys.readouterr().out
        training.train(config, str(tmp_path / "b"))  # a fresh run of the same recipe
        second = capsys.readouterr().out
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)
        jax.config.update("jax_compilation_cache_dir", None)
        jax_cache.reset_cache()
    assert "compiled the training step in" in first
    assert "loaded the compiled training step from the compilation cache in" in second
    assert any((tmp_path / "cache").iterdir())


def test_out_of_memory_is_one_line_naming_what_to_change(text_file, tmp_path, monkeypatch):
    def exhausted(*args):  # the loop, where a compile or a step runs out of memory
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                         "allocate 18.2G\nmore lines of XLA's report")

    monkeypatch.setattr(training.Loop, "run", exhausted)
    with pytest.raises(UserError) as e:
        training.train(tiny(text_file, batch_size=8, gradient_accumulation_steps=5),
                       str(tmp_path / "w"))
    message = str(e.value)
    assert "\n" not in message
    assert "--config.batch_size=4 --config.gradient_accumulation_steps=10" in message
    assert "--config.remat=True" in message and "--config.mesh.fsdp" in message
    assert "python -m jaxgpt.aot" in message and "--fit" in message


def test_libtpu_installed_changes_nothing_a_cpu_program_prints():
    """With libtpu importable, JAX would try the TPU backend first and libtpu print warnings
    about TPU workers; jaxgpt picks the CPU up front on a machine with no accelerator."""
    pytest.importorskip("libtpu")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = "import jaxgpt, jax; print(jax.devices()[0].platform)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.stdout.strip() == "cpu" and run.stderr == "", run.stderr
    bare = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert "TPU" in bare.stderr  # what it prevents: JAX alone prints libtpu's warnings
