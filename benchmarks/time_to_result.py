"""Time to the same result: gfn_dist with N rollout actors vs the single-process loop a user has today.

The result is a molecule task's ``eval/qed_top100_mean`` (mean QED of the 100 best distinct
molecules among ``eval.num_samples`` fresh samples of the current P_F; ``examples.molecules``)
first reaching ``--target``. Both sides train the same task from ``configs/molecules_qed.yaml``:
same environment and reward, same GRU P_F, TB loss, batch of 64 trajectories, optimizer and
learning rates, exploration (``sampler.policy_kwargs``), and the same sampled evaluation
(``gfn_dist.sampled_eval.sampled_metrics`` with the environment's ``eval_metrics`` hook).

* ``single``: a torchgfn-style loop in one process (``gfn_dist`` core objects, built by the
  same builders as the actors): sample 64 trajectories on-policy, compute their reward in
  the process, TB loss with log P_F recomputed, backward, Adam step; evaluate every
  ``--single-eval-every`` steps. One trajectory, one update.
* ``gfn_dist N``: ``gfn_dist.trainer.Trainer`` (embedded local Ray, one learner) with N
  rollout actors computing rewards in parallel and the preset's replay (each trajectory
  sampled ``replay.samples_per_insert`` = 4 times); the learner evaluates every
  ``eval.interval_steps`` = ``--dist-eval-every`` learner steps.

Clocks start before anything is built (the distributed side's ``elapsed_s`` counts from the
``Trainer``'s construction, so Ray's start and the actors' start-up are included; the single
loop's clock starts before it builds its environment and networks, after the imports) and
stop at the first evaluation at or above ``--target`` (the single loop stops there; gfn_dist runs
``--dist-steps`` learner steps and the time is read from its rows); evaluations cost both sides time.
Two rewards: ``qed`` (RDKit's QED in-process, CPU-bound, ~26 ms per batch of 64) and
``oracle`` (the same QED returned after ``--delay-ms`` of latency per batch, standing for an
external scoring service: ``examples.molecules.oracle.OracleSelfiesEnv(score="qed")``).

    python benchmarks/time_to_result.py --quick --json benchmarks/results/time_to_result.json

Not a test: times depend on the machine and its load (recorded in the JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # examples.molecules, from a clean clone without PYTHONPATH

from gfn_dist.builders import build_gflownet, build_rollout_parts  # noqa: E402
from gfn_dist.config import load_config  # noqa: E402
from gfn_dist.metrics import read_jsonl  # noqa: E402
from gfn_dist.optim import make_optimizer  # noqa: E402
from gfn_dist.sampled_eval import sampled_metrics  # noqa: E402
from gfn_dist.trainer import Trainer  # noqa: E402

logger = logging.getLogger("time_to_result")
PRESET = ROOT / "configs" / "molecules_qed.yaml"
METRIC = "eval/qed_top100_mean"


def task_overrides(reward: str, delay_ms: float) -> list[str]:
    """The preset's overrides for ``reward`` (``qed`` or ``oracle``)."""
    if reward == "qed":
        return []
    return ["env.name=examples.molecules.oracle:OracleSelfiesEnv", "env.kwargs.score=qed",
            f"env.kwargs.delay_ms_per_batch={delay_ms}"]


