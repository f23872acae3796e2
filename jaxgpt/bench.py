"""Benchmark: how fast a recipe trains (and samples) on this machine, compared with its peak.

  python -m jaxgpt.bench --config configs/shakespeare_cpu.py [--config.KEY=VALUE ...]
      [--json PATH] [--quick]

Training: compile time, ms/step (median over timed calls of `steps_per_call` steps each, after a
warm-up, each call waited for with block_until_ready), tokens/s, model FLOPs per token and MFU.
FLOPs per token are nanoGPT's `estimate_mfu` count: 6N + 12·L·H·Q·T, with N the parameters
without position embeddings, L layers, H heads, Q head size, T block_size (forward + backward of
every weight matmul, plus attention's two T-long matmuls). MFU = achieved FLOP/s / peak, the peak
from PEAK_TFLOPS for GPUs/TPUs and *measured* on CPU (a 2048² float32 matmul, median of repeats
run between rounds of timed calls, so peak and step see the same machine load).
Sampling: tokens/s of `generate` (KV cache, scanned decode) and of nanoGPT's full-recompute
loop, compile time separately.
"""

import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import flags
from ml_collections import config_flags

from jaxgpt import batches, cli, sampling, training
from jaxgpt import config as config_lib
from jaxgpt import data as data_lib
from jaxgpt.flops import PEAK_TFLOPS, datasheet_peak, flops_per_token, optimizer_flops  # noqa: F401
from jaxgpt.gpt_config import GPTConfig
from jaxgpt.model import count_params
from jaxgpt.tokenizer import CharTokenizer


def define_flags() -> None:
    """The command line's flags: defined only when run as a command, so importing this
    module defines none (two commands' flags of the same name would clash)."""
    flags.DEFINE_string("json", None, "Also write the figures as JSON to this path.")
    flags.DEFINE_bool("quick", False, "CI smoke test: one timed call, 20 sampled tokens; seconds. "
                      "Its timings are not meaningful.")
    flags.DEFINE_enum("only", "all", ["all", "train", "sample"], "Run only the training or the "
                      "sampling part (sampling at the shakespeare size on a CPU: --only=sample).")
    flags.DEFINE_integer("calls", 20, "Timed calls (of steps_per_call steps each), in 5 rounds.")
    config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                    lock_config=True)
    flags.mark_flags_as_required(["config"])


def timed(fn, n: int, warmup: int = 1):
    """Seconds for each of n calls of fn() after `warmup` calls; fn must block on its result."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def summary(times) -> dict:
    return {"median": statistics.median(times), "min": min(times),
            "p90": float(np.percentile(times, 90))}


def matmul_probe(n: int = 2048):
    """(n, fn): fn() runs one n x n float32 matmul and waits for it (the CPU peak probe)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    timed(lambda: matmul(a).block_until_ready(), 0, warmup=2)
    return n, lambda: matmul(a).block_until_ready()


def synthetic_dataset(config) -> data_lib.Dataset:
    """Random tokens of tiny Shakespeare's vocabulary: timing does not depend on the text."""
    rng = np.random.default_rng(0)
    vocab = config.vocab_size or 65
    train, val = (rng.integers(0, vocab, n, dtype=np.int32) for n in (100_000, 10_000))
    return data_lib.Dataset(train, val, CharTokenizer([chr(32 + i) for i in range(vocab)]))


