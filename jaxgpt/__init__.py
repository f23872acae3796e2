"""jaxgpt: the GPT of "Let's build GPT" and nanoGPT as a pure-functional JAX/Flax program."""

from jaxgpt import parallel
from jaxgpt.errors import UserError

parallel.cpu_without_accelerators()  # before any backend starts: see its docstring

__all__ = ["UserError"]
