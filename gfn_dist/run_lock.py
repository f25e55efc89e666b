"""One owner per run directory: an exclusive lock on ``RUN_DIR/.lock``.

Two runs on one ``run.dir`` (a resubmitted SLURM job, a typo) would interleave
their metric rows, prune each other's checkpoints and resume each other's
replay. The driver (rank 0) therefore takes ``RunDirLock(run_dir)`` before Ray
starts and holds it until the process exits::

    with RunDirLock(run_dir):
        ...  # the whole run

A second process asking for it gets ``RunDirLockedError`` (a ``ConfigError``:
the CLI prints one line and exits 2) naming the holder: host, PID and start
time, which the holder writes into the lock file.

Mechanism: ``fcntl.flock(LOCK_EX | LOCK_NB)`` on a descriptor that is kept
open. The kernel drops the lock when the holder dies, however it dies
(SIGKILL included), so a lock is never left behind by a dead process; what can
be left is the *file* naming it. Taking a lock whose file still names another
holder is a takeover of a stale lock, logged as a warning (with whether that
PID still lives, when it was on this host). The descriptor is not inherited by
child processes (Python's default, PEP 446), so Ray's workers cannot keep the
lock alive after the driver is gone. The file is never deleted (deleting a lock
file races with a process that has just opened it); it is emptied on release.

Network filesystems (SLURM's shared ``$HOME`` / scratch):

* NFS (v3 with ``lockd``, v4): Linux implements ``flock`` as a whole-file POSIX
  lock on the server, so the lock holds across nodes. Not with the ``nolock``
  or ``local_lock=flock|all`` mount options: then it only holds among
  processes of one node. A lock of a node that crashed is released when the
  server's lease expires (NFSv4: ~90 s), after which the next run takes it over.
  POSIX locks are dropped when the process closes *any* descriptor of the
  file, so this module reads the file only through the descriptor it holds.
* Lustre: ``flock`` is coherent across nodes only with the ``flock`` mount
  option; with ``localflock`` it holds per node; with ``noflock`` (older
  default) the call fails. A filesystem where ``flock`` fails (ENOLCK,
  EOPNOTSUPP, ...) falls back, with a warning, to the holder recorded in the
  file: a live process on this host refuses the run; a holder on another host
  cannot be checked and is taken over with a warning.
* GPFS / BeeGFS: ``flock`` is cluster-wide (BeeGFS with ``tuneUseGlobalFileLocks``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from gfn_dist.config import ConfigError
from gfn_dist.files import private_dir

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunDirLockedError(ConfigError):
    """Another live run holds the run directory; the message names it (host, PID, start time)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _describe(holder: dict) -> str:
    return f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, started {holder.get('started', '?')}"


class RunDirLock:
    """Exclusive ownership of a run directory (module doc).

    Args:
        run_dir: the run directory (created with ``dir_mode`` if missing).
        dir_mode: permission bits of a created run directory (``run.dir_mode``).
    """

    def __init__(self, run_dir: str | Path, dir_mode: int = 0o700) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.dir_mode = dir_mode
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> RunDirLock:
        """Takes the lock without waiting.

        Returns:
            self.

        Raises:
            RunDirLockedError: another live process holds it (one line naming it).
            ConfigError: the run directory or its lock file cannot be created (naming ``run.dir``).
        """
        if self._fd is not None:
            return self
        try:
            private_dir(self.run_dir, self.dir_mode)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as err:
            raise ConfigError(f"run.dir: cannot create the lock file {self.path}: {err.strerror}") from None
        try:
            self._lock(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._write_holder()
        return self

    def _lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_holder(fd)
            for _ in range(20):  # the holder writes its name right after locking: give it a moment
                if holder:
                    break
                time.sleep(0.05)
                holder = self._read_holder(fd)
            raise RunDirLockedError(
                f"run.dir: {self.run_dir} is in use by another run ({_describe(holder)}); "
                f"wait for it, stop it, or choose another run.dir (lock file {self.path})"
            ) from None
        except OSError as err:  # ENOLCK, EOPNOTSUPP, EINVAL: no flock on this filesystem (Lustre noflock, ...)
            logger.warning(
                "run.dir: flock is not supported on the filesystem of %s (%s); only a holder on "
                "this host can be detected",
                self.path,
                err.strerror,
            )
            holder = self._read_holder(fd)
            if self._live_here(holder):
                raise RunDirLockedError(
                    f"run.dir: {self.run_dir} is in use by another run ({_describe(holder)}) (lock file {self.path})"
                ) from None
        previous = self._read_holder(fd)
        if previous:
            note = ""
            if previous.get("host") == socket.gethostname():
                note = (
                    "; that process is gone"
                    if not self._live_here(previous)
                    else "; that PID now belongs to another process"
                )
            logger.warning("run.dir: took over the stale lock %s left by %s%s", self.path, _describe(previous), note)

    @staticmethod
    def _live_here(holder: dict) -> bool:
        """Whether ``holder`` is another live process of this host."""
        try:
            pid = int(holder.get("pid", -1))
        except (TypeError, ValueError):
            return False
        return holder.get("host") == socket.gethostname() and pid > 0 and pid != os.getpid() and _pid_alive(pid)

    @staticmethod
    def _read_holder(fd: int) -> dict:
        """The holder recorded in the file (read through ``fd``: see NFS in the module doc); {} if none."""
        raw = os.pread(fd, 4096, 0)
        if not raw.strip():
            return {}
        try:
            holder = json.loads(raw)
            return holder if isinstance(holder, dict) else {"raw": raw[:80].decode("utf-8", "replace")}
        except ValueError:
            return {"raw": raw[:80].decode("utf-8", "replace")}

    def _write_holder(self) -> None:
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "run_dir": str(self.run_dir.resolve()),
        }
        data = (json.dumps(holder) + "\n").encode("utf-8")
        assert self._fd is not None  # called with the lock held
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
            os.fsync(self._fd)
        except OSError as err:  # e.g. disk full: the lock itself holds, only the description is missing
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            logger.warning("run.dir: could not record the holder in %s: %s", self.path, err.strerror)

    def holder(self) -> dict:
        """The holder recorded in the lock file while this object holds it ({} otherwise)."""
        return self._read_holder(self._fd) if self._fd is not None else {}

    def release(self) -> None:
        """Empties the lock file and releases the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError as err:
            logger.debug("run.dir: could not empty %s: %s", self.path, err)
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
