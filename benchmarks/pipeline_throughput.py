"""Throughput of the distributed pipeline vs the same sampler in-process.

Three measurements on the ``configs/hypergrid_tb.yaml`` setting (HyperGrid(2, 8),
MLP 256x2 P_F), each actor with one torch thread:

1. **in-process**: the rollout actor's own ``Sampler.sample_trajectories(env, n=push)``
   in a loop in the actor's process (one thread): the rate it could reach with no
   transport at all. (The same loop in the driver process is recorded too.)
2. **actor -> replay, no learner**: the same actor's real ``run`` loop pushing to
   one shard with the rate limiter off, timed in windows alternating with (1).
   ``overhead = 1 - actor_rate / in_process_rate`` is the cost of tagging, packing,
   the Ray call, the shard insert and the weight-version check per batch.
   Target: <= 20 % with one actor.
3. **training pipeline**: the full trainer (learner consuming, rate limiter at
   ``samples_per_insert = 1``) with 1 and 2 actors: trajectories/s produced by
   the actors and consumed by the learner, learner steps/s, policy lag.

    python benchmarks/pipeline_throughput.py [--pushes 64 256 1024] [--steps 200]

Numbers depend on the machine's load (the 1-minute load average is recorded);
the script records them in ``benchmarks/results/pipeline_throughput.json``.
On a machine with few cores, part of the gap between the in-process and the
actor rate is CPU contention (the shard, raylet and driver share the cores),
not transport: ``push_share_of_actor_time`` isolates the actor's own
transport cost (waiting for the previous push, serialising and sending).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import uuid
from pathlib import Path
from typing import Optional

import ray
import torch

from gfn_dist.builders import build_env, build_policies, build_rollout_parts, build_sampler
from gfn_dist.config import load_config
from gfn_dist.distributed.replay_client import ReplayClient
from gfn_dist.distributed.replay_shard import ReplayShardConfig, create_replay_shards
from gfn_dist.distributed.rollout_actor import create_rollout_actors
from gfn_dist.distributed.weight_store import WeightPublisher, create_weight_store
from gfn_dist.metrics import read_jsonl
from gfn_dist.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
EXTRA = []
PRESET = ROOT / "configs" / "hypergrid_tb.yaml"


def in_process_rate(push: int, seconds: float) -> float:
    """Trajectories/s of the sampler alone (``push`` per call) in this process, one thread."""
    cfg = load_config(PRESET, [f"rollout.trajectories_per_push={push}"])
    torch.manual_seed(0)
    env = build_env(cfg)
    policies = build_policies(cfg, env).eval()
    sampler, kwargs = build_sampler(cfg, policies)
    sampler.sample_trajectories(env, n=push, **kwargs)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sampler.sample_trajectories(env, n=push, **kwargs)
        n += push
    return n / (time.perf_counter() - t0)


def _sample_only(worker, seconds: float) -> tuple:
    """Runs in the actor's process: its own sampler with no transport; ``(trajectories, seconds)``."""
    r = worker.cfg.rollout
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        traj = worker.sampler.sample_trajectories(worker.env, n=r.sampler_batch_size or r.trajectories_per_push,
                                                  **worker.sample_kwargs)
        n += traj.n_trajectories
    return n, time.perf_counter() - t0


def _run_window(worker, batches: int) -> tuple:
    """Runs in the actor's process: the real ``run`` loop for ``batches`` more pushes; ``(trajectories, seconds)``."""
    n0, t0 = worker.num_trajectories, time.perf_counter()
    worker.run(max_batches=worker.num_batches + batches)
    return worker.num_trajectories - n0, time.perf_counter() - t0


