"""HellaSwag (jaxgpt/hellaswag.py): the compiled, padded, batched scorer against a plain loop
over every ending; the file's errors; the command line; the measure at every eval."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt import checkpoint, hellaswag, parallel, training
from jaxgpt import config as config_lib
from jaxgpt import data as data_lib
from jaxgpt import tokenizer as tokenizers
from jaxgpt.errors import UserError
from jaxgpt.model import GPT, GPTConfig
from tests.conftest import byte_encoding, synthetic_text, tiny
from tests.test_pretrained import REAL_BPE

ROOT = Path(__file__).resolve().parents[1]
# the test text's words of 3 letters: rows come in few lengths, so the plain loop below
# compiles a few programs, not one per example
WORDS = ["the", "cat", "sat", "mat", "and", "dog", "ran", "far"]
CHARS = tokenizers.CharTokenizer.from_text(synthetic_text(20000))  # what tiny() runs know


def examples(n: int, seed: int = 0, ctx_words=(2, 4), end_words=(1, 4)) -> list[dict]:
    """n HellaSwag-format examples of the test text's words, contexts and endings of
    different lengths."""
    rng = np.random.default_rng(seed)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS, rng.integers(lo, hi)))

    return [{"ind": i, "ctx": words(*ctx_words) + ".",
             "endings": [words(*end_words) for _ in range(4)],
             "label": int(rng.integers(4)), "split": "val"} for i in range(n)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def opinionated_model(block_size: int = 64, seed: int = 0):
    """A small random GPT whose token embeddings are scaled up, so its endings' losses are
    far apart (no near-ties for argmin to break differently)."""
    model = GPT(GPTConfig(block_size=block_size, vocab_size=CHARS.vocab_size, n_layer=2,
                          n_head=2, n_embd=32))
    params = model.init(jax.random.PRNGKey(seed), np.zeros((1, 8), np.int32))["params"]
    params = jax.tree.map(np.asarray, params)
    params["wte"]["embedding"] = params["wte"]["embedding"] * 20
    return model, params


def one_device():
    return parallel.make_mesh(config_lib.base_config())


def reference(model, params, tokenizer, rows, block_size=None):
    """build-nanogpt's scoring written plainly: each context + ending alone through
    model.apply (no padding, no batch), numpy log-softmax, the ending's tokens' losses.
    block_size: the context keeps its last tokens so that the longest ending fits."""
    apply = jax.jit(model.apply)  # the same function, compiled once per row length
    sums, means = [], []
    for row in rows:
        ctx = tokenizer.encode(row["ctx"])
        ends = [tokenizer.encode(" " + e) for e in row["endings"]]
        if block_size:
            ctx = ctx[-(block_size - max(map(len, ends))):]
        s, m = [], []
        for end in ends:
            seq = np.array(ctx + end)
            logits = np.asarray(apply({"params": params}, seq[None]), np.float64)[0]  # (L, V)
            top = logits.max(-1, keepdims=True)
            logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))  # (L, V)
            positions = np.arange(len(ctx) - 1, len(seq) - 1)  # each predicts the next token
            nll = -logp[positions, seq[positions + 1]]  # (len(end),)
            s.append(nll.sum())
            m.append(nll.mean())
        sums.append(s)
        means.append(m)
    return np.array(sums), np.array(means)  # (N, 4) each


def test_the_compiled_scorer_equals_a_plain_loop_over_each_ending(tmp_path):
    rows = examples(9)
    path = write_jsonl(tmp_path / "hs.jsonl", rows)
    model, params = opinionated_model()
    scorer = hellaswag.Scorer(model, CHARS, hellaswag.read_examples(path), 4, one_device())
    total, mean = scorer.losses(params)
    want_total, want_mean = reference(model, params, CHARS, rows)
    np.testing.assert_allclose(total, want_total, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-4)
    # argmin is decided by margins far above the float error: the same predictions
    for losses in (want_total, want_mean):
        gaps = np.diff(np.sort(losses, axis=1)[:, :2], axis=1)
        assert gaps.min() > 1e-3
    labels = np.array([r["label"] for r in rows])
    assert (total.argmin(1) == want_total.argmin(1)).all()
    assert (mean.argmin(1) == want_mean.argmin(1)).all()
    # the two rules disagree somewhere here, so acc and acc_norm are told apart
    assert (want_total.argmin(1) != want_mean.argmin(1)).any()
    result = scorer(params)
    assert result == {"hellaswag_acc": np.mean(want_total.argmin(1) == labels),
                      "hellaswag_acc_norm": np.mean(want_mean.argmin(1) == labels),
                      "hellaswag_n": 9}


def test_batch_size_and_padding_change_nothing_and_compile_once(monkeypatch):
    rows = examples(7, seed=1)
    exs = [hellaswag._parse(json.dumps(r), f"t:{i}") for i, r in enumerate(rows)]
    model, params = opinionated_model(block_size=128, seed=1)
    results = {}
    for batch_size, pad_to in ((1, 32), (3, 32), (7, 32), (4, 1), (2, 128)):
        monkeypatch.setattr(hellaswag, "PAD_TO", pad_to)  # rows of 128 or of the longest
        scorer = hellaswag.Scorer(model, CHARS, exs, batch_size, one_device())
        results[batch_size, pad_to] = scorer.losses(params)
        assert scorer.score._cache_size() == 1  # the padded last batch: the same program
    first = results[1, 32]
    for total, mean in results.values():
        np.testing.assert_allclose(total, first[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(mean, first[1], rtol=1e-5, atol=1e-5)
        assert (total.argmin(1) == first[0].argmin(1)).all()


def test_a_long_context_keeps_its_last_tokens(tmp_path):
    ctx, ends = list(range(1, 21)), [[30], [31, 32, 33], [34, 35], [36]]
    tokens, mask = hellaswag.render(ctx, ends, 8)  # the longest ending (3) leaves 5 of 20
    assert tokens.tolist() == [[16, 17, 18, 19, 20, 30, 0, 0],
                               [16, 17, 18, 19, 20, 31, 32, 33],
                               [16, 17, 18, 19, 20, 34, 35, 0],
                               [16, 17, 18, 19, 20, 36, 0, 0]]
    assert mask.sum(1).tolist() == [1, 3, 2, 1] and not mask[:, :5].any()
    # an ending longer than the row keeps one context token and its own first tokens
    tokens, mask = hellaswag.render([1, 2], [list(range(40, 50)), [3], [4], [5]], 4)
    assert tokens[0].tolist() == [2, 40, 41, 42] and mask[0].tolist() == [0, 1, 1, 1]
    # a model of block_size 32 scores what the plain loop scores on the kept context
    rows = examples(5, seed=2, ctx_words=(8, 12))
    model, params = opinionated_model(block_size=32, seed=2)
    exs = hellaswag.read_examples(write_jsonl(tmp_path / "hs.jsonl", rows))
    scorer = hellaswag.Scorer(model, CHARS, exs, 2, one_device())
    assert scorer.tokens.shape == (5, 4, 32)
    total, mean = scorer.losses(params)
    want_total, want_mean = reference(model, params, CHARS, rows, block_size=32)
    np.testing.assert_allclose(total, want_total, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("which", ["bytes", "r50k_base"])
def test_bpe_rows_are_build_nanogpts(which, monkeypatch):
    """context ids, then enc(" " + ending): render_example's rows, the mask on the ending."""
    if which == "bytes":
        enc = byte_encoding()
    else:
        if not REAL_BPE.is_dir():
            pytest.skip("GPT-2's BPE file (../shared/data/tiktoken)")
        import tiktoken

        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(REAL_BPE))
        enc = tiktoken.get_encoding("r50k_base")
    row = {"ctx": "A man is sitting on a roof. he", "label": 3,
           "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                       "is holding a rubik's cube.", "starts pulling up roofing on a roof."]}
    ex = hellaswag._parse(json.dumps(row), "t:1")
    ctx, ends = hellaswag.encode(ex, tokenizers.BPETokenizer(enc))
    tokens, mask = hellaswag.render(ctx, ends, 128)
    for i, ending in enumerate(row["endings"]):
        want = enc.encode(row["ctx"]) + enc.encode(" " + ending)
        assert tokens[i, :len(want)].tolist() == want and not tokens[i, len(want):].any()
        assert mask[i].tolist() == [False] * len(enc.encode(row["ctx"])) + \
            [True] * (len(want) - len(enc.encode(row["ctx"]))) + [False] * (128 - len(want))


@pytest.mark.parametrize("line, message", [
    ("{not json", "t.jsonl:2: not JSON"),
    ("[1, 2]", "t.jsonl:2: not a JSON object"),
    ('{"ctx": "", "endings": ["a", "b", "c", "d"], "label": 0}', '"ctx" must be'),
    ('{"ctx": "x", "endings": ["a", "b", "c"], "label": 0}', '"endings" must be a list of 4'),
    ('{"ctx": "x", "endings": ["a", "b", "c", 4], "label": 0}', '"endings" must be'),
    ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 4}', '"label" must be 0, 1, 2'),
    ('{"ctx": "x", "endings": ["a", "b", "c", "d"]}', '"label" must be'),
])
def test_a_malformed_line_is_one_line_naming_it(tmp_path, line, message):
    path = write_jsonl(tmp_path / "t.jsonl", [examples(1)[0], line, examples(1)[0]])
    with pytest.raises(UserError, match=message) as e:
        hellaswag.read_examples(path)
    assert "\n" not in str(e.value) and f"{path}:2:" in str(e.value)
    assert len(hellaswag.read_examples(path, limit=1)) == 1  # the limit stops before it


