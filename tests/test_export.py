"""python -m jaxgpt.export: a workdir as a Hugging Face GPT-2 directory, read back two ways."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxgpt import convert, export, pretrained, training
from jaxgpt import tokenizer as tokenizers
from jaxgpt.errors import UserError
from jaxgpt.model import GPT
from tests.conftest import tiny
from tests.test_pretrained import REAL_BPE, gpt2_forward, write_bpe_files

pytest.importorskip("safetensors")
ROOT = Path(__file__).resolve().parents[1]


def hf_forward(directory: Path, idx):
    """GPT2LMHeadModel in numpy over the exported files alone: config.json + safetensors."""
    from safetensors.numpy import load_file

    hf = json.loads((directory / "config.json").read_text())
    tensors = load_file(directory / "model.safetensors")
    w = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    head = None if hf["tie_word_embeddings"] else w["lm_head.weight"]
    return gpt2_forward(w, idx, hf["n_head"], hf["activation_function"],
                        hf["layer_norm_epsilon"], head)


def trained(text_file, workdir, **overrides):
    training.train(tiny(text_file, max_iters=2, eval_interval=2, steps_per_call=1, **overrides),
                   workdir)
    return pretrained.load_run(workdir)


@pytest.mark.parametrize("overrides", [
    dict(),  # nanoGPT's: tied, exact GELU, biases
    dict(tie_weights=False, bias=False, activation="relu", attention="heads"),  # the lecture's
], ids=["nanogpt", "lecture"])
def test_export_gives_the_runs_logits_read_back_two_ways(tmp_path, text_file, overrides):
    run = trained(text_file, tmp_path / "run", **overrides)
    written = export.export(tmp_path / "run", tmp_path / "hf")
    assert {"config.json", "model.safetensors", "generation_config.json",
            "jaxgpt_tokenizer.json"} == set(written)
    idx = np.random.default_rng(0).integers(0, run.tokenizer.vocab_size, (2, 16))
    want = np.asarray(run.model.apply({"params": run.params}, idx))
    config, params = convert.from_hf_gpt2(tmp_path / "hf")
    got = np.asarray(GPT(config).apply({"params": params}, idx))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(hf_forward(tmp_path / "hf", idx), want, atol=1e-4, rtol=1e-4)
    chars = json.loads((tmp_path / "hf" / "jaxgpt_tokenizer.json").read_text())
    assert tokenizers.from_dict(chars).encode("the cat") == run.tokenizer.encode("the cat")


def test_rotary_is_refused_and_a_full_out_dir_kept(tmp_path, text_file):
    trained(text_file, tmp_path / "rope", position="rope")
    with pytest.raises(UserError, match="position='rope'") as e:
        export.export(tmp_path / "rope", tmp_path / "hf")
    assert "\n" not in str(e.value)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="--force"):
        export.export(tmp_path / "rope", out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file"):
        export.export(tmp_path / "rope", tmp_path / "file")


def test_export_to_gcs(gcs, tmp_path, text_file):
    """A gs:// OUT_DIR (the local emulator): the same files, read back through epath."""
    from etils import epath

    run = trained(text_file, tmp_path / "run")
    export.export(tmp_path / "run", "gs://test-bucket/hf")
    local = tmp_path / "copy"
    local.mkdir()
    for f in epath.Path("gs://test-bucket/hf").iterdir():
        (local / f.name).write_bytes(f.read_bytes())
    idx = np.arange(16)[None] % run.tokenizer.vocab_size
    np.testing.assert_allclose(hf_forward(local, idx),
                               run.model.apply({"params": run.params}, idx), atol=1e-4, rtol=1e-4)


def test_a_bpe_runs_tables_go_with_it(tmp_path):
    write_bpe_files(tmp_path)
    tok = tokenizers.BPETokenizer(directory=tmp_path)
    files = export._tokenizer_files(tok)
    assert files == {f: (tmp_path / f).read_text() for f in tokenizers.HF_BPE_FILES}


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for args in ([tmp_path / "missing", tmp_path / "out"], [tmp_path / "empty", tmp_path / "out"],
                 [tmp_path / "empty"]):
        r = subprocess.run([sys.executable, "-m", "jaxgpt.export", *map(str, args)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr


@pytest.mark.skipif(not REAL_BPE.is_dir(), reason="GPT-2's BPE file (../shared/data/tiktoken)")
def test_a_tiktoken_runs_tables_are_written_as_gpt2s_files(tmp_path, monkeypatch):
    """A BPE run that used tiktoken's ranks: the merges.txt + vocab.json written for it encode
    as tiktoken does (the reader is tested on its own against r50k_base)."""
    import tiktoken

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(REAL_BPE))
    want = tiktoken.get_encoding("r50k_base")
    for name, text in tokenizers.gpt2_bpe_files(want).items():
        (tmp_path / name).write_text(text)
    got = tokenizers.gpt2_encoding_from_files(tmp_path)
    s = "First Citizen:\n  naïve café — 東京 🙂 1234567 y'all <|endoftext|>"
    assert got.encode(s, allowed_special="all") == want.encode(s, allowed_special="all")
    assert json.loads((tmp_path / "vocab.json").read_text())["Ġthe"] == 262
