"""A nanoGPT ckpt.pt -> a jaxgpt workdir: sampled logits equal nanoGPT's function, the run's
settings and step carried over, clear errors.

torch is not installed for the tests (its PyPI wheel is large): `read_ckpt` is exercised with a
stand-in `torch` module whose `load` unpickles the checkpoint dict written by the test (numpy
arrays where nanoGPT has tensors), in sys.modules in-process and as a torch.py on PYTHONPATH for
the command; everything after the read is the real path.
"""

import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt import checkpoint, import_nanogpt, pretrained
from jaxgpt.errors import UserError
from tests.test_convert import ARGS, IDX, nanogpt_forward, random_state_dict

ROOT = Path(__file__).resolve().parent.parent
CHARS = [chr(ord("a") + i) for i in range(ARGS["vocab_size"] - 2)] + ["\n", " "]


def named_parameters(bias):
    """nanoGPT's GPT.named_parameters() order (module registration order; lm_head is tied)."""
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(ARGS["n_layer"]):
        for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names += [f"transformer.h.{i}.{m}.weight"] + ([f"transformer.h.{i}.{m}.bias"]
                                                          if bias else [])
    return names + ["transformer.ln_f.weight"] + (["transformer.ln_f.bias"] if bias else [])


def adamw_state(sd, bias, step):
    """torch AdamW's state_dict as nanoGPT's configure_optimizers builds it: group 0 the >= 2-D
    params, group 1 the rest, each in named_parameters order; random moments."""
    named = named_parameters(bias)
    decay = [n for n in named if sd[n].ndim >= 2]
    nodecay = [n for n in named if sd[n].ndim < 2]
    rng = np.random.default_rng(7)
    state = {i: {"step": float(step), "exp_avg": rng.normal(size=sd[n].shape).astype(np.float32),
                 "exp_avg_sq": rng.random(sd[n].shape).astype(np.float32)}
             for i, n in enumerate(decay + nodecay)}
    groups = [{"params": list(range(len(decay))), "weight_decay": 0.1},
              {"params": list(range(len(decay), len(named))), "weight_decay": 0.0}]
    return {"state": state, "param_groups": groups}, decay + nodecay


def nanogpt_ckpt(bias=True):
    sd = random_state_dict(bias)
    model = {k: sd[k] for k in named_parameters(bias)} | {"lm_head.weight": sd["lm_head.weight"]}
    model_args = {**ARGS, "bias": bias}
    config = {"batch_size": 4, "learning_rate": 2e-3, "dataset": "shakespeare_char",
              "init_from": "scratch", "dtype": "bfloat16", "compile": True, "out_dir": "out",
              **model_args}
    optimizer, _ = adamw_state(sd, bias, 250)
    return {"model": {"_orig_mod." + k: v for k, v in model.items()}, "optimizer": optimizer,
            "model_args": model_args, "iter_num": 250, "best_val_loss": 1.5, "config": config}


@pytest.fixture
def fake_torch(monkeypatch):
    torch = types.ModuleType("torch")
    torch.load = lambda path, **kw: pickle.loads(Path(path).read_bytes())
    monkeypatch.setitem(sys.modules, "torch", torch)


FAKE_TORCH = """import pickle


def load(path, **kw):
    with open(path, "rb") as f:
        return pickle.load(f)
"""


def run_import(tmp_path, *args):
    """`python -m jaxgpt.import_nanogpt ARGS` as a user types it, with the stand-in torch."""
    fake = tmp_path / "fake_torch"
    fake.mkdir(exist_ok=True)
    (fake / "torch.py").write_text(FAKE_TORCH)
    path = os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "jaxgpt.import_nanogpt", *map(str, args)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": path},
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(r, match):
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert match in r.stderr and "Traceback" not in r.stderr


def write_meta(path):
    meta = {"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)),
            "stoi": {c: i for i, c in enumerate(CHARS)}}
    path.write_bytes(pickle.dumps(meta))


