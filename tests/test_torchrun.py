"""torchrun smoke test: the real entry point with 2 learner ranks (gloo) and a local Ray brought up by rank 0."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gfn_dist.metrics import read_jsonl

pytestmark = pytest.mark.cluster  # torchrun of the real entry point

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.cluster
def test_torchrun_two_ranks(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        *_torchrun(), "--standalone", "--nproc_per_node=2", "--local-addr=127.0.0.1",
        "-m", "gfn_dist.train", "configs/hypergrid_tb.yaml",
        f"learner.max_steps={STEPS}", "eval.interval_steps=6", "logging.log_every=3",
        "logging.progress_bar=false", "model.hidden_dim=32", f"run.dir={run_dir}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")  # written by rank 0 only: one row per log step
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    assert all(r["world_size"] == 2 for r in rows)
    assert rows[-1]["trajectories"] == STEPS * 64
    assert "l1_exact" in rows[1] and "l1_exact" in rows[-1]
    assert (run_dir / "config.yaml").is_file()
    # One "done:" line for the run, from global rank 0 (not one per rank).
    assert (proc.stdout + proc.stderr).count(" INFO: done: ") == 1, proc.stderr[-3000:]


USER_TASK_STEPS = 150


@pytest.mark.cluster
def test_torchrun_two_ranks_user_task_by_import_path(tmp_path):
    """A user's task by import path (tests/user_task: Multiset + the user's policy factory) under
    torchrun with 2 ranks: both ranks and the Ray actors import it from the job's PYTHONPATH;
    exit 0 and the exact L1 falls below half its first evaluated value."""
    import os

    run_dir = tmp_path / "run"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    cmd = [
        *_torchrun(), "--standalone", "--nproc_per_node=2", "--local-addr=127.0.0.1",
        "-m", "gfn_dist.train", "tests/user_task/multiset_tb.yaml",
        f"learner.max_steps={USER_TASK_STEPS}", "eval.interval_steps=25", "logging.log_every=25",
        "logging.progress_bar=false", "rollout.num_actors=1", f"run.dir={run_dir}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert all(r["world_size"] == 2 for r in rows)
    evals = [r for r in rows if "l1_exact" in r]
    assert evals and evals[-1]["step"] == USER_TASK_STEPS
    assert evals[-1]["l1_exact"] < 0.5 * evals[0]["l1_exact"], [(r["step"], r["l1_exact"]) for r in evals]
