"""A full disk during checkpoints (issue 18, item 4 / Must show "Disk full").

Real ``ENOSPC`` from the kernel throughout: ``/dev/full`` (every write fails) and small
tmpfs mounts (we run as root; a test skips only if ``mount`` is refused, naming why).

* ``torch.save`` reports a full disk with its errno only through a file object (writing
  to a path, its C++ writer loses it): why every writer here goes through one.
* A checkpoint that meets a full disk raises ``DiskFullError`` with one line
  (``disk full writing ROOT/step_N: No space left on device``), removes its temporary
  directory and leaves the previous checkpoint the newest intact one; ``policy.pt`` is
  replaced atomically (the old file stays whole).
* A replay shard whose snapshot meets a full disk warns and keeps serving.
* Under ``cluster.launcher=ray`` (``cluster``) a worker's ``DiskFullError`` reaches the driver
  as the same one line.
* The real CLI (``cluster``) on a tmpfs filled mid-run: one line, exit 1, no traceback,
  no torn checkpoint, and ``gfn-dist plot`` still works on the run directory.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from tensordict import TensorDict

from gfn_dist import checkpoint_files as ck
from gfn_dist.distributed.learner_group import RayTrainLearners
from gfn_dist.distributed.replay_shard import ReplayShard, ReplayShardConfig
from gfn_dist.distributed.shard_persistence import ShardPersistence
from gfn_dist.errors import disk_full_errno
from gfn_dist.files import DiskFullError, atomic_write_text
from gfn_dist.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
PRESET = str(ROOT / "configs" / "hypergrid_tb.yaml")
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # a training function below runs in Ray Train


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {proc.stderr.strip() or proc.returncode}")


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs."""
    d = tmp_path / "disk"
    _mount_tmpfs(d, "256k")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=True)


# ---------------------------------------------------------------------- how torch reports ENOSPC


def test_torch_save_reports_a_full_disk_with_its_errno_only_through_a_file_object():
    state = {"w": torch.zeros(100_000)}
    with pytest.raises(OSError) as through_file, open("/dev/full", "wb") as f:
        torch.save(state, f)
    assert disk_full_errno(through_file.value) == errno.ENOSPC
    with pytest.raises(RuntimeError) as to_path:
        torch.save(state, "/dev/full")
    assert disk_full_errno(to_path.value) is None  # "unexpected pos ...": no errno to go by
    wrapped = RuntimeError("PytorchStreamWriter failed writing file data/0")
    wrapped.__cause__ = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))  # a user's quota
    assert disk_full_errno(wrapped) == errno.EDQUOT
    assert disk_full_errno(PermissionError(errno.EACCES, "Permission denied")) is None


# ---------------------------------------------------------------------- checkpoints and policy.pt


def _files(root: Path, step: int, numel: int) -> dict:
    return {"learner": {"step": step, "w": torch.full((numel,), float(step))}, "rng": {"ranks": [torch.ones(3)]}}


def test_checkpoint_on_a_full_disk_stops_with_one_line_and_leaves_no_torn_checkpoint(small_disk):
    root = small_disk / "checkpoints"
    first = ck.write_checkpoint(root, 10, _files(root, 10, 1000), "a: 1\n", {"step": 10})
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    with pytest.raises(DiskFullError) as info:
        ck.write_checkpoint(root, 20, _files(root, 20, 200_000), "a: 1\n", {"step": 20})  # 800 KB > 256 KiB
    assert str(info.value) == f"disk full writing {root / 'step_20'}: {NO_SPACE}"
    assert info.value.errno == errno.ENOSPC and "\n" not in str(info.value)
    assert sorted(p.name for p in root.iterdir()) == ["step_10"]  # the temporary directory is gone
    assert ck.latest_intact_checkpoint(root) == (10, first)  # what resume picks
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    # Space freed (here: it was the failed write's own): the next checkpoint is written.
    assert ck.write_checkpoint(root, 30, _files(root, 30, 1000), "a: 1\n", {"step": 30}, keep_last=1).is_dir()
    assert ck.latest_intact_checkpoint(root)[0] == 30


