"""Stand-in trainer for the SLURM template tests (not collected by pytest).

Speaks the trainer's command line (``CONFIG [key.sub=value ...]``) and its
torchrun contract, and records what a launch template handed it, so
``tests/test_slurm.py`` can check the plumbing (ranks, nodes, Ray address,
``resume=true`` after a requeue, SIGTERM forwarding) in seconds:

* under torchrun every rank joins a gloo group and all-reduces ``rank + 1``;
* rank 0 appends one row to ``RUN_DIR/metrics.jsonl`` (``run.dir=`` is
  required) with ``world_size``, the all-reduced sum, each rank's SLURM node,
  the overrides it received and, with ``cluster.address=``, the number of
  alive Ray nodes it sees there;
* ``standin.sleep_s=S`` then waits up to S seconds (not when ``resume=true``:
  a resumed run finishes at once); a SIGTERM in that window makes every rank
  write a ``{"event": "checkpoint", "rank": r}`` row (what the real trainer
  does on SIGTERM) and exit 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write("usage: slurm_standin.py CONFIG [key.sub=value ...]\n")
        return 2
    config, overrides = argv[0], dict(a.split("=", 1) for a in argv[1:])
    if "run.dir" not in overrides:
        sys.stderr.write("slurm_standin.py: run.dir= is required\n")
        return 2
    terminated = []
    signal.signal(signal.SIGTERM, lambda *_: terminated.append(time.time()))

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    me = {"rank": rank, "host": socket.gethostname(), "node": os.environ.get("SLURMD_NODENAME"),
          "local_rank": int(os.environ.get("LOCAL_RANK", 0))}
    if world_size > 1:
        dist.init_process_group("gloo")
        x = torch.tensor([float(rank + 1)])
        dist.all_reduce(x)
        ranks = [None] * world_size
        dist.all_gather_object(ranks, me)
        allreduce = x.item()
    else:
        ranks, allreduce = [me], 1.0

    ray_nodes = None
    if rank == 0 and overrides.get("cluster.address"):
        import ray

        ray.init(address=overrides["cluster.address"], log_to_driver=False)
        ray_nodes = sum(1 for n in ray.nodes() if n["Alive"])
        ray.shutdown()

    run_dir = overrides["run.dir"]
    row = {"step": 1, "world_size": world_size, "allreduce": allreduce, "ranks": ranks, "config": config,
           "overrides": overrides, "ray_nodes": ray_nodes}
    sleep_s = 0.0 if overrides.get("resume") == "true" else float(overrides.get("standin.sleep_s", 0))
    deadline = time.time() + sleep_s
    os.makedirs(run_dir, exist_ok=True)
    if rank == 0:
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    while time.time() < deadline and not terminated:
        time.sleep(0.1)
    if terminated:  # every rank: each must have got the signal
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"event": "checkpoint", "signal": "SIGTERM", "rank": rank}) + "\n")
    if world_size > 1 and not terminated:
        dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
