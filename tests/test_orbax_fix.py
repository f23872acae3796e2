"""jaxgpt.orbax_fix: the private orbax function it replaces is still there, with the same
signature, still on orbax's path (run_sync calls it), and the replacement does what orbax's
does plus waiting for the loop's other tasks."""

import asyncio
import inspect

import pytest
from orbax.checkpoint._src import asyncio_utils

from jaxgpt import checkpoint, orbax_fix


def test_orbax_still_has_the_private_function_with_its_signature():
    assert orbax_fix.ORIGINAL is not None, f"orbax has no asyncio_utils.{orbax_fix.PATCHED}"
    assert orbax_fix.ORIGINAL.__name__ == orbax_fix.PATCHED
    assert orbax_fix.ORIGINAL.__module__ == asyncio_utils.__name__
    params = list(inspect.signature(orbax_fix.ORIGINAL).parameters.values())
    assert [(p.name, p.kind, p.default) for p in params] == [
        ("coro", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty)]
    assert inspect.signature(orbax_fix.run_to_the_end).parameters.keys() == {"coro"}
    # orbax reaches it through the module's global name, so replacing the name takes effect
    assert f"return {orbax_fix.PATCHED}(" in inspect.getsource(asyncio_utils.run_sync)


def background_write(run):
    """A write that fails at once while another task of its loop is still running (another
    shard's write): whether that task got to its end, and the error the write raised."""
    ended, tasks = [], []

    async def other_shard():
        await asyncio.sleep(0.05)
        ended.append(True)

    async def write():
        tasks.append(asyncio.get_running_loop().create_task(other_shard()))
        await asyncio.sleep(0)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left") as raised:
        run(write())
    for task in tasks:  # left pending in a closed loop (orbax's own): no warning when collected
        task._log_destroy_pending = False
        task.get_coro().close()
    return bool(ended), raised.value


def test_the_loop_closes_only_once_every_task_ended():
    assert background_write(orbax_fix.run_to_the_end)[0]
    assert not background_write(orbax_fix.ORIGINAL)[0]  # orbax's own: what the fix is for

    async def value():
        return 3

    assert orbax_fix.run_to_the_end(value()) == orbax_fix.ORIGINAL(value()) == 3


def test_make_manager_applies_it(tmp_path):
    checkpoint.make_manager(tmp_path)
    assert getattr(asyncio_utils, orbax_fix.PATCHED) is orbax_fix.run_to_the_end
    ended, _ = background_write(asyncio_utils.run_sync)  # orbax's entry point, as orbax calls it
    assert ended
