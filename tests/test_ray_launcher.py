"""``cluster.launcher=ray``: learners as Ray Train workers forming the DDP group.

* Two learner workers on a simulated two-node Ray cluster (``ray.cluster_utils.Cluster``:
  a head and one worker node on this machine, learners placed with SPREAD) train a
  short budget; every metric row records world size 2, the learners ran on two
  different Ray nodes in one gloo group, and the weights rank 0 published reached
  the rollout actors.
* The embedded Ray starts its own cluster even when ``RAY_ADDRESS`` points elsewhere
  (``ray.init(address="local")``; a stale address used to make it fail), and a
  stop request on the driver (SIGTERM under ``gfn-dist train``) reaches the
  learner workers: both stop at the same step after a preemption checkpoint.
* An unreachable ``cluster.address`` fails with a ``ConnectionError`` naming it,
  within ``cluster.connect_timeout_s``.
* ``learner.batch_size`` must split over ``cluster.num_learners``.
* Faults under the Ray launcher: a SIGKILLed rollout actor and replay shard; a SIGSTOPped
  (hung) rollout actor, then a SIGKILLed learner worker that Ray Train restarts
  (``cluster.learner_max_restarts``) from the newest checkpoint, each step logged once.
"""

import math
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from gfn_dist.config import ConfigError, load_config
from gfn_dist.metrics import read_jsonl

pytestmark = pytest.mark.cluster  # cluster.launcher=ray, cluster.address, multi-node Ray

STEPS, BATCH, W = 12, 16, 2


def _cfg(*extra):
    return load_config(
        None,
        [
            "cluster.launcher=ray",
            f"cluster.num_learners={W}",
            "cluster.num_cpus_per_learner=1",
            "env.hypergrid.height=4",
            "model.hidden_dim=32",
            "rollout.num_actors=1",
            "rollout.num_cpus_per_actor=1",
            "rollout.trajectories_per_push=16",
            "replay.min_size_to_sample=16",
            "replay.timeout_s=120",
            f"learner.batch_size={BATCH}",
            f"learner.max_steps={STEPS}",
            "eval.interval_steps=6",
            "logging.log_every=4",
            "logging.progress_bar=false",
            "logging.wandb.mode=disabled",
            *extra,
        ],
    )


@pytest.fixture(autouse=True)
def _patient_raylet(monkeypatch):
    # On a loaded 2-core machine the dashboard agent can take > 30 s to start, and the
    # raylet (which reads RAY_* variables from the process that starts it) then gives up.
    monkeypatch.setenv("RAY_agent_register_timeout_ms", os.environ.get("RAY_agent_register_timeout_ms", "180000"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_batch_must_split_over_learners():
    with pytest.raises(ConfigError, match=r"learner\.batch_size.*cluster\.num_learners=3"):
        _cfg("cluster.num_learners=3")
    assert _cfg("cluster.num_learners=4").cluster.num_learners == 4


def test_learner_max_restarts_is_checked():
    assert _cfg("cluster.learner_max_restarts=-1").cluster.learner_max_restarts == -1  # unlimited
    with pytest.raises(ConfigError, match=r"cluster\.learner_max_restarts: must be >= 0, or -1 .*got -2"):
        _cfg("cluster.learner_max_restarts=-2")
    with pytest.raises(ConfigError, match=r"cluster\.learner_max_restarts: .*'nan'"):
        _cfg("cluster.learner_max_restarts=nan")


def test_unreachable_address_fails_within_timeout():
    import ray

    import gfn_dist.checkpoint  # noqa: F401  (imported here so that the timing below is the connection's)
    import gfn_dist.distributed.replay_shard  # noqa: F401
    import gfn_dist.distributed.rollout_actor  # noqa: F401
    import gfn_dist.trainer  # noqa: F401
    from gfn_dist.trainer import Trainer as RayTrainer

    port = _free_port()  # nothing listens there once the socket is closed
    cfg = _cfg(f"cluster.address=127.0.0.1:{port}", "cluster.connect_timeout_s=2")
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"cluster\.address=127\.0\.0\.1:{port}.*within 2 s"):
        RayTrainer(cfg)
    elapsed = time.monotonic() - t0
    assert 1.5 <= elapsed < 10.0, elapsed  # retried until the timeout, then gave up
    assert not ray.is_initialized()


def test_unreachable_address_cli_one_line(capsys):
    from gfn_dist.train import run_train

    port = _free_port()
    overrides = ["cluster.launcher=ray", "cluster.num_learners=2", f"cluster.address=127.0.0.1:{port}",
                 "cluster.connect_timeout_s=1", "logging.wandb.mode=disabled"]
    assert run_train(str(Path(__file__).parents[1] / "configs" / "hypergrid_tb.yaml"), overrides) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cluster.address=127.0.0.1:{port}: no Ray cluster answered" in err[0], err


@pytest.mark.slow
def test_embedded_ray_and_driver_signal_stop(tmp_path, monkeypatch):
    """Embedded Ray despite a stale RAY_ADDRESS; a signal on the driver checkpoints and stops both learners."""
    import json

    import ray

    from gfn_dist.checkpoint import list_checkpoints
    from gfn_dist.preemption import clear_preemption, request_preemption
    from gfn_dist.trainer import Trainer as RayTrainer

    # What a `ray start` elsewhere on the host leaves behind: ray.init(num_cpus=...)
    # without address="local" would try to connect there and refuse num_cpus.
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_free_port()}")
    run_dir, budget = tmp_path / "run", 300  # without the stop request: ~1 min of steps, then the asserts fail
    trainer = RayTrainer(_cfg(f"run.dir={run_dir}", f"learner.max_steps={budget}", "checkpoint.interval_steps=0"))
    try:
        assert trainer.ray_ctx.owns_ray
        assert ray.cluster_resources()["CPU"] == 3.0  # 1 actor + 2 learners, 1 CPU each
        def stop_after_a_few_steps() -> None:  # what SIGTERM does on the driver (install_preemption_handlers)
            deadline = time.monotonic() + 240
            while trainer.last_row.get("step", 0) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            request_preemption()

        import threading

        threading.Thread(target=stop_after_a_few_steps, daemon=True).start()
        last = trainer.train()
    finally:
        clear_preemption()
        trainer.close()
    assert not ray.is_initialized()

    step = trainer.learner.step
    assert trainer.preempted and 1 <= step < budget
    (ckpt_step, ckpt), = list_checkpoints(run_dir / "checkpoints")  # the preemption checkpoint only
    meta = json.loads((ckpt / "meta.json").read_text())
    assert ckpt_step == step and meta["reason"] == "preempt" and meta["world_size"] == W
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert rows[-1]["step"] == step == last["step"] and all(r["world_size"] == W for r in rows)
    assert torch.load(run_dir / "policy.pt", weights_only=True)["step"] == step


