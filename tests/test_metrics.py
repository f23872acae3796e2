"""metrics.jsonl, TensorBoard event files and W&B (offline), each read back by its own reader:
json, TensorBoard's EventAccumulator, and W&B's record log parsed from its file format."""

import json
import struct
import time

import pytest
from etils import epath

from jaxgpt import metrics
from jaxgpt.config import base_config
from jaxgpt.errors import UserError

EVENTS = [("eval", 0, {"train_loss": 4.25, "val_loss": 4.5}),
          ("train", 0, {"loss": 4.0, "grad_norm": 1.5, "lr": 1e-4}),
          ("train", 1, {"loss": 3.5, "grad_norm": 1.25, "lr": 2e-4}),
          ("eval", 2, {"train_loss": 3.25, "val_loss": 3.75})]


def write_run(workdir, config=None, events=EVENTS):
    m = metrics.Metrics(workdir, config or base_config())
    for event, step, values in events:
        m.write(event, step, **values)
    m.close()


def tensorboard_scalars(workdir) -> dict:
    """{tag: [(step, value)]} as TensorBoard reads the directory (every event file in it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(workdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_scalars(events=EVENTS) -> dict:
    want = {}
    for event, step, values in events:
        for k, v in values.items():
            want.setdefault(f"{event}/{k}", []).append((step, pytest.approx(v)))
    return want


def read_jsonl(path) -> list:
    return [json.loads(line) for line in epath.Path(path).read_text().splitlines()]


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_jsonl_and_tensorboard_read_back(where, tmp_path, request):
    if where == "gcs":
        request.getfixturevalue("gcs")
        workdir = f"gs://test-bucket/metrics-{tmp_path.name}"
    else:
        workdir = tmp_path
    write_run(workdir)
    assert read_jsonl(f"{workdir}/metrics.jsonl") == [
        {"event": e, "step": s, **v} for e, s, v in EVENTS]
    assert tensorboard_scalars(workdir) == expected_scalars()


def test_a_resumed_run_keeps_the_earlier_lines_on_gcs(gcs, tmp_path):
    workdir = f"gs://test-bucket/resumed-{tmp_path.name}"
    write_run(workdir, events=EVENTS[:2])
    write_run(workdir, events=EVENTS[2:])  # a second process start: new event file, same jsonl
    assert [(e["event"], e["step"]) for e in read_jsonl(f"{workdir}/metrics.jsonl")] == [
        (e, s) for e, s, _ in EVENTS]
    assert len(list(epath.Path(workdir).glob("events.out.tfevents.*"))) == 2
    assert tensorboard_scalars(workdir) == expected_scalars()


def test_remote_flushes_are_spaced_out_unless_forced(gcs, tmp_path):
    path = epath.Path(f"gs://test-bucket/spaced-{tmp_path.name}.txt")
    f = metrics.AppendFile(path)
    f.write(b"a")
    f.flush(force=False)  # the first flush goes out
    f.write(b"b")
    f.flush(force=False)  # within REMOTE_FLUSH_SECS: held back
    assert path.read_bytes() == b"a"
    f.flush()
    assert path.read_bytes() == b"ab"


def cut_last_line(path, keep: int = 12) -> None:
    """The file as a write that never finished leaves it: its last line cut after `keep` bytes."""
    path = epath.Path(path)
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[:start + keep])


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_a_resumed_run_never_continues_a_cut_line(where, tmp_path, request, capsys):
    if where == "gcs":
        request.getfixturevalue("gcs")
        workdir = f"gs://test-bucket/cut-{tmp_path.name}"
    else:
        workdir = tmp_path
    path = f"{workdir}/metrics.jsonl"
    write_run(workdir, events=EVENTS[:2])
    cut_last_line(path)  # the run stopped mid-write: '{"event": "t'
    capsys.readouterr()
    write_run(workdir, events=EVENTS[2:])  # the resumed run
    assert capsys.readouterr().err.count("cut short") == 1
    lines = epath.Path(path).read_text().splitlines()
    assert lines[1] == '{"event": "t'  # the fragment stays alone on its line
    assert [json.loads(line) for line in lines[2:]] == [
        {"event": e, "step": s, **v} for e, s, v in EVENTS[2:]]  # every new record whole
    kept = [EVENTS[0], *EVENTS[2:]]
    assert metrics.read(workdir) == [{"event": e, "step": s, **v} for e, s, v in kept]
    assert capsys.readouterr().err.count("skipped 1 line of") == 1
    write_run(workdir, events=EVENTS[3:])  # a file that ends with its newline: no new line
    assert "cut short" not in capsys.readouterr().err
    assert len(epath.Path(path).read_text().splitlines()) == len(lines) + 1


def test_read_skips_every_line_that_is_not_a_json_object_and_says_so_once(tmp_path, capsys):
    """Also a file written before resumed runs started a new line: a record glued onto the
    fragment of a cut one."""
    good = [{"event": "eval", "step": 0, "val_loss": 4.5}, {"event": "train", "step": 1}]
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps(good[0]) + "\n" + '{"event": "train", "st{"event": "train", "step": 9}\n'
        + "\n" + "3.5\n" + json.dumps(good[1]) + '\n{"event": "ev')
    assert metrics.read(tmp_path) == good
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "skipped 3 lines of" in err
    (tmp_path / "metrics.jsonl").write_text(json.dumps(good[0]) + "\n")
    assert metrics.read(tmp_path) == good[:1] and capsys.readouterr().err == ""


def test_other_processes_write_nothing(tmp_path):
    m = metrics.Metrics(tmp_path, base_config(), enabled=False)
    m.write("train", 0, loss=1.0)
    m.close()
    assert list(tmp_path.iterdir()) == []


def wandb_history(run_file) -> list:
    """The history rows of a W&B run file (LevelDB log blocks of wandb_internal_pb2.Record)."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    records, chunk, pos = [], b"", 7  # after the ":W&B" + magic + version header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # no room for a record header: the block's tail is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])  # after a crc32c
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST piece of one
            records.append(chunk)
            chunk = b""
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, its run directories under tmp_path/wandb. wandb's process-wide setup keeps
    the WANDB_DIR it first saw: tear it down around each test so each gets its own."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()
    yield
    wandb.teardown()


