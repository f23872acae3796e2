"""One run per workdir: the lock file (local and on the GCS emulator), a second run refused in
one line while the first finishes as if alone, a kill -9'd run's lock taken over."""

import json
import signal
import socket
import subprocess
import sys
import time

import pytest
from etils import epath

from jaxgpt import lock, training
from jaxgpt.errors import UserError
from tests import test_preemption as runs
from tests.conftest import synthetic_text


def holder_record(host, pid, beat):
    return json.dumps({"host": host, "pid": pid, "started": "then", "heartbeat": "then",
                       "beat": beat, "token": "someone-else"})


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # gone, and not reused this soon


@pytest.fixture(params=["local", "gcs"])
def workdir(request, tmp_path):
    if request.param == "local":
        return epath.Path(tmp_path)
    request.getfixturevalue("gcs")
    return epath.Path(f"gs://test-bucket/lock-{tmp_path.name}")


def test_a_second_holder_is_refused_until_the_first_releases(workdir):
    first = lock.RunLock(workdir)
    with first:
        held = json.loads((workdir / lock.LOCK_FILE).read_text())
        assert (held["host"], held["pid"]) == (socket.gethostname(), first.me["pid"])
        with pytest.raises(UserError, match=r"is in use by another run \(host .*, pid \d+, "
                                            r"started .*take_over_lock=True"):
            lock.RunLock(workdir).acquire()
    assert not (workdir / lock.LOCK_FILE).exists()  # released
    with lock.RunLock(workdir):  # free again
        assert (workdir / lock.LOCK_FILE).exists()


def test_stale_and_dead_holders_are_taken_over_with_a_warning(workdir):
    path = workdir / lock.LOCK_FILE
    warnings = []
    # another host that stopped its heartbeat long ago
    path.write_text(holder_record("elsewhere", 1, time.time() - 2 * lock.STALE_SECS))
    with lock.RunLock(workdir, warn=warnings.append):
        assert json.loads(path.read_text())["host"] == socket.gethostname()
    assert "no heartbeat for" in warnings[-1] and "host elsewhere" in warnings[-1]
    # another host with a fresh heartbeat: refused, unless told to take over
    path.write_text(holder_record("elsewhere", 1, time.time()))
    with pytest.raises(UserError, match="host elsewhere"):
        lock.RunLock(workdir).acquire()
    with lock.RunLock(workdir, take_over=True, warn=warnings.append):
        pass
    assert "take_over_lock=True" in warnings[-1]
    # this host, a pid that is gone (its heartbeat still fresh)
    path.write_text(holder_record(socket.gethostname(), dead_pid(), time.time()))
    with lock.RunLock(workdir, warn=warnings.append):
        pass
    assert "its process is gone" in warnings[-1]


def test_the_heartbeat_refreshes_the_lock(tmp_path):
    with lock.RunLock(tmp_path, heartbeat_secs=0.05):
        first = json.loads((tmp_path / lock.LOCK_FILE).read_text())["beat"]
        time.sleep(0.5)
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["beat"] > first


def test_the_gcs_lock_is_created_with_a_generation_precondition(gcs):
    """The exclusivity is the server's: two creates of one object, the second answered 412."""
    import fsspec

    fs = fsspec.filesystem("gs")
    fs.pipe_file("test-bucket/precondition/run.lock", b"first", mode="create")
    with pytest.raises(FileExistsError):
        fs.pipe_file("test-bucket/precondition/run.lock", b"second", mode="create")
    assert fs.cat_file("test-bucket/precondition/run.lock") == b"first"


# ---------------------------------------------------------------------------------------------
# train.py, as a user runs it

SETTINGS = dict(max_iters=20, eval_interval=10, lr_decay_iters=20, steps_per_call=5)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """(text file, the metrics of a run alone on its workdir), trained in this process."""
    root = tmp_path_factory.mktemp("straight")
    (root / "input.txt").write_text(synthetic_text(20000))
    training.train(runs.cli_config(root / "input.txt", **SETTINGS), root / "run")
    return root / "input.txt", runs.events(root / "run")


def wait_for_holder(read, proc):
    """Until the lock that `read()` returns (bytes or None) names `proc` as its holder."""
    deadline = time.monotonic() + runs.TIMEOUT
    while True:
        data = read()
        if data and json.loads(data).get("pid") == proc.pid:
            return
        assert proc.poll() is None and time.monotonic() < deadline, proc.log.read_text()
        time.sleep(0.01)


def refused(args, holder) -> str:
    """Run train.py with `args` while `holder` (a train.py process) is stopped holding the lock:
    its one-line stderr."""
    holder.send_signal(signal.SIGSTOP)  # holds the lock, whatever the machine's speed
    try:
        second = subprocess.run([sys.executable, *args], cwd=runs.ROOT, capture_output=True,
                                text=True, timeout=runs.TIMEOUT)
    finally:
        holder.send_signal(signal.SIGCONT)
    assert second.returncode == 1 and second.stderr.count("\n") == 1, second.stderr
    return second.stderr


def local_lock(workdir):
    path = workdir / lock.LOCK_FILE
    return lambda: path.read_bytes() if path.exists() else None


def test_a_killed_runs_lock_is_taken_over_and_a_second_run_refused(tmp_path, straight):
    """kill -9 once it holds the lock; the same command takes it over (same host, pid gone)
    and, while it trains, a third start is refused; it ends as a run alone would."""
    text, want = straight
    workdir = tmp_path / "run"
    args = runs.cli_args(text, workdir, **SETTINGS)
    killed = runs.start(args, tmp_path / "killed.log")
    wait_for_holder(local_lock(workdir), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert (workdir / lock.LOCK_FILE).exists()  # left behind

    run = runs.start(args, tmp_path / "run.log")
    wait_for_holder(local_lock(workdir), run)
    err = refused(args, run)
    assert err.startswith(f"error: {workdir} is in use by another run (host "
                          f"{socket.gethostname()}, pid {run.pid}, started "), err
    code, out = runs.finish(run)
    assert code == 0, out[-3000:]
    assert f"pid {killed.pid}" in out and "its process is gone" in out and "Traceback" not in out
    runs.assert_same_events(runs.events(workdir), want)
    assert not (workdir / lock.LOCK_FILE).exists()


def test_a_second_run_on_gcs_is_refused_while_the_first_finishes(gcs, tmp_path, straight):
    text, want = straight
    workdir = f"gs://test-bucket/two-runs-{tmp_path.name}"
    path = epath.Path(workdir) / lock.LOCK_FILE
    args = runs.cli_args(text, workdir, **SETTINGS)
    first = runs.start(args, tmp_path / "first.log")
    wait_for_holder(lambda: path.read_bytes() if path.exists() else None, first)
    err = refused(args, first)
    assert err.startswith(f"error: {workdir} is in use by another run (host "
                          f"{socket.gethostname()}, pid {first.pid}, "), err
    code, out = runs.finish(first)
    assert code == 0, out[-3000:]
    logged = [json.loads(line) for line in
              epath.Path(f"{workdir}/metrics.jsonl").read_text().splitlines()]
    runs.assert_same_events(logged, want)
    assert not path.exists()
