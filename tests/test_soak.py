"""Soak (CI-sized): 2 rollout actors, 2 replay shards, 1 learner on the embedded Ray for ``SOAK_S`` seconds.

Checks, on the run's own embedded Ray (started by the trainer, as ``gfn-dist train`` does):

* network exposure: the GCS address is 127.0.0.1 and every listening socket of
  the driver and its Ray processes is on loopback; no dashboard;
* no errors: the run stops cleanly when asked (the SIGTERM path: checkpoint, last
  row), with no actor failure and no rejected item;
* memory: the resident set size (RSS) of every process of the pipeline -- the
  driver (learner), both rollout actors, both shards and the weight store --
  stays flat after a warm-up. Buffers are preallocated, so steady state allocates
  nothing that lives on: growth from the first sample after ``WARMUP_S`` to the
  last must stay under ``RSS_GROWTH_BOUND_MB``. A leak of one trajectory batch
  (or one published weight copy) per learner step -- ~20 KB here -- exceeds the
  bound within ~1,000 steps, which the soak runs several times over on an idle
  2-core machine (the test asserts it ran at least ``MIN_STEPS``); normal
  allocator noise of a torch process is a few MB.
* Ray's own processes: the GCS and the raylet of the embedded Ray
  (``ray_compat.embedded_session``) are sampled and bounded by
  ``RSS_GROWTH_BOUND_MB`` like the pipeline. The GCS keeps Ray's task events of
  every actor call (~3.5 KB each, ``benchmarks/gcs_growth.py``) up to ~100,000
  tasks; with them on, this soak's GCS grew ~30 KB per learner step (149 MB over
  4,642 steps in 105 s), so the bound fails within ~1,000 steps. The run's actors
  are created with task events off (``cluster.task_events``, the ``topology``
  module doc): then the GCS grew 0.1 MB over 2,790 steps (60 s soak).

``GFN_SOAK_S`` (seconds of training, default ``SOAK_S``) lengthens the soak for a measurement.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import psutil
import pytest
import ray
import torch

from gfn_dist.config import load_config
from gfn_dist.distributed import ray_compat
from gfn_dist.metrics import read_jsonl
from gfn_dist.preemption import clear_preemption, request_preemption
from gfn_dist.trainer import Trainer

pytestmark = [pytest.mark.slow, pytest.mark.cluster]  # a minutes-long soak on a local Ray

logger = logging.getLogger(__name__)

SOAK_S = float(os.environ.get("GFN_SOAK_S", "60"))  # training time
WARMUP_S = 15.0  # replay full, allocator caches and Ray buffers settled
SAMPLE_EVERY_S = 2.0
RSS_GROWTH_BOUND_MB = 24.0
MIN_STEPS = 300  # learner steps between the first and the last sample (a per-step leak must show)
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def _pid(handle) -> int:
    return ray.get(ray_compat.call_in_actor(handle, lambda self: os.getpid()))


def _listening_addresses(pids) -> list:
    out = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            out.append((conn.laddr.ip, conn.laddr.port, conn.pid))
    return out


def test_soak_two_actors_two_shards(tmp_path):
    torch.set_num_threads(1)
    assert not ray.is_initialized(), "the soak must start its own embedded Ray"
    cfg = load_config(
        None,
        [
            "model.hidden_dim=64",
            "rollout.num_actors=2",
            "rollout.trajectories_per_push=32",
            "rollout.num_cpus_per_actor=0.5",
            "replay.num_shards=2",
            "replay.capacity_per_shard=512",
            "replay.min_size_to_sample=64",
            "replay.snapshot_every_inserts=2048",
            "learner.batch_size=64",
            "learner.max_steps=1000000",
            "eval.interval_steps=0",
            "checkpoint.interval_steps=2000",
            "logging.log_every=100",
            "logging.progress_bar=false",
            f"run.dir={tmp_path / 'run'}",
        ],
    )
    trainer = Trainer(cfg)
    samples: list[dict] = []
    stop = threading.Event()
    try:
        # ---- network exposure of the embedded Ray
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        node = ray._private.worker._global_node
        assert not node.address_info.get("webui_url"), "dashboard is on"
        me = psutil.Process()
        family = {me.pid} | {p.pid for p in me.children(recursive=True)}
        listening = _listening_addresses(family)
        assert listening and all(ip in LOOPBACK for ip, _, _ in listening), listening

        # ---- RSS of every pipeline process, sampled while training
        shards = trainer.learner.replay.shards
        procs = {"driver": me}
        procs.update({f"actor_{i}": psutil.Process(_pid(a)) for i, a in enumerate(trainer.actors)})
        procs.update({f"shard_{i}": psutil.Process(_pid(s)) for i, s in enumerate(shards)})
        procs["weight_store"] = psutil.Process(_pid(trainer.store))
        _, ray_pids = ray_compat.embedded_session()
        procs.update({name: psutil.Process(pid) for name, pid in ray_pids.items()})  # gcs_server, raylet
        t_start = time.monotonic()

        def sample_rss():
            while not stop.is_set():
                row = {"t": time.monotonic() - t_start, "step": trainer.learner.step}
                row.update({name: p.memory_info().rss / 2**20 for name, p in procs.items()})
                samples.append(row)
                if row["t"] >= SOAK_S:
                    request_preemption()  # as SIGTERM would: stop after this step, checkpoint, last row
                    return
                stop.wait(SAMPLE_EVERY_S)

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        row = trainer.train()
        stop.set()
        sampler.join(timeout=10)
        failures = trainer.supervisor.metrics()
    finally:
        stop.set()
        clear_preemption()
        trainer.close()

    assert trainer.preempted and row["step"] == trainer.learner.step
    assert failures["actors/failures"] == 0 and failures["actors/restarts"] == 0
    assert row["buffer/rejected"] == 0 and failures["rollout/dropped"] == 0
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert rows and all(r["loss"] == r["loss"] for r in rows)  # finite losses throughout

    first = next(s for s in samples if s["t"] >= WARMUP_S)
    last = samples[-1]
    report = {name: (round(first[name], 1), round(last[name], 1), round(last[name] - first[name], 1)) for name in procs}
    logger.warning(
        "soak: %d steps in %.0f s after warm-up; RSS MB (start, end, growth): %s",
        last["step"] - first["step"],
        last["t"] - first["t"],
        report,
    )
    print(f"soak RSS MB (start, end, growth) over {last['step'] - first['step']} steps: {report}")
    assert last["step"] - first["step"] >= MIN_STEPS, (first, last)
    for name, (_, _, growth) in report.items():
        assert growth < RSS_GROWTH_BOUND_MB, (name, report)