def test_missing_files_empty_files_and_unknown_characters(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        hellaswag.read_examples(tmp_path / "none.jsonl")
    with pytest.raises(UserError, match="no examples"):
        hellaswag.read_examples(write_jsonl(tmp_path / "empty.jsonl", [""]))
    row = {**examples(1)[0], "endings": ["the cat", "Zebra!", "a dog", "home"]}
    exs = hellaswag.read_examples(write_jsonl(tmp_path / "z.jsonl", [examples(1)[0], row]))
    model, _ = opinionated_model()
    with pytest.raises(UserError, match=r"z.jsonl:2: .*'!', 'Z'.*vocab_path") as e:
        hellaswag.Scorer(model, CHARS, exs, 2, one_device())
    assert "\n" not in str(e.value)


def test_the_validation_split_is_downloaded_once(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXGPT_DATA_DIR", str(tmp_path))
    want = tmp_path / "hellaswag" / "hellaswag_val.jsonl"

    def offline(url, timeout):
        raise OSError("no network")

    monkeypatch.setattr(data_lib.urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="offline\\? pass a local copy with --data=PATH"):
        hellaswag.data_file(None)
    assert not want.exists() and not want.with_suffix(".part").exists()

    class Response:
        def __init__(self, url, timeout):
            assert url == hellaswag.URL
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return False
        def read(self):
            return b'{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 1}\n'

    monkeypatch.setattr(data_lib.urllib.request, "urlopen", Response)
    assert hellaswag.data_file(None) == want and len(hellaswag.read_examples(want)) == 1
    monkeypatch.setattr(data_lib.urllib.request, "urlopen", offline)  # once: cached now
    assert hellaswag.data_file(None) == want
    assert hellaswag.data_file("mine.jsonl") == "mine.jsonl"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hellaswag")
    (root / "input.txt").write_text(synthetic_text(20000))
    training.train(tiny(root / "input.txt", max_iters=2, eval_interval=2, steps_per_call=1,
                        block_size=64), root / "run")
    write_jsonl(root / "hs.jsonl", examples(6, seed=3))
    return root


def command(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "jaxgpt.hellaswag", *map(str, args)],
                            cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_the_command_prints_the_accuracies_or_one_line(workdir, tmp_path):
    run, data = workdir / "run", workdir / "hs.jsonl"
    write_jsonl(tmp_path / "bad.jsonl", [examples(1)[0], '{"ctx": "x", "endings": []}'])
    bare = tmp_path / "bare"  # a workdir that never saved a checkpoint
    bare.mkdir()
    for f in (checkpoint.CONFIG_FILE, checkpoint.TOKENIZER_FILE):
        shutil.copy(run / f, bare / f)
    cases = {"bad.jsonl:2: \"endings\" must be": ["--workdir", run, "--data",
                                                  tmp_path / "bad.jsonl"],
             "none.jsonl: no such file": ["--workdir", run, "--data", tmp_path / "none.jsonl"],
             "no checkpoint in": ["--workdir", bare, "--data", data],
             "no such directory": ["--workdir", tmp_path / "nothing", "--data", data]}
    ok = command("--workdir", run, "--data", data, "--batch_size", "4", "--limit", "5")
    procs = {message: command(*args) for message, args in cases.items()}  # at once: faster
    for message, proc in procs.items():
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 1 and "Traceback" not in err, (message, err[-3000:])
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, (message, err)
        assert message in err, (message, err)
    out, err = ok.communicate(timeout=240)
    assert ok.returncode == 0, err[-3000:]
    from jaxgpt import pretrained

    r = pretrained.load_run(run)
    exs = hellaswag.read_examples(data, limit=5)
    result = hellaswag.Scorer(r.model, r.tokenizer, exs, 1, one_device())(r.params)
    assert out.strip() == (f"5 acc: {result['hellaswag_acc']:.4f} "
                           f"acc_norm: {result['hellaswag_acc_norm']:.4f}")


def test_hellaswag_path_is_scored_at_every_eval(tmp_path, text_file, monkeypatch):
    made = []

    class Recorded(hellaswag.Scorer):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(hellaswag, "Scorer", Recorded)
    path = write_jsonl(tmp_path / "hs.jsonl", examples(5, seed=4))
    c = tiny(text_file, max_iters=4, eval_interval=2, steps_per_call=2,
             hellaswag_path=str(path), hellaswag_limit=3)
    training.train(c, tmp_path / "run")
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in lines if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4]
    for e in evals:  # fractions of the 3 examples scored
        for k in ("hellaswag_acc", "hellaswag_acc_norm"):
            assert 0 <= e[k] <= 1 and abs(3 * e[k] - round(3 * e[k])) < 1e-9
    # one scorer for the run, of batch_size // 4 examples, compiled once for the three evals
    assert len(made) == 1 and made[0].batch_size == 2 and len(made[0].labels) == 3
    assert made[0].score._cache_size() == 1
    with pytest.raises(UserError, match="hellaswag_limit=-1"):
        config_lib.validate(tiny(text_file, hellaswag_limit=-1))
