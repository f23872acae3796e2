"""One fix to orbax-checkpoint, applied by checkpoint.make_manager before orbax's first write:
after a failed write, orbax's background event loop is closed only once every task in it ended.

orbax runs each background write in a fresh event loop (`asyncio_utils._run_sync_via_new_loop`,
private) and closes the loop when the write's coroutine returns. When one shard's write fails (a
full disk) that is at once, while the other shards' writes are still in tensorstore's hands:
their completions then call into the closed loop, each printing "RuntimeError: Event loop is
closed" from a C++ thread, and their tasks are logged as "exception never retrieved". Waiting
for them (they end as soon as their own writes fail) leaves the failure to be reported once, by
the main thread. tests/test_orbax_fix.py fails if orbax renames the function or changes its
signature.
"""

import asyncio

from orbax.checkpoint._src import asyncio_utils

PATCHED = "_run_sync_via_new_loop"  # orbax-checkpoint >= 0.11
ORIGINAL = getattr(asyncio_utils, PATCHED, None)  # orbax's own, before apply()


def run_to_the_end(coro):
    """orbax's `_run_sync_via_new_loop`, but the loop closes only once every task in it ended."""
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(coro)
        finally:
            pending = asyncio.all_tasks(loop)
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def apply() -> bool:
    """Put `run_to_the_end` in orbax's place (idempotent); False where this orbax has no such
    function (an orbax that does not need it, or one that renamed it: its test then fails)."""
    if not hasattr(asyncio_utils, PATCHED):
        return False
    setattr(asyncio_utils, PATCHED, run_to_the_end)
    return True
