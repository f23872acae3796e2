"""Runs in a subprocess of test_parallel.py: JAX's device count is fixed at import, so runs on
8 (or 2 per process) CPU devices need a fresh interpreter with XLA_FLAGS set before importing jax.

  python tests/parallel_worker.py mesh OUT.json TEXT BINS     # 1 vs 8 vs 4x2 devices
  python tests/parallel_worker.py train OUT_DIR TEXT BINS     # train() on every local device;
      with JAXGPT_COORDINATOR/NUM_PROCESSES/PROCESS_ID set, as one process of several
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402  (importing jax touches no backend: jax.distributed can still start)
import numpy as np  # noqa: E402

from jaxgpt import parallel, training  # noqa: E402
from jaxgpt.config import base_config  # noqa: E402
from jaxgpt.errors import UserError  # noqa: E402

STEPS = 3


def config(text, bins, host: bool, **overrides):
    """A 1-layer, 128-wide GPT: wide enough that FSDP splits its matrices (>= 2**14 entries)."""
    c = base_config()
    c.dataset, c.data_path, c.data_dir = ("owt", "", bins) if host else ("char", text, "")
    c.block_size, c.n_layer, c.n_head, c.n_embd = 16, 1, 4, 128
    c.batch_size, c.gradient_accumulation_steps = 8, 2
    c.max_iters, c.eval_interval, c.eval_iters, c.log_interval, c.steps_per_call = 2, 2, 2, 1, 2
    c.learning_rate, c.warmup_iters, c.lr_decay_iters, c.min_lr = 3e-3, 1, 4, 3e-4
    c.vocab_size = 320 if host else 0  # the test's BPE ids are bytes and <|endoftext|> (< 257)
    for k, v in overrides.items():
        c[k] = v
    return c


def run_steps(c, mesh):
    """STEPS optimizer steps through train()'s own set-up and call: (losses, state, kept)."""
    s = training.setup(c, mesh=mesh)
    shardings_in = jax.tree.map(lambda x: x.sharding, s.state)
    state, metrics = s.train_call(s.state, s.batches.train_data(0, STEPS), num_steps=STEPS)
    s.batches.close()
    kept = jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), state, shardings_in)
    return np.asarray(metrics["loss"]).tolist(), state, all(jax.tree.leaves(kept))


def n_fsdp_sharded(tree) -> int:
    return sum("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(tree))


def mesh_mode(out, text, bins):
    """Data-parallel (8) and data x fsdp (4 x 2) against one device, both data paths."""
    devices = jax.devices()
    assert len(devices) == 8, devices
    result = {}
    for path in ("device", "host"):
        c = config(text, bins, host=path == "host")
        runs = {}
        meshes = {"1": (1, 1, devices[:1]), "dp8": (-1, 1, devices), "dp4_fsdp2": (4, 2, devices)}
        if path == "host":  # the host path's sharding is the same for both: one is enough
            del meshes["dp8"]
        for name, (data, fsdp, devs) in meshes.items():
            c.mesh.data, c.mesh.fsdp = data, fsdp
            losses, state, kept = run_steps(c, parallel.make_mesh(c, devs))
            runs[name] = {
                "losses": losses, "kept_shardings": kept,
                "fsdp_params": n_fsdp_sharded(state.params),
                "fsdp_opt_state": n_fsdp_sharded(state.opt_state),
                "params": {jax.tree_util.keystr(k): np.asarray(v).tolist()
                           for k, v in jax.tree_util.tree_leaves_with_path(state.params)},
            }
        result[path] = runs
    c = config(text, bins, host=False, batch_size=6)
    try:
        parallel.check_batch(c, parallel.make_mesh(c))
        result["batch_error"] = ""
    except UserError as e:
        result["batch_error"] = str(e)
    Path(out).write_text(json.dumps(result))


def train_mode(out_dir, text, bins):
    """train() end to end on both data paths, on a data 2 x fsdp 2 mesh of 4 devices (with two
    processes, the params are split and the batch rows loaded across them)."""
    for path in ("device", "host"):
        # the host path scores the fixed val set (gpt2_fineweb.py's): the same windows on 1 and
        # on 2 processes, each process reading its rows of them
        c = config(text, bins, host=path == "host", fixed_val=path == "host")
        c.mesh.data, c.mesh.fsdp = 2, 2
        state = training.train(c, Path(out_dir) / path)
        assert n_fsdp_sharded(state.params) >= 4, "FSDP split no parameter"


if __name__ == "__main__":
    distributed = parallel.initialize_distributed()  # before any other JAX call
    mode, *args = sys.argv[1:]
    {"mesh": mesh_mode, "train": train_mode}[mode](*args)
    if distributed:
        jax.distributed.shutdown()
