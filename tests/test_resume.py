"""A resumed run's configuration (gfn_dist.resume), in-process and without Ray.

Oracle: a run directory written the way the trainer writes it (``RUN_DIR/config.yaml`` and a
``checkpoints/step_N/`` through ``write_checkpoint``, its ``config.yaml`` the first start's
resolved config). Resuming must give exactly that config with the new command line's
overrides on top, report exactly the keys that changed, refuse a key that cannot change
without touching a file, and report a finished run in one line (exit 0). ``gfn-dist eval`` of
a checkpoint directory writes beside ``checkpoints/``. The real CLI with Ray:
tests/test_resume_cli.py.
"""

import hashlib
import logging
from pathlib import Path

import pytest
import torch

from gfn_dist.builders import build_env, build_gflownet, build_policies
from gfn_dist.checkpoint_files import write_checkpoint
from gfn_dist.config import ConfigError, load_config, to_yaml
from gfn_dist.evaluate import evaluate, run_dir_of
from gfn_dist.resume import config_changes, log_changes, resolve_train_config, split_preset
from gfn_dist.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
PRESET = str(ROOT / "configs" / "hypergrid_tb.yaml")
#: The first start's overrides: none of them is in the preset, so a resume that re-read the preset
#: (or the defaults) would lose them.
FIRST = ["model.hidden_dim=32", "learner.lr=0.002", "logging.log_every=1", "learner.max_steps=8"]


def _write_run(run_dir: Path, step: int, *extra: str, weights: bool = False) -> Path:
    """A run stopped at ``step``: RUN_DIR/config.yaml and checkpoints/step_<step>/ (as the trainer writes them)."""
    cfg = load_config(PRESET, [*FIRST, f"run.dir={run_dir}", *extra])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in range(1, step + 1)))
    learner: dict = {"step": step}
    if weights:
        env = build_env(cfg)
        learner["gflownet"] = build_gflownet(cfg, env, build_policies(cfg, env)).state_dict()
    return write_checkpoint(run_dir / "checkpoints", step, {"learner": learner}, to_yaml(cfg), {"step": step})


