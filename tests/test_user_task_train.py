"""End to end: ``gfn-dist train`` on a user's task named by import path (embedded local Ray).

The task lives outside gfn_dist (tests/user_task: a Multiset environment and a
residual policy factory); the workers import it from PYTHONPATH, as any job's
environment would provide it.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gfn_dist.metrics import read_jsonl

pytestmark = pytest.mark.cluster  # gfn-dist train in a subprocess with an embedded Ray

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gfn_dist_train_by_import_path_halves_exact_l1(tmp_path):
    run_dir = tmp_path / "run"
    exe = shutil.which("gfn-dist")
    cmd = [exe] if exe else [sys.executable, "-m", "gfn_dist.cli"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [*cmd, "train", "tests/user_task/multiset_tb.yaml", f"run.dir={run_dir}", "learner.max_steps=150",
         "eval.interval_steps=25", "logging.log_every=25", "logging.progress_bar=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "l1_exact" in r]
    assert evals and evals[-1]["step"] == 150
    assert evals[-1]["l1_exact"] < 0.5 * evals[0]["l1_exact"], [(r["step"], r["l1_exact"]) for r in evals]
