"""Checkpoints: round trip, resume == uninterrupted, keep-best, errors; sample.py end to end."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import checkpoint, parallel, training
from jaxgpt import step as step_lib
from jaxgpt.errors import UserError
from jaxgpt.model import make_model
from jaxgpt.tokenizer import CharTokenizer
from tests.conftest import synthetic_text, tiny, xla_flags

ROOT = Path(__file__).resolve().parents[1]


def fresh_state(config, vocab_size=18):
    model = make_model(config, vocab_size)
    return step_lib.create_train_state(config, model, parallel.make_mesh(config))


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def save_steps(workdir, state, val_losses, keep_best=1):
    manager = checkpoint.make_manager(workdir, keep_best)
    for step, val in enumerate(val_losses, start=1):
        checkpoint.save(manager, state.replace(step=jnp.asarray(step, state.step.dtype)), val)
    manager.wait_until_finished()
    return manager


def losses(workdir):
    """[(event, step, loss)] from metrics.jsonl, in order."""
    events = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").open()]
    return [(e["event"], e["step"], e.get("loss", e.get("val_loss"))) for e in events]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of 20 steps (checkpoints at 10 and 20), and its data file."""
    root = tmp_path_factory.mktemp("run")
    (root / "input.txt").write_text(synthetic_text(20000))
    training.train(tiny(root / "input.txt"), root / "straight")
    return root


def test_round_trip_restores_every_array(tmp_path):
    config = tiny()
    state = fresh_state(config)
    state = state.replace(step=jnp.asarray(7, state.step.dtype),
                          rng=jax.random.PRNGKey(42))
    manager = checkpoint.make_manager(tmp_path)
    assert checkpoint.save(manager, state, 1.5)
    manager.wait_until_finished()
    other = fresh_state(tiny(seed=99))  # different values, same shapes and shardings
    restored, step = checkpoint.restore(tmp_path, checkpoint.abstract_like(other))
    assert step == 7 and int(restored.step) == 7
    assert_trees_equal(checkpoint._tree(restored), checkpoint._tree(state))
    # a target of bare ShapeDtypeStructs (what jax.eval_shape gives) restores the same
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), other)
    restored, _ = checkpoint.restore(tmp_path, abstract)
    assert_trees_equal(restored.params, state.params)


def test_a_restored_state_has_a_fresh_states_types(tmp_path):
    """Every leaf restores with the fresh state's shape, dtype, sharding and weak type: so a
    resumed run calls the program a fresh run compiled (and cached), not one of its own."""
    config = tiny()
    state = fresh_state(config)
    manager = checkpoint.make_manager(tmp_path)
    assert checkpoint.save(manager, state, 1.5)
    manager.wait_until_finished()
    restored, _ = checkpoint.restore(tmp_path, step_lib.abstract_train_state(
        config, make_model(config, 18), parallel.make_mesh(config)))
    avals = lambda t: [(jax.typeof(x), x.sharding) for x in jax.tree.leaves(t)]  # noqa: E731
    assert avals(restored) == avals(state)
    train = jax.jit(step_lib.train_step)
    x = jnp.zeros((1, 2, config.block_size), jnp.int32)  # (micro-batches, B, T)
    key = jax.random.PRNGKey(0)
    fresh_run = train.lower(state, (x, x), key).as_text()
    assert train.lower(restored, (x, x), key).as_text() == fresh_run


def test_resume_equals_uninterrupted(trained):
    data = trained / "input.txt"
    training.train(tiny(data, max_iters=10), trained / "resumed")
    assert checkpoint.make_manager(trained / "resumed").latest_step() == 10
    training.train(tiny(data), trained / "resumed")  # init_from=auto: continues at step 10
    straight, resumed = losses(trained / "straight"), losses(trained / "resumed")
    # the same events in the same order (the resumed run logs steps 10.. once, from step 10)
    assert [e[:2] for e in resumed] == [e[:2] for e in straight] and ("train", 19) in [
        e[:2] for e in straight]
    for (event, step, want), (_, _, got) in zip(straight, resumed):
        assert math.isclose(got, want, rel_tol=1e-6), (event, step)


