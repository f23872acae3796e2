"""jaxgpt: the GPT of "Let's build GPT" and nanoGPT as a pure-functional JAX/Flax program."""

from jaxgpt import parallel
from jaxgpt.errors import UserError

# On import, not in the entry points: Python users (the notebook, load_run) start JAX too, and
# on a machine with libtpu but no TPU this keeps libtpu's warnings from them; see its docstring.
parallel.cpu_without_accelerators()

__all__ = ["UserError"]
