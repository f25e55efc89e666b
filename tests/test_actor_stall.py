"""A hung rollout actor (SIGSTOP) end to end (issue 18, "actor hung"): the supervisor sees its batch
count stop growing for ``rollout.stall_timeout_s``, logs one line naming the actor and its node,
kills it (metric ``actors/stalls``) and Ray restarts it (``actors/restarts``); the learner keeps
stepping, the stopped process is gone, and the run is stopped (as by SIGTERM) once the restart is
seen in the metric rows."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import psutil
import pytest
import ray

from gfn_dist.config import load_config
from gfn_dist.distributed import ray_compat
from gfn_dist.metrics import read_jsonl
from gfn_dist.preemption import clear_preemption, request_preemption
from gfn_dist.trainer import Trainer

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

STALL_S = 4.0


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(run_dir):
    return load_config(None, [
        "model.hidden_dim=64", "rollout.num_actors=2", "rollout.trajectories_per_push=16",
        "rollout.num_cpus_per_actor=1", "replay.num_shards=2", "replay.capacity_per_shard=256",
        "replay.min_size_to_sample=32", "replay.timeout_s=60", "learner.batch_size=32",
        "learner.max_steps=1000000", "eval.interval_steps=0", "logging.log_every=5",
        "logging.progress_bar=false", "checkpoint.interval_steps=0", "rollout.max_restarts=2",
        f"rollout.stall_timeout_s={STALL_S}", f"run.dir={run_dir}",
    ])  # fmt: skip


def _pid(handle) -> int:
    return ray.get(ray_compat.call_in_actor(handle, lambda self: os.getpid()))


def test_sigstopped_actor_is_reported_killed_and_restarted(local_ray, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    trainer = Trainer(_cfg(tmp_path / "run"))
    stopped: dict = {}

    def stop_then_preempt() -> None:
        deadline = time.monotonic() + 300
        while trainer.process.last_row.get("step", 0) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        stopped["proc"] = psutil.Process(_pid(trainer.actors[1]))
        stopped["step"] = trainer.learner.step
        os.kill(stopped["proc"].pid, signal.SIGSTOP)  # hung: alive to Ray, but no batches
        deadline = time.monotonic() + 180
        while trainer.process.last_row.get("actors/restarts", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # a few more rows after the restart
        request_preemption()

    try:
        thread = threading.Thread(target=stop_then_preempt, daemon=True)
        thread.start()
        last = trainer.train()
        thread.join(timeout=60)
        gone = not stopped["proc"].is_running() or stopped["proc"].status() == psutil.STATUS_ZOMBIE
    finally:
        clear_preemption()
        if "proc" in stopped and stopped["proc"].is_running():
            os.kill(stopped["proc"].pid, signal.SIGCONT)  # never leave a stopped process behind
        trainer.close()

    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert trainer.preempted and last["step"] == rows[-1]["step"] == trainer.learner.step
    assert max(r["actors/stalls"] for r in rows) >= 1, rows[-1]
    assert max(r["actors/restarts"] for r in rows) >= 1, rows[-1]
    assert "rollout actor 1 (node " in caplog.text and "produced nothing for" in caplog.text, caplog.text
    assert "rollout actor 0 (node " not in caplog.text  # the running actor is not reported
    assert gone, "the SIGSTOPped actor process is still there"
    assert last["step"] > stopped["step"] + 10  # the learner kept stepping
