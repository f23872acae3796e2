"""Before you rent a TPU: compile a recipe for any TPU slice on this machine, no TPU needed.

  python -m jaxgpt.aot --config configs/gpt2.py --topology v5litepod-8 [--config.KEY=VALUE ...]
      [--fit] [--only_train] [--json PATH]

`--topology` is the `--accelerator-type` of `gcloud compute tpus tpu-vm create` (v4-8,
v5litepod-16, v5p-32, v6e-8, ...) or a topology (v5e:4x4); multi-host slices compile here too.
What compiles is what train.py builds (training.setup's model, mesh and batch source, step.py's
calls), with ShapeDtypeStructs for the arrays: the training call (steps_per_call steps,
accumulation, remat, dtype), the eval call and the sampler's decode step. Printed per device:
parameters, optimizer state, temporaries and the total against the chip's HBM (fits or not, the
margin); XLA's FLOPs per step beside the analytic 6N + 12·L·H·Q·T; a roofline lower bound on the
step time (FLOPs at the bf16 peak, or bytes at the HBM bandwidth, whichever is slower) and the
MFU ceiling it implies; the collectives in the compiled program. `--fit`: the largest global
batch that fits, with and without remat, found by compiling a few candidates. Needs libtpu
(`pip install -e ".[aot]"`); docs/scaling.md explains the figures.
"""

import dataclasses
import functools
import json
import math
import re
import time

import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from jaxgpt import batches, cli, datasets, hlo, parallel, sampling, splash, step, tpus
from jaxgpt import config as config_lib
from jaxgpt.errors import UserError
from jaxgpt.flops import datasheet_peak, flops_per_token, optimizer_flops
from jaxgpt.model import count_params, make_model
from jaxgpt.training import out_of_memory

GPT2_VOCAB = 50257  # token files (never read here) hold GPT-2 BPE ids unless vocab_size says


def define_flags() -> None:
    """The command line's flags: defined only when run as a command, so importing this
    module defines none (two commands' flags of the same name would clash)."""
    flags.DEFINE_string("topology", None, "TPU VM accelerator type (v4-8, v5litepod-16, v5p-32, "
                        "v6e-8, ...) or a topology (v5e:4x4).")
    flags.DEFINE_bool("fit", False, "Also find the largest global batch_size that fits, with and "
                      "without remat (compiles a few candidates).")
    flags.DEFINE_bool("only_train", False, "Compile only the training call (not the eval call and "
                      "the sampler): faster.")
    flags.DEFINE_string("json", None, "Also write the figures as JSON to this path.")
    config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                    lock_config=True)
    flags.mark_flags_as_required(["config", "topology"])


# ---------------------------------------------------------------------------------------------
# Building train.py's calls on devices that are not there


def for_tpu(config):
    """A copy of the config as a TPU run resolves it ("auto" dtype: bfloat16 there; "auto"
    attention_impl: splash where it takes block_size, else xla)."""
    config = config.copy_and_resolve_references()
    if config.dtype == "auto":
        config.dtype = "bfloat16"
    config.attention_impl = splash.resolve_impl(config, "tpu")[0]
    return config


def _describe(array, mesh):
    """DeviceBatches' `put` for compiling: the split's shape, replicated, no copy."""
    return jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=parallel.replicated(mesh))


@dataclasses.dataclass
class Built:
    config: object
    mesh: jax.sharding.Mesh
    model: object
    state: step.TrainState  # ShapeDtypeStructs, sharded on the mesh
    lowered: dict  # program name -> jax.stages.Lowered


