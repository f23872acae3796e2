"""jaxgpt: the GPT of "Let's build GPT" and nanoGPT as a pure-functional JAX/Flax program."""

from jaxgpt.errors import UserError

__all__ = ["UserError"]