def bench_train(config, s: training.Setup, quick: bool, calls: int):
    """Compile and time train()'s multi-step train call and its eval call.

    Returns (figures, the state after the timed calls: the input state was donated)."""
    state = s.state
    n_params = count_params(state.params)
    k = config.steps_per_call
    train = s.batches.train_data(0, k)

    t = time.perf_counter()
    compiled = s.train_call.lower(state, train, num_steps=k).compile()
    compile_s = time.perf_counter() - t
    memory = compiled.memory_analysis()

    device = jax.devices()[0]
    probe_n, probe = matmul_probe() if device.platform == "cpu" else (0, None)

    def call():
        nonlocal state
        state, metrics = compiled(state, train)  # state donated: always the latest one
        jax.block_until_ready(metrics)

    # Rounds of [one untimed call, timed calls, CPU peak probes]: the peak is measured under
    # the same machine load as the step, and the untimed call absorbs the probe's disturbance
    # (a 48 MB matmul evicts the step's working set from the caches).
    rounds = 1 if quick else 5
    per_round = 1 if quick else max(1, calls // rounds)
    timed(call, 0, warmup=1)
    times, probe_times, paired = [], [], []
    for _ in range(rounds):
        step_s = [s / k for s in timed(call, per_round, warmup=1)]
        times += step_s
        if probe is not None:
            probe_s = timed(probe, 3, warmup=0)
            probe_times += probe_s
            paired.append(statistics.median(probe_s) / statistics.median(step_s))
    step = summary(times)

    keys = jax.random.split(jax.random.PRNGKey(0),  # one eval call's batches
                            batches.eval_batches_per_call(config.eval_iters))
    val = s.batches.eval_data("val", keys)
    t = time.perf_counter()
    eval_compiled = s.evaluate.lower(state.params, val, keys).compile()
    eval_compile_s = time.perf_counter() - t
    eval_times = timed(lambda: eval_compiled(state.params, val, keys).block_until_ready(),
                       1 if quick else 5)

    tokens = config.batch_size * config.gradient_accumulation_steps * config.block_size
    fpt = flops_per_token(config, n_params)
    if probe is None:
        peak, peak_source = datasheet_peak(device, config.dtype)
    else:
        peak = 2 * probe_n**3 / statistics.median(probe_times)
        peak_source = (f"measured: float32 {probe_n}x{probe_n} matmul, median of "
                       f"{len(probe_times)} runs between rounds of timed calls")
    achieved = fpt * tokens / step["median"]
    opt_flops = optimizer_flops(config, state.params)  # Muon's Newton–Schulz (0 for AdamW)
    stats = device.memory_stats() or {}
    return {
        "params": n_params,
        "steps_per_call": k,
        "tokens_per_step": tokens,
        "compile_s": compile_s,
        "ms_per_step": 1e3 * step["median"],
        "ms_per_step_min": 1e3 * step["min"],
        "ms_per_step_p90": 1e3 * step["p90"],
        "tokens_per_s": tokens / step["median"],
        "flops_per_token": fpt,
        "flops_per_step": fpt * tokens,
        "achieved_tflops": achieved / 1e12,
        "optimizer_flops_per_step": opt_flops,
        "achieved_tflops_with_optimizer": (fpt * tokens + opt_flops) / step["median"] / 1e12,
        "peak_tflops": peak / 1e12,
        "peak_source": peak_source,
        "mfu": achieved / peak,
        "mfu_best": fpt * tokens / step["min"] / peak,
        # each round's step against the probes right after it: steadier under a varying load
        "mfu_paired": (statistics.median(fpt * tokens / (2 * probe_n**3) * r for r in paired)
                       if probe is not None else achieved / peak),
        "eval_compile_s": eval_compile_s,
        "eval_ms": 1e3 * statistics.median(eval_times),  # one eval call (of several per split)
        "peak_memory_bytes": stats.get("peak_bytes_in_use"),  # None where not reported (CPU)
        "compiled_temp_bytes": memory.temp_size_in_bytes if memory else None,
    }, state


def bench_sampling(model, params, block_size: int, quick: bool) -> list[dict]:
    """tokens/s of jaxgpt.sampling.generate at batch 1 and 16, prompts of 1 and block_size/2
    tokens, then nanoGPT's loop (full recompute per token) at batch 1 for the ratio."""
    new = 20 if quick else 500
    cases = [(b, p, False) for b in (1, 16) for p in (1, max(1, block_size // 2))]
    rows = []
    for batch, prompt, naive in cases + [(1, 1, True)]:
        r = time_generate(model, params, batch_size=batch, prompt_len=prompt,
                                   max_new_tokens=new, naive=naive)
        rows.append({"batch": batch, "prompt": prompt, "new_tokens": new, "naive": naive,
                     "compile_s": r["compile_seconds"], "tokens_per_s": r["tokens_per_sec"],
                     "ms_per_token": 1e3 * r["seconds"] / new})
    return rows


def run(config, quick: bool = False, calls: int = 20, only: str = "all") -> dict:
    """All figures as one JSON-able dict; `only` = "train" or "sample" skips the other part."""
    device = jax.devices()[0]
    load_before = os.getloadavg()[0]  # other processes on a small CPU box skew every timing
    config_lib.validate(config)
    s = training.setup(config, dataset=None if config.data_path else synthetic_dataset(config))
    train, state = None, s.state
    if only != "sample":
        train, state = bench_train(config, s, quick, calls)
    result = {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "config": {k: config[k] for k in ("model", *GPTConfig.keys(), "batch_size",
                                          "gradient_accumulation_steps", "steps_per_call")},
        "quick": quick,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": [load_before, os.getloadavg()[0]],  # before and after the training part
        "train": train,
    }
    result["sampling"] = (None if only == "train" else
                          bench_sampling(s.model, state.params, config.block_size, quick))
    return result


# ---------------------------------------------------------------------------------------------
# Sampling: the KV-cache sampler against nanoGPT's loop, which re-runs the context per token


def time_generate(model, params, *, batch_size=1, prompt_len=1, max_new_tokens=500,
                  naive=False, seed=0, slide=1) -> dict:
    """Time one sampling run (after a warm-up run that compiles): tokens/s, seconds, compile
    seconds. `naive` times the full-recompute loop instead (compile = its warm-up run)."""
    idx = jnp.zeros((batch_size, prompt_len), jnp.int32)
    run = functools.partial(sampling.generate_uncached if naive else sampling.generate, model,
                            params, idx,
                            max_new_tokens, rng=jax.random.PRNGKey(seed),
                            **({} if naive else {"slide": slide}))
    start = time.perf_counter()
    if naive:
        run().block_until_ready()
    else:
        sampling.warmup(model, params, batch_size)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    run().block_until_ready()
    seconds = time.perf_counter() - start
    return {"tokens_per_sec": batch_size * max_new_tokens / seconds, "seconds": seconds,
            "compile_seconds": compile_s}


def format_table(r: dict) -> str:
    rows = [
        ("device", f"{r['device_kind']} ({r['platform']}) x{r['device_count']}, "
                   f"jax {r['jax']} / jaxlib {r['jaxlib']}"),
        ("load average (1 min)", f"{r['load_avg_1m'][0]:.2f} before, {r['load_avg_1m'][1]:.2f} "
                                 f"after, {r['cpu_count']} CPUs"),
    ]
    if r["train"] is not None:
        rows += train_rows(r["train"])
    if r["sampling"] is not None:
        rows += sampling_rows(r["sampling"])
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def train_rows(t: dict) -> list[tuple[str, str]]:
    mem = t["peak_memory_bytes"]
    return [
        ("parameters (no wpe)", f"{t['params'] / 1e6:.2f} M"),
        ("train step compile", f"{t['compile_s']:.2f} s ({t['steps_per_call']} steps per call)"),
        ("ms / step", f"{t['ms_per_step']:.2f} median (min {t['ms_per_step_min']:.2f}, "
                      f"p90 {t['ms_per_step_p90']:.2f})"),
        ("tokens / s", f"{t['tokens_per_s']:,.0f}"),
        ("FLOPs / token", f"{t['flops_per_token'] / 1e6:.2f} M (6N + 12·L·H·Q·T)"),
        ("GFLOP / step", f"{t['flops_per_step'] / 1e9:.2f}"),
        ("achieved", f"{1e3 * t['achieved_tflops']:.1f} GFLOP/s"),
    ] + ([
        ("optimizer GFLOP / step", f"{t['optimizer_flops_per_step'] / 1e9:.2f} (Muon's "
         f"Newton–Schulz; with them {1e3 * t['achieved_tflops_with_optimizer']:.1f} GFLOP/s, "
         "not in MFU)"),
    ] if t.get("optimizer_flops_per_step") else []) + [
        ("peak", f"{1e3 * t['peak_tflops']:.1f} GFLOP/s ({t['peak_source']})"),
        ("MFU", f"{100 * t['mfu']:.1f} % (paired per round: {100 * t['mfu_paired']:.1f} %, "
                f"at the min step time: {100 * t['mfu_best']:.1f} %)"),
        ("eval call", f"{t['eval_ms']:.1f} ms (compile {t['eval_compile_s']:.2f} s)"),
        ("peak device memory", "not reported by this backend" if mem is None
         else f"{mem / 2**20:.1f} MiB"),
        ("compiled temp buffers", f"{(t['compiled_temp_bytes'] or 0) / 2**20:.1f} MiB"),
    ]


def sampling_rows(sampling: list[dict]) -> list[tuple[str, str]]:
    rows = []
    cached = {(s["batch"], s["prompt"]): s for s in sampling if not s["naive"]}
    for s in sampling:
        name = "naive loop (nanoGPT's)" if s["naive"] else "KV cache + scan"
        ratio = (f", cache {cached[1, 1]['tokens_per_s'] / s['tokens_per_s']:.1f}x faster"
                 if s["naive"] else "")
        rows.append((f"sample B={s['batch']} prompt={s['prompt']}",
                     f"{s['tokens_per_s']:,.0f} tok/s ({s['ms_per_token']:.2f} ms/token, "
                     f"{s['new_tokens']} new, {name}; compile {s['compile_s']:.2f} s{ratio})"))
    return rows


def main(argv):
    del argv  # cli.parse_flags rejects extra arguments
    result = run(flags.FLAGS.config, quick=flags.FLAGS.quick, calls=flags.FLAGS.calls,
                 only=flags.FLAGS.only)
    print(format_table(result))
    if flags.FLAGS.json:
        with open(flags.FLAGS.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
