"""Every source of trained weights: OpenAI's GPT-2 (nanoGPT's init_from='gpt2*'), a Hugging Face
GPT-2 directory, or a jaxgpt workdir (`load_run`: what sample.py and the notebook load; as
init_from, the lecture's exercise 3: pretrain, then finetune).

    run = pretrained.load("gpt2-xl", config)  # Run(config, tokenizer, model, params, step)

As nanoGPT's `GPT.from_pretrained` + `crop_block_size`: the weights fix the model's shape (layers,
heads, width, vocabulary, bias, activation); `dropout` and the compute settings stay the run's;
`block_size` may be cropped below the weights' (the position table loses its tail). A model key
left at its default follows the weights; one set to anything else is a one-line error naming it.

OpenAI's weights are found in `config.pretrained_dir` (the model's directory, or a directory with
one subdirectory per name), else in the Hugging Face cache, else downloaded through
`huggingface_hub` (the `[hf]` extra).
"""

import logging
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from jaxgpt import checkpoint, parallel, step
from jaxgpt import config as config_lib
from jaxgpt import tokenizer as tokenizers
from jaxgpt.convert import from_hf_gpt2
from jaxgpt.errors import UserError
from jaxgpt.gpt_config import WEIGHT_KEYS, GPTConfig
from jaxgpt.model import make_model
from jaxgpt.workdir import as_path, is_remote

GPT2_MODELS = {  # name -> (n_layer, n_head, n_embd), as nanoGPT's from_pretrained
    "gpt2": (12, 12, 768),  # 124M params
    "gpt2-medium": (24, 16, 1024),  # 350M
    "gpt2-large": (36, 20, 1280),  # 774M
    "gpt2-xl": (48, 25, 1600),  # 1558M
}
HF_ORG = "openai-community"  # where the Hugging Face hub keeps OpenAI's GPT-2 repositories
HF_FILES = ("config.json", "model.safetensors")
# keys the weights fix: a run may set them only to the weights' values (block_size: crop)
FIXED_KEYS = tuple(k for k in WEIGHT_KEYS if k != "block_size")


class Run(NamedTuple):
    """A trained model, ready to sample or evaluate (what `load_run` and `load` return)."""

    config: ml_collections.ConfigDict
    tokenizer: Any  # tokenizer.CharTokenizer | tokenizer.BPETokenizer
    model: Any  # model.GPT | model.BigramLanguageModel
    params: Any
    step: int


def load_run(workdir, which: str | int = "best") -> Run:
    """A trained workdir in one call: its config, tokenizer, model and the params of the
    checkpoint with the lowest val loss ("best"), the newest ("latest") or a given step.

        run = load_run("runs/shakespeare_cpu")
        logits = run.model.apply({"params": run.params}, idx)
    """
    if not as_path(workdir).is_dir():  # a local directory or gs://bucket/run
        raise UserError(f"{workdir}: no such directory; pass a workdir written by train.py")
    config = checkpoint.load_config(workdir)
    tokenizer = checkpoint.load_tokenizer(workdir)
    model = make_model(config, tokenizer.vocab_size)
    # the checkpoint's shapes, on one device (nothing is initialised for real)
    abstract = step.abstract_train_state(config, model, parallel.one_device_mesh())
    if which == "best":
        at = checkpoint.best_step(workdir)  # None if no metrics can be read: then the latest
    else:
        at = None if which == "latest" else int(which)
    state, at = checkpoint.restore(workdir, abstract, at)
    return Run(config, tokenizer, model, state.params, at)


def is_weights(init_from: str) -> bool:
    """True when init_from names weights to start from, not this workdir's own checkpoints."""
    return init_from not in config_lib.INIT_FROM


def _is_hf_dir(d: Path) -> bool:
    return all((d / f).is_file() for f in HF_FILES)


