"""WeightStore long poll (in-process, threads): answers at once, on publish, on stop, or at its timeout."""

import threading
import time

import pytest

from gfn_dist.distributed.weight_store import WeightStore


def _wait_in_thread(store, version, timeout_s):
    out = {}

    def run():
        t0 = time.monotonic()
        out["answer"] = store.wait_newer(version, timeout_s)
        out["elapsed"] = time.monotonic() - t0

    th = threading.Thread(target=run)
    th.start()
    return th, out


def test_wait_newer_answers_at_once_when_a_newer_version_exists():
    store = WeightStore()
    store.publish(3, ["ref"])
    t0 = time.monotonic()
    assert store.wait_newer(2, timeout_s=5.0) == (3, False)
    assert time.monotonic() - t0 < 1.0


def test_wait_newer_times_out_without_a_publish():
    store = WeightStore()
    store.publish(3, ["ref"])
    t0 = time.monotonic()
    assert store.wait_newer(3, timeout_s=0.3) == (3, False)
    assert time.monotonic() - t0 >= 0.25


@pytest.mark.parametrize("event", ["publish", "stop", "older_publish"])
def test_publish_and_stop_wake_a_waiting_poll(event):
    store = WeightStore()
    store.publish(1, ["ref1"])
    th, out = _wait_in_thread(store, 1, timeout_s=1.5)
    time.sleep(0.1)
    if event == "publish":
        store.publish(2, ["ref2"])
    elif event == "stop":
        store.stop()
    else:  # an older version is ignored: the poll keeps waiting until its timeout
        store.publish(0, ["ref0"])
    th.join(5.0)
    expected = {"publish": (2, False), "stop": (1, True), "older_publish": (1, False)}[event]
    assert out["answer"] == expected
    if event == "older_publish":
        assert out["elapsed"] >= 1.3
    else:
        assert out["elapsed"] < 1.0
    assert store.get()[0] == expected[0]


def test_reset_publish_replaces_a_newer_version():
    """A restarted learner resumes at an older step: its first publish (``reset``) replaces the
    newer weights of the failed learner (whose object references died with it)."""
    store = WeightStore()
    store.publish(6, ["ref6"])
    store.publish(4, ["ref4"])  # an ordinary older publish: ignored
    assert store.get() == (6, ["ref6"])
    assert store.publish(4, ["ref4"], reset=True) == 4
    assert store.get() == (4, ["ref4"])
    store.publish(5, ["ref5"])
    assert store.get() == (5, ["ref5"])
