"""One owner per run directory (gfn_dist.run_lock), with real processes. No Ray."""

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from gfn_dist.config import ConfigError
from gfn_dist.run_lock import RunDirLock, RunDirLockedError

# Holds the lock, starts a child that inherits every descriptor it may (close_fds=False, as a
# careless launcher would), prints the child's PID and waits for stdin to close.
HOLDER = textwrap.dedent("""
    import subprocess, sys
    from gfn_dist.run_lock import RunDirLock
    lock = RunDirLock(sys.argv[1]).acquire()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], close_fds=False)
    print(child.pid, flush=True)
    sys.stdin.read()
    child.kill()
    lock.release()
""")


@pytest.fixture
def holder(tmp_path):
    """Starts a process holding ``tmp_path / 'run'``; yields ``(process, child_pid)``."""
    procs = []

    def start():
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        line = p.stdout.readline()
        assert line.strip().isdigit(), f"holder failed to start (exit {p.poll()})"
        procs.append(int(line))
        return p, int(line)

    yield start
    for p in procs:
        if isinstance(p, int):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        elif p.poll() is None:
            p.kill()
            p.wait()


def test_second_owner_is_refused_with_one_line_naming_the_holder(tmp_path, holder):
    proc, _ = holder()
    with pytest.raises(RunDirLockedError) as info:
        RunDirLock(tmp_path / "run").acquire()
    msg = str(info.value)
    assert isinstance(info.value, ConfigError) and "\n" not in msg
    assert msg.startswith("run.dir: ") and f"PID {proc.pid}" in msg and socket.gethostname() in msg
    assert "started 2" in msg  # a timestamp
    proc.stdin.close()  # the holder finishes and releases
    assert proc.wait(timeout=30) == 0
    with RunDirLock(tmp_path / "run") as lock:  # free now, and no stale-lock warning needed
        assert lock.held and lock.holder()["pid"] == os.getpid()
    assert (tmp_path / "run" / ".lock").read_text() == ""  # emptied on release


def test_lock_of_a_killed_holder_is_taken_over_with_a_warning(tmp_path, holder, caplog):
    """SIGKILL leaves the lock file naming the dead holder; its child (which inherited what it
    could) does not keep the lock alive."""
    proc, child = holder()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    os.kill(child, 0)  # the child still runs
    with caplog.at_level(logging.WARNING, logger="gfn_dist.run_lock"):
        lock = RunDirLock(tmp_path / "run").acquire()
    lock.release()
    warnings = [r.getMessage() for r in caplog.records]
    assert any("stale lock" in w and f"PID {proc.pid}" in w and "that process is gone" in w for w in warnings)


def test_same_process_second_lock_is_refused_and_release_is_idempotent(tmp_path):
    first = RunDirLock(tmp_path / "run").acquire()
    with pytest.raises(RunDirLockedError, match=f"PID {os.getpid()}"):
        RunDirLock(tmp_path / "run").acquire()
    first.release()
    first.release()
    assert not first.held
    RunDirLock(tmp_path / "run").acquire().release()


def test_run_dir_is_created_private_and_a_file_is_refused(tmp_path):
    with RunDirLock(tmp_path / "a" / "run"):
        assert (tmp_path / "a" / "run").stat().st_mode & 0o777 == 0o700
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"^run.dir: cannot create the lock file"):
        RunDirLock(tmp_path / "file").acquire()
