"""No process of the embedded Ray outlives the driver, whichever way the driver ends.

Ray starts the GCS and the raylet of an embedded cluster (``ray.init(address="local")``)
as children of the driver; the raylet starts the workers and the dashboard /
runtime-env agents. ``ray.shutdown`` stops them, but nothing does when the driver
dies without it (SIGKILL, the OOM killer) or when its shutdown cannot reach a dead
GCS: the agents, at least, live on (issue 18).

Which processes are the session's: before ``ray.init`` the driver puts a random token
in its environment (``TOKEN_ENV``, only while Ray starts: ``SessionReaper.tagged``);
the GCS, the raylet and Ray's other node processes inherit it, and the raylet passes
it on to the workers it starts. A process whose initial environment
(``/proc/PID/environ``) holds that token is the session's; so is every descendant of
one -- the dashboard and runtime-env agents rename themselves (``setproctitle``),
which zeroes their copy of the environment (measured: their ``environ`` reads as NUL
bytes), so they are found as the raylet's children. Processes of other Ray sessions,
of other runs and of other users (whose environment this user cannot read) never match.

The watchdog: ``SessionReaper.start`` runs this file as a script (``python -I``, the
standard library only: no torch or Ray import, tens of milliseconds, a few MB) in a
session of its own (a Ctrl-C or a kill of the driver's process group does not reach
it). Every ``POLL_S`` it records the session's processes with their start times (a
/proc scan: ~1.5 ms for 60 processes), so that it still knows the agents once the
raylet is gone and they were re-parented, and never mistakes a reused PID for one of
them. Its stdin is the read end of a pipe whose write end only the driver holds
(non-inheritable, so Ray's processes do not keep it open): end of file there, or the
driver's PID gone or a zombie, means the driver ended (or closed the pipe after its
``ray.shutdown``: ``SessionReaper.close``). The watchdog then ``reap``s: it waits up
to ``grace_s`` for the session's processes to leave by themselves, sends SIGTERM to
those left, SIGKILL to those still there after ``term_s`` more, and exits; a clean
driver waits for that, so nothing of its Ray is left when it exits.

Linux only (``/proc``); elsewhere ``SessionReaper.start`` returns a reaper that does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

logger = logging.getLogger(__name__)

#: The environment variable that marks the processes of one embedded Ray session.
TOKEN_ENV = "GFN_DIST_RAY_SESSION"
PROC = "/proc"
POLL_S = 1.0  # the watchdog's scan of the session and check of the driver (the pipe's end of file is seen at once)
GRACE_S = 2.0  # the session's processes may leave by themselves (a raylet stopping its workers)
TERM_S = 3.0  # after SIGTERM, before SIGKILL


def supported() -> bool:
    """Whether processes can be told apart by their environment here (Linux ``/proc``)."""
    return os.path.isfile(f"{PROC}/self/environ")


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks after boot, ``/proc/PID/stat`` field 22), or None when
    the process is gone or a zombie (it has ended; only its exit status waits for its parent)."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()  # after "PID (COMM) "; COMM may hold spaces
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def process_table() -> dict[int, tuple[int, int]]:
    """``{pid: (ppid, start time)}`` of every live process (zombies left out)."""
    table = {}
    for name in os.listdir(PROC):
        if not name.isdigit():
            continue
        try:
            with open(f"{PROC}/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone since the listing
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] not in (b"Z", b"X"):
            table[int(name)] = (int(fields[1]), int(fields[19]))
    return table


def session_processes(token: str, known: dict[int, int] | None = None) -> dict[int, int]:
    """``{pid: start time}`` of the session's live processes: those tagged with ``token``, those of
    ``known`` (``{pid: start time}`` from an earlier scan) still running with the same start time,
    and every descendant of either. This process is never included."""
    table = process_table()
    members = {pid: table[pid][1] for pid in session_pids(token) if pid in table}
    for pid, start in (known or {}).items():
        if pid in table and table[pid][1] == start:
            members[pid] = start
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(members)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in members:
                members[child] = table[child][1]
                stack.append(child)
    members.pop(os.getpid(), None)
    return members


def session_pids(token: str) -> list[int]:
    """PIDs of the live processes whose initial environment holds ``TOKEN_ENV=token`` (this one excluded).

    Zombies have an empty environment and do not match; nor does a process whose
    environment this user may not read.
    """
    needle = f"{TOKEN_ENV}={token}".encode()
    me = os.getpid()
    found = []
    for name in os.listdir(PROC):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"{PROC}/{name}/environ", "rb") as f:
                environ = f.read()
        except OSError:  # gone since the listing, or another user's
            continue
        if needle in environ.split(b"\0"):
            found.append(int(name))
    return sorted(found)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # left in the meantime
            os.kill(pid, sig)


def _wait_gone(token: str, known: dict[int, int], timeout_s: float) -> dict[int, int]:
    """The session's processes once none is left or after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    members = session_processes(token, known)
    while members and time.monotonic() < end:
        time.sleep(0.05)
        members = session_processes(token, members)
    return members


