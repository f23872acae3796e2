"""Carry a nanoGPT run over: its ckpt.pt becomes a jaxgpt workdir to sample, evaluate or train on.

  python -m jaxgpt.import_nanogpt out-shakespeare-char/ckpt.pt runs/imported \
      [--meta data/shakespeare_char/meta.pkl]

The params, and AdamW's two moments, go through `convert.from_nanogpt`; the run's settings come
from the checkpoint's `config` (nanoGPT's key names are jaxgpt's); the step and the optimizer's
step counts are nanoGPT's `iter_num`, so `train.py --workdir runs/imported` continues the run
where it stopped, on the same learning-rate schedule. The vocabulary: `meta.pkl` (nanoGPT's
char-level datasets) if given, else GPT-2's BPE. Reading ckpt.pt needs torch (the `[torch]`
extra); nothing else does.
"""

import pickle
from pathlib import Path

import jax
import optax
from absl import flags

from jaxgpt import checkpoint, cli, parallel
from jaxgpt import config as config_lib
from jaxgpt import tokenizer as tokenizers
from jaxgpt.convert import from_nanogpt
from jaxgpt.errors import UserError
from jaxgpt.gpt_config import WEIGHT_KEYS
from jaxgpt.model import make_model
from jaxgpt.step import create_train_state
from jaxgpt.workdir import as_path


def define_flags() -> None:
    """The command line's flags: defined only when run as a command, so importing this
    module defines none (two commands' flags of the same name would clash)."""
    flags.DEFINE_string("meta", None, "nanoGPT's data/DATASET/meta.pkl for a char-level run "
                        "(default: GPT-2's BPE).")


# nanoGPT's train.py settings that are not jaxgpt's to take over: where and how it ran
NOT_CARRIED = {"init_from", "dtype", "eval_only"}


def read_ckpt(path) -> dict:
    """nanoGPT's checkpoint dict (torch tensors inside), read without running pickled code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such file; pass nanoGPT's OUT_DIR/ckpt.pt")
    try:
        import torch
    except ImportError:
        raise UserError("reading a nanoGPT ckpt.pt needs torch: pip install 'jaxgpt[torch]' "
                        "(the CPU wheel is enough)") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  not a torch file, truncated, ...
        raise UserError(f"{path} cannot be read as a torch checkpoint "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def read_meta(path):
    """A CharTokenizer from nanoGPT's data/*/meta.pkl (vocab_size, itos, stoi)."""
    try:
        with open(Path(path).expanduser(), "rb") as f:
            meta = pickle.load(f)
        return tokenizers.CharTokenizer([meta["itos"][i] for i in range(meta["vocab_size"])])
    except (OSError, pickle.UnpicklingError, KeyError, TypeError, EOFError) as e:
        raise UserError(f"--meta={path}: not nanoGPT's meta.pkl ({type(e).__name__}: {e})") \
            from None


def run_config(ckpt: dict, gpt_config):
    """jaxgpt's config for the run: nanoGPT's settings where the names match, the model's
    shape from the weights."""
    config = config_lib.base_config()
    for key, value in ckpt.get("config", {}).items():
        if key in config and key not in NOT_CARRIED and key not in WEIGHT_KEYS and \
                isinstance(value, type(config[key])):
            config[key] = value
    for key in WEIGHT_KEYS:
        if hasattr(gpt_config, key):
            config[key] = getattr(gpt_config, key)
    config.model = "gpt"
    return config


def adam_moments(ckpt: dict) -> tuple[dict, dict] | None:
    """nanoGPT's AdamW `exp_avg` / `exp_avg_sq` as two state dicts in its naming, or None.

    torch numbers the optimizer's params in the order of its param groups: nanoGPT's
    `configure_optimizers` puts every >= 2-D param first, then the rest, each in
    `named_parameters()` order (the state_dict's, less the tied lm_head and the mask buffers).
    """
    state = ckpt.get("optimizer", {}).get("state")
    if not state:
        return None
    names = [k for k in ckpt["model"] if not k.endswith((".attn.bias", "lm_head.weight"))]
    ndim = {k: len(ckpt["model"][k].shape) for k in names}
    order = [k for k in names if ndim[k] >= 2] + [k for k in names if ndim[k] < 2]
    if len(order) != len(state):
        raise UserError(f"the optimizer state holds {len(state)} params, the model "
                        f"{len(order)}: not a checkpoint of nanoGPT's train.py")
    return tuple({name: state[i][moment] for i, name in enumerate(order)}
                 for moment in ("exp_avg", "exp_avg_sq"))


