"""Every dataset by name: the table the `dataset` config key is looked up in.

Text (data.load_text: a char-level text, or tiny Shakespeare in GPT-2's BPE) and tasks with
their own examples (addition.py, the lecture's exercise 2) by name; any other name is a
directory of prepared token files (data.load_bins: nanoGPT's train.bin / val.bin).
"""

from jaxgpt import addition, data

LOADERS = {name: data.load_text for name in data.TEXT_DATASETS} | {"addition": addition.load}


def load(config, tokenizer=None) -> data.Dataset:
    """The dataset `config.dataset` names; `tokenizer` is the vocabulary of weights the run
    starts from (pretrained.py), which the data must be encoded with (default: its own)."""
    return LOADERS.get(config.dataset, data.load_bins)(config, tokenizer)
