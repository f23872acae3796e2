"""jaxgpt.aot with the splash kernel in the program: it compiles for a TPU slice on this CPU,
counts the kernel's FLOPs analytically (XLA's cost analysis does not see inside a Pallas call)
and says so, and splits the bytes accessed by where in the model they come from."""

import pytest

from jaxgpt import aot, hlo, tpus
from tests.conftest import synthetic_text, tiny

pytest.importorskip("libtpu")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot_splash") / "input.txt"
    path.write_text(synthetic_text(20000))
    return path


def small(text, impl):
    """The smallest model the kernel takes: T = 128, 2 heads of 64."""
    c = tiny(text, n_layer=1, n_head=2, n_embd=128, block_size=128, batch_size=8,
             gradient_accumulation_steps=2, steps_per_call=2, eval_iters=2,
             attention_impl=impl)
    return aot.for_tpu(c)


def test_auto_is_splash_for_a_tpu_slice_and_xla_for_a_short_block(text):
    assert small(text, "auto").attention_impl == "splash"
    c = tiny(text, attention_impl="auto")  # block_size 16: not a multiple of 128
    assert aot.for_tpu(c).attention_impl == "xla"


def test_a_splash_model_compiles_for_v5e_with_analytic_flops(text):
    devices = tpus.devices("v5e:2x2")
    runs, texts = {}, {}
    for impl in ("splash", "xla"):
        # the xla run is the yardstick for the training call only: its other programs are skipped
        built, seconds, compiled = aot.compile_all(small(text, impl), devices,
                                                   everything=impl == "splash")
        runs[impl] = aot.report(built, "v5e:2x2", seconds, compiled)
        texts[impl] = compiled["train"].as_text()
    splash, xla = runs["splash"]["flops_per_step"], runs["xla"]["flops_per_step"]
    # the kernel: forward, dq and dk/dv per micro-batch (the eval call has its own)
    assert splash["pallas_kernels"] >= 3 and xla["pallas_kernels"] == 0
    assert splash["source"].startswith("analytic") and splash["used"] == splash["analytic"]
    assert xla["source"] == "XLA" and xla["used"] == xla["xla"]
    assert splash["xla"] < xla["xla"]  # what XLA no longer sees: attention's matmuls
    assert splash["analytic"] == xla["analytic"]
    r = runs["splash"]
    assert r["attention_impl"] == "splash"
    assert r["roofline"]["compute_s"] == splash["analytic"] / r["roofline"]["peak_flops"]
    b = r["bytes_per_step"]
    assert b["total"] > 0 and "attention core" in b["by_category"]
    assert sum(b["by_category"].values()) == b["total"]
    top = hlo.bytes_by_source(texts["splash"], 2, top=100)["top"]
    assert any(source.startswith("splash attention") for _, source, _ in top)
    assert hlo.custom_calls(texts["splash"]) >= 3
    lines = []
    aot.print_report(r, lines.append)
    out = "\n".join(lines)
    assert "attention_impl=splash" in out and "Pallas kernel calls" in out and "(*)" in out
    assert "attention core" in out

