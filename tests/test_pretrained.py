"""Starting from weights: a small random GPT-2 in Hugging Face's layout, written here with numpy,
against an independent numpy GPT-2 forward over the same files; cropping; the offline errors.

Tolerance 5e-5 on logits: float32 rounding is ~2e-6 here, while exact GELU instead of GPT-2's
tanh form moves them by ~1e-3, so a wrong activation, layout or split order fails.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from jaxgpt import pretrained
from jaxgpt import tokenizer as tokenizers
from jaxgpt.config import base_config
from jaxgpt.errors import UserError
from jaxgpt.model import make_model

pytest.importorskip("safetensors")
pytest.importorskip("tiktoken")

C, N_LAYER, N_HEAD, N_POS = 32, 2, 4, 16
MERGES = [("t", "h"), ("th", "e"), ("Ġ", "c"), ("Ġc", "a"), ("a", "t")]
VOCAB = 256 + len(MERGES) + 1  # bytes, merges, <|endoftext|>


def bytes_to_unicode() -> dict:
    """OpenAI's GPT-2 encoder.py: every byte as a printable character (its vocab.json alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_bpe_files(d):
    """merges.txt + vocab.json as GPT-2's: the 256 bytes in bytes_to_unicode order, then one
    token per merge, then <|endoftext|>."""
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))