def test_keep_best_keeps_lowest_val_losses_and_latest(tmp_path):
    state = fresh_state(tiny())
    manager = save_steps(tmp_path, state, [3.0, 1.0, 2.0, 4.0, 5.0], keep_best=2)
    assert sorted(manager.all_steps()) == [2, 3, 5]  # best two (1.0, 2.0) + the latest
    assert checkpoint.best_step(tmp_path) == 2


def test_never_saves_a_nan_state(tmp_path, capsys):
    state = fresh_state(tiny())
    manager = checkpoint.make_manager(tmp_path)
    assert not checkpoint.save(manager, state.replace(step=jnp.asarray(1)), float("nan"))
    bad = state.replace(step=jnp.asarray(2),
                        params=jax.tree.map(lambda p: p * jnp.nan, state.params))
    assert not checkpoint.save(manager, bad, 1.0)
    assert manager.all_steps() == [] and "not finite" in capsys.readouterr().err


def test_always_save_false_saves_improvements_and_the_end(tmp_path):
    config = tiny(always_save_checkpoint=False, keep_best=5)
    run = checkpoint.RunCheckpoints(config, tmp_path)
    state = fresh_state(config)
    saved = [run.after_eval(state.replace(step=jnp.asarray(s)), {"val": v}, final=final)
             for s, v, final in [(0, 9.0, False), (10, 3.0, False), (20, 4.0, False),
                                 (30, 2.0, False), (40, 5.0, True)]]
    run.close()
    assert saved == [False, True, False, True, True]  # never step 0; the end always


def test_scratch_refuses_to_overwrite_and_resume_needs_a_checkpoint(trained, tmp_path):
    with pytest.raises(UserError, match="init_from=scratch would overwrite"):
        training.train(tiny(trained / "input.txt", init_from="scratch"), trained / "straight")
    with pytest.raises(UserError, match="holds no checkpoint"):
        training.train(tiny(trained / "input.txt", init_from="resume"), tmp_path / "new")


def test_incompatible_config_names_the_keys(trained):
    with pytest.raises(UserError, match=r"n_layer \(2 -> 3\).*n_embd \(32 -> 48\)"):
        training.train(tiny(trained / "input.txt", n_layer=3, n_embd=48, max_iters=30),
                       trained / "straight")


def test_missing_and_non_checkpoint_directories(tmp_path):
    abstract = checkpoint.abstract_like(fresh_state(tiny()))
    with pytest.raises(UserError, match="no checkpoint in"):
        checkpoint.restore(tmp_path, abstract)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="holds no checkpoint"):
        checkpoint.restore(tmp_path, abstract)


def corrupt(step_dir: Path):
    for f in step_dir.rglob("*"):
        if f.is_file() and f.name != "_CHECKPOINT_METADATA":
            f.write_bytes(b"garbage")


def test_corrupt_latest_falls_back_with_a_warning(tmp_path, capsys):
    state = fresh_state(tiny())
    save_steps(tmp_path, state, [2.0, 1.0, 3.0], keep_best=1)  # keeps 2 (best) and 3 (latest)
    corrupt(tmp_path / "checkpoints" / "3")
    restored, step = checkpoint.restore(tmp_path, checkpoint.abstract_like(state))
    assert step == 2 and int(restored.step) == 2
    assert "step 3 cannot be read" in capsys.readouterr().err
    _, step = checkpoint.restore(tmp_path, checkpoint.abstract_like(state), step=3)
    assert step == 2  # asked for the damaged one: the next newest good one, with a warning
    corrupt(tmp_path / "checkpoints" / "2")
    with pytest.raises(UserError, match="cannot be read"):
        checkpoint.restore(tmp_path, checkpoint.abstract_like(state))


