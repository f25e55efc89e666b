"""The bookkeeping of ``benchmarks/gpu_check.sh``: the environment report, one record per step, the summary.

    python benchmarks/gpu_check_summary.py env ENV_JSON [--nvidia-smi FILE] [--mode cuda|cpu]
    python benchmarks/gpu_check_summary.py step STEPS_JSONL NAME RC T0 T1 LOG [options] -- CMD ...
    python benchmarks/gpu_check_summary.py summary STEPS_JSONL ENV_JSON OUT_JSON --mode M --budget-s S --elapsed-s T

``env`` prints the versions and ``torch.cuda.device_count()`` for the log (stderr) and the device count alone
on stdout (the script reads it); with ``--mode cuda`` and no GPU it exits 2 with one line. ``step`` appends one
JSON line to STEPS_JSONL: the command, its exit code and wall time, and what the step left behind (the run's
last metrics row and last evaluation, the learners' process-group backend from the log, the benchmark's
medians) with the checks that make the step pass or fail. ``summary`` writes OUT_JSON from both.

Standard library only (``env`` imports torch): it must run where gfn_dist's own imports fail, to say so.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import sys
from pathlib import Path

#: Keys of the last metrics row kept in the summary (with every ``eval/*`` key of the last evaluation).
ROW_KEYS = ("step", "elapsed_s", "traj_per_s", "traj_per_s/produced", "loss", "logZ", "policy_lag_steps_mean")
#: Evaluation keys that do not start with ``eval/`` (the exact metrics of enumerable environments).
EXACT_KEYS = ("l1_exact", "logZ_err")
#: What ``RayTrainLearners`` logs once the learner workers are up (gfn_dist.distributed.learner_group).
PLACEMENT = re.compile(r"(\d+) learner workers \((\w+), ([^)]+)\) on (\d+) node")
#: Distributions gfn_dist's steps import (and the module each installs, where it differs): reported so that a
#: missing one is named, not guessed from a traceback.
PACKAGES = {
    "torch": "torch",
    "ray": "ray",
    "tensordict": "tensordict",
    "omegaconf": "omegaconf",
    "wandb": "wandb",
    "rdkit": "rdkit",
    "selfies": "selfies",
    "torchgfn": "gfn",
}


# ---------------------------------------------------------------- reading what a step left behind


def read_rows(path: str | Path) -> list[dict]:
    """The JSON rows of a ``metrics.jsonl`` (a torn last line, as after a kill, is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def is_eval_row(row: dict) -> bool:
    return any(k.startswith("eval/") or k in EXACT_KEYS for k in row)


def final_metrics(rows: list[dict]) -> dict:
    """``ROW_KEYS`` of the last row, and the evaluation keys of the last row that has any (``eval_step``: its step).

    Returns:
        ``{}`` when there are no rows.
    """
    if not rows:
        return {}
    out = {k: rows[-1][k] for k in ROW_KEYS if k in rows[-1]}
    evals = [r for r in rows if is_eval_row(r)]
    if evals:
        out["eval_step"] = evals[-1].get("step")
        out.update({k: v for k, v in evals[-1].items() if k.startswith("eval/") or k in EXACT_KEYS})
    return out


def learner_placement(log_text: str) -> dict | None:
    """World size, backend, device and node count of a ``cluster.launcher=ray`` run, from its log."""
    m = PLACEMENT.search(log_text)
    if m is None:
        return None
    return {"world_size": int(m[1]), "backend": m[2], "device": m[3], "nodes": int(m[4])}


def bench_medians(path: str | Path) -> dict:
    """``{case: {variant: median_ms, ...}, ...}`` of a ``core_vs_torchgfn.py --json`` file, and its device."""
    data = json.loads(Path(path).read_text())
    out: dict = {"device": data["meta"].get("device"), "gpu": data["meta"].get("gpu")}
    for r in data["results"]:
        out[r["case"]["name"]] = {k: round(v["median_ms"], 3) for k, v in r["variants"].items()}
    return out


def gpu_processes(path: str | Path) -> dict | None:
    """Distinct PIDs and the largest memory (MiB) in a log of ``nvidia-smi --query-compute-apps=pid,used_memory
    --format=csv,noheader,nounits`` polls; None when nothing was logged (no nvidia-smi, or it lists no apps)."""
    p = Path(path)
    if not p.exists():
        return None
    pids, mem = set(), 0.0
    for line in p.read_text().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) >= 2 and parts[0].isdigit():
            pids.add(parts[0])
            with contextlib.suppress(ValueError):  # "[N/A]" where the driver does not say
                mem = max(mem, float(parts[1]))
    return {"pids": len(pids), "max_used_mib": mem} if pids else None