def build(config, devices, *, everything: bool = True, num_steps: int | None = None,
          lower: bool = True) -> Built:
    """Lower train.py's calls for the config on `devices`: setup()'s steps, no array made.

    The training call (`num_steps`, default steps_per_call), and with `everything` the eval
    call and the sampler's decode step; `lower=False`: only the abstract state. Small
    on-device datasets (text, tasks) are loaded as train.py loads them; token files are never
    read (only their shapes matter)."""
    config_lib.validate(config)
    mesh = parallel.make_mesh(config, devices)
    parallel.check_batch(config, mesh)
    n = num_steps or config.steps_per_call
    if config.dataset in datasets.LOADERS:  # batches.make's DeviceBatches: drawn on the device
        dataset = datasets.load(config)
        source = batches.DeviceBatches(dataset, config, mesh, put=_describe)
        vocab, train_data, eval_data = (dataset.tokenizer.vocab_size, source.train_data(0, n),
                                        source.eval_spec())
    else:  # HostBatches: (x, y) read from token files on the host
        source = batches.HostBatches
        vocab = config.vocab_size or GPT2_VOCAB
        train_data, eval_data = batches.HostBatches.abstract_data(config, mesh, n)
    model = make_model(config, vocab)
    state = step.abstract_train_state(config, model, mesh)
    built = Built(config, mesh, model, state, {})
    if not lower:
        return built
    shardings = jax.tree.map(lambda x: x.sharding, state)
    built.lowered["train"] = step.jit_train_steps(shardings, source.train_batch).lower(
        state, train_data, num_steps=n)
    if everything:
        keys = batches.eval_keys_spec(config.eval_iters, mesh)
        evaluate = step.jit_eval_loss(state.apply_fn, source.eval_batch, mesh)
        built.lowered["evaluate"] = evaluate.lower(state.params, eval_data, keys)
        built.lowered["decode"] = lower_decode(model, state.params, devices[0])
    return built


def lower_decode(model, params, device, batch_size: int = 1):
    """sample.py's decode step (one chunk of the scan) for `batch_size` rows on one chip."""
    one = parallel.replicated(parallel.one_device_mesh(device))

    def on_chip(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one)

    params = jax.tree.map(on_chip, params)
    start_fn, decode_fn = sampling.compiled_programs(model, sampling.CHUNK)
    window = on_chip(jax.ShapeDtypeStruct((batch_size, model.config.block_size), jnp.int32))
    scalar = on_chip(jax.ShapeDtypeStruct((), jnp.int32))
    carry = jax.tree.map(on_chip, jax.eval_shape(start_fn, params, window, scalar))
    settings = tuple(on_chip(jax.ShapeDtypeStruct((), d))
                     for d in (jnp.float32, jnp.int32, jnp.float32))
    rng = on_chip(jax.ShapeDtypeStruct((2,), jnp.uint32))
    return decode_fn.lower(params, carry, scalar, scalar, rng, settings, scalar)


# ---------------------------------------------------------------------------------------------
# What the compiled programs say


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the most any holds)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def peak_bytes(memory) -> int:
    """Per device: arguments + outputs (less what the donated state aliases) + temporaries."""
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes)


_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
             "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# `%name = <result shape> op(` (op maybe -start: async; its -done carries no new data)
_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(_ITEMSIZE) + r")\[([\d,]*)\]")


def collectives(hlo_text: str) -> dict:
    """{op: {"count", "bytes"}} of the collectives in compiled HLO text, each counted once
    where it appears (an op in a loop body runs once per iteration). Bytes are the op's result;
    an async all-gather / collective-permute start returns (operands, results[, context
    scalars]): the results."""
    out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        found = _ARRAY.findall(m.group(1))
        if m.group(3) and m.group(2) in ("all-gather", "collective-permute"):
            found = [a for a in found if a[1]]  # without the u32[] context scalars
            found = found[len(found) // 2:]  # the results, not the operands
        arrays = [math.prod(int(d) for d in dims.split(",") if d) * _ITEMSIZE[t]
                  for t, dims in found]
        out[m.group(2)]["count"] += 1
        out[m.group(2)]["bytes"] += sum(arrays)
    return {op: v for op, v in out.items() if v["count"]}


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost) or {}