def test_run_info_round_trip(tmp_path):
    config = tiny(n_layer=3)
    tok = CharTokenizer.from_text("hello world")
    checkpoint.write_run_info(tmp_path, config, tok)
    assert checkpoint.load_config(tmp_path).n_layer == 3
    assert checkpoint.load_tokenizer(tmp_path).chars == tok.chars
    with pytest.raises(UserError, match="no config.json"):
        checkpoint.load_config(tmp_path / "elsewhere")


# ---------------------------------------------------------------------------------------------
# sample.py, end to end


def sample(*args):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_sample_cli_end_to_end(trained):
    workdir = str(trained / "straight")
    r = sample("--workdir", workdir, "--start", "the cat", "--max_new_tokens", "40",
               "--num_samples", "2", "--seed", "3")
    assert r.returncode == 0, r.stderr
    texts = r.stdout.split("---------------\n")[:2]
    assert all(t.startswith("the cat") and len(t) == len("the cat") + 40 + 1 for t in texts)
    assert "80 tokens" in r.stderr and "tokens/s" in r.stderr and "compile" in r.stderr
    r = sample("--workdir", workdir, "--max_new_tokens", "5", "--quiet")
    assert r.returncode == 0 and r.stderr == "" and len(r.stdout) == 1 + 5 + 1


@pytest.mark.parametrize("args, message", [
    (["--start", "Zebra!"], "outside the vocabulary"),
    (["--top_k", "0"], "top_k=0"),
    (["--top_k", "1000"], "top_k=1000"),
    (["--temperature", "-1"], "temperature"),
    (["--max_new_tokens", "0"], "max_new_tokens"),
    (["--top_p", "1.5"], "top_p"),
    (["--slide", "0"], "slide"),
    (["--start", "FILE:/no/such/file"], "cannot read"),
])
def test_sample_cli_bad_input_is_one_line(trained, args, message):
    r = sample("--workdir", str(trained / "straight"), *args)
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and message in r.stderr
    assert r.stderr.count("\n") == 1


def test_sample_cli_on_a_directory_without_checkpoints(tmp_path):
    r = sample("--workdir", str(tmp_path))
    assert r.returncode == 1 and r.stderr.startswith("error: no config.json")


SHARDED = """
import sys
import jax, numpy as np
from tests.conftest import tiny
from jaxgpt import checkpoint, parallel
from jaxgpt import step as step_lib
from jaxgpt.model import make_model
workdir = sys.argv[1]
def state_on(devices, fsdp, seed):
    config = tiny(n_embd=128, seed=seed)
    config.mesh.fsdp = fsdp
    mesh = parallel.make_mesh(config, devices)
    return step_lib.create_train_state(config, make_model(config, 18), mesh)
big = state_on(jax.devices(), 4, 0)  # 8 devices: data 2 x fsdp 4
assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
           for x in jax.tree.leaves(big.params))
manager = checkpoint.make_manager(workdir)
checkpoint.save(manager, big.replace(step=big.step + 5), 1.0)
manager.wait_until_finished()
one = state_on(jax.devices()[:1], 1, 1)
restored, _ = checkpoint.restore(workdir, checkpoint.abstract_like(one))
for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(big.replace(step=big.step + 5))):
    assert len(a.sharding.device_set) == 1
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
back, _ = checkpoint.restore(workdir, checkpoint.abstract_like(state_on(jax.devices(), 4, 2)))
for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(big.params)):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
print("ok")
"""