def test_policy_file_is_replaced_atomically_on_a_full_disk(small_disk):
    path = small_disk / "policy.pt"
    ck.save_torch_file(path, {"policies": {"w": torch.ones(1000)}, "step": 1})
    before = path.read_bytes()
    with pytest.raises(DiskFullError) as info:
        ck.save_torch_file(path, {"policies": {"w": torch.ones(200_000)}, "step": 2})
    assert str(info.value) == f"disk full writing {path}: {NO_SPACE}"
    assert path.read_bytes() == before and os.listdir(small_disk) == ["policy.pt"]  # no temporary left
    assert torch.load(path, weights_only=True)["step"] == 1
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


def test_run_files_written_atomically_name_the_file_on_a_full_disk(small_disk):
    """config.yaml, samples/step_N.txt, a resumed metrics.jsonl: ``atomic_write_text`` says which file."""
    path = small_disk / "config.yaml"
    atomic_write_text(path, "a: 1\n")
    with pytest.raises(DiskFullError) as info:
        atomic_write_text(path, "x" * (1 << 20))
    assert str(info.value) == f"disk full writing {path}: {NO_SPACE}"
    assert path.read_text() == "a: 1\n" and os.listdir(small_disk) == ["config.yaml"]


# ---------------------------------------------------------------------- replay shard snapshots


def _batch(n: int, start: int) -> TensorDict:
    ids = torch.arange(start, start + n, dtype=torch.int64)
    return TensorDict(
        {
            "states": ids.view(n, 1, 1).expand(n, 4, 2).clone(),
            "actions": torch.zeros(n, 3, 1, dtype=torch.int64),
            "terminating_idx": torch.full((n,), 3, dtype=torch.int64),
            "log_rewards": torch.zeros(n),
            "policy_version": torch.zeros(n, dtype=torch.int64),
            "actor_id": ids,
        },
        batch_size=[n],
    )


def test_replay_shard_snapshot_on_a_full_disk_warns_and_keeps_serving(tmp_path, caplog):
    shard = ReplayShard(ReplayShardConfig(capacity=64, seed=0, state_dir=str(tmp_path), snapshot_every_inserts=8))
    tmp = tmp_path / "snapshot.tmp"  # where the shard writes its next snapshot: onto a full disk
    tmp.symlink_to("/dev/full")
    with caplog.at_level(logging.WARNING):
        assert shard.try_add(_batch(8, 0))["accepted"]  # 8 items: a snapshot is due, and fails
    stats = shard.stats()
    assert (stats["num_snapshots"], stats["num_snapshot_failures"]) == (0, 1)
    assert not tmp.exists() and not tmp.is_symlink() and not (tmp_path / ShardPersistence.SNAPSHOT).exists()
    assert f"disk full writing {tmp_path / ShardPersistence.SNAPSHOT}" in caplog.text
    assert "keeps serving" in caplog.text
    assert shard.try_sample(4) is not None  # still serving
    # A checkpoint's snapshot() on the full disk still hands its state back (the driver writes the
    # checkpoint, and meets the full disk there: one line, see above).
    tmp.symlink_to("/dev/full")
    state = shard.snapshot()
    assert state["buffer"]["storage"]["actor_id"].tolist() == list(range(8))
    assert shard.stats()["num_snapshot_failures"] == 2
    # Space again: the next due snapshot is written and becomes the restart point.
    assert shard.try_add(_batch(8, 8))["accepted"]
    assert shard.stats()["num_snapshots"] == 1
    saved = torch.load(tmp_path / ShardPersistence.SNAPSHOT, weights_only=True)
    assert saved["buffer"]["storage"]["actor_id"].tolist() == list(range(16))


# ---------------------------------------------------------------------- cluster.launcher=ray


def _rank0_meets_a_full_disk(ctx, sink):  # a Ray Train worker's training function
    if ctx.is_main:
        raise DiskFullError(errno.ENOSPC, f"disk full writing /run/checkpoints/step_20: {NO_SPACE}")
    return None


@pytest.fixture(scope="module")
def local_ray():
    # On a loaded 2-core machine the dashboard agent can take > 30 s to start (tests/test_ray_launcher.py).
    patient = "RAY_agent_register_timeout_ms"  # Ray's own spelling
    before = os.environ.get(patient)
    os.environ[patient] = before or "180000"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="disk_full")
    yield
    ray.shutdown()
    if before is None:
        del os.environ[patient]