def run_single(reward: str, delay_ms: float, target: float, budget_s: float, eval_every: int, seed: int) -> dict:
    """The single-process loop (module doc); stops at the target or after ``budget_s`` seconds."""
    cfg = load_config(str(PRESET), [*task_overrides(reward, delay_ms), f"run.seed={seed}"])
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    env, policies, sampler, sample_kwargs = build_rollout_parts(cfg, torch.device("cpu"))
    gflownet = build_gflownet(cfg, env, policies)
    opt = make_optimizer(gflownet, cfg.learner.lr, cfg.learner.lr_logz)
    evals, step, hit = [], 0, None
    while time.perf_counter() - t0 < budget_s and hit is None:
        traj = sampler.sample_trajectories(env, n=cfg.learner.batch_size, **sample_kwargs)
        loss = gflownet.loss(env, traj, recalculate_all_logprobs=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % eval_every == 0:
            m = sampled_metrics(env, policies["pf"], None, cfg.eval.num_samples, cfg.eval.top_k,
                                seed=seed + 7919 * step, on_states=lambda s: env.eval_metrics(s, cfg.eval.top_k))
            evals.append({"step": step, "elapsed_s": time.perf_counter() - t0, METRIC: m[METRIC]})
            logger.info("single %s step %d  %.1f s  %s %.3f", reward, step, evals[-1]["elapsed_s"], METRIC, m[METRIC])
            if m[METRIC] >= target:
                hit = evals[-1]
    return {"side": "single", "reward": reward, "actors": 0, "evals": evals, "steps": step,
            "trajectories": step * cfg.learner.batch_size, "time_to_target_s": hit and hit["elapsed_s"]}


def run_gfn_dist(reward: str, delay_ms: float, target: float, max_steps: int, eval_every: int, actors: int,
                 seed: int, run_dir: Path) -> dict:
    """gfn_dist's trainer with ``actors`` rollout actors (module doc) for ``max_steps`` learner steps; the
    time to the target is read from its evaluation rows afterwards."""
    overrides = [
        *task_overrides(reward, delay_ms), f"rollout.num_actors={actors}", f"run.seed={seed}",
        f"eval.interval_steps={eval_every}", f"logging.log_every={eval_every}", f"learner.max_steps={max_steps}", "logging.progress_bar=false", "logging.wandb.mode=disabled",
        "checkpoint.interval_steps=0", "run.save_policy=false", f"run.dir={run_dir}",
    ]
    cfg = load_config(str(PRESET), overrides)
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if METRIC in r]
    evals = [{"step": r["step"], "elapsed_s": r["elapsed_s"], METRIC: r[METRIC]} for r in rows]
    hit = next((e for e in evals if e[METRIC] >= target), None)
    last = read_jsonl(run_dir / "metrics.jsonl")[-1]
    return {"side": "gfn_dist", "reward": reward, "actors": actors, "evals": evals, "steps": last["step"],
            "trajectories": last.get("trajectories"), "time_to_target_s": hit and hit["elapsed_s"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter budgets (the whole script in ~15 minutes)")
    p.add_argument("--json", default=None, help="write {'rows': [...]} here")
    p.add_argument("--rewards", nargs="+", default=["qed", "oracle"], choices=["qed", "oracle"])
    p.add_argument("--actors", type=int, nargs="+", default=None,
                   help="gfn_dist runs (default: 2 for qed -- two cores --, 1 and 8 for oracle)")
    p.add_argument("--target", type=float, default=0.50, help=f"{METRIC} to reach")
    p.add_argument("--delay-ms", type=float, default=1000.0, help="oracle latency per batch of 64")
    p.add_argument("--budget-s", type=float, default=None, help="single loop's limit (default 600; --quick 240)")
    p.add_argument("--dist-steps", type=int, default=None,
                   help="gfn_dist's learner steps per run (default 3000; --quick 1500)")
    p.add_argument("--single-eval-every", type=int, default=None, help="steps (default: qed 100, oracle 10)")
    p.add_argument("--dist-eval-every", type=int, default=100, help="learner steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    os.environ.setdefault("PYTHONPATH", str(ROOT))  # Ray workers import examples.molecules
    budget = args.budget_s or (240.0 if args.quick else 600.0)
    rows = []
    for reward in args.rewards:
        single_every = args.single_eval_every or (100 if reward == "qed" else 10)
        rows.append(run_single(reward, args.delay_ms, args.target, budget, single_every, args.seed))
        for n in args.actors or ([2] if reward == "qed" else [1, 8]):
            steps = args.dist_steps or (1500 if args.quick else 3000)
            rows.append(run_gfn_dist(reward, args.delay_ms, args.target, steps, args.dist_eval_every, n, args.seed,
                                     Path("/tmp") / f"ttr_{reward}_{n}_{time.time_ns()}"))
        for r in rows:
            if r["reward"] == reward:
                logger.info("%-6s %-8s actors=%d  time to %s >= %.2f: %s s  (%s steps, %s trajectories)", reward,
                            r["side"], r["actors"], METRIC, args.target, r["time_to_target_s"] and
                            round(r["time_to_target_s"], 1), r["steps"], r["trajectories"])
    out = {"rows": rows, "target": args.target, "delay_ms": args.delay_ms, "budget_s": budget,
           "cores": os.cpu_count(), "load_average_1min_at_end": os.getloadavg()[0]}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        logger.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