def step_record(ns: argparse.Namespace) -> dict:
    """The record of one step (module doc); ``ok`` is the exit code 0 and every check passed."""
    rc = int(ns.rc)
    wall = float(ns.t1) - float(ns.t0)
    rec: dict = {
        "name": ns.name,
        "cmd": " ".join(ns.cmd),
        "rc": rc,
        "timed_out": rc in (124, 137),
        "wall_s": round(wall, 2),
        "log": Path(ns.log).name,
    }
    if ns.note:
        rec["note"] = ns.note
    checks: list[str] = []  # what failed
    if rc != 0:
        checks.append(f"exit code {rc}" + (" (killed at its time limit)" if rec["timed_out"] else ""))
    log_text = Path(ns.log).read_text(errors="replace") if Path(ns.log).exists() else ""
    if ns.run_dir:
        rec["run_dir"] = ns.run_dir
        metrics = Path(ns.run_dir) / "metrics.jsonl"
        rec["final"] = final_metrics(read_rows(metrics)) if metrics.exists() else {}
        if ns.expect_step is not None and rec["final"].get("step") != ns.expect_step:
            checks.append(f"last metrics row at step {rec['final'].get('step')}, expected {ns.expect_step}")
        if ns.expect_eval and not any(k.startswith("eval/") for k in rec["final"]):
            checks.append("no evaluation row in metrics.jsonl")
    if ns.expect_backend:
        rec["learners"] = learner_placement(log_text)
        got = (rec["learners"] or {}).get("backend")
        if got != ns.expect_backend:
            checks.append(f"learner backend {got}, expected {ns.expect_backend}")
    if ns.bench_json:
        try:
            rec["medians_ms"] = bench_medians(ns.bench_json)
        except (OSError, ValueError, KeyError) as err:
            checks.append(f"{Path(ns.bench_json).name}: {err}")
    if ns.gpu_log:
        rec["gpu_processes"] = gpu_processes(ns.gpu_log)
    rec["failed_checks"] = checks
    rec["ok"] = not checks
    return rec


def summary(steps_path: str | Path, env_path: str | Path, mode: str, budget_s: float, elapsed_s: float) -> dict:
    steps = read_rows(steps_path) if Path(steps_path).exists() else []
    env = json.loads(Path(env_path).read_text()) if Path(env_path).exists() else {}
    ran = [s for s in steps if not s.get("skipped")]
    return {
        "mode": mode,
        "ok": bool(ran) and all(s["ok"] for s in ran),
        "budget_s": budget_s,
        "total_wall_s": elapsed_s,
        "environment": env,
        "steps": steps,
    }


# ---------------------------------------------------------------- environment


def _version(dist: str) -> str | None:
    """The installed version of ``dist``; "?" when its module imports without metadata; None when absent."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None if importlib.util.find_spec(PACKAGES[dist]) is None else "?"


def environment(nvidia_smi: str | None) -> dict:
    import torch  # the one heavy import, here only

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    smi = Path(nvidia_smi).read_text().splitlines() if nvidia_smi and Path(nvidia_smi).exists() else []
    return {
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_cuda": torch.version.cuda,
        "cuda_device_count": n,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(n)],
        "nvidia_smi": smi,
        "cpu_count": os.cpu_count(),
    }


# ---------------------------------------------------------------- command line


def _write_json(path: str | Path, obj) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env")
    e.add_argument("out")
    e.add_argument("--nvidia-smi")
    e.add_argument("--mode", choices=("cpu", "cuda"), default="cuda")
    s = sub.add_parser("step")
    for name in ("steps", "name", "rc", "t0", "t1", "log"):
        s.add_argument(name)
    s.add_argument("--run-dir")
    s.add_argument("--expect-step", type=int)
    s.add_argument("--expect-eval", action="store_true")
    s.add_argument("--expect-backend")
    s.add_argument("--bench-json")
    s.add_argument("--gpu-log")
    s.add_argument("--note")
    k = sub.add_parser("skip")
    for name in ("steps", "name", "reason"):
        k.add_argument(name)
    m = sub.add_parser("summary")
    for name in ("steps", "env", "out"):
        m.add_argument(name)
    m.add_argument("--mode", required=True)
    m.add_argument("--budget-s", type=float, required=True)
    m.add_argument("--elapsed-s", type=float, required=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)  # after it: the step's command, options and all
    ns = p.parse_args(argv[:split])
    ns.cmd = argv[split + 1 :]

    if ns.command == "env":
        env = environment(ns.nvidia_smi)
        _write_json(ns.out, env)
        pk = env["packages"]
        print(
            f"python {env['python']}, torch {pk['torch']} (CUDA {env['torch_cuda']}), ray {pk['ray']}", file=sys.stderr
        )
        print(f"torch.cuda.device_count() = {env['cuda_device_count']} {env['cuda_devices']}", file=sys.stderr)
        missing = [name for name in PACKAGES if pk[name] is None]
        if missing:
            print(f"not installed: {missing}", file=sys.stderr)
        if ns.mode == "cuda" and env["cuda_device_count"] == 0:
            print("gpu_check.sh: no CUDA GPU is visible to torch; run with --cpu-dry-run", file=sys.stderr)
            return 2
        print(env["cuda_device_count"])
        return 0
    if ns.command == "step":
        rec = step_record(ns)
    elif ns.command == "skip":
        rec = {"name": ns.name, "skipped": ns.reason}
    else:
        _write_json(ns.out, summary(ns.steps, ns.env, ns.mode, ns.budget_s, ns.elapsed_s))
        return 0
    with open(ns.steps, "a") as f:
        f.write(json.dumps(rec) + "\n")
    if "skipped" in rec:
        status = "skipped: " + rec["skipped"]
    else:
        status = "ok" if rec["ok"] else f"FAILED {rec['failed_checks']}"
    wall = f" in {rec['wall_s']:.1f} s" if "wall_s" in rec else ""
    print(f"== {rec['name']}: {status}{wall}; final {rec.get('final') or rec.get('medians_ms') or {}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
