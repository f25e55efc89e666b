"""The prepared GPU check (issue 15 item 5), tested where there is no GPU.

* ``benchmarks/gpu_check.sh --cpu-dry-run`` end to end (slow, cluster: it starts Ray through the real CLI):
  every step (the main job, the main job with two Ray Train learners, the molecule preset, the core
  benchmark) exits 0, reaches its step budget, the two learners formed one gloo group (the check that reads
  nccl with GPUs), and what comes back in ``$OUT`` fits the device tool (at most 8 plain files).
* Fast: ``core_vs_torchgfn.py --device cpu`` runs a tiny case through every variant (in process); ``--device
  cuda`` without CUDA is refused; the summary helper's readings of a run's files against hand-made ones; the
  script with no budget left starts no step and fails; its bad usage is one line and exit code 2.
* The GPU reservations a configuration asks of an embedded Ray: one whole GPU per Ray Train learner with
  ``learner.device=cuda``, beside the rollout actors' shares (``check_devices``, ``learners_use_gpu``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gfn_dist.config import ConfigError, check_devices, load_config
from gfn_dist.distributed.cluster import learners_use_gpu

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _load(name: str):
    """A benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- GPU reservations


def _cfg(*overrides):
    return load_config(None, ["logging.wandb.mode=disabled", *overrides])


RAY2 = ("cluster.launcher=ray", "cluster.num_learners=2", "learner.device=cuda")


def test_ray_learners_on_cuda_take_a_whole_gpu_each():
    with pytest.raises(ConfigError, match=r"^cluster\.num_learners: 2 learner workers .* but 1 are visible"):
        check_devices(_cfg(*RAY2, "rollout.num_gpus_per_actor=0"), num_gpus=1)
    check_devices(_cfg(*RAY2, "rollout.num_gpus_per_actor=0"), num_gpus=2)


def test_actor_gpus_must_fit_beside_the_learners():
    with pytest.raises(ConfigError, match=r"^rollout\.num_gpus_per_actor: .* beside the learners' 2 but 2 are"):
        check_devices(_cfg(*RAY2, "rollout.num_gpus_per_actor=0.25"), num_gpus=2)
    check_devices(_cfg(*RAY2, "rollout.num_gpus_per_actor=0.25"), num_gpus=3)
    # A learner in the driver (launcher local) or a torchrun rank reserves no Ray GPU: it shares the actor's.
    check_devices(_cfg("learner.device=cuda", "rollout.num_gpus_per_actor=0.25"), num_gpus=1)
    check_devices(_cfg("learner.device=cuda", "rollout.num_gpus_per_actor=1"), num_gpus=1)


def test_auto_learner_device_counts_the_actors_gpus():
    auto = ("cluster.launcher=ray", "cluster.num_learners=2", "learner.device=auto", "rollout.num_gpus_per_actor=0.5")
    assert not learners_use_gpu(_cfg(*auto), cluster_gpus=2.0)  # the actor's half would not fit
    assert learners_use_gpu(_cfg(*auto), cluster_gpus=3.0)
    assert learners_use_gpu(_cfg(*auto, "rollout.num_gpus_per_actor=0"), cluster_gpus=2.0)
    assert not learners_use_gpu(_cfg(*auto[:2], "learner.device=cpu"), cluster_gpus=8.0)


# ---------------------------------------------------------------- the core benchmark's device flag


@pytest.fixture
def bench():
    module = _load("core_vs_torchgfn")
    yield module
    logging.disable(logging.NOTSET)  # main() silences torchgfn's construction logs process-wide
    torch.set_flush_denormal(False)


