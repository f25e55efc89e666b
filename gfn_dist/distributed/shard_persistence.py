"""Recoverable replay shards: an insert journal and snapshots (``ShardPersistence``).

Replay shards (``ShardPersistence``, inside each shard with a state directory
``RUN_DIR/replay/shard_<i>``): ``journal.bin`` holds 32 bytes rewritten in place
(``os.pwrite``) after every insert -- ``num_inserts``, restarts, items lost; the
write is in the kernel's page cache, so it survives the process being killed.
``snapshot.pt`` holds the latest ``ReplayShard.snapshot()`` (plain tensors, read
with ``torch.load(weights_only=True)``), written atomically every
``replay.snapshot_every_inserts`` items and whenever ``snapshot()`` (checkpoints)
or ``restore()`` runs. A shard Ray restarts (``replay.max_restarts``) restores the
snapshot and reports ``items_lost = journal.num_inserts - snapshot.num_inserts``
(a warning, its ``stats()``, the metric ``replay/items_lost``); a shard created
anew clears what an earlier run left.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import Any

import torch

from gfn_dist.distributed.ray_compat import was_restarted_by_ray

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
    _FORMAT = "<4q"  # num_inserts, num_restarts, items_lost, format tag
    _TAG = 0x67666E31

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
        self.num_snapshots = 0
        self._last_snapshot_inserts = 0
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
        self._write_journal(shard.buffer.num_inserts)

    def _recover(self, shard, journal: dict[str, int]) -> None:
        if self.snapshot_path.is_file():
            # Plain tensors only: weights_only refuses anything that would run code when loaded.
            shard.restore(torch.load(self.snapshot_path, map_location="cpu", weights_only=True))
        restored = shard.buffer.num_inserts
        lost = max(0, journal["num_inserts"] - restored)
        self.num_restarts = journal["num_restarts"] + 1
        self.items_lost = journal["items_lost"] + lost
        self.restored_size = len(shard.buffer)
        self.restored_inserts = restored
        self._last_snapshot_inserts = restored
        logger.warning(
            "replay shard %s restarted (restart %d): restored %d items from the snapshot taken at %d inserts; "
            "%d items inserted after it were lost (%d lost in all)",
            self.dir.name,
            self.num_restarts,
            self.restored_size,
            restored,
            lost,
            self.items_lost,
        )

    @classmethod
    def read_journal(cls, path: str | Path) -> dict[str, int] | None:
        """The journal's ``num_inserts``, ``num_restarts``, ``items_lost``; None if absent or unreadable."""
        try:
            raw = Path(path).read_bytes()
        except FileNotFoundError:
            return None
        if len(raw) < struct.calcsize(cls._FORMAT):
            return None
        inserts, restarts, lost, tag = struct.unpack_from(cls._FORMAT, raw)
        if tag != cls._TAG:
            return None
        return {"num_inserts": inserts, "num_restarts": restarts, "items_lost": lost}

    def _write_journal(self, num_inserts: int) -> None:
        if self._fd is not None:
            os.pwrite(
                self._fd, struct.pack(self._FORMAT, num_inserts, self.num_restarts, self.items_lost, self._TAG), 0
            )

    def after_insert(self, shard) -> None:
        """Journals the insert count; snapshots when ``snapshot_every_inserts`` items arrived since the last one."""
        inserts = shard.buffer.num_inserts
        self._write_journal(inserts)
        if self.every and inserts - self._last_snapshot_inserts >= self.every:
            shard.snapshot()  # ReplayShard.snapshot() hands its state to save()

    def save(self, state: dict[str, Any]) -> None:
        """Writes ``state`` (a ``ReplayShard.snapshot()``) as the restart point, atomically."""
        tmp = self.snapshot_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.snapshot_path)
        inserts = int(state["buffer"]["num_inserts"])
        self._last_snapshot_inserts = inserts
        self.num_snapshots += 1
        self._write_journal(inserts)  # after a restore the journal must not remember the old count

    def stats(self) -> dict[str, int]:
        """``num_restarts``, ``items_lost``, ``restored_size``, ``restored_inserts``, ``num_snapshots``."""
        return {
            "num_restarts": self.num_restarts,
            "items_lost": self.items_lost,
            "restored_size": self.restored_size,
            "restored_inserts": self.restored_inserts,
            "num_snapshots": self.num_snapshots,
        }