def report(built: Built, topology: str, compile_s: dict, compiled: dict) -> dict:
    """The figures of one recipe on one slice (what main prints and --json writes). Without a
    compiled training call (`compiled` empty: the state alone does not fit) only the state's
    memory, which needs no compile."""
    config, chip = built.config, tpus.chip(topology)
    devices, first = built.mesh.devices.size, built.mesh.devices.flat[0]
    A = config.gradient_accumulation_steps
    tokens = config.batch_size * A * config.block_size
    n_params = count_params(built.state.params)
    state = {"params": shard_bytes(built.state.params),
             "opt_state": shard_bytes(built.state.opt_state), "hbm": chip.hbm_bytes,
             "hbm_source": chip.source}
    out = {
        "topology": topology, "devices": devices,
        "processes": len({d.process_index for d in built.mesh.devices.flat}),
        "device_kind": first.device_kind, "mesh": dict(built.mesh.shape),
        "batch_size": config.batch_size, "gradient_accumulation_steps": A,
        "steps_per_call": config.steps_per_call, "remat": bool(config.remat),
        "dtype": config.dtype, "attention_impl": config.attention_impl, "params": n_params,
        "tokens_per_step": tokens,
        "compile_s": compile_s, "memory": state,
    }
    if "train" not in compiled:
        total = state["params"] + state["opt_state"]
        state |= {"temp": None, "total": total, "fits": total <= chip.hbm_bytes,
                  "margin": chip.hbm_bytes - total}
        return out
    train = compiled["train"]
    memory = train.memory_analysis()
    total = peak_bytes(memory)
    state |= {"temp": memory.temp_size_in_bytes, "arguments": memory.argument_size_in_bytes,
              "outputs": memory.output_size_in_bytes, "aliased": memory.alias_size_in_bytes,
              "total": total, "fits": total <= chip.hbm_bytes, "margin": chip.hbm_bytes - total}
    # XLA's cost analysis counts a loop body once, not once per trip (checked: the same FLOPs
    # for 1 and 3 steps per call): the steps_per_call scan shows one step, and with
    # accumulation that step shows one micro-batch of A
    cost, text = _cost(train), train.as_text()
    # ... so that micro-batch counts A times, the AdamW update once (its traffic estimated:
    # read params, grads and both moments, write params and moments, float32)
    update_bytes = 7 * state["params"]
    xla_flops = cost.get("flops", float("nan")) * A
    by_source = hlo.bytes_by_source(text, A)
    xla_bytes = cost.get("bytes accessed", float("nan"))
    formula_bytes = (xla_bytes - update_bytes) * A + update_bytes
    # XLA's count with each instruction counted as often as it runs: the parse of the program
    # knows which instructions sit in the accumulation loop (the formula above assumes all but
    # the update do, so work done once per step would count A times)
    hbm_bytes = xla_bytes * by_source["total"] / by_source["once"] if by_source["once"] else \
        formula_bytes
    analytic = flops_per_token(config, n_params) * tokens / devices
    # XLA's cost analysis does not look inside a Pallas kernel: with kernels in the program its
    # count misses their FLOPs (attention's, with splash), so the compute side is analytic
    kernels = hlo.custom_calls(text)
    flops = max(xla_flops, analytic) if kernels else xla_flops
    peak, peak_source = datasheet_peak(first, "bfloat16")
    step_s = max(flops / peak, hbm_bytes / chip.hbm_bytes_per_s)
    out |= {
        # Muon's Newton–Schulz, whole (each device runs it whole where the kernels are
        # replicated); XLA's figure includes it, the analytic model FLOPs do not
        "flops_per_step": {"xla": xla_flops, "analytic": analytic, "used": flops,
                           "optimizer": optimizer_flops(config, built.state.params),
                           "pallas_kernels": kernels,
                           "source": "analytic (XLA misses the Pallas kernels)" if kernels
                           and flops == analytic else "XLA"},
        "bytes_per_step": {"xla": hbm_bytes, "xla_once": xla_bytes,
                           "xla_times_accumulation": formula_bytes, **by_source},
        "roofline": {"step_s": step_s, "mfu_ceiling": analytic / peak / step_s,
                     "compute_s": flops / peak, "memory_s": hbm_bytes / chip.hbm_bytes_per_s,
                     "peak_flops": peak, "peak_source": peak_source,
                     "hbm_bytes_per_s": chip.hbm_bytes_per_s},
        "collectives": collectives(text),
    }
    for name in ("evaluate", "decode"):
        if name in compiled:
            out[name] = {"total": peak_bytes(compiled[name].memory_analysis()),
                         "collectives": collectives(compiled[name].as_text())}
    return out