def _snapshot(d: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``d``: SHA-256 and mtime (a lock taken and released leaves the bytes, not the mtime)."""
    return {
        str(p.relative_to(d)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def test_split_preset():
    assert split_preset("resume=true", ["run.dir=/r"]) == (None, ["resume=true", "run.dir=/r"])
    assert split_preset(PRESET, ["resume=true"]) == (PRESET, ["resume=true"])
    assert split_preset(None, ["resume=true"]) == (None, ["resume=true"])


def test_resume_keeps_the_runs_config_with_the_overrides_on_top(tmp_path):
    run = tmp_path / "run"
    ckpt = _write_run(run, 4)
    for preset in (None, PRESET):  # the preset is optional, and when given its values are not applied again
        r = resolve_train_config(preset, ["resume=true", f"run.dir={run}", "learner.max_steps=20"])
        assert (r.step, r.checkpoint, r.run_dir) == (4, ckpt, run.absolute())
        assert r.cfg.model.hidden_dim == 32 and r.cfg.learner.lr == 0.002 and r.cfg.logging.log_every == 1
        assert r.cfg.learner.max_steps == 20 and r.cfg.resume is True and r.cfg.run.dir == str(run.absolute())
        assert r.changes == [("learner.max_steps", 8, 20)]
        assert not r.finished
    # The whole config, key by key: the first start's with max_steps and resume changed.
    expected = load_config(PRESET, [*FIRST, f"run.dir={run.absolute()}", "learner.max_steps=20", "resume=true"])
    assert to_yaml(r.cfg) == to_yaml(expected)


def test_config_changes_lists_each_changed_leaf():
    old = load_config(None, ["learner.lr=0.1", "eval.interval_steps=5"])
    new = load_config(None, ["learner.lr=0.2", "eval.interval_steps=5", "logging.tensorboard=true", "resume=true"])
    assert config_changes(old, new) == [("learner.lr", 0.1, 0.2), ("logging.tensorboard", False, True)]
    assert config_changes(old, old) == []


def test_resume_logs_one_line_per_changed_key(tmp_path, caplog):
    run = tmp_path / "run"
    ckpt = _write_run(run, 4)
    resolved = resolve_train_config(None, ["resume=true", f"run.dir={run}", "learner.lr=0.004", "learner.max_steps=8"])
    with caplog.at_level(logging.INFO, logger="gfn_dist"):
        log_changes(resolved)
    assert caplog.messages == [
        f"resume: the configuration of {ckpt}, with the command line's overrides on top",
        "resume: learner.lr: 0.002 -> 0.004",
    ]


def test_a_key_that_cannot_change_is_refused_before_any_file_is_touched(tmp_path, capsys):
    run = tmp_path / "run"
    _write_run(run, 4)
    (run / ".lock").write_text("12345\n")  # the lock file a finished run leaves behind
    before = _snapshot(run)
    for key, value in [("env.hypergrid.ndim", 3), ("model.hidden_dim", 64), ("replay.capacity_per_shard", 2048)]:
        code = train_main(["resume=true", f"run.dir={run}", f"{key}={value}", "learner.max_steps=20"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"gfn-dist: config error: resume: {key}: checkpoint ") and "cannot change" in err[0]
        assert _snapshot(run) == before
    with pytest.raises(ConfigError, match=r"model\.hidden_dim: checkpoint 32, config 256"):
        resolve_train_config(PRESET, ["resume=true", f"run.dir={run}", "model.hidden_dim=256"])


def test_a_finished_run_says_so_and_exits_0(tmp_path, capsys):
    run = tmp_path / "run"
    _write_run(run, 8)
    before = _snapshot(run)
    assert train_main(["resume=true", f"run.dir={run}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        f"gfn-dist: run {run.absolute()} is finished (step 8 of 8); its results are in {run.absolute()} "
        "(metrics.jsonl, checkpoints/step_8): gfn-dist plot / gfn-dist eval read them; "
        "to train further, resume with learner.max_steps > 8"
    ]
    assert _snapshot(run) == before
    # A larger budget is not finished: the run continues from step 8.
    r = resolve_train_config(None, ["resume=true", f"run.dir={run}", "learner.max_steps=9"])
    assert r.step == 8 and not r.finished


def test_resume_without_a_checkpoint_or_a_run_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ of this directory: none
    (tmp_path / "empty").mkdir()
    cases = [
        (["resume=true", f"run.dir={tmp_path / 'empty'}"], "resume: true, but there is no checkpoint in"),
        (["resume=true"], "resume: true without a preset needs run.dir"),
        ([PRESET, "resume=true"], "resume: true, but run.dir is not set and no runs/hypergrid_tb-*"),
        (["learner.max_steps=3"], "config: a preset or a YAML file is needed unless resuming"),
    ]
    for argv, needle in cases:
        assert train_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (argv, err)
    # auto without a checkpoint: a fresh run from the preset and the overrides.
    r = resolve_train_config(PRESET, ["resume=auto", f"run.dir={tmp_path / 'empty'}", "learner.max_steps=3"])
    assert r.step is None and r.changes == [] and r.cfg.learner.max_steps == 3 and r.cfg.model.hidden_dim == 256


def test_eval_of_a_checkpoint_writes_beside_the_checkpoints(tmp_path):
    run = tmp_path / "run"
    ckpt = _write_run(run, 4, weights=True)
    torch.manual_seed(0)
    metrics, out = evaluate(ckpt, n_samples=0)
    assert out == run / "eval" / "step_4" and (out / "metrics.json").is_file()
    assert metrics["step"] == 4 and not (ckpt / "eval").exists()
    assert run_dir_of(ckpt / "config.yaml", load_config(ckpt / "config.yaml")) == run
    assert run_dir_of(run / "config.yaml", load_config(run / "config.yaml")) == run


def test_the_python_api_resumes_the_same_way(tmp_path):
    import ray

    import gfn_dist

    run = tmp_path / "run"
    _write_run(run, 8)
    before = _snapshot(run)
    # A finished run: its last metrics row, nothing trained, Ray not started, no file touched.
    assert gfn_dist.run(PRESET, ["resume=true", f"run.dir={run}"]) == {"step": 8}
    assert not ray.is_initialized() and _snapshot(run) == before
    with pytest.raises(ConfigError, match=r"resume: env\.hypergrid\.height: checkpoint 8, config 9"):
        gfn_dist.run(PRESET, ["resume=true", f"run.dir={run}", "env.hypergrid.height=9"])


def test_the_train_entry_point_imports_neither_torch_nor_ray():
    """A fresh run's config errors stay quick: checkpoints are looked for (torch) only when resuming."""
    import subprocess
    import sys

    code = "import sys, gfn_dist.train; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
