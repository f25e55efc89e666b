"""Clean ends of the embedded Ray (issue 18 item 6), through the real entry point
(``python -m gfn_dist.train``, a subprocess that starts its own embedded Ray):

* the driver SIGKILLed mid-training: within ``REAP_BOUND_S`` no process of its Ray session is left
  (the GCS, the raylet, the workers and the dashboard / runtime-env agents, collected as the
  driver's descendants before the kill), nor the session's watchdog;
* the GCS SIGKILLed once training finished (the driver held at ``GFN_DIST_SHUTDOWN_GATE``): the run
  exits 0 within ``SHUTDOWN_BOUND_S``, with a warning naming the GCS, its outputs complete, and no
  process of the session left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gfn_dist.metrics import read_jsonl

pytestmark = pytest.mark.cluster  # real CLI runs that start Ray (the fast tier: -m "not cluster")

ROOT = Path(__file__).resolve().parents[1]
#: Seconds from the driver's SIGKILL until no process of its Ray is left: the watchdog sees the
#: pipe's end of file at once, waits 2 s (GRACE_S), SIGTERMs, SIGKILLs after 3 s (TERM_S).
REAP_BOUND_S = 15.0
#: Seconds from opening the gate (GCS dead) to the driver's exit: the bounded ray.shutdown (10 s)
#: plus the actors' stop (5 s) and the reaper's grace, with margin.
SHUTDOWN_BOUND_S = 45.0
SMALL = [
    "rollout.num_actors=1",
    "learner.batch_size=16",
    "rollout.trajectories_per_push=16",
    "replay.capacity_per_shard=256",
    "replay.min_size_to_sample=16",
    "eval.interval_steps=0",
    "logging.log_every=1",
    "logging.progress_bar=false",
    "logging.wandb.mode=disabled",
    "model.hidden_dim=32",
]


def _start(run_dir: Path, log: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gfn_dist.train", "configs/hypergrid_tb.yaml", *SMALL, f"run.dir={run_dir}", *extra]
    # Output to a file: after a SIGKILL the driver's pipe would stay open as long as any of its Ray's processes.
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env or dict(os.environ), stdout=out, stderr=subprocess.STDOUT)


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return read_jsonl(path) if path.is_file() else []


def _wait_for(predicate, proc: subprocess.Popen, log: Path, what: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"exited before {what}: " + log.read_text()[-4000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _alive(proc: psutil.Process) -> bool:
    """Running (same PID and start time) and not a zombie (ended, its status not yet read)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _names(procs: list[psutil.Process]) -> set[str]:
    names = set()
    for p in procs:
        try:
            names.add(p.name())
            names.update(arg for arg in p.cmdline() if "agent" in arg.lower())
        except psutil.NoSuchProcess:
            pass
    return names


def _session(driver: subprocess.Popen) -> list[psutil.Process]:
    """Every descendant of the driver: its Ray's GCS and raylet, the raylet's workers and agents, the watchdog."""
    return psutil.Process(driver.pid).children(recursive=True)


def _kill_leftovers(procs: list[psutil.Process]) -> None:
    for p in procs:
        if _alive(p):
            p.kill()


def _wait_all_gone(procs: list[psutil.Process], timeout_s: float) -> tuple[float, list[str]]:
    """Seconds until none of ``procs`` is alive (or ``timeout_s``), and the survivors' descriptions."""
    t0 = time.monotonic()
    while any(_alive(p) for p in procs) and time.monotonic() - t0 < timeout_s:
        time.sleep(0.1)
    survivors = []
    for p in procs:
        if _alive(p):
            with contextlib.suppress(psutil.NoSuchProcess):
                survivors.append(f"{p.pid} {p.name()} {' '.join(p.cmdline())[:200]}")
    return time.monotonic() - t0, survivors


def test_no_process_of_the_embedded_ray_survives_the_drivers_sigkill(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    driver = _start(run_dir, log, "learner.max_steps=100000", "checkpoint.interval_steps=0")
    session: list[psutil.Process] = []
    try:
        _wait_for(lambda: any(r["step"] >= 3 for r in _rows(run_dir)), driver, log, "training steps")
        session = _session(driver)
        names = _names(session)
        # What must not survive is there: the control plane, the actors' workers and the agents.
        assert {"gcs_server", "raylet"} <= names, names
        assert any(n.startswith("ray::") for n in names), names
        assert any("dashboard" in n.lower() or "agent" in n.lower() for n in names), names
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        elapsed, survivors = _wait_all_gone(session, REAP_BOUND_S)
    finally:
        if driver.poll() is None:
            driver.kill()
        _kill_leftovers(session)
    assert not survivors, f"{len(survivors)} processes outlived the driver by {elapsed:.1f} s: {survivors}"
    print(f"no process of the driver's Ray left {elapsed:.1f} s after its SIGKILL ({len(session)} processes)")


def test_a_finished_run_exits_0_when_the_gcs_dies_at_shutdown(tmp_path):
    run_dir, log, gate = tmp_path / "run", tmp_path / "log", tmp_path / "gate"
    env = {**os.environ, "GFN_DIST_SHUTDOWN_GATE": str(gate)}
    driver = _start(run_dir, log, "learner.max_steps=5", env=env)
    session: list[psutil.Process] = []
    try:
        _wait_for(lambda: Path(f"{gate}.waiting").is_file(), driver, log, "the end of training")
        assert int(Path(f"{gate}.waiting").read_text()) == driver.pid
        session = _session(driver)
        gcs = [p for p in session if p.name() == "gcs_server"]
        assert len(gcs) == 1, _names(session)
        gcs[0].kill()
        _wait_all_gone(gcs, 10.0)  # a zombie until the driver reads its status: ended
        t0 = time.monotonic()
        gate.touch()
        code = driver.wait(timeout=SHUTDOWN_BOUND_S + 60)
        elapsed = time.monotonic() - t0
        _, survivors = _wait_all_gone(session, 5.0)  # the driver reaped its session before exiting
    finally:
        if driver.poll() is None:
            driver.kill()
        _kill_leftovers(session)
    out = log.read_text()
    assert code == 0, out[-4000:]
    assert elapsed < SHUTDOWN_BOUND_S, elapsed
    assert "GCS at 127.0.0.1:" in out and "does not answer at shutdown" in out, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert [r["step"] for r in _rows(run_dir)] == [1, 2, 3, 4, 5]
    assert (run_dir / "policy.pt").is_file()
    assert not survivors, (survivors, out[-3000:])
    print(f"exit 0 {elapsed:.1f} s after the gate opened with the GCS dead")