def compile_all(config, devices, *, everything: bool = True, num_steps: int | None = None):
    """(Built, {step: seconds}, {program: Compiled}): lowered, then each program compiled."""
    t = time.perf_counter()
    built = build(config, devices, everything=everything, num_steps=num_steps)
    seconds, compiled = {"lower": time.perf_counter() - t}, {}
    for name, program in built.lowered.items():
        t = time.perf_counter()
        compiled[name] = program.compile()
        seconds[name] = time.perf_counter() - t
    return built, seconds, compiled


# ---------------------------------------------------------------------------------------------
# --fit: the largest batch that fits, from a few compiles


def largest(fits_bytes, limit: int, max_compiles: int = 10) -> tuple[int, dict]:
    """The largest b >= 1 with fits_bytes(b) <= limit (0 if b=1 does not fit), and every
    {b: bytes} measured. Memory grows about linearly with the batch: before a candidate fails,
    the next is where the line through the last two points meets the limit (at most 8x the
    largest that fits); then where the
    chord between the bracket's ends (lo fits, hi does not) meets it, or its middle when the
    chord only creeps, until hi = lo + 1. After max_compiles: the largest seen to fit."""
    seen = {1: fits_bytes(1)}
    if seen[1] > limit:
        return 0, seen
    lo, hi, b, width = 1, None, 4, None
    for _ in range(max_compiles - 1):
        seen[b] = fits_bytes(b)
        if seen[b] <= limit:
            lo = max(lo, b)
        else:
            hi = b if hi is None else min(hi, b)
        if hi is not None and hi - lo <= 1:
            break
        if hi is None:  # extrapolate from lo and the largest point below it
            below = max(x for x in seen if x < lo)
            slope = (seen[lo] - seen[below]) / (lo - below)
            guess = 2 * lo if slope <= 0 else lo + int((limit - seen[lo]) / slope)
            # at most 8x: at small batches padding and constants hide the slope
            b = min(max(lo + 1, guess), 8 * lo)
        elif width is not None and 2 * (hi - lo) > width:  # the chord creeps: bisect
            b, width = (lo + hi) // 2, None
        else:
            width = hi - lo
            b = lo + int((limit - seen[lo]) * (hi - lo) / (seen[hi] - seen[lo]))
            b = min(max(b, lo + 1), hi - 1)
    return lo, seen


_NEEDED = re.compile(r"required for HLO temporaries \(([\d.]+)G\)")


def refused_bytes(error: Exception, hbm: int) -> int:
    """A compile the compiler refused for want of HBM (RESOURCE_EXHAUSTED) as a size over the
    chip's HBM: the temporaries it asked for when it says, else just over. Other errors raise."""
    if not isinstance(error, jax.errors.JaxRuntimeError) or "RESOURCE_EXHAUSTED" not in str(error):
        raise error
    needed = _NEEDED.search(str(error))
    return max(hbm + 1, int(float(needed.group(1)) * tpus.GiB) if needed else 0)