@pytest.fixture
def two_node_cluster(monkeypatch):
    """A head and one worker node (2 CPUs each) on this machine, without touching the host's
    Ray address file (/tmp/ray/ray_current_cluster), which other processes' ray.init would read."""
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    monkeypatch.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    c.add_node(num_cpus=2)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        c.shutdown()


@pytest.mark.cluster
def test_two_learner_workers_on_two_nodes(tmp_path, two_node_cluster):
    import ray

    from gfn_dist.trainer import Trainer as RayTrainer

    run_dir = tmp_path / "run"
    cfg = _cfg(f"cluster.address={two_node_cluster.address}", "cluster.placement_strategy=SPREAD",
               f"run.dir={run_dir}")
    trainer = RayTrainer(cfg)
    try:
        assert len({n["NodeID"] for n in ray.nodes() if n["Alive"]}) == 2
        last = trainer.train()
        stats = trainer.actor_stats()
    finally:
        trainer.close()
    assert not ray.is_initialized()

    # One DDP group of two learner workers, one per Ray node (SPREAD), gloo on CPU.
    assert trainer.learner_backend == "gloo"
    assert len(trainer.learner_nodes) == W and len(set(trainer.learner_nodes)) == W
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [4, 6, 8, 12]
    assert all(r["world_size"] == W for r in rows)
    assert last["step"] == STEPS and last["trajectories"] == STEPS * BATCH
    assert math.isfinite(last["loss"]) and 0.0 <= last["l1_exact"] <= 2.0
    # Rank 0 published weights the actor picked up; the driver saved rank 0's final policies.
    assert max(s.get("policy_version", -1) for s in stats) > 0, stats
    saved = torch.load(run_dir / "policy.pt", weights_only=True)
    assert saved["step"] == STEPS and trainer.learner.step == STEPS
    assert set(saved["policies"]) and all(torch.isfinite(v).all() for v in saved["policies"].values())


