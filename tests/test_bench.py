"""Smoke tests for the benchmark: it runs, and its figures are consistent (no timing asserts)."""

import json
import subprocess
import sys

import pytest

from jaxgpt import bench
from tests.conftest import tiny


def test_flops_per_token_is_nanogpts_estimate():
    c = tiny()  # 2 layers, 4 heads, 32 wide, block 16
    # 6N + 12·L·H·Q·T with Q = 32 / 4
    assert bench.flops_per_token(c, 1000) == 6 * 1000 + 12 * 2 * 4 * 8 * 16


def test_datasheet_peak_matches_device_kind():
    class Device:
        device_kind = "NVIDIA H100 80GB HBM3"

    peak, source = bench.datasheet_peak(Device, "bfloat16")
    assert peak == 989.4e12 and "H100" in source
    Device.device_kind = "TPU v5 lite"
    assert bench.datasheet_peak(Device, "float32")[0] == 197e12  # TPUs: the bf16 figure


def test_quick_run_reports_consistent_figures(tiny_config):
    r = bench.run(tiny_config, quick=True)
    t = r["train"]
    assert r["platform"] == "cpu" and r["jax"] and r["jaxlib"]
    assert t["ms_per_step"] > 0 and t["compile_s"] > 0 and t["peak_tflops"] > 0
    tokens = tiny_config.batch_size * tiny_config.block_size
    assert abs(t["tokens_per_s"] * t["ms_per_step"] / 1e3 - tokens) < 1e-6 * tokens
    assert t["flops_per_step"] == t["flops_per_token"] * tokens
    rows = r["sampling"]  # 2 batch sizes x 2 prompt lengths with the cache, then the naive loop
    assert [(s["batch"], s["naive"]) for s in rows] == [(1, False)] * 2 + [(16, False)] * 2 + [
        (1, True)]
    assert all(s["tokens_per_s"] * s["ms_per_token"] / 1e3 == pytest.approx(s["batch"])
               for s in rows)
    json.dumps(r)  # everything in it is JSON-able
    assert "KV cache" in bench.format_table(r) and "naive loop" in bench.format_table(r)


def test_only_sample_skips_training(tiny_config):
    r = bench.run(tiny_config, quick=True, only="sample")
    assert r["train"] is None and len(r["sampling"]) == 5
    assert "ms / step" not in bench.format_table(r)


def test_cli_writes_json(tmp_path, text_file):
    out = tmp_path / "bench.json"
    args = ["--config", "configs/shakespeare_cpu.py", f"--config.data_path={text_file}",
            "--config.n_layer=1", "--config.n_embd=32", "--config.n_head=2",
            "--config.block_size=16", "--config.batch_size=4", "--config.steps_per_call=2",
            "--config.eval_iters=2", "--quick", "--only=train", "--json", str(out)]
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.bench", *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ms / step" in proc.stdout
    written = json.loads(out.read_text())
    assert written["train"]["params"] > 0 and written["sampling"] is None  # timed above
