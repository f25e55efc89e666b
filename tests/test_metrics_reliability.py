"""Metrics that survive crashes and full disks (gfn_dist.metrics). No Ray."""

import errno
import json
import logging
import os

import pytest

from gfn_dist import metrics as m
from gfn_dist.cli import main as cli_main
from gfn_dist.metrics import DiskFullError, JsonlSink, MetricLogger, read_metrics, truncate_metrics_after


def _rows(n, start=1):
    return [{"step": s, "loss": 1.0 / s, "traj_per_s": 100.0 + s, "trajectories": 16 * s} for s in range(start, start + n)]


def _fill(path, rows):
    sink = JsonlSink(path)
    for r in rows:
        sink.write(r)
    sink.close()


class _DiskFillsUp:
    """``os.write`` that writes ``allow`` more bytes to ``fd``, then fails with ENOSPC (a short write first)."""

    def __init__(self, fd, allow):
        self.fd, self.allow, self.real = fd, allow, os.write

    def __call__(self, fd, data):
        if fd != self.fd:
            return self.real(fd, data)
        if self.allow <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = self.real(fd, bytes(data[: self.allow]))
        self.allow -= n
        return n


def test_each_row_is_one_whole_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _fill(path, _rows(3))
    assert path.read_text().count("\n") == 3
    assert read_metrics(path) == _rows(3)
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


def test_disk_full_skips_the_row_whole_and_raises_one_line(tmp_path, monkeypatch, caplog):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.write(_rows(1)[0])
    size = path.stat().st_size
    monkeypatch.setattr(os, "write", _DiskFillsUp(sink._fd, allow=10))  # 10 bytes of the row land, then ENOSPC
    with caplog.at_level(logging.WARNING), pytest.raises(DiskFullError) as info:
        sink.write(_rows(1, start=2)[0])
    err = info.value
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert "\n" not in str(err) and str(path) in str(err) and "step 2" in str(err)
    assert path.stat().st_size == size  # the 10 bytes were cut back: no torn row
    assert read_metrics(path) == _rows(1)
    assert sum("disk full" in r.getMessage() for r in caplog.records) == 1
    sink.close()


def test_disk_full_without_stop_skips_rows_with_one_warning(tmp_path, monkeypatch, caplog):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path, stop_on_disk_full=False)
    monkeypatch.setattr(os, "write", _DiskFillsUp(sink._fd, allow=0))
    with caplog.at_level(logging.WARNING):
        for r in _rows(4):
            sink.write(r)
    monkeypatch.undo()
    sink.write(_rows(1, start=5)[0])  # space again
    sink.close()
    assert sink.rows_skipped == 4
    assert sum("disk full" in r.getMessage() for r in caplog.records) == 1
    assert read_metrics(path) == _rows(1, start=5)


def test_metric_logger_lets_disk_full_through(tmp_path, monkeypatch):
    """The run's driver catches ``DiskFullError`` from ``MetricLogger.log`` to stop with one line."""
    logger = MetricLogger.for_rank(0, tmp_path)
    monkeypatch.setattr(os, "write", _DiskFillsUp(logger.sinks[0]._fd, allow=0))
    with pytest.raises(DiskFullError):
        logger.log({"step": 1, "loss": 0.5})
    monkeypatch.undo()
    logger.close()


def test_torn_last_line_is_skipped_by_readers_and_cut_by_the_sink(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    _fill(path, _rows(3))
    with open(path, "ab") as f:
        f.write(b'{"step": 4, "loss": 0.2')  # the process died mid-row
    with caplog.at_level(logging.WARNING):
        assert read_metrics(path) == _rows(3)
        assert m.read_jsonl(path) == _rows(3)
    assert any("torn last line" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    _fill(path, _rows(1, start=4))  # reopened (e.g. resumed): the torn tail is cut, the new row is whole
    assert path.read_bytes().count(b"\n") == 4
    assert read_metrics(path) == _rows(4)


def test_corrupt_middle_line_is_skipped_with_its_line_number(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_rows(1)[0]) + '\n{"step": 2, "lo{"step": 3}\n' + json.dumps(_rows(1, 4)[0]) + "\n")
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(path)] == [1, 4]
    assert any("line 2" in r.getMessage() for r in caplog.records)


def test_truncate_after_a_checkpoint_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _fill(path, _rows(9))
    with open(path, "ab") as f:
        f.write(b'{"step": 10')
    os.chmod(path, 0o640)
    assert truncate_metrics_after(path, 6) == 3
    assert read_metrics(path) == _rows(6)
    assert path.read_bytes().endswith(b"\n") and b'"step": 10' not in path.read_bytes()
    assert path.stat().st_mode & 0o777 == 0o640  # permissions kept
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"]  # no temporary left
    assert truncate_metrics_after(path, 6) == 0
    assert truncate_metrics_after(tmp_path / "absent.jsonl", 6) == 0
    # the resumed run appends after step 6: each step appears once
    _fill(path, _rows(3, start=7))
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 10))


def test_plot_works_on_a_run_with_a_torn_last_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _fill(run_dir / "metrics.jsonl", _rows(5))
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 6, "loss": 0.1, "traj')
    assert cli_main(["plot", str(run_dir), "--no-distributions"]) == 0
    out = capsys.readouterr().out.split()
    assert out and all(p.endswith(".png") and os.path.getsize(p) > 0 for p in out)


def test_truncate_on_a_full_disk_leaves_the_file_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    _fill(path, _rows(4))
    before = path.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        truncate_metrics_after(path, 2)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["metrics.jsonl"]
