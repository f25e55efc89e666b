"""Replay accounting after a shard restart (issue 18, item 7).

``replay/items_lost`` = items the shard held at its death - items restored from its
snapshot (``gfn_dist.distributed.shard_persistence``), so never more than the capacity,
however many items were inserted after the snapshot; the driver logs one warning per
restart naming the shard, the items restored and lost; every metric row carries
``replay/shard_restarts``, ``replay/items_lost`` and ``replay/shards_down``.

* In-process (fast tier): a shard's journal and snapshot left behind as by a killed
  process, then the next incarnation's ``ShardPersistence.start(restarted=True)`` --
  exact counts, a ring buffer overwritten many times over, no snapshot at all, two
  restarts in a row; the driver-side report of ``ReplayClient.stats()``.
* One local Ray (``cluster``): a shard actor killed with ``ray.kill(no_restart=False)``
  after a snapshot and 24x its capacity of inserts is restarted by Ray and reports
  exactly the shortfall.
* The real CLI (``cluster``): a shard process SIGKILLed mid-run; its restart reaches
  the driver's log and the metric rows with the exact loss.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch
from tensordict import TensorDict

from gfn_dist.distributed.replay_client import ReplayClient
from gfn_dist.distributed.replay_shard import ReplayShard, ReplayShardConfig, create_replay_shard
from gfn_dist.distributed.shard_persistence import ShardPersistence
from gfn_dist.metrics import read_jsonl
from gfn_dist.train_loop import ShardRestartReport

ROOT = Path(__file__).resolve().parents[1]
PRESET = str(ROOT / "configs" / "hypergrid_tb.yaml")
T = 3  # padded trajectory length of the hand-made batches
REPLAY_KEYS = ("replay/shard_restarts", "replay/items_lost", "replay/shards_down")


def _batch(n: int, start: int) -> TensorDict:
    """n items with consecutive ``actor_id`` from ``start`` (their identity in the buffer)."""
    ids = torch.arange(start, start + n, dtype=torch.int64)
    return TensorDict(
        {
            "states": ids.view(n, 1, 1).expand(n, T + 1, 2).clone(),
            "actions": torch.zeros(n, T, 1, dtype=torch.int64),
            "terminating_idx": torch.full((n,), T, dtype=torch.int64),
            "log_rewards": torch.zeros(n),
            "policy_version": torch.zeros(n, dtype=torch.int64),
            "actor_id": ids,
        },
        batch_size=[n],
    )


def _push(shard: ReplayShard, pushes: int, n: int = 8, start: int = 0) -> int:
    for k in range(pushes):
        assert shard.try_add(_batch(n, start + n * k))["accepted"]
    return start + n * pushes


def _reborn(state_dir: Path, capacity: int, every: int = 0) -> tuple[ReplayShard, ShardPersistence]:
    """What Ray's restart of a dead shard runs: a new shard, recovered from the directory it left."""
    shard = ReplayShard(ReplayShardConfig(capacity=capacity, seed=0))
    persistence = ShardPersistence(state_dir, every)
    persistence.start(shard, restarted=True)
    return shard, persistence


# ---------------------------------------------------------------------- in-process


def test_items_lost_is_the_size_at_death_minus_the_size_restored(tmp_path, caplog):
    capacity = 64
    dead = ReplayShard(ReplayShardConfig(capacity=capacity, seed=0, state_dir=str(tmp_path), snapshot_every_inserts=20))
    _push(dead, 7)  # 56 inserts; snapshots after 24 and 48 (every 20 items, checked after each push of 8)
    journal = ShardPersistence.read_journal(tmp_path / ShardPersistence.JOURNAL)
    assert (journal["num_inserts"], journal["size"]) == (56, 56)  # the journal knows what the shard held
    del dead  # killed: what it left on disk is all the next incarnation has

    shard, persistence = _reborn(tmp_path, capacity, every=20)
    stats = persistence.stats()
    assert (stats["restored_size"], stats["restored_inserts"]) == (48, 48)
    assert stats["items_lost"] == stats["last_items_lost"] == 56 - 48 and stats["num_restarts"] == 1
    assert shard.buffer.state_dict()["storage"]["actor_id"].tolist() == list(range(48))
    assert "replay shard" in caplog.text and "8 items lost" in caplog.text

    # A second death, 16 inserts later (no snapshot due: 64 - 48 < 20): 16 more lost, 24 in all.
    for k in range(2):
        assert shard.try_add(_batch(8, 1000 + 8 * k))["accepted"]
        persistence.after_insert(shard)  # what the shard's try_add does with its own persistence
    assert len(shard.buffer) == 64
    del shard
    _, again = _reborn(tmp_path, capacity, every=20)
    assert again.stats()["last_items_lost"] == 64 - 48 and again.stats()["items_lost"] == 8 + 16
    assert again.stats()["num_restarts"] == 2


