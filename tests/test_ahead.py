"""ahead.Ahead: a program compiled on a thread before its first call is the jit's program."""

import contextlib
import json
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import ahead, compile_cache, training
from tests.conftest import tiny


def tanh_steps(x, w, *, n, np=jnp):
    for _ in range(n):
        x = np.tanh(x @ w)
    return x


@contextlib.contextmanager
def backend_compiles():
    """Counts XLA compiles inside the block, in any thread."""
    count = [0]

    def listen(event, seconds, **kwargs):
        count[0] += event == "/jax/core/compile/backend_compile_duration"

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield lambda: count[0]
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_a_call_runs_the_program_compiled_ahead_and_others_go_through_the_jit():
    call = ahead.Ahead(jax.jit(tanh_steps, static_argnames="n", donate_argnums=0))
    x, w = np.ones((4, 8), np.float32), np.random.default_rng(0).normal(size=(8, 8)) / 3
    w = w.astype(np.float32)
    expected = {n: tanh_steps(x, w, n=n, np=np) for n in (2, 3)}  # numpy's
    inputs = [jnp.asarray(x) for _ in range(2)]  # (each call donates its input)
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    wide, w2 = jnp.asarray(np.ones((4, 16), np.float32)), np.tile(w, (2, 2))  # other shapes
    with backend_compiles() as compiles:
        call.compile(spec, w, n=3)
        assert call.compiled(spec, w, n=3).seconds > 0
        assert not call.compiled(spec, w, n=3).from_cache
        assert compiles() == 1
        np.testing.assert_allclose(call(inputs[0], w, n=3), expected[3], rtol=1e-5, atol=1e-6)
        assert compiles() == 1  # the call ran the program compiled ahead
        np.testing.assert_allclose(call(inputs[1], w, n=2), expected[2], rtol=1e-5, atol=1e-6)
        assert compiles() == 2 and call.compiled(spec, w, n=2) is None  # through the jit
        np.testing.assert_allclose(call(wide, w2, n=3),  # the static arguments compiled ahead
                                   tanh_steps(np.ones((4, 16), np.float32), w2, n=3, np=np),
                                   rtol=1e-5, atol=1e-6)
        assert compiles() == 3 and call.compiled(wide, w2, n=3) is None  # through the jit


def test_an_error_while_compiling_ahead_is_raised_by_the_call():
    call = ahead.Ahead(jax.jit(lambda x, *, n: x @ x, static_argnames="n"))
    call.compile(jax.ShapeDtypeStruct((2, 3), jnp.float32), n=1)  # (2, 3) @ (2, 3)
    with pytest.raises(TypeError, match="dot_general"):
        call(jnp.ones((2, 3)), n=1)


def test_cache_hits_counts_only_the_threads_it_is_told(monkeypatch):
    listeners = []
    monkeypatch.setattr(jax.monitoring, "register_event_listener", listeners.append)
    monkeypatch.setattr(jax.monitoring, "unregister_event_listener", listeners.remove)
    with compile_cache.hits() as every, compile_cache.hits(threading.get_ident()) as mine:
        other = threading.Thread(target=lambda: [f(compile_cache.HIT) for f in listeners])
        other.start()
        other.join()
        for listen in list(listeners):
            listen(compile_cache.HIT)
            listen("/jax/some_other_event")
    assert (every(), mine()) == (2, 1)


def test_train_compiles_its_first_call_ahead_and_trains_as_without(tmp_path, text_file,
                                                                   monkeypatch, capsys):
    """train() with JAXGPT_COMPILE_AHEAD on (the default; the suite turns it off) runs its
    calls through the programs compiled ahead (the first training call's, the eval's) and
    gives the losses of a run without it, bit for bit (dropout on, 3 calls of 2 steps, a resume
    from the checkpoint of step 4)."""
    compiled = []
    original = ahead.Ahead._compile
    monkeypatch.setattr(ahead.Ahead, "_compile",
                        lambda self, *a: compiled.append(a[1]) or original(self, *a))

    def losses(name, setting):
        monkeypatch.setenv(ahead.ENV, setting)
        c = tiny(text_file, max_iters=6, eval_interval=4, steps_per_call=2, dropout=0.1)
        training.train(c, tmp_path / name)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [(e["event"], e.get("loss", e.get("val_loss")))
                for e in map(json.loads, lines) if e["event"] in ("train", "eval")]

    without = losses("without", "0")
    assert compiled == []
    assert losses("with", "1") == without
    assert compiled == [{"num_steps": 2}, {}]  # the first training call's, then the eval's
    assert "compiled the training step in" in capsys.readouterr().out