def fit(config, devices, topology: str, say) -> dict:
    """{remat: largest global batch_size} on the slice, the training call only (one step:
    memory does not depend on steps_per_call), accumulation kept (A > 1 holds a gradient sum)."""
    n = parallel.data_parallel_size(parallel.make_mesh(config, devices))
    hbm = tpus.chip(topology).hbm_bytes
    out = {}
    for remat in (False, True):
        def measure(b, remat=remat):
            c = config.copy_and_resolve_references()
            c.batch_size, c.remat = b * n, remat
            c.gradient_accumulation_steps = min(config.gradient_accumulation_steps, 2)
            try:
                _, _, compiled = compile_all(c, devices, everything=False, num_steps=1)
            except jax.errors.JaxRuntimeError as e:  # the compiler's own HBM check refused it
                total = refused_bytes(e, hbm)
                say(f"  remat={remat} batch_size={b * n}: refused by the compiler (needs "
                    f"{total / tpus.GiB:.2f} GiB or more per device)")
                return total
            total = peak_bytes(compiled["train"].memory_analysis())
            say(f"  remat={remat} batch_size={b * n}: {total / tpus.GiB:.2f} GiB per device")
            return total

        per_device, seen = largest(measure, hbm)
        out[remat] = per_device * n
    return out


def train_command(config_path: str, config, batch_size: int, remat: bool, n: int = 1) -> str:
    """train.py with a batch_size up to the one that fits, and the accumulation that keeps the
    recipe's sequences per step: the largest multiple of n (the data-parallel devices) that
    divides them, if one is at least half the batch that fits, else that batch with the nearest
    accumulation."""
    product = config.batch_size * config.gradient_accumulation_steps
    exact = [b for b in range(batch_size, batch_size // 2 - 1, -1)
             if b > 0 and b % n == 0 and product % b == 0]
    batch = exact[0] if exact else batch_size
    accum = max(1, round(product / batch))
    return (f"python train.py --config {config_path} --config.batch_size={batch} "
            f"--config.gradient_accumulation_steps={accum}"
            + (" --config.remat=True" if remat else ""))


# ---------------------------------------------------------------------------------------------
# The command


def _gib(b) -> str:
    return f"{b / tpus.GiB:.2f} GiB" if abs(b) >= tpus.GiB / 10 else f"{b / 2**20:.1f} MiB"


def print_report(r: dict, say) -> None:
    m = r["memory"]
    say(f"{r['topology']}: {r['devices']} x {r['device_kind']} in {r['processes']} "
        f"process(es), mesh {r['mesh']}; batch_size={r['batch_size']} x accumulation "
        f"{r['gradient_accumulation_steps']}, steps_per_call={r['steps_per_call']}, "
        f"remat={r['remat']}, dtype={r['dtype']}, attention_impl={r['attention_impl']}, "
        f"{r['params'] / 1e6:.1f}M parameters")
    if r["compile_s"]:
        say("compiled in " + ", ".join(f"{k} {v:.1f} s" for k, v in r["compile_s"].items()))
    say("per device (the training call):")
    rows = [("parameters", m["params"]), ("optimizer state", m["opt_state"])]
    if m["temp"] is not None:
        rows += [("temporaries", m["temp"]), ("total", m["total"])]
    else:  # not compiled: parameters and optimizer state alone exceed the HBM
        rows += [("total (no temps)", m["total"])]
    for label, value in rows:
        say(f"  {label:<17} {_gib(value):>11}")
    verdict = "fits" if m["fits"] else "does not fit"
    say(f"  HBM {_gib(m['hbm'])}: {verdict}, margin {_gib(m['margin'])} ({m['hbm_source']})")
    if "flops_per_step" not in r:
        say("  (parameters and optimizer state alone exceed the HBM: nothing compiled; "
            "raise mesh.fsdp or choose a larger slice)")
        return
    for name in ("evaluate", "decode"):
        if name in r:
            say(f"  {name} call: {_gib(r[name]['total'])} in all")
    f, roof = r["flops_per_step"], r["roofline"]
    say(f"FLOPs per step per device: XLA {f['xla']:.3g}, analytic 6N + 12·L·H·Q·T "
        f"{f['analytic']:.3g}" + (f", Muon's Newton–Schulz {f['optimizer']:.3g} (not in the "
                                  "analytic figure)" if f.get("optimizer") else "")
        + (f"; {f['pallas_kernels']} Pallas kernel calls XLA does not count into: the "
           "roofline uses the analytic figure (*)" if f["source"] != "XLA" else ""))
    say(f"roofline: step >= {roof['step_s'] * 1e3:.1f} ms (compute {roof['compute_s'] * 1e3:.1f}"
        f" ms{' (*)' if f['source'] != 'XLA' else ''} at {roof['peak_flops'] / 1e12:.0f} "
        f"TFLOP/s bf16, memory "
        f"{roof['memory_s'] * 1e3:.1f} ms at {roof['hbm_bytes_per_s'] / 1e9:.0f} GB/s), "
        f"MFU <= {roof['mfu_ceiling']:.0%}: compiler figures, not a measured run")
    b = r["bytes_per_step"]
    say(f"bytes accessed per step per device: XLA {b['xla'] / 1e9:.3g} GB (its count of one "
        f"pass, {b['xla_once'] / 1e9:.3g} GB, with each instruction as often as it runs; all "
        f"but the update x accumulation: {b['xla_times_accumulation'] / 1e9:.3g} GB); by source,"
        f" from the compiled program's operands and results ({b['total'] / 1e9:.3g} GB in all):")
    for name, value in b["by_category"].items():
        say(f"  {name:<30} {value / 1e9:>9.3g} GB {value / b['total']:>5.0%}")
    say("  largest single sources (pass, jaxpr path):")
    for phase, source, value in b["top"][:8]:
        say(f"    {value / 1e9:>9.3g} GB  {phase:<8} {source}")
    if r["collectives"]:
        say("collectives in the training program (each counted once where it appears):")
        for op, v in r["collectives"].items():
            say(f"  {op:<20} {v['count']:>4} ops {v['bytes'] / 2**20:>10.1f} MiB")
    else:
        say("collectives in the training program: none")


def main(argv):
    say = functools.partial(print, flush=True)
    topology = tpus.topology_name(flags.FLAGS.topology)
    config = for_tpu(flags.FLAGS.config)
    devices = tpus.devices(topology)
    built = build(config, devices, lower=False)
    r = report(built, topology, {}, {})
    if r["memory"]["fits"]:  # else the state alone overflows: no compile needed to say so
        try:
            built, seconds, compiled = compile_all(config, devices,
                                                   everything=not flags.FLAGS.only_train)
        except jax.errors.JaxRuntimeError as e:  # the state fits, the temporaries do not
            needs = refused_bytes(e, tpus.chip(topology).hbm_bytes)
            refused = (f"does not fit {flags.FLAGS.topology}: the compiler needs "
                       f"{needs / tpus.GiB:.2f} GiB or more per device")
            if not flags.FLAGS.fit:
                raise UserError(f"{refused}. {out_of_memory(config)}") from None
            say(refused)  # --fit: find the batch that does fit
            r = {"refused_bytes": needs}
        else:
            r = report(built, topology, seconds, compiled)
    if "memory" in r:
        print_report(r, say)
    if flags.FLAGS.fit:
        say("fitting the batch (the training call, a few compiles):")
        found = fit(config, devices, topology, say)
        r["fit"] = {("remat" if k else "no_remat"): v for k, v in found.items()}
        path = config_flags.get_config_filename(flags.FLAGS["config"])
        for remat, batch in found.items():
            if batch:
                n = parallel.data_parallel_size(built.mesh)
                product = config.batch_size * config.gradient_accumulation_steps
                say(f"largest batch_size with remat={remat}: {batch}; with the recipe's {product}"
                    " sequences per step:\n  " + train_command(path, config, batch, remat, n))
            else:
                say(f"remat={remat}: not even batch_size={parallel.data_parallel_size(built.mesh)}"
                    " fits: raise mesh.fsdp or choose a larger slice")
    if flags.FLAGS.json:
        with open(flags.FLAGS.json, "w") as fh:
            json.dump(r, fh, indent=1, default=float)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