def reap(
    token: str, grace_s: float = GRACE_S, term_s: float = TERM_S, known: dict[int, int] | None = None
) -> list[int]:
    """Ends every process of the session ``token`` (``session_processes``, with ``known`` from an
    earlier scan): waits ``grace_s`` for them to leave, then SIGTERM, then after ``term_s`` SIGKILL.
    Returns within about ``grace_s + term_s + 1`` seconds.

    The session's processes are re-read (PID and start time) just before each round of signals,
    so no process of another session or user is touched.

    Returns:
        The PIDs that had to be signalled (empty when the session ended by itself).
    """
    members = _wait_gone(token, known or {}, grace_s)
    signalled: set[int] = set()
    for sig, wait_s in ((signal.SIGTERM, term_s), (signal.SIGKILL, 1.0)):
        if not members:
            break
        _signal_all(sorted(members), sig)
        signalled.update(members)
        members = _wait_gone(token, members, wait_s)
    return sorted(signalled)


class SessionReaper:
    """The watchdog of one embedded Ray session (see module doc); a no-op when ``token`` is None.

    Args:
        token: the session's token (``TOKEN_ENV``), or None (not supported here).
        watchdog: the watchdog process, or None.
        pipe_fd: the write end of the watchdog's stdin, or None.
    """

    def __init__(
        self, token: str | None = None, watchdog: subprocess.Popen | None = None, pipe_fd: int | None = None
    ) -> None:
        self.token = token
        self.watchdog = watchdog
        self._pipe_fd = pipe_fd

    @classmethod
    def start(cls, grace_s: float = GRACE_S, term_s: float = TERM_S) -> SessionReaper:
        """Starts the watchdog of a new session token for this process (call before ``ray.init``)."""
        if not supported():
            logger.debug("no /proc on this system: the embedded Ray's processes are not watched")
            return cls()
        token = uuid.uuid4().hex
        start = process_start_time(os.getpid())
        read_fd, write_fd = os.pipe()  # both non-inheritable: no other child of this process holds the pipe
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        cmd = [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), str(start), token]
        try:
            watchdog = subprocess.Popen(
                [*cmd, str(grace_s), str(term_s)], stdin=read_fd, env=env, start_new_session=True, close_fds=True
            )
        finally:
            os.close(read_fd)
        return cls(token, watchdog, write_fd)

    @contextlib.contextmanager
    def tagged(self) -> Iterator[None]:
        """While active, processes started from this one carry the session's token (start Ray here)."""
        if self.token is None:
            yield
            return
        old = os.environ.get(TOKEN_ENV)
        os.environ[TOKEN_ENV] = self.token
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(TOKEN_ENV, None)
            else:
                os.environ[TOKEN_ENV] = old

    def pids(self) -> list[int]:
        """The session's live processes, tagged or descendants of tagged ones (empty for a no-op reaper)."""
        return sorted(session_processes(self.token)) if self.token is not None else []

    def close(self, timeout_s: float = GRACE_S + TERM_S + 3.0) -> None:
        """Ends what is left of the session (call after ``ray.shutdown``): closes the pipe, so that the
        watchdog reaps the session (it knows the processes that are no longer the raylet's children)
        and exits, and waits up to ``timeout_s`` for it. Without a live watchdog, reaps here."""
        if self.token is None:
            return
        if self._pipe_fd is not None:
            os.close(self._pipe_fd)  # end of file: the watchdog reaps and exits
            self._pipe_fd = None
        if self.watchdog is not None:
            try:
                self.watchdog.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("the Ray session watchdog (pid %d) did not exit; killed", self.watchdog.pid)
                self.watchdog.kill()
                self.watchdog.wait()
        if self.watchdog is None or self.watchdog.returncode != 0:  # it did not finish its reap
            signalled = reap(self.token)
            if signalled:
                logger.warning("stopped %d leftover process(es) of the embedded Ray: %s", len(signalled), signalled)
        self.token = None


# ---------------------------------------------------------------------------- the watchdog process


def _driver_ended(stdin_fd: int, driver_pid: int, driver_start: int | None) -> bool:
    """Waits up to ``POLL_S``; True once the pipe reached end of file or the driver's PID is gone."""
    ready, _, _ = select.select([stdin_fd], [], [], POLL_S)
    if ready and not os.read(stdin_fd, 4096):
        return True
    return process_start_time(driver_pid) != driver_start


def watch(driver_pid: int, driver_start: int | None, token: str, grace_s: float, term_s: float) -> int:
    """The watchdog's loop: records the session's processes until the driver ends (or closes the
    pipe), then ``reap``s them. Returns 0."""
    with contextlib.suppress(ValueError, OSError):  # stray terminal signals must not end the watch
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    known: dict[int, int] = {}
    while not _driver_ended(0, driver_pid, driver_start):
        known = session_processes(token, known)
    signalled = reap(token, grace_s, term_s, known)
    if signalled:
        sys.stderr.write(
            f"gfn-dist: {len(signalled)} process(es) of the embedded Ray were left after its driver "
            f"(pid {driver_pid}) stopped or died; stopped them: pids {signalled}\n"
        )
    return 0


if __name__ == "__main__":  # python -I session_reaper.py DRIVER_PID DRIVER_START TOKEN GRACE_S TERM_S
    _pid, _start, _token, _grace, _term = sys.argv[1:6]
    sys.exit(watch(int(_pid), None if _start == "None" else int(_start), _token, float(_grace), float(_term)))
