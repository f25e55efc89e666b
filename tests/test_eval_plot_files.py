"""``gfn-dist eval`` / ``plot`` on damaged runs: torn checkpoints skipped, unreadable files one line. No Ray."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gfn_dist import checkpoint as ck
from gfn_dist.builders import build_env, build_gflownet, build_policies
from gfn_dist.cli import main as cli_main
from gfn_dist.config import load_config, to_yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_dir(tmp_path):
    """A run directory with config.yaml and intact checkpoints at steps 2 and 4 (distinct weights)."""
    d = tmp_path / "run"
    cfg = load_config(None, ["model.hidden_dim=16", "model.n_hidden_layers=1", f"run.dir={d}"])
    d.mkdir()
    (d / "config.yaml").write_text(to_yaml(cfg))
    env = build_env(cfg)
    gflownet = build_gflownet(cfg, env, build_policies(cfg, env))
    for step in (2, 4):
        with torch.no_grad():
            for p in gflownet.parameters():
                p.fill_(0.01 * step)
        ck.write_checkpoint(d / "checkpoints", step, {"learner": {"gflownet": gflownet.state_dict(), "step": step}},
                            to_yaml(cfg), {"step": step})
    return d


def _eval(capsys, *args):
    code = cli_main(["eval", *map(str, args), "--n-samples", "0", "--json"])
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def test_eval_skips_a_torn_newest_checkpoint(run_dir, capsys, caplog):
    os.truncate(run_dir / "checkpoints" / "step_4" / "learner.pt", 100)
    with caplog.at_level(logging.WARNING):
        code, out, _ = _eval(capsys, run_dir)
    assert code == 0 and json.loads(out)["step"] == 2
    assert any("step_4" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    code, _, err = _eval(capsys, run_dir / "checkpoints" / "step_4")  # asked for by name: refused, one line
    assert code == 2 and len(err) == 1 and "step_4/learner.pt" in err[0] and "truncated" in err[0]


def test_eval_on_a_corrupt_policy_file(run_dir, capsys, caplog):
    (run_dir / "policy.pt").write_bytes(b"\x00" * 64)  # e.g. a crash while it was written
    with caplog.at_level(logging.WARNING):
        code, out, _ = _eval(capsys, run_dir)
    assert code == 0 and json.loads(out)["step"] == 4  # the checkpoint is used instead
    assert any("policy.pt" in r.getMessage() for r in caplog.records)
    code, _, err = _eval(capsys, run_dir / "policy.pt")
    assert code == 2 and len(err) == 1 and "policy.pt: unreadable torch file" in err[0]


def test_cli_eval_corrupt_policy_one_line_no_traceback(tmp_path):
    """The real command line: a run whose only weights are a corrupt policy.pt."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.yaml").write_text(to_yaml(load_config(None, ["model.hidden_dim=16"])))
    (d / "policy.pt").write_bytes(b"PK\x03\x04 not really a zip")
    proc = subprocess.run([sys.executable, "-m", "gfn_dist.cli", "eval", str(d), "--n-samples", "0"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert str(d / "policy.pt") in lines[0] and "Traceback" not in proc.stderr


def test_plot_on_unusable_metrics_one_line(tmp_path, capsys):
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_bytes(b"\x00\xff garbage\n")
    assert cli_main(["plot", str(d), "--no-distributions"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(d / "metrics.jsonl") in err[0]


def test_plot_with_torn_checkpoint_still_draws_p_t(run_dir, capsys):
    """plot loads the newest intact weights for P_T; the metric plots come from the JSONL."""
    with open(run_dir / "metrics.jsonl", "w") as f:
        for s in (1, 2, 3, 4):
            f.write(json.dumps({"step": s, "loss": 1.0 / s, "trajectories": 16 * s, "elapsed_s": s}) + "\n")
        f.write('{"step": 5, "lo')
    os.truncate(run_dir / "checkpoints" / "step_4" / "learner.pt", 10)
    assert cli_main(["plot", str(run_dir)]) == 0
    names = {Path(p).name for p in capsys.readouterr().out.split()}
    assert "p_t_heatmap.png" in names and "training_vs_trajectories.png" in names
