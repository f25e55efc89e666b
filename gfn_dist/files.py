"""Durable and private files: fsync, atomic replace, private directories.

What "durable" means here (POSIX; ext4 / xfs, and NFS / Lustre where the
server honours ``fsync``): a file's bytes reach the disk on ``fsync(fd)``; a
directory entry (a create or a rename) reaches the disk on ``fsync`` of the
directory. ``atomic_write_bytes`` / ``atomic_write_text`` therefore write a
temporary file in the same directory, fsync it, rename it over the target and
fsync the directory: after a crash or power loss the target holds either the
old or the new content, never a mix.

Permissions. ``private_dir`` creates a directory readable by its owner only
(mode 0700 unless told otherwise): run directories hold checkpoints, configs
and metrics another local user should not read. ``ray_temp_dir`` gives the
embedded Ray a temp directory below a per-user directory of mode 0700 (Ray's
default, ``/tmp/ray``, is world-writable and shared by all users of the
machine, so another user could rename its sockets and stop the run).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from pathlib import Path

from gfn_dist.errors import DISK_FULL_ERRNOS, DiskFullError, disk_full_errno

__all__ = [
    "DISK_FULL_ERRNOS",
    "DiskFullError",
    "atomic_write_bytes",
    "atomic_write_text",
    "disk_full_errno",
    "fsync_dir",
    "fsync_file",
    "private_dir",
    "raise_if_disk_full",
    "ray_temp_dir",
]  # DISK_FULL_ERRNOS, DiskFullError, disk_full_errno: re-exported from gfn_dist.errors

logger = logging.getLogger(__name__)


def fsync_file(path: str | Path) -> None:
    """Flushes ``path``'s content to the disk.

    Raises:
        OSError: if the file cannot be opened or synced.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flushes a directory's entries (creates, renames) to the disk.

    Some filesystems refuse ``fsync`` on a directory (EINVAL / EBADF /
    ENOTSUP: e.g. some network and FUSE filesystems); that is logged at debug
    level and ignored, since there is nothing more a process can do there.

    Raises:
        OSError: if the directory cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:
        logger.debug("fsync of directory %s not supported: %s", path, err)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o600) -> None:
    """Replaces ``path`` with ``data`` atomically and durably (module doc).

    Args:
        path: the target file (its directory must exist).
        data: the new content.
        mode: permission bits of the new file.

    Raises:
        DiskFullError: ``disk full writing PATH: <strerror>`` (ENOSPC / EDQUOT); the target is
            then unchanged and the temporary file removed.
        OSError: if writing fails otherwise, with the same guarantee.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise_if_disk_full(err, path)
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise_if_disk_full(err, path)
        raise
    fsync_dir(path.parent)


def raise_if_disk_full(err: BaseException, target: Path) -> None:
    """Raises ``DiskFullError`` (one line naming ``target``) if ``err`` means a full disk."""
    code = disk_full_errno(err)
    if code is not None:
        raise DiskFullError(code, f"disk full writing {target}: {os.strerror(code)}") from None


def atomic_write_text(path: str | Path, text: str, mode: int = 0o600) -> None:
    """``atomic_write_bytes`` of ``text`` in UTF-8.

    Raises:
        OSError: as ``atomic_write_bytes``.
    """
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def private_dir(path: str | Path, mode: int = 0o700) -> Path:
    """Creates ``path`` (and missing parents) with ``mode`` for the last component.

    An existing directory keeps its permissions (the user chose them, e.g. a
    shared project directory); a created one gets exactly ``mode`` (not
    reduced by the umask). Missing parents get the default permissions.

    Args:
        path: the directory.
        mode: permission bits of the created directory (``run.dir_mode``).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OSError: if it cannot be created (e.g. a parent is a regular file, or is read-only).
    """
    path = Path(path)
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not path.is_dir():
            raise
        return path  # created concurrently by someone else: theirs
    os.chmod(path, mode)  # the umask may have removed bits the caller asked for
    return path


def _owned_private_dir(path: Path) -> bool:
    """Whether ``path`` is a real directory (not a link) of this user with no group / other bits."""
    st = os.lstat(path)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077 == 0


def _private_user_dir(base: Path) -> Path:
    """``base/ray-<uid>`` created 0700 (or reused when it is this user's real directory), else a fresh one."""
    path = base / f"ray-{os.getuid()}"
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)
        return path
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
        if not _owned_private_dir(path):
            logger.warning("Ray temp directory %s had mode %o; set to 0700", path, stat.S_IMODE(st.st_mode))
            os.chmod(path, 0o700)
        return path
    fresh = Path(tempfile.mkdtemp(prefix=f"ray-{os.getuid()}-", dir=base))
    logger.warning(
        "%s is not a directory owned by this user (uid %d): using %s for Ray instead", path, os.getuid(), fresh
    )
    return fresh


def ray_temp_dir(base: str | Path | None = None) -> str:
    """A temp directory for the embedded Ray that only this user can reach.

    Returns ``<base>/ray-<uid>/ray`` (``base``: the system temp directory,
    ``$TMPDIR`` or ``/tmp``). Ray itself makes its temp, session and socket
    directories world-writable (``chmod 0777``, for machines shared by several
    users), so the privacy comes from the parent ``ray-<uid>``: created 0700,
    it lets no other user reach anything below it. Reused by later runs of the
    same user, as Ray reuses ``/tmp/ray``. Pass the result to
    ``ray.init(_temp_dir=...)`` (used when Ray starts a local cluster). Kept
    short: Ray puts Unix sockets under it, and their paths are limited to ~107 bytes.

    If ``ray-<uid>`` exists but is not a directory of this user, or is a
    symbolic link, another user may have planted it: a fresh unique directory
    (``mkdtemp``, 0700) is used instead, with a warning. An existing one of
    this user with looser permissions is set back to 0700.

    Returns:
        the path to pass as Ray's temp directory.

    Raises:
        OSError: if no directory can be created under ``base``.
    """
    base = Path(base) if base is not None else Path(tempfile.gettempdir())
    return str(_private_user_dir(base) / "ray")
