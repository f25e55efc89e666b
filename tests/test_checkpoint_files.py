"""Checkpoints that never tear (gfn_dist.checkpoint_files): manifest, verification, fallback. No Ray."""

import hashlib
import json
import logging
import os
import stat

import pytest
import torch

from gfn_dist import checkpoint as ck
from gfn_dist.checkpoint_files import CorruptCheckpointError
from gfn_dist.files import DiskFullError


def _write(root, step, keep_last=None, **kw):
    files = {"learner": {"step": step, "w": torch.full((64,), float(step))}, "rng": {"ranks": [torch.ones(3)]}}
    return ck.write_checkpoint(root, step, files, f"step: {step}\n", {"step": step}, keep_last=keep_last, **kw)


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    path = _write(tmp_path / "ckpt", 5)
    manifest = json.loads((path / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["config.yaml", "learner.pt", "meta.json", "rng.pt"]
    for name, entry in manifest["files"].items():
        assert entry["size"] == (path / name).stat().st_size
    ck.verify_checkpoint(path)  # intact
    assert ck.load_checkpoint(path)["learner"]["step"] == 5
    assert stat.S_IMODE(os.stat(tmp_path / "ckpt").st_mode) == 0o700  # created private
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip", "delete_manifest"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    root = tmp_path / "ckpt"
    for step in (2, 4, 6):
        _write(root, step)
    newest = root / "step_6"
    f = newest / "learner.pt"
    if damage == "truncate":
        os.truncate(f, f.stat().st_size // 2)
    elif damage == "delete":
        (newest / "rng.pt").unlink()
    elif damage == "flip":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    else:
        (newest / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert ck.latest_intact_checkpoint(root) == (4, root / "step_4")
        assert ck.latest_checkpoint(root) == root / "step_4"
        step, path, data = ck.load_latest_checkpoint(root)
    assert (step, path, data["learner"]["step"]) == (4, root / "step_4", 4)
    assert any("step_6" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    with pytest.raises(CorruptCheckpointError, match="step_6"):
        ck.load_checkpoint(newest) if damage != "delete_manifest" else ck.verify_checkpoint(newest)


def test_unpicklable_file_that_matches_its_manifest_falls_back(tmp_path):
    """A file written broken (bytes that are no torch file) passes the manifest but not the load."""
    root = tmp_path / "ckpt"
    _write(root, 1)
    ck.write_checkpoint(root, 2, {"learner": {"step": 2}}, "", {})
    (root / "step_2" / "learner.pt").write_bytes(b"garbage!")
    entry = {"size": 8, "sha256": hashlib.sha256(b"garbage!").hexdigest()}  # as if written so
    m = json.loads((root / "step_2" / "manifest.json").read_text())
    m["files"]["learner.pt"] = entry
    (root / "step_2" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorruptCheckpointError, match=r"step_2/learner.pt: unreadable torch file"):
        ck.load_checkpoint(root / "step_2")
    step, _, data = ck.load_latest_checkpoint(root)
    assert step == 1 and data["learner"]["step"] == 1


def test_no_intact_checkpoint_gives_none(tmp_path):
    root = tmp_path / "ckpt"
    _write(root, 3)
    os.truncate(root / "step_3" / "rng.pt", 1)
    assert ck.latest_intact_checkpoint(root) is None
    assert ck.load_latest_checkpoint(root) is None


def test_checkpoints_without_any_manifest_are_read_as_before(tmp_path):
    """A run written before manifests existed still resumes from its newest checkpoint."""
    root = tmp_path / "ckpt"
    for step in (1, 2):
        _write(root, step)
        (root / f"step_{step}" / "manifest.json").unlink()
    assert ck.latest_intact_checkpoint(root) == (2, root / "step_2")
    ck.prune_checkpoints(root, keep_last=None)
    assert [s for s, _ in ck.list_checkpoints(root)] == [1, 2]


def test_prune_keeps_newest_intact_and_drops_older_torn(tmp_path):
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        _write(root, step)
    os.truncate(root / "step_1" / "learner.pt", 3)  # older torn: never resumable
    _write(root, 4, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(root)] == [3, 4]
    # A torn checkpoint newer than every intact one (a fallback resume) is not pruned, and a
    # fresh checkpoint of a lower step is kept whatever keep_last says.
    os.truncate(root / "step_4" / "learner.pt", 3)
    _write(root, 3, keep_last=1)
    assert [s for s, _ in ck.list_checkpoints(root)] == [3, 4]
    assert ck.latest_intact_checkpoint(root)[0] == 3


def test_failed_write_leaves_previous_checkpoints_untouched(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    _write(root, 1)
    before = {p.name: p.read_bytes() for p in (root / "step_1").iterdir()}

    def disk_full(obj, f, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(DiskFullError, match=r"^disk full writing .*step_2: No space left on device$"):
        _write(root, 2)
    assert [p.name for p in root.iterdir()] == ["step_1"]  # no step_2, no temporary left
    assert {p.name: p.read_bytes() for p in (root / "step_1").iterdir()} == before
