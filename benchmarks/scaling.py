"""Rollout-actor scaling on a simulated multi-node Ray cluster, for an expensive reward.

A Ray cluster of ``--nodes`` nodes is simulated on this machine with
``ray.cluster_utils.Cluster`` (each node a raylet with ``--cpus-per-node`` logical CPUs);
the trainer connects to it (``cluster.address``) and Ray's scheduler places 1, 2, 4 and 8
rollout actors over the nodes. Two rewards of ``examples.molecules``:

(a) ``qed``: RDKit's QED of SELFIES molecules (``SelfiesEnv``): CPU-bound in the actors,
    so on a machine with C free cores it scales to about C actors and no further;
(b) ``oracle``: a latency-bound reward standing for an external service
    (``OracleSelfiesEnv``: ``--delay-ms`` per batch, no CPU): actors overlap the waits.

Per run: ``--train-seconds`` of training (then a preemption request stops it);
trajectories/s produced by the actors (replay inserts per second) and consumed by the
learner (``traj_per_s``), and the policy lag, over the log rows from 5 s after the first
(the actors' start-up is not counted). ``efficiency = produced(N) / (N * produced(1))``. The rate limiter is off by
default (``replay.samples_per_insert=null``: actors produce as fast as they can, the
learner samples what is there); ``--rate-limiter`` turns it on at 1 sample per insert.

    python benchmarks/scaling.py --quick --json benchmarks/results/scaling.json

``--quick``: 20 s of training per run instead of 60 (a few minutes in all).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # examples.molecules, from a clean clone without PYTHONPATH

from gfn_dist.config import load_config  # noqa: E402
from gfn_dist.metrics import read_jsonl  # noqa: E402
from gfn_dist.preemption import clear_preemption, request_preemption  # noqa: E402
from gfn_dist.trainer import Trainer  # noqa: E402

logger = logging.getLogger("scaling")
PRESET = ROOT / "configs" / "molecules_qed.yaml"
WARMUP_S = 5.0  # seconds after the first metric row not counted (every actor has pushed by then)
ENVS = {"qed": "examples.molecules:SelfiesEnv", "oracle": "examples.molecules.oracle:OracleSelfiesEnv"}


def run_once(address: str, reward: str, num_actors: int, train_s: float, delay_ms: float, rate_limiter: bool,
             run_dir: Path) -> dict:
    """One training run with ``num_actors`` actors for ``train_s`` seconds of training.

    The run is stopped as SIGTERM would stop it (``request_preemption``) ``train_s`` after
    its first metric row; rates are taken over the rows from ``WARMUP_S`` after the first
    row to the last (so the actors' start-up, which grows with their number on 2 cores, is
    not counted): produced = inserts / seconds, consumed = mean ``traj_per_s``.
    """
    overrides = [
        f"env.name={ENVS[reward]}", f"rollout.num_actors={num_actors}", f"replay.num_shards={min(num_actors, 4)}",
        "rollout.num_cpus_per_actor=0.5", "learner.max_steps=1000000", "eval.num_samples=0",
        "logging.log_every=10", "logging.progress_bar=false", "logging.wandb.mode=disabled",
        "checkpoint.interval_steps=0", "run.save_policy=false", f"run.dir={run_dir}", f"cluster.address={address}",
        "replay.min_size_to_sample=64",
        "replay.samples_per_insert=1.0" if rate_limiter else "replay.samples_per_insert=null",
    ]
    if reward == "oracle":
        overrides.append(f"env.kwargs.delay_ms_per_batch={delay_ms}")
    cfg = load_config(str(PRESET), overrides)
    metrics = run_dir / "metrics.jsonl"
    done = threading.Event()

    def stop_after_train_s() -> None:
        first = None
        while not done.wait(0.2):
            if first is None and metrics.exists() and metrics.stat().st_size > 0:
                first = time.monotonic()
            if first is not None and time.monotonic() - first >= train_s:
                request_preemption()
                return

    t0 = time.perf_counter()
    clear_preemption()
    trainer = Trainer(cfg)
    timer = threading.Thread(target=stop_after_train_s, daemon=True)
    timer.start()
    try:
        trainer.train()
    finally:
        done.set()
        trainer.close()
        clear_preemption()
    rows = read_jsonl(metrics)
    t_first = rows[0]["elapsed_s"]
    window = [r for r in rows if r["elapsed_s"] >= t_first + WARMUP_S] or rows
    a, b = window[0], window[-1]
    seconds = max(b["elapsed_s"] - a["elapsed_s"], 1e-9)
    mean = lambda k: statistics.fmean(r[k] for r in window[1:] or window)  # noqa: E731
    return {"reward": reward, "actors": num_actors,
            "traj_per_s": (b["buffer/inserts"] - a["buffer/inserts"]) / seconds,
            "traj_per_s_consumed": mean("traj_per_s"), "policy_lag_steps_mean": mean("policy_lag_steps_mean"),
            "learner_steps_per_s": mean("learner_steps_per_s"), "window_s": seconds,
            "wall_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs (the whole script in a few minutes)")
    p.add_argument("--json", default=None, help="write {'rows': [...]} here")
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--rewards", nargs="+", default=["qed", "oracle"], choices=sorted(ENVS))
    p.add_argument("--nodes", type=int, default=4, help="simulated Ray nodes")
    p.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs per simulated node")
    p.add_argument("--delay-ms", type=float, default=200.0, help="oracle latency per batch of 64 (b)")
    p.add_argument("--train-seconds", type=float, default=None,
                   help="seconds of training per run (default 60; --quick 20)")
    p.add_argument("--rate-limiter", action="store_true", help="samples_per_insert=1 instead of off")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    train_s = args.train_seconds or (20.0 if args.quick else 60.0)
    os.environ.setdefault("PYTHONPATH", str(ROOT))  # Ray workers import examples.molecules
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus_per_node})
    for _ in range(args.nodes - 1):
        cluster.add_node(num_cpus=args.cpus_per_node)
    cluster.wait_for_nodes()
    rows = []
    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        for reward in args.rewards:
            base = None
            for n in args.actors:
                r = run_once(cluster.address, reward, n, train_s, args.delay_ms, args.rate_limiter,
                             Path("/tmp") / f"scaling_{reward}_{n}_{time.time_ns()}")
                base = base or r["traj_per_s"]
                r["efficiency"] = r["traj_per_s"] / (n * base)
                rows.append(r)
                logger.info("%-6s actors=%d produced %7.0f traj/s consumed %7.0f traj/s lag %.1f efficiency %.2f",
                            reward, n, r["traj_per_s"], r["traj_per_s_consumed"], r["policy_lag_steps_mean"],
                            r["efficiency"])
    finally:
        ray.shutdown()
        cluster.shutdown()
    out = {"rows": rows, "nodes": args.nodes, "cpus_per_node": args.cpus_per_node, "delay_ms": args.delay_ms,
           "rate_limiter": args.rate_limiter, "train_seconds": train_s, "warmup_s": WARMUP_S, "cores": os.cpu_count(),
           "load_average_1min_at_end": os.getloadavg()[0]}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        logger.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
