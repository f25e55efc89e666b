"""One owner per run directory, SIGTERM while the learner waits on replay, resume without duplicated rows.

Through the real entry point (``python -m gfn_dist.train``, subprocesses, embedded Ray):

* a second run on a ``run.dir`` in use exits 2 with one line naming the holder, and the first run
  finishes untouched (its metric rows stay in step order: nothing interleaved);
* a lock file left by a dead holder is taken over (with a warning);
* SIGTERM while the learner waits on a replay that no actor fills (their reward call hangs) writes a
  checkpoint and exits 0 within a bound, and ``resume=true`` continues from it, each step logged once;
  with the local launcher and with ``cluster.launcher=ray`` (the learner a Ray Train worker).
"""

import psutil
import pytest
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from gfn_dist import checkpoint as ck
from gfn_dist.metrics import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.cluster]  # real CLI runs with an embedded Ray

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
#: Seconds from SIGTERM to exit allowed while the learner waits on replay (SLURM's grace is 30-60 s;
#: the wait wakes within one backoff, 0.05 s; the rest is the checkpoint, actor stop and Ray shutdown).
SIGTERM_BOUND_S = 30.0
SMALL = ["rollout.num_actors=1", "learner.batch_size=16", "rollout.trajectories_per_push=16",
         "replay.capacity_per_shard=256", "replay.min_size_to_sample=16", "eval.interval_steps=0",
         "logging.log_every=1", "logging.progress_bar=false", "logging.wandb.mode=disabled"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def _hypergrid(run_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "gfn_dist.train", "configs/hypergrid_tb.yaml", "model.hidden_dim=32", *SMALL,
            f"run.dir={run_dir}", *extra]


def _rows(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return read_jsonl(path) if path.is_file() else []


def _wait_for(predicate, proc, what: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"exited before {what}: " + proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_second_run_on_a_run_dir_is_refused_and_a_stale_lock_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(_hypergrid(run_dir, "learner.max_steps=100000", "checkpoint.interval_steps=0"),
                             cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: any(r["step"] >= 3 for r in _rows(run_dir)), first, "the first run's steps")
        second = subprocess.run(_hypergrid(run_dir, "learner.max_steps=5"), cwd=ROOT, env=_env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and "is in use by another run" in err[0] and f"pid {first.pid}" in err[0].lower(), err
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out[-4000:]
    steps = [r["step"] for r in _rows(run_dir)]
    assert steps == sorted(set(steps)), "metric rows interleaved or duplicated"

    # A lock left by a holder that died without releasing it: a dead PID of this host.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"host": socket.gethostname(), "pid": int(dead.stdout), "started": "earlier"}
    (run_dir / ".lock").write_text(json.dumps(holder))
    n = steps[-1]
    third = subprocess.run(_hypergrid(run_dir, f"learner.max_steps={n + 2}", "resume=true"), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-4000:]
    assert "taken over" in third.stderr or "took over" in third.stderr, third.stderr[-3000:]
    assert [r["step"] for r in _rows(run_dir)] == steps + [n + 1, n + 2]


@pytest.mark.parametrize("launcher", ["local", "ray"])
def test_sigterm_while_waiting_on_replay_checkpoints_and_resumes(tmp_path, launcher):
    """``local``: the driver is the learner. ``ray``: the learner is a Ray Train worker (1 learner); the
    driver forwards the stop request through its channel, the worker's wait ends and it checkpoints."""
    run_dir, log = tmp_path / "run", tmp_path / "out.log"
    task = ["env.name=stall_task:SlowMultiset", "model.policy=mlp", "model.pb=learned", "model.hidden_dim=32"]
    cmd = [sys.executable, "-m", "gfn_dist.train", "configs/hypergrid_tb.yaml", *task, *SMALL, f"run.dir={run_dir}"]
    if launcher == "ray":
        cmd += ["cluster.launcher=ray", "cluster.num_learners=1"]
    env = {**_env(), "GFN_TEST_REWARD_SLEEP_S": "3600"}  # the actor's reward call never returns
    env.setdefault("RAY_agent_register_timeout_ms", "180000")  # a slow dashboard agent on a loaded machine
    with open(log, "w") as out:
        proc = subprocess.Popen([*cmd, "learner.max_steps=20"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                text=True)
    # The rollout actor is up (the weights are published after it was created), the learner (a Ray
    # Train worker: once the driver logged its placement) waits, and nothing reached replay.
    started = (lambda: "learner workers (" in log.read_text()) if launcher == "ray" else (
        lambda: (run_dir / "config.yaml").is_file())
    try:
        deadline = time.monotonic() + 300
        while not started():
            assert proc.poll() is None, "exited before the run's start: " + log.read_text()[-4000:]
            assert time.monotonic() < deadline, "timed out waiting for the run's start"
            time.sleep(0.1)
        time.sleep(8.0)
        assert proc.poll() is None, log.read_text()[-4000:]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    assert elapsed < SIGTERM_BOUND_S, elapsed
    assert "preemption while waiting on replay at step 0" in out, out[-4000:]  # the wait ended, on the driver's log
    assert "stopped by signal 15 at step 0 after a checkpoint; continue with resume=true" in out, out[-4000:]
    (step, path), = ck.list_checkpoints(run_dir / "checkpoints")
    assert step == 0 and json.loads((path / "meta.json").read_text())["reason"] == "preempt"
    assert _rows(run_dir) == []  # no step was trained

    resumed = subprocess.run([*cmd, "learner.max_steps=4", "resume=true"], cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert [r["step"] for r in _rows(run_dir)] == [1, 2, 3, 4]


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def test_torchrun_sigterm_while_both_ranks_wait_on_replay_checkpoints_and_resumes(tmp_path):
    """Two torchrun ranks wait on a replay that no actor fills; SIGTERM to the rank processes (as
    SLURM's ``scancel`` sends it to every process of the step) ends both ranks' waits together
    (``RankAgreement``): they checkpoint step 0 and exit 0 (torchrun then exits 0 too) within the
    bound; ``resume=true`` under torchrun then trains each step once. (torchrun's own agent, when
    it gets SIGTERM, forwards it to the ranks the same way but exits 1 itself: PyTorch's choice.)"""
    run_dir = tmp_path / "run"
    task = ["env.name=stall_task:SlowMultiset", "model.policy=mlp", "model.pb=learned", "model.hidden_dim=32"]
    launch = [*_torchrun(), "--standalone", "--nproc_per_node=2", "--local-addr=127.0.0.1", "-m", "gfn_dist.train"]
    cmd = [*launch, "configs/hypergrid_tb.yaml", *task, *SMALL, f"run.dir={run_dir}"]
    env = {**_env(), "GFN_TEST_REWARD_SLEEP_S": "3600", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.Popen([*cmd, "learner.max_steps=20"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: (run_dir / "config.yaml").is_file(), proc, "the run's start")
        time.sleep(8.0)
        assert proc.poll() is None
        t0 = time.monotonic()
        ranks = [p for p in psutil.Process(proc.pid).children() if "gfn_dist.train" in " ".join(p.cmdline())]
        assert len(ranks) == 2, ranks
        for rank in ranks:
            rank.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert elapsed < SIGTERM_BOUND_S, elapsed
    assert "stopped by signal 15 at step 0 after a checkpoint; continue with resume=true" in out, out[-4000:]
    (step, path), = ck.list_checkpoints(run_dir / "checkpoints")
    meta = json.loads((path / "meta.json").read_text())
    assert step == 0 and meta["reason"] == "preempt", meta
    assert _rows(run_dir) == []

    env.pop("GFN_TEST_REWARD_SLEEP_S")
    resumed = subprocess.run([*cmd, "learner.max_steps=4", "resume=true"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["world_size"] == 2 for r in rows)