def test_imported_workdir_computes_nanogpts_function(tmp_path):
    ckpt = nanogpt_ckpt()
    (tmp_path / "ckpt.pt").write_bytes(pickle.dumps(ckpt))
    write_meta(tmp_path / "meta.pkl")
    r = run_import(tmp_path, tmp_path / "ckpt.pt", tmp_path / "run",
                   "--meta", tmp_path / "meta.pkl")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{tmp_path / 'run'}: nanoGPT's step 250")
    run = pretrained.load_run(tmp_path / "run", "latest")
    assert run.step == 250 and run.tokenizer.chars == CHARS
    assert run.config.learning_rate == 2e-3 and run.config.batch_size == 4  # carried over
    assert run.config.init_from == "auto" and run.config.dtype == "auto"  # not carried
    sd = random_state_dict(bias=True)
    logits = run.model.apply({"params": run.params}, IDX)
    np.testing.assert_allclose(logits, nanogpt_forward(sd, {**ARGS, "bias": True}, IDX),
                               atol=5e-5, rtol=5e-5)


def test_adamw_state_and_step_carry_over(tmp_path):
    import optax

    from jaxgpt import parallel
    from jaxgpt.step import create_train_state

    ckpt = nanogpt_ckpt()
    import_nanogpt.import_run(ckpt, tmp_path / "run", import_nanogpt.read_meta(_meta(tmp_path)))
    run = pretrained.load_run(tmp_path / "run", "latest")
    fresh = create_train_state(run.config, run.model, parallel.one_device_mesh())
    state, step = checkpoint.restore(tmp_path / "run", checkpoint.abstract_like(fresh))
    assert step == int(state.step) == 250
    adam = [x for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
        x, (optax.ScaleByAdamState, optax.ScaleByScheduleState))) if hasattr(x, "count")]
    assert [int(x.count) for x in adam] == [250, 250]  # the moments' and the schedule's
    torch_state, order = adamw_state(random_state_dict(True), True, 250)
    moments = {n: torch_state["state"][i] for i, n in enumerate(order)}
    mu, nu = adam[0].mu, adam[0].nu
    np.testing.assert_array_equal(mu["wte"]["embedding"],
                                  moments["transformer.wte.weight"]["exp_avg"])
    np.testing.assert_array_equal(mu["h_1"]["attn"]["c_attn"]["kernel"],  # torch (out, in)
                                  moments["transformer.h.1.attn.c_attn.weight"]["exp_avg"].T)
    np.testing.assert_array_equal(nu["h_0"]["ln_2"]["bias"],
                                  moments["transformer.h.0.ln_2.bias"]["exp_avg_sq"])


def test_imported_workdir_samples(tmp_path, fake_torch):
    import_nanogpt.import_run(nanogpt_ckpt(bias=False), tmp_path / "run",
                              import_nanogpt.read_meta(_meta(tmp_path)))
    r = subprocess.run([sys.executable, "sample.py", "--workdir", str(tmp_path / "run"),
                        "--start", "ab", "--max_new_tokens", "5", "--quiet"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ab") and len(r.stdout.rstrip("\n")) >= 2


def _meta(tmp_path):
    write_meta(tmp_path / "meta.pkl")
    return tmp_path / "meta.pkl"


def test_errors_are_one_line(tmp_path, fake_torch, monkeypatch):
    with pytest.raises(UserError, match="no such file"):
        import_nanogpt.read_ckpt(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read as a torch checkpoint"):
        import_nanogpt.read_ckpt(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="not a nanoGPT checkpoint: it has no model_args"):
        import_nanogpt.import_run({"model": {}}, tmp_path / "a")
    with pytest.raises(UserError, match="50257 tokens but the model only 50: pass the run's"):
        import_nanogpt.import_run(nanogpt_ckpt(), tmp_path / "a")  # GPT-2's BPE by default
    chars = import_nanogpt.read_meta(_meta(tmp_path))
    import_nanogpt.import_run(nanogpt_ckpt(), tmp_path / "b", chars)
    with pytest.raises(UserError, match="already holds checkpoints"):  # never overwritten
        import_nanogpt.import_run(nanogpt_ckpt(), tmp_path / "b", chars)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(UserError, match=r"pip install 'jaxgpt\[torch\]'"):
        import_nanogpt.read_ckpt(tmp_path / "junk.pt")


def test_cli_errors_are_one_line(tmp_path):
    assert_one_line_error(run_import(tmp_path, tmp_path / "none.pt", tmp_path / "run"),
                          "no such file")
    assert_one_line_error(run_import(tmp_path, tmp_path / "none.pt"), "expected CKPT WORKDIR")
    (tmp_path / "bad.pkl").write_bytes(b"junk")
    assert_one_line_error(run_import(tmp_path, tmp_path / "none.pt", tmp_path / "run",
                                     "--meta", tmp_path / "bad.pkl"), "not nanoGPT's meta.pkl")
    assert not (tmp_path / "run").exists()
