"""Recoverable replay shards: an insert journal and snapshots (``ShardPersistence``).

Replay shards (``ShardPersistence``, inside each shard with a state directory
``RUN_DIR/replay/shard_<i>``): ``journal.bin`` holds 48 bytes rewritten in place
(``os.pwrite``) after every insert -- ``num_inserts``, the items the shard holds
(``size``), restarts, items lost; the write is in the kernel's page cache, so it
survives the process being killed. ``snapshot.pt`` holds the latest
``ReplayShard.snapshot()`` (plain tensors, read with ``torch.load(weights_only=True)``),
written atomically every ``replay.snapshot_every_inserts`` items and whenever
``snapshot()`` (checkpoints) or ``restore()`` runs.

A shard Ray restarts (``replay.max_restarts``) restores the snapshot and reports
``items_lost = size at death - size restored`` (the journal's ``size`` minus the
snapshot's), so never more than the capacity: with a full ring buffer the
restored items are as many as the dead shard held, only older. The inserts
after the snapshot (``inserts_after_snapshot`` in ``stats()``) are reported too.
The loss is in a warning (the shard's own log), in ``stats()`` and, through the
learner's ``ReplayClient``, in the driver's log and the metric rows
(``replay/items_lost``, ``replay/shard_restarts``; ``gfn_dist.train_loop``). A
shard created anew clears what an earlier run left.

A full disk (ENOSPC / EDQUOT) while writing a snapshot or the journal is a
warning, not a failure: the shard keeps serving (its restart point stays the
previous snapshot) and tries again after another ``snapshot_every_inserts``
items; the temporary file is removed.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import Any

import torch

from gfn_dist.distributed.ray_compat import was_restarted_by_ray
from gfn_dist.errors import disk_full_errno

logger = logging.getLogger(__name__)


class ShardPersistence:
    """Insert journal and snapshots of one replay shard (see module doc).

    Args:
        state_dir: the shard's own directory (created).
        snapshot_every_inserts: snapshot every this many inserted items (0: only
            when ``save`` is called, i.e. on ``snapshot()`` / ``restore()``).

    Raises:
        ValueError: if ``snapshot_every_inserts < 0``.
    """

    SNAPSHOT = "snapshot.pt"
    JOURNAL = "journal.bin"
    _FORMAT = "<6q"  # num_inserts, size, num_restarts, items_lost, inserts_after_snapshot, format tag
    _TAG = 0x67666E32

    def __init__(self, state_dir: str | Path, snapshot_every_inserts: int = 0) -> None:
        if int(snapshot_every_inserts) < 0:
            raise ValueError(f"replay.snapshot_every_inserts: must be >= 0, got {snapshot_every_inserts}")
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.every = int(snapshot_every_inserts)
        self.num_restarts = 0
        self.items_lost = 0
        self.restored_size = -1  # size right after the last restart's restore (-1: never restarted)
        self.restored_inserts = -1  # num_inserts of the snapshot restored at the last restart
        self.last_items_lost = 0  # items lost at the last restart alone
        self.inserts_after_snapshot = 0  # inserts after the restored snapshot, summed over restarts
        self.num_snapshots = 0
        self.num_snapshot_failures = 0  # snapshots not written: the disk was full
        self._last_snapshot_inserts = 0  # inserts at the last snapshot attempt (paces the next one)
        self._disk_full_warned = False
        self._fd: int | None = None

    @property
    def snapshot_path(self) -> Path:
        return self.dir / self.SNAPSHOT

    @property
    def journal_path(self) -> Path:
        return self.dir / self.JOURNAL

    def start(self, shard, restarted: bool | None = None) -> None:
        """Called once by the shard's constructor: recovers after a Ray restart, else starts clean.

        Args:
            shard: the ``ReplayShard`` (its ``restore`` must not call back into this object).
            restarted: whether Ray restarted the process (detected when None).
        """
        restarted = was_restarted_by_ray() if restarted is None else restarted
        journal = self.read_journal(self.journal_path)
        if restarted and journal is not None:
            self._recover(shard, journal)
        else:  # a new shard: nothing from an earlier run in this directory applies
            self.snapshot_path.unlink(missing_ok=True)
        self._fd = os.open(self.journal_path, os.O_RDWR | os.O_CREAT, 0o644)
        self._write_journal(shard.buffer.num_inserts, len(shard.buffer))

    def _recover(self, shard, journal: dict[str, int]) -> None:
        if self.snapshot_path.is_file():
            # Plain tensors only: weights_only refuses anything that would run code when loaded.
            shard.restore(torch.load(self.snapshot_path, map_location="cpu", weights_only=True))
        restored = shard.buffer.num_inserts
        self.restored_size = len(shard.buffer)
        self.restored_inserts = restored
        self.last_items_lost = max(0, journal["size"] - self.restored_size)  # held at death - restored
        self.num_restarts = journal["num_restarts"] + 1
        self.items_lost = journal["items_lost"] + self.last_items_lost
        self.inserts_after_snapshot = journal["inserts_after_snapshot"] + max(0, journal["num_inserts"] - restored)
        self._last_snapshot_inserts = restored
        logger.warning(
            "replay shard %s restarted (restart %d): held %d items at its death, restored %d from the snapshot "
            "taken at %d inserts: %d items lost (%d in all); %d inserted after that snapshot",
            self.dir.name,
            self.num_restarts,
            journal["size"],
            self.restored_size,
            restored,
            self.last_items_lost,
            self.items_lost,
            journal["num_inserts"] - restored,
        )

    @classmethod
    def read_journal(cls, path: str | Path) -> dict[str, int] | None:
        """The journal's ``num_inserts``, ``size``, ``num_restarts``, ``items_lost``,
        ``inserts_after_snapshot``; None if absent or unreadable."""
        try:
            raw = Path(path).read_bytes()
        except FileNotFoundError:
            return None
        if len(raw) < struct.calcsize(cls._FORMAT):
            return None
        inserts, size, restarts, lost, after, tag = struct.unpack_from(cls._FORMAT, raw)
        if tag != cls._TAG:
            return None
        return {
            "num_inserts": inserts,
            "size": size,
            "num_restarts": restarts,
            "items_lost": lost,
            "inserts_after_snapshot": after,
        }

    def _write_journal(self, num_inserts: int, size: int) -> None:
        if self._fd is None:
            return
        record = struct.pack(
            self._FORMAT,
            num_inserts,
            size,
            self.num_restarts,
            self.items_lost,
            self.inserts_after_snapshot,
            self._TAG,
        )
        try:
            os.pwrite(self._fd, record, 0)
        except OSError as err:  # in place, so only a journal never written before can meet a full disk
            if disk_full_errno(err) is None:
                raise
            self._warn_disk_full(self.journal_path, err)

    def after_insert(self, shard) -> None:
        """Journals the insert count and size; snapshots when ``snapshot_every_inserts`` items arrived since the
        last snapshot (or the last attempt, when the disk was full)."""
        inserts = shard.buffer.num_inserts
        self._write_journal(inserts, len(shard.buffer))
        if self.every and inserts - self._last_snapshot_inserts >= self.every:
            shard.snapshot()  # ReplayShard.snapshot() hands its state to save()

    def save(self, state: dict[str, Any]) -> bool:
        """Writes ``state`` (a ``ReplayShard.snapshot()``) as the restart point, atomically.

        Returns:
            True if written; False if the disk was full (a warning; the previous snapshot stays the
            restart point and the temporary file is removed).

        Raises:
            OSError: if writing fails for another reason (the temporary file removed).
        """
        tmp = self.snapshot_path.with_suffix(".tmp")
        inserts = int(state["buffer"]["num_inserts"])
        self._last_snapshot_inserts = inserts  # paces the next attempt, written or not
        try:
            with open(tmp, "wb") as f:  # a file object: a full disk is an OSError with its errno
                torch.save(state, f)
            os.replace(tmp, self.snapshot_path)
        except (OSError, RuntimeError) as err:
            tmp.unlink(missing_ok=True)
            if disk_full_errno(err) is None:
                raise
            self.num_snapshot_failures += 1
            self._warn_disk_full(self.snapshot_path, err)
            return False
        self.num_snapshots += 1
        self._disk_full_warned = False
        # After a restore the journal must not remember the old count.
        self._write_journal(inserts, int(state["buffer"]["size"]))
        return True

    def _warn_disk_full(self, path: Path, err: BaseException) -> None:
        """One warning per spell of a full disk (a snapshot written ends the spell)."""
        if self._disk_full_warned:
            return
        self._disk_full_warned = True
        logger.warning(
            "replay shard %s: disk full writing %s (%s); the shard keeps serving, its restart point stays "
            "the previous snapshot (%d snapshots failed so far)",
            self.dir.name,
            path,
            str(err).splitlines()[0] if str(err) else type(err).__name__,
            self.num_snapshot_failures,
        )

    def stats(self) -> dict[str, int]:
        """``num_restarts``, ``items_lost`` (in all), ``last_items_lost`` (at the last restart),
        ``restored_size``, ``restored_inserts``, ``inserts_after_snapshot``, ``num_snapshots``,
        ``num_snapshot_failures``."""
        return {
            "num_restarts": self.num_restarts,
            "items_lost": self.items_lost,
            "last_items_lost": self.last_items_lost,
            "restored_size": self.restored_size,
            "restored_inserts": self.restored_inserts,
            "inserts_after_snapshot": self.inserts_after_snapshot,
            "num_snapshots": self.num_snapshots,
            "num_snapshot_failures": self.num_snapshot_failures,
        }
