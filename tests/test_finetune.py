"""Runs that start from weights (finetuning), eval_only, sample.py --init_from, and the data
side: nanoGPT's `shakespeare` (BPE) dataset, a char vocabulary shared by two runs."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt import checkpoint, datasets, pretrained, training
from jaxgpt import tokenizer as tokenizers
from jaxgpt.config import base_config
from jaxgpt.errors import UserError
from tests.conftest import byte_encoding, synthetic_text, tiny
from tests.test_pretrained import write_hf_gpt2

pytest.importorskip("safetensors")
pytest.importorskip("tiktoken")
ROOT = Path(__file__).resolve().parent.parent


def finetune_config(data_path, init_from, dataset="char", **overrides):
    """finetune_shakespeare's shape: no model key set (the weights fix them), a constant small
    learning rate, few steps."""
    c = base_config()
    c.dataset, c.data_path, c.init_from = dataset, str(data_path), str(init_from)
    c.batch_size, c.max_iters, c.eval_interval, c.eval_iters = 4, 2, 2, 2
    c.learning_rate, c.decay_lr, c.steps_per_call = 3e-4, False, 1
    for k, v in overrides.items():
        c[k] = v
    return c


def events(workdir, kind):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


@pytest.fixture(scope="module")
def pretrained_workdir(tmp_path_factory):
    """A tiny char model trained 10 steps: the run a finetune starts from."""
    d = tmp_path_factory.mktemp("pretrain")
    (d / "input.txt").write_text(synthetic_text(20000))
    training.train(tiny(d / "input.txt", max_iters=10, eval_interval=10), d / "run")
    return d / "run"


def test_init_from_workdir_starts_at_step_0_with_its_params(pretrained_workdir, tmp_path,
                                                            monkeypatch, capsys):
    text = tmp_path / "other.txt"
    text.write_text(synthetic_text(8000, seed=5))  # a different text over the same characters
    config = finetune_config(text, pretrained_workdir)
    started = {}  # train()'s whole start-up, then the loop's starting point instead of a run

    def run(loop, state):
        started.update(state=state, model_config=loop.s.model.config)
        return state

    monkeypatch.setattr(training.Loop, "run", run)
    training.train(config, tmp_path / "ft")
    state, model_config = started["state"], started["model_config"]
    source = pretrained.load_run(pretrained_workdir)
    out = capsys.readouterr().out  # the finetune's own run is new: nothing to resume
    assert "starting from the weights of" in out and "resuming" not in out
    assert int(state.step) == 0 and source.step == 10
    assert (model_config.n_layer, model_config.n_embd, model_config.block_size) == (2, 32, 16)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(source.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a fresh AdamW: step counts and both moments all zero (a carried-over state is not)
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(state.opt_state))


def test_eval_only_reports_the_loss_and_writes_no_checkpoint(pretrained_workdir, tmp_path):
    # the workdir's own checkpoint, evaluated with its final eval's batches (same step, key)
    final = events(pretrained_workdir, "eval")[-1]
    steps = checkpoint.make_manager(pretrained_workdir, read_only=True).all_steps()
    training.train(tiny(pretrained_workdir.parent / "input.txt", max_iters=10, eval_interval=10,
                        eval_only=True), pretrained_workdir)
    again = events(pretrained_workdir, "eval")[-1]
    assert again["step"] == final["step"] == 10
    np.testing.assert_allclose([again["train_loss"], again["val_loss"]],
                               [final["train_loss"], final["val_loss"]], rtol=1e-5)
    assert checkpoint.make_manager(pretrained_workdir, read_only=True).all_steps() == steps

    hf = tmp_path / "gpt2"
    write_hf_gpt2(hf)
    text = tmp_path / "input.txt"
    text.write_text(synthetic_text(6000))
    training.train(finetune_config(text, hf, dataset="shakespeare", eval_only=True),
                   tmp_path / "eval")
    (e,) = events(tmp_path / "eval", "eval")
    assert e["step"] == 0 and np.isfinite([e["train_loss"], e["val_loss"]]).all()
    assert not (tmp_path / "eval" / "checkpoints").exists()


def _sample(*args):
    return subprocess.run([sys.executable, "sample.py", "--max_new_tokens", "8", "--quiet",
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_finetune_hf_gpt2_then_sample_both(tmp_path):
    hf = tmp_path / "gpt2"
    write_hf_gpt2(hf)
    text = tmp_path / "input.txt"
    text.write_text(synthetic_text(6000))
    training.train(finetune_config(text, hf, dataset="shakespeare"), tmp_path / "ft")
    assert [e["step"] for e in events(tmp_path / "ft", "eval")] == [0, 2]
    assert pretrained.load_run(tmp_path / "ft").step == 2

    r = _sample("--workdir", tmp_path / "ft", "--start", " the cat")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" the cat") and len(r.stdout) > len(" the cat\n")
    (tmp_path / "prompt.txt").write_text(" a cat sat")
    r = _sample("--init_from", hf, "--start", f"FILE:{tmp_path / 'prompt.txt'}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" a cat sat")


def test_sample_needs_workdir_or_init_from():
    r = _sample()
    assert r.returncode == 1 and "Exactly one of (workdir, init_from)" in r.stderr


def test_shakespeare_is_the_text_in_bpe_split_by_characters(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizers, "_gpt2_encoding", byte_encoding)  # GPT-2's needs a download
    text = synthetic_text(3000)
    (tmp_path / "input.txt").write_text(text)
    ds = datasets.load(tiny(tmp_path / "input.txt", dataset="shakespeare"))
    n = int(0.9 * len(text))
    assert ds.tokenizer.kind == "gpt2"
    assert ds.tokenizer.decode(ds.train) == text[:n] and ds.tokenizer.decode(ds.val) == text[n:]
    with pytest.raises(UserError, match="'shakespeare' is BPE but init_from=.*characters"):
        datasets.load(tiny(tmp_path / "input.txt", dataset="shakespeare"),
                          tokenizers.CharTokenizer.from_text(text))
    with pytest.raises(UserError, match="'char' is character-level but .* GPT-2 BPE"):
        datasets.load(tiny(tmp_path / "input.txt"), ds.tokenizer)


def test_vocab_path_makes_one_char_vocabulary_for_two_texts(tmp_path):
    (tmp_path / "big.txt").write_text(synthetic_text(3000))
    (tmp_path / "small.txt").write_text("$&" + synthetic_text(3000, seed=1).upper())
    big = datasets.load(tiny(tmp_path / "big.txt"))
    with pytest.raises(UserError, match=r"'\$', '&', 'A'.*--config.vocab_path=<this text>"):
        datasets.load(tiny(tmp_path / "small.txt"), big.tokenizer)
    shared = datasets.load(tiny(tmp_path / "big.txt", vocab_path=str(tmp_path / "small.txt")))
    both = (tmp_path / "big.txt").read_text() + (tmp_path / "small.txt").read_text()
    assert shared.tokenizer.chars == sorted(set(both))
    small = datasets.load(tiny(tmp_path / "small.txt"), shared.tokenizer)
    assert small.tokenizer is shared.tokenizer
    assert shared.tokenizer.decode(np.concatenate([small.train, small.val])) == \
        (tmp_path / "small.txt").read_text()


@pytest.mark.parametrize("name,init_from", [("finetune_shakespeare", "gpt2-xl"),
                                            ("eval_gpt2", "gpt2"),
                                            ("eval_gpt2_medium", "gpt2-medium"),
                                            ("eval_gpt2_large", "gpt2-large"),
                                            ("eval_gpt2_xl", "gpt2-xl")])
def test_gpt2_recipes_are_nanogpts(name, init_from):
    import importlib

    from jaxgpt import config as config_lib

    c = importlib.import_module(f"configs.{name}").get_config()
    config_lib.validate(c)
    assert c.init_from == init_from
    if name.startswith("eval"):  # nanoGPT: batch 8, 500 eval batches, eval_only
        assert (c.eval_only, c.batch_size, c.eval_iters, c.dataset) == (True, 8, 500,
                                                                         "openwebtext")
    else:  # 1 x 32 accumulation, 20 steps at a constant 3e-5, eval every 5, save on improvement
        assert (c.dataset, c.batch_size, c.gradient_accumulation_steps, c.max_iters) == \
            ("shakespeare", 1, 32, 20)
        assert (c.learning_rate, c.decay_lr, c.eval_interval, c.always_save_checkpoint) == \
            (3e-5, False, 5, False)
