"""Metric logger: JSONL always (rank 0 only), non-finite values dropped, optional TensorBoard sink."""

import json

import pytest

from gfn_dist.metrics import MetricLogger, read_jsonl


def test_jsonl_rank0_only_and_clean(tmp_path):
    m0 = MetricLogger.for_rank(0, tmp_path / "r0")
    m1 = MetricLogger.for_rank(1, tmp_path / "r1")
    for m in (m0, m1):
        m.log({"step": 1, "loss": 0.5, "l1_exact": float("nan"), "time/sample_s": 0.25})
        m.log({"step": 2, "loss": 0.125})
        m.close()
    rows = read_jsonl(tmp_path / "r0" / "metrics.jsonl")
    assert rows == [{"step": 1, "loss": 0.5, "time/sample_s": 0.25}, {"step": 2, "loss": 0.125}]
    assert all(json.loads(line) for line in (tmp_path / "r0" / "metrics.jsonl").read_text().splitlines())
    assert not (tmp_path / "r1").exists()  # other ranks write nothing
    with pytest.raises(ValueError, match="step"):
        MetricLogger([]).log({"loss": 1.0})


def test_tensorboard_sink(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = MetricLogger.for_rank(0, tmp_path, tensorboard=True)
    m.log({"step": 3, "loss": 0.75})
    m.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    (event,) = acc.Scalars("loss")
    assert event.step == 3 and event.value == pytest.approx(0.75)