@pytest.mark.cluster
def test_ray_train_worker_on_a_full_disk_reaches_the_driver_as_one_line(local_ray, tmp_path):
    """Under ``cluster.launcher=ray`` the checkpoint is written in a Ray Train worker: the driver
    raises the same ``DiskFullError`` (``gfn-dist train`` prints its line), not Ray Train's report."""
    group = RayTrainLearners(
        num_workers=1,
        cpus_per_worker=1,
        use_gpu=False,
        placement_strategy="PACK",
        max_restarts=0,
        name="disk_full",
        storage_path=str(tmp_path / "ray_train"),
        namespace="disk_full",
    )
    rows: list = []
    with pytest.raises(DiskFullError) as info:
        group.run(_rank0_meets_a_full_disk, on_row=rows.append, on_stop=lambda: None, stop_requested=lambda: False)
    assert str(info.value) == f"disk full writing /run/checkpoints/step_20: {NO_SPACE}"
    assert info.value.errno == errno.ENOSPC


# ---------------------------------------------------------------------- the real CLI


def _fill(disk: Path, leave_bytes: int) -> None:
    """Fills ``disk`` up to ``leave_bytes`` of free space."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
        except OSError as err:
            assert err.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave_bytes))


@pytest.mark.cluster
def test_cli_stops_with_one_line_on_a_full_disk_and_plot_still_works(tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "32m")
    try:
        run_dir = disk / "run"
        root = run_dir / "checkpoints"
        cmd = [
            sys.executable, "-m", "gfn_dist.cli", "train", PRESET, f"run.dir={run_dir}",
            "model.hidden_dim=64", "rollout.num_actors=2", "rollout.num_cpus_per_actor=1", "replay.num_shards=2",
            "replay.capacity_per_shard=1024", "learner.batch_size=32", "learner.max_steps=100000",
            "eval.interval_steps=0", "checkpoint.interval_steps=20", "logging.log_every=5",
            "logging.progress_bar=false",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        filled = threading.Event()

        def fill_after_the_first_checkpoint() -> None:
            deadline = time.monotonic() + 300
            while not (root / "step_20").is_dir() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if (root / "step_20").is_dir():
                _fill(disk, leave_bytes=64 << 10)  # room for metric rows, not for a checkpoint
                filled.set()

        filler = threading.Thread(target=fill_after_the_first_checkpoint, daemon=True)
        filler.start()
        try:
            _, stderr = proc.communicate(timeout=600)
        finally:
            proc.kill()
        filler.join(timeout=30)
        assert filled.is_set(), stderr[-3000:]

        lines = stderr.strip().splitlines()
        assert proc.returncode == 1, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        steps = sorted(s for s, _ in ck.list_checkpoints(root))
        ours = [line for line in lines if line.startswith("gfn-dist:")]
        assert len(ours) == 1, lines[-10:]  # one line (the log lines of the shutdown may follow it)
        failed = f"gfn-dist: disk full writing {root}/step_"
        assert ours[0].startswith(failed) and ours[0].endswith(f": {NO_SPACE}"), ours
        failed_step = int(ours[0][len(failed) : -len(f": {NO_SPACE}")])
        # No torn checkpoint: the temporary directory removed; resume would pick the newest intact one.
        assert not any(p.name.startswith(ck.TMP_PREFIX) for p in root.iterdir())
        assert steps and max(steps) < failed_step and failed_step % 20 == 0
        assert ck.latest_intact_checkpoint(root)[0] == max(steps)
        rows = read_jsonl(run_dir / "metrics.jsonl")
        assert rows and rows[-1]["step"] <= failed_step
        assert (run_dir / "metrics.jsonl").read_bytes().endswith(b"\n")  # no torn row

        # gfn-dist plot reads the full disk's run directory (its PNGs go elsewhere: no space there).
        out = tmp_path / "plots"
        plot = subprocess.run([sys.executable, "-m", "gfn_dist.cli", "plot", str(run_dir), "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert plot.returncode == 0, plot.stderr
        pngs = plot.stdout.split()
        assert pngs and all(p.endswith(".png") and os.path.getsize(p) > 0 for p in pngs)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
