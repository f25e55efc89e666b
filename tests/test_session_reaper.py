"""gfn_dist.distributed.session_reaper, without Ray: plain processes stand in for a Ray session.

* ``reap`` ends exactly the processes whose environment carries the session's token
  (SIGTERM, then SIGKILL for one that ignores SIGTERM) and leaves another session's and
  untagged processes alone, within its stated bound;
* the watchdog of a driver killed with SIGKILL ends the driver's tagged processes and a child of
  one whose environment does not show the tag, even after its parent died first (as the agents
  after the raylet), leaves the driver's untagged child alone, and exits;
* ``SessionReaper.close`` has the watchdog reap, restores the environment and waits for it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from gfn_dist.distributed import session_reaper
from gfn_dist.distributed.session_reaper import TOKEN_ENV, SessionReaper, reap, session_pids

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
#: Ignores SIGTERM (as a wedged process may); says "ready" once the handler is in place.
STUBBORN = [
    sys.executable,
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)",
]
#: A tagged process that starts a child of its own, as the raylet starts the agents, with an environment
#: that does not show the tag (as an agent's after ``setproctitle`` zeroed it); prints the child's PID.
PARENT = [
    sys.executable,
    "-c",
    "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
    "env={}); print(c.pid, flush=True); time.sleep(120)",
]


def _spawn(cmd: list[str], token: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    if token is not None:
        env[TOKEN_ENV] = token
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)


def _gone(proc: psutil.Process) -> bool:
    """Ended: no longer running, or a zombie waiting for its parent to read its status."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_until(predicate, timeout_s: float) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, "timed out"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_reap_ends_exactly_the_tagged_processes():
    mine = [_spawn(SLEEPER, "A"), _spawn(SLEEPER, "A"), _spawn(STUBBORN, "A")]
    others = [_spawn(SLEEPER, "B"), _spawn(SLEEPER, None)]
    try:
        assert mine[2].stdout.readline().strip() == "ready"
        assert session_pids("A") == sorted(p.pid for p in mine)
        assert session_pids("B") == [others[0].pid]
        t0 = time.monotonic()
        signalled = reap("A", grace_s=0.3, term_s=1.0)
        elapsed = time.monotonic() - t0
        assert signalled == sorted(p.pid for p in mine)
        assert elapsed < 0.3 + 1.0 + 1.0 + 0.5, elapsed  # reap's stated bound (+ scan time)
        assert [p.wait(timeout=5) for p in mine] == [-signal.SIGTERM, -signal.SIGTERM, -signal.SIGKILL]
        assert all(p.poll() is None for p in others)
        assert session_pids("A") == []
        assert reap("A", grace_s=0.1) == []  # nothing left: nothing signalled
    finally:
        for p in mine + others:
            p.kill()
            p.wait()


def test_reap_leaves_a_session_that_ends_within_the_grace_alone():
    proc = _spawn([sys.executable, "-c", "import time; time.sleep(0.5)"], "C")
    try:
        assert reap("C", grace_s=5.0, term_s=1.0) == []  # left by itself: nothing signalled
        assert proc.wait(timeout=5) == 0
    finally:
        proc.kill()
        proc.wait()


DRIVER = """
import json, subprocess, sys, time
from gfn_dist.distributed.session_reaper import SessionReaper
reaper = SessionReaper.start(grace_s=0.5, term_s=1.0)
with reaper.tagged():
    parent = subprocess.Popen(PARENT, stdout=subprocess.PIPE, text=True)
    stubborn = subprocess.Popen(STUBBORN, stdout=subprocess.PIPE, text=True)
untagged = subprocess.Popen(SLEEPER)
assert stubborn.stdout.readline().strip() == "ready"
print(json.dumps({"watchdog": reaper.watchdog.pid, "tagged": [parent.pid, int(parent.stdout.readline()),
                  stubborn.pid], "untagged": untagged.pid}), flush=True)
time.sleep(120)
"""


def test_the_watchdog_ends_the_session_of_a_sigkilled_driver():
    code = f"PARENT, STUBBORN, SLEEPER = {PARENT!r}, {STUBBORN!r}, {SLEEPER!r}\n{DRIVER}"
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    info = json.loads(driver.stdout.readline())
    watchdog = psutil.Process(info["watchdog"])
    tagged = [psutil.Process(pid) for pid in info["tagged"]]
    untagged = psutil.Process(info["untagged"])
    try:
        assert watchdog.ppid() == driver.pid and os.getsid(watchdog.pid) == watchdog.pid  # a session of its own
        token = watchdog.cmdline()[-3]
        parent, _, stubborn = info["tagged"]
        assert session_pids(token) == sorted([parent, stubborn])  # the grandchild's environment has no tag
        assert sorted(session_reaper.session_processes(token)) == sorted(info["tagged"])  # but it descends
        time.sleep(2 * session_reaper.POLL_S + 0.5)  # the watchdog has seen the grandchild as the parent's
        tagged[0].kill()  # the parent dies first (as the raylet, on the driver's death): its child is orphaned
        _wait_until(lambda: _gone(tagged[0]), timeout_s=5.0)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        # The pipe's end of file is seen at once; grace 0.5 s, SIGTERM, the stubborn one SIGKILLed after 1 s.
        elapsed = _wait_until(lambda: all(_gone(p) for p in tagged), timeout_s=10.0)
        assert elapsed < 0.5 + 1.0 + 2.0, elapsed
        _wait_until(lambda: _gone(watchdog), timeout_s=5.0)
        assert not _gone(untagged)  # not the session's: left alone
    finally:
        for p in [*tagged, untagged]:
            if not _gone(p):
                p.kill()


def test_close_has_the_watchdog_reap_and_waits_for_it():
    reaper = SessionReaper.start(grace_s=0.2, term_s=0.5)
    try:
        with reaper.tagged():
            assert os.environ[TOKEN_ENV] == reaper.token
            stubborn = subprocess.Popen(STUBBORN, stdout=subprocess.PIPE, text=True)
        assert TOKEN_ENV not in os.environ  # only processes started inside `tagged` carry it
        assert stubborn.stdout.readline().strip() == "ready"
        assert reaper.pids() == [stubborn.pid]
        t0 = time.monotonic()
        reaper.close()
        assert time.monotonic() - t0 < 0.2 + 0.5 + 1.0 + 1.0  # grace, SIGTERM ignored, SIGKILL
        assert stubborn.wait(timeout=5) == -signal.SIGKILL
        assert reaper.watchdog.returncode == 0  # the watchdog reaped, then exited
        reaper.close()  # idempotent
    finally:
        if reaper.watchdog.poll() is None:
            reaper.watchdog.kill()


def test_process_start_time_tells_a_zombie_from_a_live_process():
    proc = subprocess.Popen(SLEEPER)
    try:
        assert session_reaper.process_start_time(proc.pid) is not None
        proc.kill()
        _wait_until(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE, timeout_s=5.0)
        assert session_reaper.process_start_time(proc.pid) is None  # ended, not yet waited for
    finally:
        proc.wait()
    assert session_reaper.process_start_time(proc.pid) is None
