"""Scaling out on CPU: 8 devices in one process, and two processes joined by jax.distributed;
the start-up checks (joining the processes, a batch that divides across the devices).

JAX fixes the device count at import, so each run is a fresh interpreter (tests/parallel_worker.py)
with XLA_FLAGS=--xla_force_host_platform_device_count=N. Tolerances: float32 runs on different
meshes differ only in the order of the gradient all-reduce sums: losses to 1e-5 relative,
params to 5e-5 absolute (weights are O(0.02-1); Adam's first steps move them by ~lr=3e-3).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxgpt import parallel, prepare
from jaxgpt import tokenizer as tokenizers
from jaxgpt.errors import UserError
from tests.conftest import byte_encoding, synthetic_text, tiny, xla_flags

WORKER = Path(__file__).with_name("parallel_worker.py")
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A char text and BPE bins of it (byte-level ids: the worker's vocab_size=320 covers them)."""
    d = tmp_path_factory.mktemp("corpus")
    text = d / "input.txt"
    text.write_text(synthetic_text(20000))
    # byte-level ids (< 257) whatever tiktoken has cached on this machine
    prepare.prepare_bpe(text, d / "bins", tokenizer=tokenizers.BPETokenizer(byte_encoding()))
    return text, d / "bins"


@pytest.fixture(scope="module")
def workers(corpus, tmp_path_factory):
    """Every worker of this module, started at once: the two processes spend part of their time
    waiting on each other, and the other runs compile meanwhile."""
    text, bins = corpus
    d = tmp_path_factory.mktemp("runs")
    port = _free_port()
    procs = {"mesh": _start(d / "mesh.log", 8, "mesh", d / "mesh.json", text, bins),
             "ref": _start(d / "ref.log", 4, "train", d / "ref", text, bins)}
    for i in range(2):
        procs[f"p{i}"] = _start(d / f"p{i}.log", 2, "train", d / "multi", text, bins,
                                JAXGPT_COORDINATOR=f"127.0.0.1:{port}",
                                JAXGPT_NUM_PROCESSES="2", JAXGPT_PROCESS_ID=str(i))
    yield d, procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXGPT_")
           or k == "JAXGPT_COMPILATION_CACHE"}
    return dict(env, XLA_FLAGS=xla_flags(devices),
                JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **extra)


def _start(log: Path, devices, *args, **env):
    """The worker in a fresh interpreter with `devices` CPU devices; output to `log` (a file,
    not a pipe: several run at once and nobody reads a pipe until they finish)."""
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], cwd=ROOT,
                                env=_env(devices, **env), stdout=out, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def _finish(proc):
    proc.wait(timeout=TIMEOUT)
    assert proc.returncode == 0, proc.log.read_text()[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_8_devices_data_parallel_and_fsdp_match_one_device(workers):
    d, procs = workers
    _finish(procs["mesh"])
    result = json.loads((d / "mesh.json").read_text())
    for path in ("device", "host"):  # batches drawn on the device | loaded on the host
        runs = result[path]
        ref = runs["1"]
        for name, run in runs.items():
            np.testing.assert_allclose(run["losses"], ref["losses"], rtol=1e-5, err_msg=name)
            for k, v in ref["params"].items():
                np.testing.assert_allclose(run["params"][k], v, atol=5e-5, err_msg=f"{name} {k}")
            assert run["kept_shardings"], f"{path} {name}: the step changed the state's shardings"
        # FSDP really splits the large matrices, in the params and in Adam's mu and nu
        assert runs["dp4_fsdp2"]["fsdp_params"] >= 4
        assert runs["dp4_fsdp2"]["fsdp_opt_state"] == 2 * runs["dp4_fsdp2"]["fsdp_params"]
        assert ref["fsdp_params"] == 0
    assert result["batch_error"] == ("config.batch_size=6 does not divide across 8 data-parallel "
                                     "devices: use a multiple of 8")


def _metrics(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_match_one_process(workers):
    """2 processes x 2 CPU devices over jax.distributed (gloo) = 1 process x 4 devices, both
    on a data 2 x fsdp 2 mesh."""
    tmp_path, procs = workers
    for name in ("p0", "p1", "ref"):
        _finish(procs[name])
    # replicated char data | per-process BPE rows, the val loss on the fixed val set
    for path in ("device", "host"):
        # one shared workdir, as on a pod: process 0 alone writes metrics.jsonl, so no event
        # appears twice
        multi, single = (_metrics(tmp_path / d / path / "metrics.jsonl") for d in ("multi", "ref"))
        assert [m["step"] for m in multi] == [m["step"] for m in single]
        for m, s in zip(multi, single):
            for k in ("loss", "train_loss", "val_loss", "grad_norm"):
                if k in s:
                    np.testing.assert_allclose(m[k], s[k], rtol=1e-5, err_msg=f"{path} {k}")


def test_initialize_distributed(monkeypatch):
    for k in ("JAXGPT_COORDINATOR", "JAXGPT_NUM_PROCESSES", "JAXGPT_PROCESS_ID",
              "JAXGPT_DISTRIBUTED"):
        monkeypatch.delenv(k, raising=False)
    assert parallel.initialize_distributed() is False  # single process: nothing to join
    assert parallel.initialize_distributed("127.0.0.1:1234", 1, 0) is False
    with pytest.raises(UserError, match="num_processes"):
        parallel.initialize_distributed("127.0.0.1:1234")
    monkeypatch.setenv("JAXGPT_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.setenv("JAXGPT_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAXGPT_PROCESS_ID", "2")
    with pytest.raises(UserError, match="process_id"):
        parallel.initialize_distributed()


def test_batch_must_divide_across_data_parallel_devices():
    mesh = parallel.make_mesh(tiny())
    parallel.check_batch(tiny(batch_size=3), mesh)  # 1 device divides anything
    fake = type("M", (), {"shape": {"data": 4, "fsdp": 2}})()
    with pytest.raises(UserError, match="batch_size=12 does not divide across 8"):
        parallel.check_batch(tiny(batch_size=12), fake)
