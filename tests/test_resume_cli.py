"""Resume through the real command line (``python -m gfn_dist.cli``, subprocesses, embedded Ray).

A short run started with overrides that are not in the preset, then:

* ``train resume=true run.dir=DIR learner.max_steps=6`` (no preset) continues with the run's own
  config: the earlier overrides kept (``config.yaml``, one metric row per step as ``log_every=1``
  asked), one ``resume: learner.max_steps: 4 -> 6`` line, one ``done:`` line;
* resuming it again, at its budget: one line "finished (step 6 of 6)", exit 0, no Ray, no file changed;
* a key that cannot change (``env.hypergrid.ndim``): one line naming it, exit 2, files byte-identical;
* ``eval`` of a checkpoint directory writes ``RUN_DIR/eval/step_6``, nothing inside the checkpoint.
"""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gfn_dist.metrics import read_jsonl

pytestmark = pytest.mark.cluster  # the real CLI, with Ray

ROOT = Path(__file__).resolve().parents[1]
#: The first start's overrides (none of them in configs/hypergrid_tb.yaml).
FIRST = [
    "model.hidden_dim=32",
    "rollout.num_actors=1",
    "learner.batch_size=16",
    "rollout.trajectories_per_push=16",
    "replay.capacity_per_shard=256",
    "replay.min_size_to_sample=16",
    "eval.interval_steps=0",
    "logging.log_every=1",
    "logging.progress_bar=false",
    "logging.wandb.mode=disabled",
    "checkpoint.interval_steps=2",
]
CHANGE_LINE = re.compile(r"resume: ([\w.]+): (.*) -> (.*)$")


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gfn_dist.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _snapshot(d: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``d``: SHA-256 and mtime (a lock taken and released leaves the bytes, not the mtime)."""
    return {
        str(p.relative_to(d)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    run = tmp_path_factory.mktemp("resume") / "run"
    first = _cli("train", "configs/hypergrid_tb.yaml", *FIRST, "learner.max_steps=4", f"run.dir={run}")
    assert first.returncode == 0, first.stderr[-4000:]
    second = _cli("train", "resume=true", f"run.dir={run}", "learner.max_steps=6")
    assert second.returncode == 0, second.stderr[-4000:]
    return run, second


def test_resume_without_a_preset_keeps_the_runs_config(resumed):
    run, proc = resumed
    changes = [m.groups() for line in proc.stderr.splitlines() if (m := CHANGE_LINE.search(line))]
    assert changes == [("learner.max_steps", "4", "6")]
    assert len(re.findall(r" INFO: done: ", proc.stderr)) == 1
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["hidden_dim"] == 32 and cfg["learner"]["batch_size"] == 16  # the first start's overrides
    assert cfg["logging"]["log_every"] == 1 and cfg["learner"]["max_steps"] == 6 and cfg["resume"] is True
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]  # log_every=1 kept


def test_resuming_a_finished_run_says_so_without_ray(resumed):
    run, _ = resumed
    before = _snapshot(run)
    proc = _cli("train", "configs/hypergrid_tb.yaml", "resume=true", f"run.dir={run}", timeout=60)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.splitlines() == [
        f"gfn-dist: run {run} is finished (step 6 of 6); its results are in {run} "
        "(metrics.jsonl, policy.pt, checkpoints/step_6): gfn-dist plot / gfn-dist eval read them; "
        "to train further, resume with learner.max_steps > 6"
    ]
    assert "done:" not in proc.stderr and "Ray" not in proc.stderr, proc.stderr[-2000:]
    assert _snapshot(run) == before


def test_a_key_that_cannot_change_is_refused_and_no_file_changes(resumed):
    run, _ = resumed
    before = _snapshot(run)
    assert ".lock" in before  # left by the runs; taking the lock would rewrite it (mtime)
    proc = _cli("train", "resume=true", f"run.dir={run}", "env.hypergrid.ndim=3", "learner.max_steps=10", timeout=60)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert err[0].startswith("gfn-dist: config error: resume: env.hypergrid.ndim: checkpoint 2, config 3: cannot")
    assert "Traceback" not in proc.stderr
    assert _snapshot(run) == before


def test_eval_of_a_checkpoint_writes_to_the_run_eval_dir(resumed):
    run, _ = resumed
    ckpt = run / "checkpoints" / "step_6"
    proc = _cli("eval", str(ckpt), "--n-samples", "16", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "eval" / "step_6" / "metrics.json").is_file()
    assert f"written: {run / 'eval' / 'step_6' / 'metrics.json'}" in proc.stdout
    assert not (ckpt / "eval").exists()