def test_restore_across_device_counts(tmp_path):
    """Saved from 8 devices (FSDP-sharded params), restored on 1 device and back onto 8."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(8),
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Retention across restarts


def test_retained_keeps_the_best_and_the_newest_and_a_damaged_step_only_while_newest():
    d = checkpoint.DAMAGED
    assert checkpoint.retained({1: 3.0, 2: 1.0, 3: 2.0, 4: None}, keep_best=1) == {2, 4}
    assert checkpoint.retained({1: 3.0, 2: 1.0, 3: 2.0}, keep_best=2) == {2, 3}
    # the newest damaged: kept, with the newest step restore can fall back to
    assert checkpoint.retained({1: 1.0, 2: 3.0, 3: None, 4: d}, keep_best=1) == {1, 3, 4}
    assert checkpoint.retained({1: 1.0, 2: d, 3: 2.0}, keep_best=1) == {1, 3}  # not the newest
    assert checkpoint.retained({}, keep_best=1) == set()


def run_evals(workdir, state, evals, keep_best=1):
    """One run of the loop's checkpoints: a save after each (step, val loss)."""
    config = tiny(keep_best=keep_best)
    run = checkpoint.RunCheckpoints(config, workdir)
    for step, val in evals:
        run.after_eval(state.replace(step=jnp.asarray(step, state.step.dtype)), {"val": val},
                       final=False)
    run.close()


@pytest.mark.parametrize("keep_best", [1, 2])
def test_a_run_restarted_many_times_keeps_what_a_straight_run_keeps(tmp_path, keep_best):
    state = fresh_state(tiny())
    evals = list(zip(range(10, 60, 10), [3.0, 1.0, 0.5, 4.0, 2.0], strict=True))
    run_evals(tmp_path / "straight", state, evals, keep_best)
    for run in (evals[:1], evals[1:2], evals[2:3], evals[3:]):  # resumed three times
        run_evals(tmp_path / "restarted", state, run, keep_best)
        # never more than a straight run would hold at this point
        assert len(os.listdir(tmp_path / "restarted" / "checkpoints")) <= keep_best + 1
    straight = sorted(os.listdir(tmp_path / "straight" / "checkpoints"))
    assert sorted(os.listdir(tmp_path / "restarted" / "checkpoints")) == straight
    assert len(straight) == keep_best + 1  # the best ones (steps 30, ...) and the latest (50)


def test_a_damaged_step_is_dropped_once_a_newer_one_is_saved(tmp_path):
    state = fresh_state(tiny())
    run_evals(tmp_path, state, [(10, 1.0), (20, 2.0)])
    (tmp_path / "checkpoints" / "20" / "metrics" / "metrics").write_text("garbage")
    run = checkpoint.RunCheckpoints(tiny(), tmp_path)  # a damaged newest step: readable dir
    assert sorted(run.manager.all_steps()) == [10, 20] and run.best_val == 1.0
    run.after_eval(state.replace(step=jnp.asarray(30, state.step.dtype)), {"val": 3.0},
                   final=False)
    run.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "30"]


def test_half_written_steps_are_removed_at_the_next_start(tmp_path, capsys):
    state = fresh_state(tiny())
    run_evals(tmp_path, state, [(10, 1.0)])
    partial = tmp_path / "checkpoints" / "20.orbax-checkpoint-tmp"
    (partial / "default").mkdir(parents=True)
    run = checkpoint.RunCheckpoints(tiny(), tmp_path)
    run.close()
    assert not partial.exists() and os.listdir(tmp_path / "checkpoints") == ["10"]
    assert "removed 20.orbax-checkpoint-tmp" in capsys.readouterr().err


def test_retention_and_partial_steps_on_gcs(gcs):
    """On an object store a half-written step is one without orbax's commit marker."""
    from etils import epath

    state = fresh_state(tiny())
    workdir = "gs://test-bucket/retention"
    run_evals(workdir, state, [(10, 1.0)])
    epath.Path(f"{workdir}/checkpoints/20/default/half").write_text("written before a crash")
    run_evals(workdir, state, [(30, 2.0)])
    run_evals(workdir, state, [(40, 0.5), (50, 3.0)])  # restarted twice
    steps = {name.split("/")[2] for name in gcs.objects("retention/checkpoints/")}
    assert steps == {"40", "50"}  # the best and the latest; 20 removed, 10 and 30 pruned
