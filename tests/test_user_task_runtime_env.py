"""User code reaches the Ray workers only through ``cluster.working_dir`` (Ray's ``runtime_env``).

``gfn-dist train`` runs as a subprocess from a temporary working directory. The
user's package is a copy of tests/user_task under a name nothing else provides
(``user_task_copy``), inside ``TMP/pkgroot``; ``PYTHONPATH`` holds only the
gfn_dist checkout, so neither the driver nor a Ray worker can import the package
except through ``cluster.working_dir=TMP/pkgroot`` (the driver puts the local
working_dir on its ``sys.path``, Ray uploads it and starts every worker in it).
The run must exit 0 and log evaluated rows; without ``cluster.working_dir`` the
same command must exit 2 naming ``env.name`` (so the package really is not
importable otherwise).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gfn_dist.metrics import read_jsonl

pytestmark = pytest.mark.cluster  # Ray workers with a runtime_env

ROOT = Path(__file__).resolve().parents[1]
PKG = "user_task_copy"


def _launch(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)  # gfn_dist only: not tests/, not pkgroot
    env.setdefault("RAY_agent_register_timeout_ms", "180000")  # a loaded 2-core machine
    cmd = [sys.executable, "-m", "gfn_dist.cli", "train", str(tmp_path / "task.yaml"),
           f"env.name={PKG}.multiset:Multiset", f"model.policy={PKG}.nets:make_policy",
           f"model.pb={PKG}.nets:make_policy", "learner.max_steps=20", "eval.interval_steps=10",
           "eval.num_samples=64", "logging.log_every=10", "logging.progress_bar=false",
           "rollout.num_actors=1", *extra]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_user_package_importable_only_through_working_dir(tmp_path):
    pkgroot = tmp_path / "pkgroot"
    shutil.copytree(ROOT / "tests" / "user_task", pkgroot / PKG,
                    ignore=shutil.ignore_patterns("__pycache__", "*.yaml"))
    shutil.copy(ROOT / "tests" / "user_task" / "multiset_tb.yaml", tmp_path / "task.yaml")
    probe = subprocess.run([sys.executable, "-c", f"import {PKG}"], cwd=tmp_path, capture_output=True,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(ROOT)})
    assert probe.returncode != 0  # not importable from the launch directory's environment

    refused = _launch(tmp_path, f"run.dir={tmp_path / 'refused'}")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "env.name" in refused.stderr and "Traceback" not in refused.stderr

    run_dir = tmp_path / "run"
    proc = _launch(tmp_path, f"cluster.working_dir={pkgroot}", f"run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 20]
    assert all("l1_exact" in r and "eval/reward_mean" in r for r in rows)
