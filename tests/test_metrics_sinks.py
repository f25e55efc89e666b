"""Metric sinks read back: the wandb offline run's records and TensorBoard's event file.

wandb offline writes a LevelDB-style log (``run-<id>.wandb``: a 7-byte header,
then 32 KiB blocks of records ``crc u32 | length u16 | type u8 | payload``,
payloads being ``wandb_internal_pb2.Record`` protobufs split over FIRST /
MIDDLE / LAST chunks). ``wandb_records`` parses it, so the test checks what
``wandb sync`` would upload, without a network or an account.
"""

import json
import socket
import struct
import time

import pytest

from gfn_dist.config import load_config
from gfn_dist.metrics import MetricLogger, read_jsonl

ROWS = [
    {"step": 10, "trajectories": 640, "loss": 2.5, "logZ": 0.75, "traj_per_s": 1000.0, "time/sample_s": 0.125},
    {"step": 20, "trajectories": 1280, "loss": 1.25, "logZ": 1.5, "l1_exact": 0.5, "time/sample_s": 0.0625},
    {"step": 30, "trajectories": 1920, "loss": 0.625, "logZ": 2.25, "l1_exact": float("nan")},  # NaN dropped
]


def wandb_records(path):
    """``wandb_internal_pb2.Record`` objects of a ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunk, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer: zero padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(chunk)
            out.append(rec)
            chunk = b""
    return out


def _item_key(item):
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir, timeout_s=30.0):
    """``(run_id, history rows, config keys, summary)`` of the one offline run under ``run_dir/wandb``.

    ``run.finish()`` can return before the wandb-core process has flushed the
    file; it is complete once it holds the exit record.
    """
    (path,) = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + timeout_s
    while True:
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    run_id, history, config_keys, summary = None, [], set(), {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_id = rec.run.run_id
            config_keys |= {_item_key(i) for i in rec.run.config.update}
        elif kind == "config":
            config_keys |= {_item_key(i) for i in rec.config.update}
        elif kind == "history":
            history.append({_item_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            summary.update({_item_key(i): json.loads(i.value_json) for i in rec.summary.update})
    return run_id, history, config_keys, summary


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """No account, and any Python-side connection off the machine fails the test."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc credentials
    attempts = []
    real_connect = socket.socket.connect

    def guarded_connect(sock, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError(f"test: network access to {address} refused")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    yield attempts
    assert attempts == []


def test_wandb_offline_by_default_records_rows(tmp_path, no_network):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    assert cfg.logging.wandb.mode == "offline"  # the default: works without an account
    run_dir = tmp_path / "run"
    m = MetricLogger.from_config(cfg, run_dir)
    for row in ROWS:
        m.log(row)
    m.close()

    run_id, history, config_keys, summary = read_offline_run(run_dir)
    assert run_id == (run_dir / "wandb" / "run_id").read_text()
    assert {"env", "learner", "logging", "loss"} <= config_keys  # the resolved config rides along
    assert [h["_step"] for h in history] == [10, 20, 30]
    for h, row in zip(history, ROWS):
        expected = {k: v for k, v in row.items() if k != "step" and v == v}
        assert {k: h[k] for k in expected} == expected
    assert "l1_exact" not in history[2]
    assert summary["loss"] == 0.625 and summary["l1_exact"] == 0.5  # last values
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [10, 20, 30]  # JSONL always

    # A resumed run (same RUN_DIR) continues the same wandb run id.
    m = MetricLogger.from_config(cfg, run_dir)
    m.log({"step": 40, "loss": 0.5})
    m.close()
    runs = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and all(p.name == f"run-{run_id}.wandb" for p in runs)


def test_wandb_disabled_and_other_ranks_write_nothing(tmp_path):
    cfg = load_config(None, ["logging.wandb.mode=disabled"])
    m = MetricLogger.from_config(cfg, tmp_path / "r0")
    m.log(ROWS[0])
    m.close()
    assert not (tmp_path / "r0" / "wandb").exists()
    assert read_jsonl(tmp_path / "r0" / "metrics.jsonl") == [ROWS[0]]
    offline = load_config(None, ["logging.tensorboard=true"])
    m1 = MetricLogger.from_config(offline, tmp_path / "r1", rank=1)
    m1.log(ROWS[0])
    m1.close()
    assert m1.sinks == [] and not (tmp_path / "r1").exists()


def test_tensorboard_event_file_has_every_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, ["logging.wandb.mode=disabled", "logging.tensorboard=true"])
    m = MetricLogger.from_config(cfg, tmp_path)
    for row in ROWS:
        m.log(row)
    m.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    keys = {k for row in ROWS for k, v in row.items() if k != "step" and v == v}
    assert set(acc.Tags()["scalars"]) == keys
    for key in keys:
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        want = [(row["step"], pytest.approx(row[key])) for row in ROWS if key in row and row[key] == row[key]]
        assert got == want, key
