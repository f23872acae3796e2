"""What the loop tells the user: the CPU time estimate, and MFU as nanoGPT computes it."""

import math
from types import SimpleNamespace

from jaxgpt import progress
from tests.conftest import tiny


def test_cpu_estimate_warns_once_past_half_an_hour_and_names_the_cpu_recipe():
    c = tiny(max_iters=5000, eval_interval=500, eval_iters=200, gradient_accumulation_steps=1)
    estimate = progress.CPUEstimate(c)
    # eval batches of 0.1 s: a step ~3 forwards = 0.3 s; an eval 2 x 200 x 0.1 = 40 s;
    # from step 0: 5000 x 0.3 + 10 evals x 40 = 1900 s = 31.67 min
    line = estimate.after_eval_batches(0.1, 0)
    assert line.startswith("warning: this run needs about 32 min more on this CPU")
    assert "300 ms/step x 5000 steps + 10 evals of 40 s, from the first eval batches" in line
    assert "configs/shakespeare_cpu.py" in line
    assert estimate.after_train_call(1.0, 10) is None  # said once


def test_no_cpu_warning_for_a_short_run():
    c = tiny(max_iters=2000, eval_interval=250, eval_iters=20)
    estimate = progress.CPUEstimate(c)
    assert estimate.after_eval_batches(0.005, 0) is None  # 2000 x 15 ms + 8 x 0.2 s: 32 s
    assert estimate.after_train_call(0.016, 50) is None


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
