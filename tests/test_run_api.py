"""``gfn_dist.run(config, overrides)``: the job of ``gfn-dist train`` from Python.

* ``import gfn_dist`` imports neither torch nor Ray (the entry point imports them on call).
* Bad input raises ``ConfigError`` naming the key (or the file), before any actor starts.
* A user's task by import path (tests/user_task/multiset_tb.yaml) trains with the
  embedded local Ray; the returned row is the last row of RUN_DIR/metrics.jsonl, and
  the exact L1 falls below half its first evaluated value.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import gfn_dist
from gfn_dist.errors import ConfigError
from gfn_dist.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
STEPS = 150


def test_import_is_light():
    code = ("import sys, gfn_dist; "
            "print(callable(gfn_dist.run), sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True []"


@pytest.mark.parametrize(
    ("config", "overrides", "match"),
    [
        ("no_such_preset", (), r"no_such_preset.*neither a file nor a preset"),
        ("configs/missing.yaml", (), r"config file not found"),
        ("hypergrid_tb", ("learner.no_such_key=1",), r"no_such_key"),
        ("hypergrid_tb", ("learner.max_steps",), r"key\.sub=value"),
        (str(ROOT / "tests/user_task/multiset_tb.yaml"), ("env.name=user_task.nonexistent_mod:Env",), r"env\.name"),
    ],
)
def test_bad_input_raises_config_error(config, overrides, match, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    import ray

    with pytest.raises(ConfigError, match=match):
        gfn_dist.run(config, overrides)
    assert not ray.is_initialized()  # refused before Ray (and any actor) started


@pytest.mark.slow
@pytest.mark.cluster  # gfn_dist.run starts an embedded Ray
def test_run_trains_user_task_and_returns_last_row(tmp_path, monkeypatch):
    # Ray workers inherit the driver's environment: the user's package comes from PYTHONPATH,
    # as under `gfn-dist train` (tests/test_user_task_train.py).
    tests_dir = str(ROOT / "tests")
    monkeypatch.syspath_prepend(tests_dir)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), tests_dir, os.environ.get("PYTHONPATH", "")]))
    run_dir = tmp_path / "run"
    row = gfn_dist.run(
        ROOT / "tests/user_task/multiset_tb.yaml",
        [f"run.dir={run_dir}", f"learner.max_steps={STEPS}", "eval.interval_steps=25", "logging.log_every=25",
         "logging.progress_bar=false"],
    )
    import ray

    assert not ray.is_initialized()  # closed in finally: the embedded Ray is shut down
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert row["step"] == STEPS and row == rows[-1]
    evals = [r for r in rows if "l1_exact" in r]
    assert evals[-1]["step"] == STEPS
    assert evals[-1]["l1_exact"] < 0.5 * evals[0]["l1_exact"], [(r["step"], r["l1_exact"]) for r in evals]
    assert "eval/reward_mean" in row
