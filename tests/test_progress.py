"""What the loop tells the user: the CPU time estimate, and MFU as nanoGPT computes it."""

import math
from types import SimpleNamespace

from jaxgpt import progress
from tests.conftest import tiny


def test_cpu_estimate_warns_past_half_an_hour_and_names_the_cpu_recipe():
    # 0.5 s/step x 5000 steps + 10 evals of 60 s = 2500 + 600 s = 51.67 min
    line = progress.cpu_estimate(0.5, 5000, 60.0, 10)
    assert line.startswith("warning: on this CPU the run needs about 52 min more")
    assert "500 ms/step x 5000 steps + 10 evals of 1 min" in line
    assert "configs/shakespeare_cpu.py" in line
    assert progress.cpu_estimate(0.01, 2000, 2.0, 8) is None  # 36 s: no warning


def test_duration():
    assert progress.duration(3 * 3600 + 5 * 60 + 9) == "3 h 05 min"
    assert progress.duration(125) == "2 min"
    assert progress.duration(40) == "40 s"


def test_mfu_is_nanogpts_flops_over_the_datasheet_peak():
    c = tiny(batch_size=8, gradient_accumulation_steps=2)  # block 16, 2 layers, 4 heads, 32 wide
    v5e = SimpleNamespace(device_kind="TPU v5 lite")
    mfu = progress.MFU(c, n_params=1000, n_devices=4, device=v5e)
    # by hand: 6N + 12 L H Q T FLOPs per token, 8 x 2 x 16 tokens per step, 197 TFLOP/s per chip
    flops_per_step = (6 * 1000 + 12 * 2 * 4 * 8 * 16) * (8 * 2 * 16)
    assert math.isclose(mfu(0.001), flops_per_step / 0.001 / (4 * 197e12))
    cpu = SimpleNamespace(device_kind="cpu")
    assert progress.MFU(c, 1000, 1, device=cpu)(0.001) is None  # no peak known: no MFU
