"""Durable and private files (gfn_dist.files) and the fsync order of checkpoint writes. No Ray."""

import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch

from gfn_dist import checkpoint as ck
from gfn_dist.files import atomic_write_text, private_dir, ray_temp_dir


def _mode(p):
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_private_dir_creates_with_the_mode_whatever_the_umask(tmp_path, umask_022):
    d = private_dir(tmp_path / "a" / "run")
    assert d.is_dir() and _mode(d) == 0o700
    assert _mode(private_dir(tmp_path / "shared", 0o750)) == 0o750
    (tmp_path / "mine").mkdir(mode=0o755)
    assert _mode(private_dir(tmp_path / "mine")) == 0o755  # an existing directory keeps what its owner chose
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        private_dir(tmp_path / "file")


def test_ray_temp_dir_is_private_and_reused(tmp_path, umask_022, monkeypatch):
    d = ray_temp_dir(tmp_path)
    private = tmp_path / f"ray-{os.getuid()}"
    assert d == str(private / "ray") and _mode(private) == 0o700
    os.makedirs(d)
    os.chmod(d, 0o777)  # what Ray does to its temp directory: harmless below the private parent
    os.chmod(private, 0o777)  # loosened by someone: set back
    assert ray_temp_dir(tmp_path) == d and _mode(private) == 0o700
    (tmp_path / "sys_tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "sys_tmp"))  # what $TMPDIR would set
    assert ray_temp_dir() == str(tmp_path / "sys_tmp" / f"ray-{os.getuid()}" / "ray")


def test_ray_temp_dir_ignores_a_planted_link(tmp_path):
    """Another user may create ``/tmp/ray-<uid>`` first (here: a symbolic link to a directory they own)."""
    (tmp_path / "theirs").mkdir(mode=0o777)
    (tmp_path / f"ray-{os.getuid()}").symlink_to(tmp_path / "theirs")
    d = Path(ray_temp_dir(tmp_path))
    parent = d.parent
    assert parent.parent == tmp_path and not parent.is_symlink() and _mode(parent) == 0o700
    assert parent.name.startswith(f"ray-{os.getuid()}-") and d.name == "ray"


def test_atomic_write_replaces_whole(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("old")
    atomic_write_text(p, "new", mode=0o640)
    assert p.read_text() == "new" and _mode(p) == 0o640 and os.listdir(tmp_path) == ["x.yaml"]


def test_checkpoint_files_and_directories_are_fsynced_around_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    root = tmp_path / "ckpt"
    ck.write_checkpoint(root, 7, {"learner": {"w": torch.ones(3)}, "rng": {"x": torch.zeros(1)}}, "a: 1\n", {})
    tmp = str(root / ".tmp_step_7")
    i_rename = events.index(("rename", tmp, str(root / "step_7")))
    before = [e[1] for e in events[:i_rename] if e[0] == "fsync"]
    for name in ("learner.pt", "rng.pt", "config.yaml", "meta.json", "manifest.json"):
        assert f"{tmp}/{name}" in before, name
    assert before[-2:] == [f"{tmp}/manifest.json", tmp]  # the manifest last, then its directory
    assert ("fsync", str(root)) in events[i_rename:]  # the rename itself made durable
