"""Errors shared by every layer (standard library only, so core and distributed code can raise them).

``ConfigError`` is re-exported by ``gfn_dist.config``; ``gfn-dist`` turns it into
one line on stderr and exit code 2. ``DiskFullError`` / ``disk_full_errno``: a
full disk, however the writer reported it (``gfn_dist.files`` re-exports them).
"""

from __future__ import annotations

import errno
import os

#: errno values of a full disk: no space, or the user's quota (common on cluster filesystems).
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key (one line)."""


class ReplayStalled(RuntimeError):
    """The learner got no data from replay for ``replay.timeout_s``; a checkpoint was written first.
    ``gfn-dist`` prints it as one line and exits 1."""


class DiskFullError(OSError):
    """The disk is full (ENOSPC / EDQUOT); the message is one line naming the file.

    Raised by the metrics sink (``gfn_dist.metrics.JsonlSink``, after skipping
    the row), by ``write_checkpoint`` (the previous checkpoints untouched) and by
    ``save_torch_file`` (``policy.pt``; the previous file untouched);
    ``gfn-dist train`` catches it to stop with that line (exit code 1).
    Built as ``DiskFullError(errno, message)``.
    """

    def __str__(self) -> str:
        return str(self.strerror)


def disk_full_errno(err: BaseException) -> int | None:
    """The errno if ``err`` means a full disk, else None.

    ``torch.save`` reports a full disk as the ``OSError`` of the file object it
    writes to, or -- writing to a path itself -- as a ``RuntimeError`` from its
    C++ writer whose chain (``__cause__`` / ``__context__``) or message holds the
    ``OSError``; both count, as does an ``OSError`` with ``ENOSPC`` / ``EDQUOT``.
    A ``RuntimeError`` that names no errno (torch's "file write failed") does not:
    write through a Python file object to get the errno.
    """
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in DISK_FULL_ERRNOS:
            return int(cur.errno)
        text = str(cur)
        for code in DISK_FULL_ERRNOS:
            if f"[Errno {code}]" in text or os.strerror(code) in text:
                return code
        cur = cur.__cause__ or cur.__context__
    return None
