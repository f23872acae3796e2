"""Ahead-of-time compiling for TPU slices on this CPU (jaxgpt.aot): libtpu compiles train.py's
own calls for devices that are not there. The figures are checked against counts made here from
the model's parameter shapes, not against numbers copied from a run."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import gpt2
from jaxgpt import aot, datasets, parallel, tpus
from jaxgpt.errors import UserError
from jaxgpt.model import make_model
from tests.conftest import synthetic_text, tiny

pytest.importorskip("libtpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "input.txt"
    path.write_text(synthetic_text(20000))
    return path


def small(text, **overrides):
    """A model with every weight matrix >= FSDP_MIN_SIZE (so FSDP splits all of them)."""
    c = tiny(text, n_layer=1, n_head=4, n_embd=128, block_size=16, batch_size=16,
             steps_per_call=2, eval_iters=2)
    for k, v in overrides.items():
        c[k] = v
    return aot.for_tpu(c)


def param_shapes(config, vocab):
    model = make_model(config, vocab)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             np.zeros((1, config.block_size), np.int32)))["params"]


def expected_bytes(config, vocab, fsdp):
    """Per device, counted from the shapes: float32 params, large ones split fsdp ways (the
    ones FSDP leaves whole: biases, LayerNorms), and AdamW's two float32 moments of each."""
    total = 0
    for leaf in jax.tree.leaves(param_shapes(config, vocab)):
        n = math.prod(leaf.shape)
        total += 4 * n // (fsdp if n >= parallel.FSDP_MIN_SIZE else 1)
    return total, 2 * total


def test_accelerator_types_name_the_chips_they_have():
    """v4 / v5p names count TensorCores (2 per chip), v5e / v6e names count chips."""
    for name, chips, kind in (("v4-8", 4, "TPU v4"), ("v5p-8", 4, "TPU v5"),
                              ("v5litepod-8", 8, "TPU v5 lite"), ("v6e-8", 8, "TPU v6 lite"),
                              ("v5litepod-16", 16, "TPU v5 lite")):
        devices = tpus.devices(tpus.topology_name(name))
        assert len(devices) == chips, name
        assert devices[0].device_kind == kind, name
    # a multi-host slice: 16 chips of 4 hosts (4 chips each), all visible from this one CPU
    assert len({d.process_index for d in tpus.devices("v5e:4x4")}) == 4


@pytest.mark.parametrize("topology,fsdp", [("v4-8", 1), ("v5litepod-4", 4), ("v5p-8", 2),
                                           ("v6e-4", 1), ("v5litepod-16", 4)])
def test_memory_per_device_is_the_state_counted_from_the_shapes(text, topology, fsdp):
    config = small(text)
    config.mesh.fsdp = fsdp
    built, seconds, compiled = aot.compile_all(config, tpus.devices(tpus.topology_name(topology)),
                                               everything=False)
    r = aot.report(built, tpus.topology_name(topology), seconds, compiled)
    vocab = built.model.config.vocab_size
    params, moments = expected_bytes(config, vocab, fsdp)
    m = r["memory"]
    assert m["params"] == params
    assert moments <= m["opt_state"] <= moments + 64  # + the step counts
    # XLA's own figure for the program's arguments: the state, the replicated text splits
    # (DeviceBatches) and a few scalars, in TPU layouts (small arrays padded to whole tiles)
    dataset = datasets.load(config)
    state_and_data = params + m["opt_state"] + dataset.train.nbytes + dataset.val.nbytes
    assert state_and_data <= m["arguments"] <= 1.01 * state_and_data + 2**14
    assert m["total"] >= m["arguments"] and m["fits"]
    assert m["margin"] == tpus.chip(r["topology"]).hbm_bytes - m["total"]
    assert r["flops_per_step"]["xla"] > 0.9 * r["flops_per_step"]["analytic"]
    assert r["roofline"]["step_s"] > 0 and 0 < r["roofline"]["mfu_ceiling"] <= 1
    # data parallel: the gradients' all-reduce, which carries every weight at least once (in
    # bf16 or float32); FSDP: the weights gathered before use
    c = r["collectives"]
    if fsdp == 1:
        assert "all-gather" not in c and params / 2 <= c["all-reduce"]["bytes"] <= 2 * params
    else:
        assert c["all-gather"]["count"] > 0


