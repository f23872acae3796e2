"""A trained workdir as a Hugging Face GPT-2 directory, for transformers, lm-eval-harness, vLLM.

  python -m jaxgpt.export runs/gpt2 hf/gpt2 [--checkpoint best|latest|STEP] [--force]

Writes config.json (GPT2LMHeadModel), model.safetensors (through safetensors.numpy: no torch),
generation_config.json and, for GPT-2 BPE runs, the tokenizer's merges.txt + vocab.json. A
char-level run's vocabulary is no Hugging Face tokenizer: jaxgpt's own file goes beside as
jaxgpt_tokenizer.json (tokenizer.json is the name Hugging Face's tokenizers read). WORKDIR and
OUT_DIR may be gs:// paths. A non-empty OUT_DIR is refused unless --force.
"""

import json

from absl import flags

from jaxgpt import cli, pretrained
from jaxgpt import tokenizer as tokenizers
from jaxgpt.convert import to_hf_gpt2
from jaxgpt.errors import UserError
from jaxgpt.workdir import as_path


def define_flags() -> None:
    flags.DEFINE_string("checkpoint", "best", "best (lowest val loss) | latest | a step number")
    flags.DEFINE_bool("force", False, "write into a non-empty OUT_DIR (its files are replaced)")


def _tokenizer_files(tokenizer) -> dict[str, str]:
    """The files beside the weights that turn ids back into text."""
    if tokenizer.kind != "gpt2":  # the lecture's characters: jaxgpt's own format
        return {"jaxgpt_tokenizer.json": json.dumps(tokenizer.to_dict())}
    if tokenizer.directory:  # the run read a Hugging Face directory's tables: the same files
        return {f: (as_path(tokenizer.directory) / f).read_text() for f in tokenizers.HF_BPE_FILES}
    return tokenizers.gpt2_bpe_files()


def export(workdir, out_dir, which: str = "best", force: bool = False) -> list[str]:
    """Writes the Hugging Face directory; returns the names of the files written."""
    out = as_path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out_dir} is a file: pass a directory to write the model into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out_dir} is not empty: pass --force to replace its files, or "
                        "another OUT_DIR")
    run = pretrained.load_run(workdir, which)
    if run.config.model != "gpt":
        raise UserError(f"{workdir} holds a {run.config.model} model: only a GPT exports to "
                        "GPT-2's architecture")
    hf_config, tensors = to_hf_gpt2(run.model.config, run.params)
    try:
        from safetensors.numpy import save
    except ImportError:
        raise UserError("export needs safetensors: pip install 'jaxgpt[hf]'") from None
    files = {"config.json": json.dumps(hf_config, indent=2),
             "generation_config.json": json.dumps(
                 {"bos_token_id": 50256, "eos_token_id": 50256}, indent=2),
             **_tokenizer_files(run.tokenizer)}
    try:
        out.mkdir(parents=True, exist_ok=True)
        # bytes through epath, so a gs:// OUT_DIR takes them as a local one does
        (out / "model.safetensors").write_bytes(save(tensors, metadata={"format": "pt"}))
        for name, text in files.items():
            (out / name).write_text(text)
    except OSError as e:
        raise UserError(f"cannot write to {out_dir} ({type(e).__name__}: {e.strerror or e}); "
                        "pass a writable OUT_DIR") from None
    return ["model.safetensors", *files]


def main(argv):
    workdir, out_dir = argv[1:]
    written = export(workdir, out_dir, flags.FLAGS.checkpoint, flags.FLAGS.force)
    print(f"{out_dir}: {', '.join(written)}; load with "
          f"transformers.GPT2LMHeadModel.from_pretrained({str(out_dir)!r})")


if __name__ == "__main__":
    define_flags()
    cli.run(main, positional=("WORKDIR", "OUT_DIR"))