def write_hf_gpt2(d, seed=0, bpe=True) -> dict:
    """A random GPT-2 as Hugging Face stores it: GPT2Model key names (no prefix), Conv1D weights
    stored (in, out), the attention-mask buffers, config.json. Returns the weights."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.normal(0, 0.2, shape).astype(np.float32)

    w = {"wte.weight": r(VOCAB, C), "wpe.weight": r(N_POS, C),
         "ln_f.weight": 1 + r(C), "ln_f.bias": r(C)}
    conv1d = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C),
              "mlp.c_proj": (4 * C, C)}
    for i in range(N_LAYER):
        for ln in ("ln_1", "ln_2"):
            w[f"h.{i}.{ln}.weight"], w[f"h.{i}.{ln}.bias"] = 1 + r(C), r(C)
        for name, shape in conv1d.items():
            w[f"h.{i}.{name}.weight"], w[f"h.{i}.{name}.bias"] = r(*shape), r(shape[1])
        w[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, N_POS, N_POS), np.float32))  # a buffer
    d.mkdir(parents=True, exist_ok=True)
    save_file(w, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "n_positions": N_POS, "n_ctx": N_POS, "vocab_size": VOCAB,
        "n_layer": N_LAYER, "n_head": N_HEAD, "n_embd": C, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5}))
    if bpe:
        write_bpe_files(d)
    return w


ACTIVATIONS = {  # Hugging Face's activation_function names
    "gelu_new": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "gelu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))),
    "relu": lambda x: np.maximum(x, 0)}


def gpt2_forward(w, idx, n_head=N_HEAD, activation="gelu_new", eps=1e-5, head=None):
    """GPT-2 in numpy over Hugging Face's weights: Conv1D is x @ W + b; GELU is the tanh form
    (GPT-2's). head: the (V, C) output layer, the tied wte by default."""
    act = ACTIVATIONS[activation]

    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

    def conv1d(x, name):
        return x @ w[name + ".weight"] + w[name + ".bias"]

    B, T = idx.shape
    x = w["wte.weight"][idx] + w["wpe.weight"][:T]  # (B, T, C)
    C = x.shape[-1]
    hs = C // n_head
    for i in range(sum(k.endswith(".ln_1.weight") for k in w)):
        q, k, v = np.split(conv1d(ln(x, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn"), 3, axis=-1)
        q, k, v = (t.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3) for t in (q, k, v))
        att = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs)  # (B, nh, T, T)
        att = np.where(np.tril(np.ones((T, T), bool)), att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
        x = x + conv1d(y, f"h.{i}.attn.c_proj")
        x = x + conv1d(act(conv1d(ln(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc")), f"h.{i}.mlp.c_proj")
    return ln(x, "ln_f") @ (w["wte.weight"] if head is None else head).T  # (B, T, V)


IDX = np.random.default_rng(1).integers(0, VOCAB, (2, N_POS))


def logits_of(run, idx):
    return np.asarray(run.model.apply({"params": run.params}, idx))


def test_hf_directory_gives_gpt2s_logits(tmp_path):
    w = write_hf_gpt2(tmp_path / "gpt2")
    run = pretrained.load(str(tmp_path / "gpt2"))
    assert (run.config.n_layer, run.config.n_head, run.config.n_embd) == (N_LAYER, N_HEAD, C)
    assert run.config.activation == "gelu_tanh" and run.config.bias and run.step == 0
    np.testing.assert_allclose(logits_of(run, IDX), gpt2_forward(w, IDX), atol=5e-5, rtol=5e-5)


def test_crop_block_size_keeps_the_first_positions(tmp_path):
    w = write_hf_gpt2(tmp_path / "gpt2")
    config = base_config()
    config.block_size = 8
    run = pretrained.load(str(tmp_path / "gpt2"), config)
    assert run.config.block_size == 8 and run.params["wpe"]["embedding"].shape == (8, C)
    np.testing.assert_allclose(logits_of(run, IDX[:, :8]), gpt2_forward(w, IDX)[:, :8],
                               atol=5e-5, rtol=5e-5)


def test_overrides_that_contradict_the_weights_name_the_key(tmp_path):
    write_hf_gpt2(tmp_path / "gpt2")
    config = base_config()
    config.dropout = 0.1  # free: nanoGPT's one override
    assert pretrained.load(str(tmp_path / "gpt2"), config).config.dropout == 0.1
    for key, value, match in (("n_layer", 6, "config.n_layer=6 contradicts.*n_layer=2"),
                              ("bias", False, "config.bias=False contradicts"),
                              ("block_size", 32, "block_size=32 exceeds the 16 positions")):
        config = base_config()
        config[key] = value
        with pytest.raises(UserError, match=match):
            pretrained.load(str(tmp_path / "gpt2"), config)


def test_hf_directory_tokenizer_is_its_own_bpe(tmp_path):
    write_hf_gpt2(tmp_path / "gpt2")
    tok = pretrained.load(str(tmp_path / "gpt2")).tokenizer
    ids = tok.encode(" cat the hat<|endoftext|>")
    # by hand from MERGES: " cat" = "Ġca"+"t"; " " + "the"; " " + "h" + "at"; <|endoftext|>
    byte = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    assert ids == [259, byte["t"], byte["Ġ"], 257, byte["Ġ"], byte["h"], 260, 261]
    assert tok.decode(ids) == " cat the hat<|endoftext|>" and tok.vocab_size == VOCAB
    again = tokenizers.from_dict(tok.to_dict())  # what a workdir's tokenizer.json holds
    assert again.encode(" cat") == [259, byte["t"]]


@pytest.mark.parametrize("hub", [True, False], ids=["with_hub", "without_hub"])
def test_gpt2_name_offline_and_uncached_is_one_line(tmp_path, monkeypatch, hub):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network attempt, as offline
    if not hub:
        monkeypatch.setattr(pretrained, "_download", _no_hub)
    elif not _has_hub():
        pytest.skip("huggingface_hub is not installed")
    else:  # the hub reads the variables once, at import
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(UserError) as e:
        pretrained.load("gpt2-medium")
    message = str(e.value)
    assert "\n" not in message and "openai-community/gpt2-medium" in message
    assert "--config.pretrained_dir=DIR" in message
    assert ("pip install 'jaxgpt[hf]'" in message) != hub


def _no_hub(name):
    raise ImportError("No module named 'huggingface_hub'")


def _has_hub():
    try:
        import huggingface_hub  # noqa: F401
        return True
    except ImportError:
        return False


def test_gpt2_name_found_in_pretrained_dir_and_hf_cache(tmp_path, monkeypatch):
    w = write_hf_gpt2(tmp_path / "models" / "gpt2")
    monkeypatch.setitem(pretrained.GPT2_MODELS, "gpt2", (N_LAYER, N_HEAD, C))  # a tiny "gpt2"
    config = base_config()
    config.pretrained_dir = str(tmp_path / "models")
    np.testing.assert_allclose(logits_of(pretrained.load("gpt2", config), IDX),
                               gpt2_forward(w, IDX), atol=5e-5, rtol=5e-5)
    # huggingface_hub's cache layout: models--ORG--NAME/{refs/main, snapshots/REVISION/}
    repo = tmp_path / "hf" / "hub" / "models--openai-community--gpt2"
    write_hf_gpt2(repo / "snapshots" / "abc123", seed=3)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    pytest.importorskip("huggingface_hub")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    w3 = write_hf_gpt2(tmp_path / "unused", seed=3)
    np.testing.assert_allclose(logits_of(pretrained.load("gpt2"), IDX), gpt2_forward(w3, IDX),
                               atol=5e-5, rtol=5e-5)
    monkeypatch.setitem(pretrained.GPT2_MODELS, "gpt2", (12, 12, 768))  # the real size
    with pytest.raises(UserError, match=r"not gpt2's \(12, 12, 768\)"):
        pretrained.load("gpt2")


def test_unknown_init_from_is_one_line(tmp_path):
    with pytest.raises(UserError, match="not auto, scratch, resume, gpt2"):
        pretrained.load(str(tmp_path / "nothing-here"))


def test_missing_gpt2_vocabulary_is_one_line(tmp_path, monkeypatch):
    """GPT-2's vocabulary through tiktoken, neither cached nor downloadable: one line naming
    TIKTOKEN_CACHE_DIR and where tiktoken looked."""
    import tiktoken.load

    def offline(url):
        raise ConnectionError(f"cannot reach {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    monkeypatch.setattr(tiktoken.load, "read_file", offline)  # the download, nothing else
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # not loaded earlier in this process
    write_hf_gpt2(tmp_path / "gpt2", bpe=False)  # weights without merges.txt / vocab.json
    tok = pretrained.load(str(tmp_path / "gpt2")).tokenizer  # lazy: no vocabulary needed yet
    with pytest.raises(UserError) as e:
        tok.encode("hello")
    message = str(e.value)
    assert "\n" not in message and "TIKTOKEN_CACHE_DIR" in message
    assert str(tmp_path / "tiktoken") in message


def test_crop_block_size_function():
    params = {"wpe": {"embedding": np.arange(12.0).reshape(6, 2)}, "wte": {"embedding": 1}}
    cropped = pretrained.crop_block_size(params, 4)
    np.testing.assert_array_equal(cropped["wpe"]["embedding"], np.arange(8.0).reshape(4, 2))
    assert cropped["wte"] is params["wte"] and params["wpe"]["embedding"].shape == (6, 2)


def test_model_of_a_run_is_built_from_its_config(tmp_path):
    write_hf_gpt2(tmp_path / "gpt2")
    run = pretrained.load(str(tmp_path / "gpt2"))
    again = make_model(run.config, run.tokenizer.vocab_size)
    assert again.config == run.model.config


# tiktoken's r50k_base (GPT-2's ranks) under its cache name, beside the checkout
REAL_BPE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiktoken"


@pytest.mark.skipif(not REAL_BPE.is_dir(), reason="GPT-2's BPE file (../shared/data/tiktoken)")
def test_gpt2s_real_bpe_files_give_tiktokens_ids(tmp_path, monkeypatch):
    """GPT-2's 50,257 tokens written as merges.txt + vocab.json (each merge recovered from the
    ranks: BPE over the token with only lower ranks leaves exactly two parts), read back by the
    project's own reader: the same ids as tiktoken's r50k_base on varied text."""
    import tiktoken

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(REAL_BPE))
    want = tiktoken.get_encoding("r50k_base")
    tokens = [want.decode_single_token_bytes(i) for i in range(want.eot_token)]
    ranks = {t: i for i, t in enumerate(tokens)}

    def last_merge(t: bytes, rank: int) -> tuple[bytes, bytes]:
        parts = [t[i:i + 1] for i in range(len(t))]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            assert best < rank
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts[0], parts[1]

    spell = bytes_to_unicode()
    text = lambda t: "".join(spell[b] for b in t)  # noqa: E731
    merges = [last_merge(t, i) for i, t in enumerate(tokens) if i >= 256]
    vocab = {text(t): i for i, t in enumerate(tokens)} | {"<|endoftext|>": want.eot_token}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{text(a)} {text(b)}\n" for a, b in merges))
    got = tokenizers.gpt2_encoding_from_files(tmp_path)
    assert got.encode("Hello world") == [15496, 995]
    for s in ["First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
              "  naïve café — 東京 🙂 1234567 x\t\ty's we'll <|endoftext|> ...",
              "".join(chr(c) for c in range(32, 600))]:
        assert got.encode(s, allowed_special="all") == want.encode(s, allowed_special="all")
    assert got.eot_token == want.eot_token == 50256