def test_core_benchmark_runs_a_tiny_case_on_cpu(bench, tmp_path):
    has_tg = importlib.util.find_spec("gfn") is not None
    out = tmp_path / "core.json"
    argv = ["--device", "cpu", "--iterations", "2", "--warmup", "1", "--cases", "hypergrid_2x8", "--no-compile"]
    assert bench.main([*argv, *([] if has_tg else ["--no-torchgfn"]), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["gpu"] is None
    (r,) = data["results"]
    expected = {"gfn_dist", "floor"} | ({"torchgfn", "torchgfn_recompute"} if has_tg else set())
    assert set(r["variants"]) == expected
    for v in r["variants"].values():
        assert 0 < v["p25_ms"] <= v["median_ms"] <= v["p75_ms"]
        assert 1 <= v["mean_traj_len"] <= 2 * 7 + 1  # HyperGrid(2, 8): at most 14 moves and the exit
    # The floor replays gfn_dist's own counts: M_pf = B x the mean length of the same rounds.
    counts, batch = r["gfn_dist_counts"], r["case"]["batch_size"]
    assert counts["mean_pf_transitions"] == pytest.approx(r["variants"]["gfn_dist"]["mean_traj_len"] * batch)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_core_benchmark_refuses_cuda_without_a_gpu(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cuda", "--no-torchgfn"])
    assert exc.value.code == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err.strip().splitlines()[-1]


# ---------------------------------------------------------------- the summary helper


def test_summary_helper_reads_the_last_row_and_the_last_evaluation(tmp_path):
    helper = _load("gpu_check_summary")
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"step": 10, "loss": 3.0, "traj_per_s": 100.0, "eval/reward_mean": 0.1, "l1_exact": 0.9},
        {"step": 20, "loss": 2.0, "traj_per_s": 120.0, "eval/reward_mean": 0.2, "l1_exact": 0.5, "time/x": 1},
        {"step": 30, "loss": 1.5, "traj_per_s": 130.0, "logZ": 2.5},
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 4')  # a torn line
    log = tmp_path / "step.log"
    log.write_text("... INFO: 2 learner workers (nccl, cuda:0) on 1 node(s), up 3.2 s after launch\n")
    steps = tmp_path / "steps.jsonl"
    common = ["step", str(steps), "main_job", "0", "100.0", "142.5", str(log), "--run-dir", str(run), "--expect-eval"]
    assert helper.main([*common, "--expect-step", "30", "--expect-backend", "nccl", "--", "echo", "hi"]) == 0
    assert helper.main([*common, "--expect-step", "40", "--expect-backend", "gloo", "--", "echo"]) == 0
    killed = ["step", str(steps), "molecules", "124", "0", "150", str(tmp_path / "absent.log"), "--", "x"]
    assert helper.main(killed) == 0
    ok, bad, timed_out = helper.read_rows(steps)
    final = {"step": 30, "loss": 1.5, "traj_per_s": 130.0, "logZ": 2.5, "eval_step": 20}
    assert ok["final"] == final | {"eval/reward_mean": 0.2, "l1_exact": 0.5}
    assert ok["learners"] == {"world_size": 2, "backend": "nccl", "device": "cuda:0", "nodes": 1}
    assert (ok["ok"], ok["wall_s"], ok["cmd"], ok["failed_checks"]) == (True, 42.5, "echo hi", [])
    assert bad["failed_checks"] == ["last metrics row at step 30, expected 40", "learner backend nccl, expected gloo"]
    assert not bad["ok"]
    assert timed_out["timed_out"] and timed_out["failed_checks"] == ["exit code 124 (killed at its time limit)"]


def test_gpu_check_with_its_budget_spent_skips_every_step(tmp_path):
    """The budget bounds the whole script: with none left, no step starts (no Ray), and the check fails."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_RUNS=str(tmp_path / "runs"), GPU_CHECK_BUDGET_S="0")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--cpu-dry-run"],
        cwd=ROOT,
        env={**env, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["ok"]
    assert [(s["name"], s["skipped"].split(" (")[0]) for s in summary["steps"]] == [
        (name, "budget spent") for name in ("main_job", "main_job_2_learners", "molecules", "core_bench")
    ]
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]  # no step ran, no log


@pytest.mark.parametrize(
    "args, env, line",
    [
        (["--bogus"], {}, "gpu_check.sh: unknown argument '--bogus' (expected --cpu-dry-run or --help)"),
        ([], {"GPU_CHECK_DEVICE": "tpu"}, "gpu_check.sh: GPU_CHECK_DEVICE must be cpu or cuda, got 'tpu'"),
    ],
)
def test_gpu_check_bad_usage_is_one_line_exit_2(tmp_path, args, env, line):
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=ROOT,
        env={**os.environ, "OUT": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stderr.splitlines(), proc.stdout) == (2, [line], "")


# ---------------------------------------------------------------- the script, end to end on the CPU


@pytest.mark.cluster
@pytest.mark.slow
def test_gpu_check_cpu_dry_run_end_to_end(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_RUNS=str(runs), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--cpu-dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "cpu" and summary["ok"] and summary["total_wall_s"] <= summary["budget_s"]
    assert summary["environment"]["cuda_device_count"] == 0
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == ["main_job", "main_job_2_learners", "molecules", "core_bench"]
    for s in steps.values():
        assert (s["rc"], s["ok"], s["failed_checks"]) == (0, True, []), s
        assert s["wall_s"] > 0 and (out / s["log"]).exists()
    for name in ("main_job", "main_job_2_learners", "molecules"):
        final = steps[name]["final"]
        assert final["step"] == final["eval_step"] == 20 and final["traj_per_s"] > 0, final
    assert "l1_exact" in steps["main_job"]["final"]  # HyperGrid: the exact metrics too
    assert "eval/qed_top100_mean" in steps["molecules"]["final"]  # the molecule task's own metrics
    assert steps["main_job_2_learners"]["learners"] == {"world_size": 2, "backend": "gloo", "device": "cpu", "nodes": 1}
    assert steps["core_bench"]["medians_ms"]["device"] == "cpu"
    assert steps["core_bench"]["medians_ms"]["hypergrid_2x8"]["gfn_dist_compiled"] > 0
    # What the device tool brings back: at most 8 plain files, named in letters, digits, '.', '_', '-'.
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert len(files) <= 8, files