def test_a_full_ring_buffer_loses_at_most_its_capacity(tmp_path):
    """88 inserts into 16 slots after a snapshot of 8: the restart restores 8 of the 16 held. Counting
    inserts since the snapshot (the old accounting) would report 80, five times the capacity."""
    capacity = 16
    dead = ReplayShard(ReplayShardConfig(capacity=capacity, seed=0, state_dir=str(tmp_path)))
    _push(dead, 1)
    dead.snapshot()  # a checkpoint: the restart point holds 8 items
    _push(dead, 10, start=8)
    assert (dead.buffer.num_inserts, len(dead.buffer)) == (88, capacity)
    del dead

    _, persistence = _reborn(tmp_path, capacity)
    stats = persistence.stats()
    assert stats["restored_size"] == 8 and stats["items_lost"] == capacity - 8
    assert stats["inserts_after_snapshot"] == 80  # reported separately, not as items lost
    assert stats["items_lost"] <= capacity


def test_no_snapshot_loses_everything_held(tmp_path):
    dead = ReplayShard(ReplayShardConfig(capacity=16, seed=0, state_dir=str(tmp_path)))
    _push(dead, 3)  # 24 inserts, 16 held, never snapshotted (snapshot_every_inserts=0, no checkpoint)
    del dead
    shard, persistence = _reborn(tmp_path, 16)
    assert len(shard.buffer) == 0 and persistence.stats()["items_lost"] == 16


def test_driver_report_names_each_restart_once():
    report = ShardRestartReport()
    healthy = {"num_restarts": 0, "items_lost": 0}
    assert report.new_restarts([healthy, healthy]) == []
    back = {"num_restarts": 1, "items_lost": 40, "last_items_lost": 40, "restored_size": 24}
    assert report.new_restarts([healthy, back]) == [
        "replay shard 1 restarted (restart 1): restored 24 items from its snapshot; "
        "40 of the items it held were lost (40 in all)"
    ]
    assert report.new_restarts([healthy, back]) == []  # reported once
    down = {**back, "available": False}  # a shard down again reports its last answer: nothing new
    assert report.new_restarts([healthy, down]) == []
    again = {"num_restarts": 2, "items_lost": 50, "last_items_lost": 10, "restored_size": 60}
    assert report.new_restarts([again, again]) == [
        "replay shard 0 restarted (restart 2): restored 60 items from its snapshot; "
        "10 of the items it held were lost (50 in all)",
        "replay shard 1 restarted (restart 2): restored 60 items from its snapshot; "
        "10 of the items it held were lost (50 in all)",
    ]


# ---------------------------------------------------------------------- one local Ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.cluster
def test_shard_killed_by_ray_kill_reports_the_exact_shortfall(local_ray, tmp_path):
    capacity, push = 64, 8
    shard = create_replay_shard(
        ReplayShardConfig(capacity=capacity, seed=0, state_dir=str(tmp_path / "shard_0")), num_cpus=0, max_restarts=1
    )
    client = ReplayClient([shard], timeout_s=60)
    client.add(_batch(push, 0), 0)
    client.add(_batch(push, push), 0)
    client.snapshot()  # as a checkpoint does: the restart point holds 16 items
    for k in range(2, 200):  # 1600 inserts in all: 25x the capacity
        client.add(_batch(push, push * k), 0)
    assert client.stats()["size"] == capacity
    ray.kill(shard, no_restart=False)

    deadline = time.monotonic() + 120
    while True:
        stats = client.stats()
        if stats["shards"][0].get("num_restarts") == 1 and stats["num_shards_down"] == 0:
            break
        assert time.monotonic() < deadline, f"the shard did not come back: {stats}"
        time.sleep(0.2)
    s = stats["shards"][0]
    assert (s["restored_size"], s["restored_inserts"], s["size"]) == (16, 16, 16)
    assert s["items_lost"] == stats["items_lost"] == capacity - 16  # held at death - restored
    assert s["inserts_after_snapshot"] == 1600 - 16
    kept = ray.get(shard.snapshot.remote())["buffer"]["storage"]["actor_id"]
    assert kept.tolist() == list(range(16))  # exactly the snapshot's items


