"""The one exception type for bad input a user can fix (config, data, prompt, checkpoint).

The CLIs print its message as one line and exit with status 1; anything else is a bug and
keeps its traceback.
"""


class UserError(ValueError):
    """Bad input, with a message that says what to do."""
