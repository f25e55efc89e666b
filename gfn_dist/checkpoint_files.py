"""Checkpoint directories on disk: written so they never tear, verified when read.

A checkpoint is ``ROOT/step_N/`` (``gfn_dist.checkpoint`` describes its files
and when they are written). Writing (``write_checkpoint``):

1. every file goes into ``ROOT/.tmp_step_N/`` and is fsynced;
2. ``manifest.json`` (size and SHA-256 of every other file) is written last, fsynced;
3. the temporary directory is fsynced, renamed to ``step_N`` and ``ROOT`` is fsynced.

So after a crash, a power loss or a node lost mid-write, ``step_N`` either
does not exist or holds the files its manifest lists (on filesystems that
honour ``fsync``; network filesystems such as NFS and Lustre do on close /
fsync). A file damaged later (truncated, deleted, bit rot, a copy cut short)
no longer matches the manifest.

Reading: ``latest_intact_checkpoint`` / ``latest_checkpoint`` return the newest
checkpoint whose files match its manifest, logging a warning that names every
newer one skipped and why; ``load_latest_checkpoint`` also falls back when a
file matches its manifest but cannot be unpickled. A checkpoint without a
manifest counts as torn, unless no checkpoint under ``ROOT`` has one (a run
written by a gfn_dist without manifests: those are read as before).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from gfn_dist.files import fsync_dir, private_dir, raise_if_disk_full

logger = logging.getLogger(__name__)

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp_"
MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class CorruptCheckpointError(ValueError):
    """A checkpoint file is missing, truncated or unreadable; the message names the file."""


# ---------------------------------------------------------------------------- listing / verifying


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Checkpoint directories ``step_N`` under ``root`` holding ``learner.pt``, as ``(step, path)``,
    oldest first (not verified: see ``latest_intact_checkpoint``)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        suffix = p.name[len(STEP_PREFIX) :]
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and suffix.isdigit() and (p / "learner.pt").is_file():
            found.append((int(suffix), p))
    return sorted(found)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(path: str | Path, checksums: bool = True) -> None:
    """Checks ``path``'s files against its ``manifest.json``.

    Args:
        path: a ``step_N`` directory.
        checksums: also compare SHA-256 (reads every file); False compares sizes only.

    Raises:
        CorruptCheckpointError: naming the first file that is missing, has the
            wrong size or checksum, or an unreadable manifest.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{path / MANIFEST}: missing (checkpoint torn or not written by gfn_dist)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(f"{path / MANIFEST}: unreadable ({type(err).__name__}: {err})") from None
    for name, want in sorted(files.items()):
        f = path / name
        try:
            size = f.stat().st_size
        except OSError:
            raise CorruptCheckpointError(f"{f}: missing") from None
        if size != want["size"]:
            raise CorruptCheckpointError(f"{f}: {size} bytes, the manifest says {want['size']} (truncated?)")
        if checksums and _sha256(f) != want["sha256"]:
            raise CorruptCheckpointError(f"{f}: SHA-256 differs from the manifest (corrupted)")


def _has_manifests(candidates: list[tuple[int, Path]]) -> bool:
    return any((p / MANIFEST).is_file() for _, p in candidates)


def newest_intact(candidates: list[tuple[int, Path]], checksums: bool = True) -> tuple[int, Path] | None:
    """The newest ``(step, path)`` of ``candidates`` (oldest first) that passes ``verify_checkpoint``.

    Each newer one skipped is named in a warning. Without any manifest among
    the candidates (an older gfn_dist's run), the newest is returned unverified.
    """
    if not candidates:
        return None
    if not _has_manifests(candidates):
        return candidates[-1]
    for step, path in reversed(candidates):
        try:
            verify_checkpoint(path, checksums)
            return step, path
        except CorruptCheckpointError as err:
            logger.warning("checkpoint %s skipped, falling back to an older one: %s", path, err)
    return None


def latest_intact_checkpoint(root: str | Path) -> tuple[int, Path] | None:
    """``(step, path)`` of the newest checkpoint under ``root`` that matches its manifest, or None."""
    return newest_intact(list_checkpoints(root))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest intact ``step_N`` under ``root`` (``latest_intact_checkpoint``), or None."""
    found = latest_intact_checkpoint(root)
    return found[1] if found else None


# ---------------------------------------------------------------------------- loading


def load_torch_file(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on the CPU.

    Raises:
        CorruptCheckpointError: naming ``path`` if it is not a readable torch file.
        OSError: if it cannot be opened.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, KeyError, IndexError) as err:
        if isinstance(err, pickle.UnpicklingError):  # torch's message is a page about weights_only
            first = "not a torch file of tensors and plain containers"
        else:
            first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CorruptCheckpointError(f"{path}: unreadable torch file ({type(err).__name__}: {first})") from None


def load_checkpoint(path: str | Path, verify: bool = True) -> dict:
    """Every file of a ``step_N`` directory: ``learner``, ``rng``, ``replay``, ``actors`` (.pt,
    ``weights_only=True``; absent files are None) and ``config`` (YAML text).

    Args:
        path: the ``step_N`` directory.
        verify: check the files against the manifest first (when there is one).

    Raises:
        CorruptCheckpointError: naming the file that does not match the manifest or cannot be read.
    """
    path = Path(path)
    if verify and (path / MANIFEST).is_file():
        verify_checkpoint(path)
    out: dict[str, Any] = {
        k: load_torch_file(path / f"{k}.pt") if (path / f"{k}.pt").is_file() else None
        for k in ("learner", "rng", "replay", "actors")
    }
    try:
        out["config"] = (path / "config.yaml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{path / 'config.yaml'}: unreadable ({err})") from None
    return out


def load_latest_checkpoint(root: str | Path) -> tuple[int, Path, dict] | None:
    """``(step, path, load_checkpoint(path))`` of the newest checkpoint under ``root`` that verifies
    and loads; each newer one skipped is named in a warning. None if there is none."""
    candidates = list_checkpoints(root)
    while candidates:
        found = newest_intact(candidates)
        if found is None:
            return None
        step, path = found
        try:
            return step, path, load_checkpoint(path, verify=False)  # newest_intact just verified it
        except (CorruptCheckpointError, OSError) as err:
            logger.warning("checkpoint %s skipped, falling back to an older one: %s", path, err)
            candidates = [c for c in candidates if c[0] < step]
    return None


_load = load_torch_file  # the older private name


# ---------------------------------------------------------------------------- writing


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class _HashingWriter:
    """A binary file that hashes and counts what goes through it (``torch.save`` target)."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _write_durable(path: Path, fill) -> dict:
    """Writes ``path`` with ``fill(writer)``, fsyncs it; returns its manifest entry."""
    with open(path, "wb") as f:
        w = _HashingWriter(f)
        fill(w)
        f.flush()
        os.fsync(f.fileno())
    return {"size": w.size, "sha256": w.sha.hexdigest()}


