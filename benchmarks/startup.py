"""Start-up cost of ``gfn-dist``: wall time minus training time.

    python benchmarks/startup.py                 # main job (1 and 8 actors), launcher=ray, --help; 1 run each
    python benchmarks/startup.py --repeats 3 --out benchmarks/results/startup.json

Each case runs the real command line in a fresh process (``python -m
gfn_dist.cli train hypergrid_tb ...``, the main job's preset) and measures:

* ``wall_s``: from spawning the process to its exit (interpreter start, imports,
  config, Ray start, actors, training, checkpoint, shutdown);
* ``train_s``: the learner's steps, rebuilt from ``metrics.jsonl`` as the sum
  over rows of ``(step - previous step) / learner_steps_per_s`` (each row's
  rate is measured over its own window of steps);
* ``overhead_s = wall_s - train_s``: what start-up and shutdown cost.

``--help`` is timed the same way (no training). Prints a Markdown table (the
median of ``--repeats`` runs per case, with the min-max range). Not a test:
times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = "hypergrid_tb"
CASES = {
    "main job, 1 actor": ["rollout.num_actors=1"],
    "main job, 8 actors": ["rollout.num_actors=8"],
    "main job, cluster.launcher=ray": ["cluster.launcher=ray"],
}


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("RAY_ADDRESS", None)  # an embedded Ray, as the README's command
    return env


def training_seconds(metrics_path: Path) -> float:
    """Sum over metric rows of ``(step - previous step) / learner_steps_per_s``."""
    prev, total = 0, 0.0
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if row.get("learner_steps_per_s"):
            total += (row["step"] - prev) / row["learner_steps_per_s"]
        prev = row["step"]
    return total


def run_train(overrides: list[str], extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="gfn-startup-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "gfn_dist.cli", "train", PRESET, *overrides, *extra, f"run.dir={run_dir}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        train = training_seconds(run_dir / "metrics.jsonl")
    return {"wall_s": wall, "train_s": train, "overhead_s": wall - train}


def run_help() -> dict:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gfn_dist.cli", "--help"], env=_env(), cwd=ROOT, capture_output=True,
                   check=True)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "train_s": 0.0, "overhead_s": wall}


def _cell(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:.1f}" if len(values) == 1 else f"{med:.1f} [{min(values):.1f}-{max(values):.1f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=1, help="runs per case (default 1)")
    p.add_argument("--out", default=None, help="also write the raw times as JSON here")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every training case "
                                                "(e.g. logging.wandb.mode=disabled)")
    ns = p.parse_args(argv)
    results: dict[str, list[dict]] = {}
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for _ in range(ns.repeats):  # interleaved: every case sees the machine's drift alike
        for name, overrides in CASES.items():
            results.setdefault(name, []).append(run_train(overrides, ns.overrides))
            print(f"{name}: {results[name][-1]}", file=sys.stderr, flush=True)
        results.setdefault("gfn-dist --help", []).append(run_help())
    lines = ["| case | wall s | training s | wall - training s |", "|---|---:|---:|---:|"]
    for name, runs in results.items():
        lines.append(f"| {name} | {_cell([r['wall_s'] for r in runs])} | {_cell([r['train_s'] for r in runs])} | "
                     f"**{_cell([r['overhead_s'] for r in runs])}** |")
    print("\n".join(lines))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{os.cpu_count()} CPUs, load average {load0:.1f} at the start, {load:.1f} at the end; "
          f"median [min-max] of {ns.repeats} run(s)")
    if ns.out:
        Path(ns.out).write_text(json.dumps({"results": results, "cpus": os.cpu_count(), "load": load}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