@pytest.mark.slow
def test_faults_under_ray_launcher(tmp_path, caplog):
    """The Ray launcher gets the same topology as the others: a SIGKILLed rollout actor is restarted
    (``rollout.max_restarts``) and a SIGKILLed replay shard restarts from its snapshot
    (``replay.max_restarts``); the metric rows report both, and the items lost exactly. The run is
    stopped (as by SIGTERM) once the rows show the shard's restart, or after 180 s (the asserts fail)."""
    import os
    import signal
    import threading

    import psutil
    import ray

    from gfn_dist.distributed import ray_compat
    from gfn_dist.distributed.shard_persistence import ShardPersistence
    from gfn_dist.preemption import clear_preemption, request_preemption
    from gfn_dist.trainer import Trainer

    def sigkill(handle) -> None:
        proc = psutil.Process(ray.get(ray_compat.call_in_actor(handle, lambda self: os.getpid())))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    run_dir = tmp_path / "run"
    cfg = _cfg(f"run.dir={run_dir}", "cluster.num_learners=1", "rollout.num_actors=2", "replay.num_shards=2",
               "replay.max_restarts=1", "rollout.max_restarts=2", "replay.snapshot_every_inserts=48",
               "replay.capacity_per_shard=256", "learner.max_steps=1000000", "eval.interval_steps=0",
               "logging.log_every=5", "checkpoint.interval_steps=0")
    trainer = Trainer(cfg)
    state_dir = run_dir / "replay" / "shard_1"
    at_death: dict = {}

    def crash_then_stop() -> None:
        deadline = time.monotonic() + 300
        while trainer.last_row.get("step", 0) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        sigkill(trainer.actors[1])
        sigkill(trainer.topology.shards[1])
        at_death["journal"] = ShardPersistence.read_journal(state_dir / ShardPersistence.JOURNAL)
        snap = torch.load(state_dir / ShardPersistence.SNAPSHOT, weights_only=True)["buffer"]
        at_death["inserts"], at_death["size"] = int(snap["num_inserts"]), int(snap["size"])
        deadline = time.monotonic() + 180
        while trainer.last_row.get("replay/shard_restarts", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a few more rows after the restart
        request_preemption()

    try:
        killer = threading.Thread(target=crash_then_stop, daemon=True)
        killer.start()
        last = trainer.train()
        killer.join(timeout=60)
    finally:
        clear_preemption()
        trainer.close()
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert trainer.preempted and last["step"] == rows[-1]["step"] == trainer.learner.step
    lost = at_death["journal"]["size"] - at_death["size"]  # held at its death - restored (issue 18)
    restarted = [r for r in rows if r.get("replay/shard_restarts") == 1]
    assert restarted, "the shard restart never reached the metric rows"
    assert all(r["replay/items_lost"] == lost for r in restarted) and lost >= 0
    # Rank 0 runs in a Ray Train worker; its report of the restart reaches the driver's log.
    assert f"learner rank 0: replay shard 1 restarted (restart 1): restored {at_death['size']} items" in caplog.text
    assert f"{lost} of the items it held were lost" in caplog.text
    assert max(r["actors/restarts"] for r in rows) >= 1


USER_TASK_STEPS = 150


@pytest.mark.cluster
def test_ray_launcher_two_learners_user_task_by_import_path(tmp_path):
    """``gfn-dist train`` with ``cluster.launcher=ray`` and 2 learner workers on a user's task by
    import path (tests/user_task: Multiset + the user's policy factory): the driver, the Ray Train
    learners and the actors import it from the job's PYTHONPATH; exit 0 and the exact L1 falls
    below half its first evaluated value."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")])
    env.setdefault("RAY_agent_register_timeout_ms", "180000")
    cmd = [sys.executable, "-m", "gfn_dist.cli", "train", "tests/user_task/multiset_tb.yaml",
           "cluster.launcher=ray", f"cluster.num_learners={W}", "cluster.num_cpus_per_learner=1",
           "rollout.num_actors=1", "rollout.num_cpus_per_actor=1", f"learner.max_steps={USER_TASK_STEPS}",
           "eval.interval_steps=25", "logging.log_every=25", "logging.progress_bar=false", f"run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert all(r["world_size"] == W for r in rows)
    evals = [r for r in rows if "l1_exact" in r]
    assert evals and evals[-1]["step"] == USER_TASK_STEPS
    assert evals[-1]["l1_exact"] < 0.5 * evals[0]["l1_exact"], [(r["step"], r["l1_exact"]) for r in evals]


@pytest.mark.slow
def test_learner_killed_and_actor_hung_under_ray_launcher(tmp_path, caplog):
    """``cluster.launcher=ray`` with ``cluster.learner_max_restarts=1``, one run, two faults:

    * rollout actor 1 SIGSTOPped (hung): reported as stalled (actor 1 only), killed and restarted by
      Ray; the learner keeps stepping;
    * then the learner's Ray Train worker SIGKILLed: Ray Train restarts the worker group, which
      resumes from the newest checkpoint while the actors, the replay shards and the weight store
      keep running; the driver logs one line naming the restart and the step, drops the rows past
      it, and every step appears once in metrics.jsonl.

    The run is stopped (as by SIGTERM) a few rows after the restart, or after 180 s per phase (the
    asserts fail)."""
    import logging
    import signal
    import threading

    import psutil
    import ray

    from gfn_dist.checkpoint import list_checkpoints
    from gfn_dist.distributed import ray_compat
    from gfn_dist.preemption import clear_preemption, request_preemption
    from gfn_dist.trainer import Trainer

    caplog.set_level(logging.WARNING)
    run_dir = tmp_path / "run"
    cfg = _cfg(f"run.dir={run_dir}", "cluster.num_learners=1", "cluster.learner_max_restarts=1",
               "rollout.num_actors=2", "rollout.max_restarts=2", "rollout.stall_timeout_s=4",
               "learner.max_steps=1000000", "eval.interval_steps=0", "logging.log_every=1",
               "checkpoint.interval_steps=10")
    trainer = Trainer(cfg)
    seen: dict = {}

    def wait_until(predicate, what: str, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                seen.setdefault("timeouts", []).append(what)
                return
            time.sleep(0.05)

    def learner_workers() -> list:
        return [p for p in psutil.Process().children(recursive=True)
                if any("RayTrainWorker" in part for part in p.cmdline())]

    def faults_then_stop() -> None:
        try:
            wait_until(lambda: trainer.last_row.get("step", 0) >= 10, "step 10")
            pid = ray.get(ray_compat.call_in_actor(trainer.actors[1], lambda self: os.getpid()))
            seen["stopped"] = psutil.Process(pid)
            os.kill(pid, signal.SIGSTOP)  # hung: alive to Ray, but no batches
            wait_until(lambda: trainer.last_row.get("actors/restarts", 0) >= 1, "the actor's restart")
            seen["step_after_stall"] = trainer.last_row.get("step", 0)
            # A checkpoint, and rows past it: the restart drops them and logs those steps again.
            wait_until(lambda: trainer.last_row.get("step", 0) >= seen["step_after_stall"] + 12, "a checkpoint")
            (worker,) = learner_workers()
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)  # gone: no further row or checkpoint from it
            time.sleep(1.0)  # the driver has drained the rows it sent (every 0.25 s)
            seen["ckpt_step"] = list_checkpoints(run_dir / "checkpoints")[-1][0]
            seen["killed_at"] = trainer.last_row.get("step", 0)
            wait_until(lambda: "restarted by Ray Train" in caplog.text, "the learner restart")
            wait_until(lambda: trainer.last_row.get("step", 0) >= seen["killed_at"] + 5, "steps after the restart")
        finally:
            request_preemption()

    try:
        thread = threading.Thread(target=faults_then_stop, daemon=True)
        thread.start()
        last = trainer.train()
        thread.join(timeout=60)
    finally:
        clear_preemption()
        stopped = seen.get("stopped")
        if stopped is not None and stopped.is_running() and stopped.status() == psutil.STATUS_STOPPED:
            os.kill(stopped.pid, signal.SIGCONT)  # never leave a stopped process behind
        trainer.close()

    assert "timeouts" not in seen, seen
    rows = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, steps[-1] + 1)), steps  # each step once, the restart's overlap dropped
    assert trainer.preempted and last["step"] == steps[-1] == trainer.learner.step > seen["killed_at"]
    ckpt, killed = seen["ckpt_step"], seen["killed_at"]
    assert 0 < ckpt <= killed, seen  # rows past the checkpoint (if any) were dropped: steps above
    restart_lines = [r.getMessage() for r in caplog.records if "restarted by Ray Train" in r.getMessage()]
    assert len(restart_lines) == 1 and f"(restart 1 of 1): resumed from step {ckpt};" in restart_lines[0], caplog.text
    # The hung actor: reported once (actor 1 only), killed and restarted; the learner kept stepping.
    assert seen["step_after_stall"] > 10
    # (Reported through the driver channel: the supervisor runs in rank 0's Ray Train worker.)
    assert "learner rank 0: rollout actor 1 (node " in caplog.text and "produced nothing for" in caplog.text
    assert "rollout actor 0 (node " not in caplog.text, caplog.text  # the running actor: not reported,
    assert "rollout actor 0 is unreachable" not in caplog.text  # before or after the learner's restart
    assert max(r["actors/stalls"] for r in rows) >= 1 and max(r["actors/restarts"] for r in rows) >= 1
    assert not seen["stopped"].is_running() or seen["stopped"].status() == psutil.STATUS_ZOMBIE