def with_adam_state(opt_state, step: int, moments, model_args):
    """`opt_state` (a fresh optax AdamW chain's) with the step counts at `step` and, if given,
    nanoGPT's moments in jaxgpt's layout."""
    if moments is not None:
        mu, nu = (from_nanogpt(m, model_args)[1] for m in moments)

    def fill(x):
        if isinstance(x, optax.ScaleByAdamState):
            if moments is not None:
                x = x._replace(mu=jax_tree_like(mu, x.mu), nu=jax_tree_like(nu, x.nu))
            return x._replace(count=x.count + step)
        if isinstance(x, optax.ScaleByScheduleState):  # the learning rate's schedule
            return x._replace(count=x.count + step)
        return x

    return jax.tree.map(fill, opt_state, is_leaf=lambda x: isinstance(
        x, (optax.ScaleByAdamState, optax.ScaleByScheduleState)))


def import_run(ckpt: dict, workdir, tokenizer=None) -> int:
    """Write nanoGPT's checkpoint dict as a jaxgpt workdir; returns the step it holds."""
    missing = [k for k in ("model", "model_args") if k not in ckpt]
    if missing:
        raise UserError(f"not a nanoGPT checkpoint: it has no {', '.join(missing)}")
    gpt_config, params = from_nanogpt(ckpt["model"], ckpt["model_args"])
    tokenizer = tokenizer or tokenizers.BPETokenizer(lazy=True)
    if tokenizer.vocab_size > gpt_config.vocab_size:
        raise UserError(f"the vocabulary has {tokenizer.vocab_size} tokens but the model only "
                        f"{gpt_config.vocab_size}: pass the run's own --meta")
    config = run_config(ckpt, gpt_config)
    workdir = as_path(workdir)  # a local directory or gs://bucket/run
    if (workdir / checkpoint.CHECKPOINT_DIR).exists():
        raise UserError(f"{workdir} already holds checkpoints: import into a new directory")
    moments = adam_moments(ckpt)
    workdir.mkdir(parents=True, exist_ok=True)
    model = make_model(config, tokenizer.vocab_size)
    state = create_train_state(config, model, parallel.one_device_mesh())
    step = int(ckpt.get("iter_num", 0))
    state = state.replace(step=state.step + step, params=jax_tree_like(params, state.params),
                          opt_state=with_adam_state(state.opt_state, step, moments,
                                                    ckpt["model_args"]))
    manager = checkpoint.make_manager(workdir, config.keep_best)
    val = float(ckpt.get("best_val_loss", 1e9))  # nanoGPT's "none yet" value
    checkpoint.write_run_info(workdir, config, tokenizer)
    if not checkpoint.save(manager, state, val):
        raise UserError(f"the checkpoint could not be written to {workdir}")
    manager.wait_until_finished()
    manager.close()
    return int(state.step)


def jax_tree_like(params: dict, like):
    """Converted numpy arrays as arrays with the dtypes and shardings of `like`."""
    return jax.tree.map(lambda p, x: jax.device_put(p.astype(x.dtype), x.sharding), params, like)


def main(argv):
    ckpt_path, workdir = argv[1:]
    tokenizer = read_meta(flags.FLAGS.meta) if flags.FLAGS.meta else None
    step = import_run(read_ckpt(ckpt_path), workdir, tokenizer)
    print(f"{workdir}: nanoGPT's step {step}, params and AdamW state; sample with "
          f"python sample.py --workdir {workdir}, continue with python train.py "
          f"--config ... --workdir {workdir}")


if __name__ == "__main__":
    define_flags()
    cli.run(main, positional=("CKPT", "WORKDIR"))