def write_checkpoint(
    root: str | Path,
    step: int,
    files: dict[str, Any],
    config_yaml: str,
    meta: dict,
    keep_last: int | None = None,
    dir_mode: int = 0o700,
) -> Path:
    """Writes ``root/step_<step>/`` so that it never tears (module doc) and prunes.

    Args:
        root: the checkpoint directory (created with ``dir_mode`` if missing).
        step: learner step of the checkpoint.
        files: ``name -> object`` saved as ``name.pt`` (tensors and plain containers only).
        config_yaml: the resolved configuration.
        meta: JSON-serialisable summary (``meta.json``).
        keep_last: newest checkpoints to keep (None keeps all).
        dir_mode: permission bits of created directories (``run.dir_mode``).

    Returns:
        the checkpoint directory.

    Raises:
        DiskFullError: (an OSError) the disk is full (also when ``torch.save`` wraps the
            ``OSError`` in a ``RuntimeError``): ``disk full writing ROOT/step_N: <strerror>``.
            The partial checkpoint is removed and the previous ones are untouched.
        OSError: if writing fails otherwise, with the same guarantee.
    """
    root = private_dir(root, dir_mode)
    final, tmp = root / f"{STEP_PREFIX}{step}", root / f"{TMP_PREFIX}{STEP_PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp, dir_mode)
    try:
        entries = {}
        for name, obj in files.items():
            entries[f"{name}.pt"] = _write_durable(tmp / f"{name}.pt", lambda w, o=obj: torch.save(_to_cpu(o), w))
        entries["config.yaml"] = _write_durable(tmp / "config.yaml", lambda w: w.write(config_yaml.encode("utf-8")))
        meta_bytes = json.dumps(meta, indent=1).encode("utf-8")
        entries["meta.json"] = _write_durable(tmp / "meta.json", lambda w: w.write(meta_bytes))
        manifest = json.dumps({"format": 1, "step": int(step), "files": entries}, indent=1).encode("utf-8")
        _write_durable(tmp / MANIFEST, lambda w: w.write(manifest))  # last: its presence means complete
        fsync_dir(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. disk full: free what was written; never resumed from
        raise_if_disk_full(err, final)
        raise
    if final.exists():  # e.g. a run resumed at step N and stopped again at N
        old = root / f"{TMP_PREFIX}old_{STEP_PREFIX}{step}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
        fsync_dir(root)
    prune_checkpoints(root, keep_last)
    return final


def save_torch_file(path: str | Path, obj: Any, mode: int = 0o600) -> None:
    """``torch.save(obj)`` to ``path`` atomically and durably (e.g. ``RUN_DIR/policy.pt``).

    Written to a temporary file in the same directory, fsynced, renamed over
    ``path``, and the directory fsynced: ``path`` holds the old or the new
    content, never a torn file.

    Args:
        path: the target file (its directory must exist).
        obj: tensors and plain containers.
        mode: permission bits of the file.

    Raises:
        DiskFullError: ``disk full writing PATH: <strerror>``; the temporary file is
            removed and ``path`` unchanged.
        OSError: if writing fails otherwise, with the same guarantee.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _write_durable(tmp, lambda w: torch.save(_to_cpu(obj), w))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(err, path)
        raise
    fsync_dir(path.parent)


def prune_checkpoints(root: str | Path, keep_last: int | None) -> None:
    """Deletes all but the newest ``keep_last`` intact checkpoints (None: keeps all) and stale temporaries.

    Intact here means the sizes match the manifest (checksums are not read).
    A torn checkpoint older than the newest intact one can never be resumed
    from and is deleted; a newer torn one is left for a human to look at (it
    is skipped with a warning when reading).
    """
    found = list_checkpoints(root)
    legacy = not _has_manifests(found)
    intact, torn = [], []
    for step, p in found:
        try:
            if not legacy:
                verify_checkpoint(p, checksums=False)
            intact.append((step, p))
        except CorruptCheckpointError:
            torn.append((step, p))
    doomed = intact[: max(len(intact) - keep_last, 0)] if keep_last is not None else []
    if intact and keep_last is not None:
        doomed += [(s, p) for s, p in torn if s < intact[-1][0]]
    for _, p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(root).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