def test_wandb_offline_gets_the_same_scalars(tmp_path, wandb_offline):
    config = base_config()
    config.wandb_log, config.wandb_project, config.wandb_run_name = True, "jaxgpt", "test"
    write_run(tmp_path / "run", config)
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    # W&B's service process writes the file; on a loaded machine its last blocks can land
    # shortly after finish() returns: read it again until the rows are there (at most 60 s)
    deadline = time.monotonic() + 60
    while not (rows := wandb_history(run_file)) and time.monotonic() < deadline:
        time.sleep(0.5)
    got = {}
    for row in rows:
        for k, v in row.items():
            if not k.startswith("_"):
                got.setdefault(k, []).append((row["_step"], pytest.approx(v)))
    assert got == expected_scalars()


def test_wandb_resumed_run_keeps_its_id(tmp_path, wandb_offline):
    config = base_config()
    config.wandb_log, config.wandb_project, config.wandb_run_name = True, "jaxgpt", "test"
    ids = []
    for workdir in ("run", "run", "other"):  # a start, its resumption, another run
        m = metrics.Metrics(tmp_path / workdir, config)
        ids.append(m.wandb.id)
        m.close()
    assert ids[0] == ids[1] != ids[2]
    for workdir, run_id in (("run", ids[0]), ("other", ids[2])):
        assert (tmp_path / workdir / metrics.WANDB_ID_FILE).read_text() == run_id
    # offline-run-<time>-<id>, with "-1" after it when a resumption starts in the same second
    runs = sorted(p.name.split("-")[3] for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert runs == sorted(ids)


def test_wandb_asked_for_but_missing(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # import wandb fails
    config = base_config()
    config.wandb_log = True
    with pytest.raises(UserError, match=r"pip install 'jaxgpt\[wandb\]'"):
        metrics.check_wandb(config)