def test_the_eval_call_and_the_sampler_compile_too(text):
    built, seconds, compiled = aot.compile_all(small(text), tpus.devices("v5e:2x2"))
    assert set(compiled) == {"train", "evaluate", "decode"}
    r = aot.report(built, "v5e:2x2", seconds, compiled)
    assert 0 < r["decode"]["total"] < r["memory"]["total"]
    assert r["evaluate"]["total"] > 0


def test_gpt2_xl_shape_does_not_fit_one_v5e_chip(tmp_path):
    """48 layers, 1600 wide, 25 heads: float32 params and AdamW's moments alone are 18.7 GB,
    over the chip's 16 GiB, so nothing needs compiling to say so."""
    xl = ["--config.n_layer=48", "--config.n_embd=1600", "--config.n_head=25"]
    run = subprocess.run(
        [sys.executable, "-m", "jaxgpt.aot", "--config", "configs/gpt2.py", "--topology",
         "v5litepod-1", *xl, "--config.batch_size=1", "--config.gradient_accumulation_steps=1",
         "--json", str(tmp_path / "xl.json")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
        timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == ""  # libtpu's warnings stay hidden
    config = gpt2.get_config()
    config.n_layer, config.n_embd, config.n_head = 48, 1600, 25
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(config, 50304)))
    assert 1.5e9 < n < 1.6e9
    m = json.loads((tmp_path / "xl.json").read_text())["memory"]
    assert m["params"] == 4 * n and 8 * n <= m["opt_state"] <= 8 * n + 64
    assert not m["fits"] and m["margin"] == 16 * 2**30 - m["total"] < 0
    assert "does not fit, margin -" in run.stdout
    assert f"{4 * n / 2**30:.2f} GiB" in run.stdout and f"{8 * n / 2**30:.2f} GiB" in run.stdout


def test_bad_inputs_are_one_line(text, monkeypatch):
    with pytest.raises(UserError, match="unknown; use a TPU VM accelerator type"):
        tpus.topology_name("v5litepod-7")
    devices = tpus.devices("v5e:2x2")
    with pytest.raises(UserError, match="does not divide across 4"):
        aot.build(small(text, batch_size=6), devices, lower=False)
    bad_mesh = small(text)
    bad_mesh.mesh.data, bad_mesh.mesh.fsdp = 2, 4
    with pytest.raises(UserError, match="must use all 4 devices"):
        aot.build(bad_mesh, devices, lower=False)
    monkeypatch.setattr(tpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"needs libtpu: pip install -e '.\[aot\]'"):
        tpus.devices("v5e:2x2")