def _hf_cache_snapshot(name: str) -> Path | None:
    """The Hugging Face cache's snapshot of `name`, asked of huggingface_hub (its cache dir,
    HF_HOME / HF_HUB_CACHE, the `main` revision), if it is installed and holds the files."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None  # then _download says what to install
    for repo in (f"{HF_ORG}/{name}", name):
        paths = [try_to_load_from_cache(repo, f) for f in HF_FILES]
        if all(isinstance(p, str) for p in paths):  # else None or "known not to exist"
            return Path(paths[0]).parent
    return None


def _download(name: str) -> Path:
    from huggingface_hub import hf_hub_download  # ImportError: the caller says what to install

    repo = f"{HF_ORG}/{name}"
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # offline, each retry would print a warning
    try:
        paths = [Path(hf_hub_download(repo, f)) for f in HF_FILES]
        for f in tokenizers.HF_BPE_FILES:  # the vocabulary too: no tiktoken download needed
            hf_hub_download(repo, f)
    finally:
        hub_log.setLevel(level)
    return paths[0].parent


def gpt2_directory(name: str, pretrained_dir: str = "") -> Path:
    """The local directory of OpenAI's `name` weights: pretrained_dir (itself or its `name`
    subdirectory), else the Hugging Face cache, else a download into that cache."""
    where = (f"put config.json, model.safetensors, merges.txt and vocab.json of {HF_ORG}/{name} "
             f"in a directory DIR and pass init_from=DIR (train.py: or "
             f"--config.pretrained_dir=DIR)")
    if pretrained_dir:
        root = Path(pretrained_dir).expanduser()
        for d in (root / name, root):
            if _is_hf_dir(d):
                return d
        raise UserError(f"config.pretrained_dir={pretrained_dir} holds no {name} weights "
                        f"(config.json + model.safetensors, there or in {name}/): {where}")
    cached = _hf_cache_snapshot(name)
    if cached is not None:
        return cached
    try:
        return _download(name)
    except ImportError:
        reason = "huggingface_hub is not installed: pip install 'jaxgpt[hf]'"
    except Exception as e:  # noqa: BLE001  offline, refused, a proxy: the hub raises many types
        reason = f"the download failed: {type(e).__name__}"
    raise UserError(f"init_from={name}: OpenAI's weights are not in the Hugging Face cache and "
                    f"{reason}; offline? {where}")


def _check_gpt2_shape(name: str, config: ml_collections.ConfigDict, directory: Path) -> None:
    want = GPT2_MODELS[name]
    have = (config.n_layer, config.n_head, config.n_embd)
    if have != want:
        raise UserError(f"{directory} holds a model of n_layer, n_head, n_embd = {have}, not "
                        f"{name}'s {want}: point pretrained_dir at {name}'s weights")


def _hf_source(directory: Path):
    """(model config keys, tokenizer, params) of a Hugging Face GPT-2 directory."""
    gpt_config, params = from_hf_gpt2(directory)
    config = config_lib.base_config()
    config.model = "gpt"
    for key in GPTConfig.keys("weights"):
        config[key] = getattr(gpt_config, key)
    if tokenizers.has_bpe_files(directory):  # its own tables: nothing to download
        tokenizer = tokenizers.BPETokenizer(directory=directory)
    else:  # GPT-2's, through tiktoken, loaded on the first encode (bins need only the size)
        tokenizer = tokenizers.BPETokenizer(lazy=True)
    return config, tokenizer, params


def _workdir_source(workdir):
    """(config, tokenizer, params, step) of the best checkpoint of a jaxgpt workdir."""
    run = load_run(workdir, "best")
    return run.config, run.tokenizer, run.params, run.step


def source(init_from: str, pretrained_dir: str = ""):
    """(config, tokenizer, params, step) of the weights `init_from` names, as they are."""
    if init_from in GPT2_MODELS:
        directory = gpt2_directory(init_from, pretrained_dir)
        config, tokenizer, params = _hf_source(directory)
        _check_gpt2_shape(init_from, config, directory)
        return config, tokenizer, params, 0
    path = Path(init_from).expanduser()
    if _is_hf_dir(path):
        return (*_hf_source(path), 0)
    if is_remote(init_from) or (path / "checkpoints").is_dir():  # gs://... : a workdir
        return _workdir_source(as_path(init_from))
    raise UserError(f"init_from={init_from!r}: not auto, scratch, resume, "
                    f"{', '.join(GPT2_MODELS)}, a jaxgpt workdir (config.json + checkpoints/) "
                    "or a Hugging Face GPT-2 directory (config.json + model.safetensors)")


def merge(config, weights_config, vocab_size: int, init_from: str):
    """A copy of the run's `config` with the model keys the weights fix, and a cropped
    block_size if the run asks for one; a contradicting key is a UserError naming it."""
    defaults = config_lib.base_config()
    out = config.copy_and_resolve_references()
    have = {k: weights_config[k] for k in FIXED_KEYS}
    have["vocab_size"] = weights_config.vocab_size or vocab_size  # 0: the tokenizer's size
    for key, value in have.items():
        if config[key] != defaults[key] and config[key] != value:
            raise UserError(f"config.{key}={config[key]!r} contradicts init_from={init_from}, "
                            f"whose weights have {key}={value!r}: leave config.{key} unset")
        out[key] = value
    block_size = weights_config.block_size
    if config.block_size != defaults.block_size:
        if config.block_size > block_size:
            raise UserError(f"config.block_size={config.block_size} exceeds the "
                            f"{block_size} positions of init_from={init_from}: it can only be "
                            "cropped (a smaller block_size)")
        block_size = config.block_size
    out.block_size = block_size
    return out


def crop_block_size(params: dict, block_size: int) -> dict:
    """nanoGPT's model surgery: keep the first `block_size` rows of the position table (the
    causal mask has no weights here, so nothing else changes)."""
    if "wpe" not in params:  # the bigram model has no positions
        return params
    wpe = np.asarray(params["wpe"]["embedding"])[:block_size]  # (block_size, C)
    return {**params, "wpe": {"embedding": wpe}}


def load(init_from: str, config=None):
    """The weights `init_from` names as a Run(config, tokenizer, model, params, step) shaped for
    `config` (the run's; default: every key at its default): the model keys the weights fix,
    the run's dropout and compute settings, block_size cropped if asked."""
    config = config if config is not None else config_lib.base_config()
    weights_config, tokenizer, params, step = source(init_from, config.get("pretrained_dir", ""))
    config = merge(config, weights_config, tokenizer.vocab_size, init_from)
    params = crop_block_size(params, config.block_size)
    return Run(config, tokenizer, make_model(config, tokenizer.vocab_size), params, step)
