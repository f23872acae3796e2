"""What every entry point (train.py, sample.py, python -m jaxgpt.*) shares: flag parsing and
one-line errors."""

import gc
import logging as pylogging
import sys

from absl import app, flags, logging

from jaxgpt.errors import UserError
from jaxgpt.preemption import Preempted


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr, flush=True)
    # work abandoned by background threads (orbax's write coroutines after a failed save) is
    # finalized at interpreter exit, each with an "Exception ignored in" traceback: the line
    # above said what failed
    sys.unraisablehook = lambda unraisable: None
    sys.exit(1)


def _hide_orbax_errors(record) -> bool:
    """A failed checkpoint write is logged as an error by each of orbax's background threads
    (and by asyncio, for each of its write tasks whose exception nobody retrieved), then raised
    in the main thread, which reports it in one line: drop the thread logs."""
    return not (record.levelno >= pylogging.ERROR
                and ("orbax" in record.pathname or "orbax" in record.getMessage()))


def _one_line(e: Exception) -> str:
    # ml_collections nests KeyError reprs: "'\\'n_embed\\'\\nDid you mean ...'"
    text = str(e).replace("\\n", " ").replace("\\", "").replace("\n", " ").replace("'", "")
    return " ".join(text.split())


def parse_flags(argv, positional=()):
    """absl's parser, with ml_collections override errors (a misspelled --config.KEY, a value
    of the wrong type) turned into one line instead of a traceback; exactly the `positional`
    arguments (names, for the message) besides the flags, or at least as many where the last
    name ends in "..." (one or more of it: ("WORKDIR...",)); a name in brackets may be left out
    ("[SOURCE]", "OUT_DIR": one or two)."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        _fail(f"bad --config override: {_one_line(e)}")
    given = len(rest) - 1
    more = bool(positional) and positional[-1].endswith("...")
    required = sum(not name.startswith("[") for name in positional)  # "[NAME]": optional
    if given < required or (not more and given > len(positional)):
        expected = f"expected {' '.join(positional)}" if positional else "unexpected arguments"
        _fail(f"{expected} (got: {' '.join(rest[1:]) or 'none'})")
    return rest


def run(main, positional=()):
    """app.run(main) with UserError printed as `error: ...` (exit 1) and JAX's start-up INFO
    lines hidden unless -v/--verbosity is given."""
    # what is imported by now (JAX, Flax, orbax: ~10^6 objects) lives as long as the process:
    # out of the cyclic collector's sight, each full collection skips it, the one at exit too
    # (0.3 s of every command's exit on a 2-core CPU)
    gc.freeze()

    def wrapped(argv):
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
            logging.get_absl_handler().addFilter(_hide_orbax_errors)  # asyncio's records too
        try:
            if "config" in flags.FLAGS:  # config files load lazily: surface a bad path here
                flags.FLAGS.config.keys()
        except OSError as e:
            _fail(f"cannot load --config: {_one_line(e)}")
        try:
            main(argv)
        except UserError as e:
            _fail(str(e))
        except Preempted as e:  # stopped by SIGTERM / Ctrl-C after saving: not a success
            print(e, file=sys.stderr, flush=True)
            sys.exit(e.exit_code)

    app.run(wrapped, flags_parser=lambda argv: parse_flags(argv, positional))