def test_a_bad_topology_on_the_command_line_is_one_line():
    run = subprocess.run([sys.executable, "-m", "jaxgpt.aot", "--config", "configs/gpt2.py",
                          "--topology", "v9-8"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: --topology='v9-8'")


def test_largest_batch_search_finds_the_edge_in_a_few_compiles():
    for base, slope, limit, pad in ((100, 7, 1000, 0), (5000, 1, 5100, 0), (10, 100, 95, 0),
                                    (0, 3, 3000, 0), (2**33, 2**26, 16 * 2**30, 0),
                                    (2**30, 2**24, 16 * 2**30, 2**31)):
        def memory(b, base=base, slope=slope, pad=pad):
            # slightly super-linear, as with XLA; `pad`: small batches all cost the same
            return max(pad, base + slope * b + (b * b) // 1000)

        best, seen = aot.largest(memory, limit)
        truth = max((b for b in range(1, 10**5) if memory(b) <= limit), default=0)
        assert best == truth, (base, slope, limit)
        assert len(seen) <= 10  # compiles
        assert max(seen) < 8 * truth + 8  # no wild extrapolation from flat small batches


REFUSED = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total "
           "memory required for HLO temporaries (23.20G) exceeds available HBM (15.75G). HLO "
           "module: jit_train_steps.")  # what libtpu said for GPT-2 124M, batch 112 on a v5e


def test_a_batch_the_compiler_refuses_counts_as_not_fitting(text, monkeypatch):
    """XLA's own HBM check refuses some candidates at compile time (it keeps part of the HBM
    for itself): --fit counts them as not fitting and goes on, other errors still raise."""
    hbm = tpus.chip("v5e:1x1").hbm_bytes
    assert aot.refused_bytes(jax.errors.JaxRuntimeError(REFUSED), hbm) == int(23.20 * 2**30)
    assert aot.refused_bytes(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory"),
                             hbm) == hbm + 1
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        aot.refused_bytes(jax.errors.JaxRuntimeError("INTERNAL: a compiler bug"), hbm)

    class Memory:  # 1 GiB per sequence: 16 would fit the 16 GiB, the compiler stops at 12
        def __init__(self, b):
            self.argument_size_in_bytes, self.output_size_in_bytes = 0, 0
            self.alias_size_in_bytes, self.temp_size_in_bytes = 0, b * 2**30

    def compile_all(c, devices, everything, num_steps):
        if c.batch_size > 12:
            raise jax.errors.JaxRuntimeError(REFUSED)
        return None, None, {"train": type("Compiled", (), {
            "memory_analysis": lambda self: Memory(c.batch_size)})()}

    monkeypatch.setattr(aot, "compile_all", compile_all)
    said = []
    found = aot.fit(small(text, batch_size=1), tpus.devices("v5e:1x1"), "v5e:1x1", said.append)
    assert found == {False: 12, True: 12}
    assert any("refused by the compiler (needs 23.20 GiB" in line for line in said)


def test_train_command_keeps_the_tokens_per_step():
    config = small("x", batch_size=12, gradient_accumulation_steps=40)
    command = aot.train_command("configs/gpt2.py", config, 96, remat=True)
    assert "--config.batch_size=96 --config.gradient_accumulation_steps=5" in command
    assert command.endswith("--config.remat=True")
    for fits, n in ((128, 8), (352, 8), (100, 1), (37, 1)):
        command = aot.train_command("configs/gpt2.py", config, fits, remat=False, n=n)
        b, a = map(int, re.search(r"batch_size=(\d+) .*accumulation_steps=(\d+)", command).groups())
        assert fits // 2 <= b <= fits and b % n == 0
        assert b * a == 480 or not any(480 % d == 0 and d % n == 0
                                       for d in range(fits // 2, fits + 1))
    assert "batch_size=120 --config.gradient_accumulation_steps=4" in aot.train_command(
        "configs/gpt2.py", config, 128, remat=False, n=8)  # 128 x 4 would be 512


def test_collectives_are_read_from_the_hlo_text():
    """Async starts return (operands, results, context scalars): only the results count."""
    hlo = """
  %cp = (bf16[4,768]{1,0}, bf16[4,768]{1,0}, u32[], u32[]) collective-permute-start(%x), a={}
  %ag = (bf16[96,768]{1,0}, bf16[768,768]{1,0}) all-gather-start(%y), dimensions={0}
  %ag.1 = bf16[768,768]{1,0:T(8,128)(2,1)} all-gather(%w), dimensions={0}
  %done = bf16[768,768]{1,0} all-gather-done(%ag)
  ROOT %ar = (f32[10]{0}, bf16[3,5]{1,0}) all-reduce(%z, %v), to_apply=%add
"""
    assert aot.collectives(hlo) == {
        "all-gather": {"count": 2, "bytes": 2 * 768 * 768 * 2},
        "all-reduce": {"count": 1, "bytes": 10 * 4 + 15 * 2},
        "collective-permute": {"count": 1, "bytes": 4 * 768 * 2}}