# ---------------------------------------------------------------------- the real CLI


def _shard_process(run_dir: Path, index: int, driver_pid: int, timeout_s: float = 300.0) -> psutil.Process:
    """The process of replay shard ``index``: the descendant of the driver holding its journal open."""
    journal = str(run_dir / "replay" / f"shard_{index}" / ShardPersistence.JOURNAL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in psutil.Process(driver_pid).children(recursive=True):
            try:
                if any(f.path == journal for f in proc.open_files()):
                    return proc
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no process holds {journal} open")


@pytest.mark.cluster
def test_cli_shard_killed_mid_run_reaches_the_driver_log_and_the_rows(tmp_path):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "step_20"
    cmd = [
        sys.executable, "-m", "gfn_dist.cli", "train", PRESET, f"run.dir={run_dir}",
        "model.hidden_dim=64", "rollout.num_actors=2", "rollout.trajectories_per_push=16",
        "rollout.num_cpus_per_actor=1", "replay.num_shards=2", "replay.capacity_per_shard=2048",
        "replay.min_size_to_sample=32", "replay.max_restarts=1", "replay.timeout_s=120",
        "learner.batch_size=32", "learner.max_steps=200", "eval.interval_steps=0",
        "checkpoint.interval_steps=20", "logging.log_every=5", "logging.progress_bar=false",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    at_death: dict = {}

    def kill_shard_1() -> None:
        try:
            deadline = time.monotonic() + 300
            while not ckpt.is_dir() and time.monotonic() < deadline:  # the checkpoint snapshots the shards
                time.sleep(0.05)
            victim = _shard_process(run_dir, 1, proc.pid)
            state_dir = run_dir / "replay" / "shard_1"

            def snapshot_size() -> int:
                return int(torch.load(state_dir / ShardPersistence.SNAPSHOT, weights_only=True)["buffer"]["size"])

            # Killed once it holds 48 items more than its restart point (re-read: later checkpoints move it).
            while ShardPersistence.read_journal(state_dir / ShardPersistence.JOURNAL)["size"] < snapshot_size() + 48:
                assert time.monotonic() < deadline, "no inserts after the checkpoint"
                time.sleep(0.02)
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(timeout=30)
            # What the dead shard left, read before Ray's restart rewrites the journal.
            at_death["journal"] = ShardPersistence.read_journal(state_dir / ShardPersistence.JOURNAL)
            at_death["snapshot"] = torch.load(state_dir / ShardPersistence.SNAPSHOT, weights_only=True)["buffer"]
        except BaseException as err:  # reported by the main thread
            at_death["error"] = err

    killer = threading.Thread(target=kill_shard_1, daemon=True)
    killer.start()
    try:
        _, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    killer.join(timeout=60)
    assert "error" not in at_death, at_death.get("error")
    assert proc.returncode == 0, stderr[-3000:]

    held, restored = at_death["journal"]["size"], int(at_death["snapshot"]["size"])
    lost = held - restored
    assert 0 < lost <= 2048 and restored > 0, (held, restored)  # grew by >= 48 after a snapshot
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert rows[-1]["step"] == 200
    assert all(all(k in r for k in REPLAY_KEYS) for r in rows), "a row without the replay accounting"
    restarted = [r for r in rows if r["replay/shard_restarts"] == 1]
    assert restarted and all(r["replay/items_lost"] == lost for r in restarted), [
        (r["step"], r["replay/shard_restarts"], r["replay/items_lost"]) for r in rows
    ]
    assert all(r["replay/items_lost"] == 0 for r in rows if r["replay/shard_restarts"] == 0)
    # The driver's own log (stderr of the CLI), once: the shard, items restored and lost.
    warning = (
        f"replay shard 1 restarted (restart 1): restored {restored} items from its snapshot; "
        f"{lost} of the items it held were lost ({lost} in all)"
    )
    assert stderr.count(warning) == 1, stderr[-3000:]