def actor_rate(push: int, seconds: float, rounds: int, sampler_batch: Optional[int] = None) -> dict:
    """One rollout actor pushing into one shard with the limiter off (no learner).

    The reference and the pipeline are timed in the same actor process, in
    alternating windows (``rounds`` of each, ``seconds / rounds`` long): its sampler
    alone (no transport), then its real ``run`` loop (sample, tag, pack, push,
    wait for the shard's answer). ``sampler_batch``: trajectories per sampler
    call (``rollout.sampler_batch_size``; default ``push``), for both. The machine's speed drifts by 10-20 % over
    tens of seconds on a shared VM; interleaving puts both rates under the same
    drift, and the same process rules out differences between processes.
    """
    cfg = load_config(PRESET, [f"rollout.trajectories_per_push={push}", "replay.capacity_per_shard=100000", *EXTRA,
                               "replay.min_size_to_sample=1", "replay.num_shards=1",
                               f"rollout.sampler_batch_size={sampler_batch or push}"])
    tag = uuid.uuid4().hex[:8]  # rollout actors find their shard and store by name
    shards = create_replay_shards(1, ReplayShardConfig(capacity=100_000, samples_per_insert=None),
                                  name_prefix=f"bench_replay_{tag}", num_cpus=0)
    store = create_weight_store(name=f"bench_weights_{tag}")
    env = build_env(cfg)
    torch.manual_seed(0)
    WeightPublisher(store).publish(0, build_policies(cfg, env))
    (actor,) = create_rollout_actors(cfg, build_rollout_parts, f"bench_replay_{tag}", f"bench_weights_{tag}")
    ray.get(actor.stats.remote())  # constructed
    client = ReplayClient(shards)
    win = seconds / rounds
    ray.get(actor.__ray_call__.remote(_run_window, 20))  # warm-up: weights loaded, shard and Ray paths hot
    ray.get(actor.__ray_call__.remote(_sample_only, 0.5))
    ref_n = ref_t = run_n = run_t = 0.0
    s0, i0 = ray.get(actor.stats.remote()), client.stats()["num_inserts"]
    for _ in range(rounds):
        n, t = ray.get(actor.__ray_call__.remote(_sample_only, win))
        ref_n, ref_t = ref_n + n, ref_t + t
        # As many pushes as the sampler alone made in its window (the same work, timed).
        n, t = ray.get(actor.__ray_call__.remote(_run_window, max(int(n) // push, 1)))
        run_n, run_t = run_n + n, run_t + t
    s1, i1 = ray.get(actor.stats.remote()), client.stats()["num_inserts"]
    if i1 - i0 != run_n:
        raise RuntimeError(f"push={push}: the shard inserted {i1 - i0} trajectories, the actor sent {run_n}")
    ray.get(store.stop.remote())
    for h in (actor, *shards, store):
        ray.kill(h)
    batches = max(s1["num_batches"] - s0["num_batches"], 1)
    return {
        "in_actor_traj_per_s": ref_n / ref_t,
        "traj_per_s": run_n / run_t,
        "sample_ms_per_batch": 1e3 * (s1["sample_time_s"] - s0["sample_time_s"]) / batches,
        "push_ms_per_batch": 1e3 * (s1["push_time_s"] - s0["push_time_s"]) / batches,
    }


def pipeline(num_actors: int, steps: int, run_dir: Path) -> dict:
    """The trainer with ``num_actors`` actors; means over the log rows after the first (warm-up)."""
    cfg = load_config(PRESET, [f"rollout.num_actors={num_actors}", f"replay.num_shards={num_actors}",
                               f"learner.max_steps={steps}", "eval.interval_steps=0", "eval.exact=false",
                               f"logging.log_every={max(steps // 8, 1)}", "logging.progress_bar=false",
                               f"run.dir={run_dir}", "run.save_policy=false"])
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    rows = read_jsonl(run_dir / "metrics.jsonl")[1:]
    mean = lambda k: statistics.fmean(r[k] for r in rows)  # noqa: E731
    return {
        "num_actors": num_actors,
        "traj_per_s_produced": mean("traj_per_s/produced"),
        "traj_per_s_consumed": mean("traj_per_s"),
        "learner_steps_per_s": mean("learner_steps_per_s"),
        "policy_lag_steps_mean": mean("policy_lag_steps_mean"),
        "policy_lag_steps_max": max(r["policy_lag_steps_max"] for r in rows),
        "time_ms_per_step": {k: 1e3 * mean(k) for k in ("time/sample_s", "time/loss_s", "time/backward_s",
                                                         "time/sync_s")},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pushes", nargs="+", default=["64", "256", "1024", "64:256"],
                   help="trajectories per push P, or S:P for S per sampler call and P per push")
    p.add_argument("--seconds", type=float, default=8.0, help="measurement time per rate (split into --rounds windows)")
    p.add_argument("--rounds", type=int, default=8, help="alternating reference / pipeline windows per push size")
    p.add_argument("--steps", type=int, default=200, help="learner steps per pipeline run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline_throughput.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        transport = []
        for case in args.pushes:
            sampler_batch, _, push = case.rpartition(":")
            push = int(push)
            sampler_batch = int(sampler_batch) if sampler_batch else push
            base = in_process_rate(sampler_batch, min(args.seconds, 4.0))
            act = actor_rate(push, args.seconds, args.rounds, sampler_batch)
            ref = act["in_actor_traj_per_s"]
            transport.append({"trajectories_per_push": push, "sampler_batch_size": sampler_batch,
                              "in_process_traj_per_s": ref,
                              "driver_in_process_traj_per_s": base,
                              "actor_traj_per_s": act["traj_per_s"], "overhead": 1 - act["traj_per_s"] / ref,
                              # The actor's own time not spent sampling (waits for the previous push + sending):
                              "push_share_of_actor_time": act["push_ms_per_batch"] / (
                                  act["push_ms_per_batch"] + act["sample_ms_per_batch"]),
                              **{k: v for k, v in act.items() if k not in ("traj_per_s", "in_actor_traj_per_s")}})
            print(f"push={push:5d} (sampler batch {sampler_batch:4d})  in-process {ref:9.0f} traj/s (driver: {base:.0f})  actor->replay "
                  f"{act['traj_per_s']:9.0f} traj/s  overhead {100 * transport[-1]['overhead']:5.1f} %  "
                  f"(push share of actor time {100 * transport[-1]['push_share_of_actor_time']:4.1f} %; "
                  f"sample {act['sample_ms_per_batch']:.2f} ms, push {act['push_ms_per_batch']:.2f} ms per batch)",
                  flush=True)
        runs = []
        for num_actors in (1, 2):
            r = pipeline(num_actors, args.steps, Path("/tmp") / f"pipeline_bench_{num_actors}_{time.time_ns()}")
            runs.append(r)
            print(f"actors={num_actors}  produced {r['traj_per_s_produced']:7.0f} traj/s  consumed "
                  f"{r['traj_per_s_consumed']:7.0f} traj/s  learner {r['learner_steps_per_s']:5.1f} steps/s  "
                  f"lag mean {r['policy_lag_steps_mean']:.1f} max {r['policy_lag_steps_max']:.0f}  "
                  f"ms/step {json.dumps({k: round(v, 1) for k, v in r['time_ms_per_step'].items()})}", flush=True)
    finally:
        ray.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": f"{platform.node()} ({torch.get_num_threads()} torch thread, "
                                          f"{os.cpu_count()} cores)",
                               "load_average_1min_at_end": os.getloadavg()[0],
                               "transport": transport, "pipeline": runs}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
