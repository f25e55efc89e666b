"""The distributed pipeline on a local Ray: 2 rollout actors, 2 replay shards, 1 learner.

Policy-lag bound checked here (derivation). Before each batch, actor k reads
the weight store's answer to the poll it sent before the previous batch (and
fetches newer weights if there are any): call "pull" the moment the store
answered, t0 the learner's completed steps then, v the version the batch is
sampled with (v >= the store's latest at the pull). The actor pushes the
batch to shard k; the learner uses one of its trajectories x in draw j,
the batch of the update that starts after j completed steps: lag = j - v.

* Publishing: version p is published right after step p when p % sync_every
  == 0, with at most one publish call in flight (``WeightPublisher(max_in_flight=2)``),
  so the store already holds p - sync_every: v >= t0 - 2 * sync_every + 1.
* Prefetch (``learner.prefetch``): draw j starts while the learner has
  completed j - 1 steps, so draws t0 + 2 .. j all start after the pull.
* The learner waits until every shard holds min_size_to_sample m = capacity C
  before its first step, so both shards stay full and every draw takes exactly
  n = B / 2 items from shard k. The limiter caps what can be drawn from shard
  k after the pull at spi * (m + ΔI) + 2 * eb (insert side at the pull:
  S >= spi (I - m) - eb; sample side at the draw: S <= spi I + eb), where
  ΔI <= 3 * n_push + C - 1 counts shard k's inserts after the pull while x is
  held: the batch in flight and the batch being sampled when the store
  answered (the poll is one batch old), x's batch, and fewer than C later
  items (FIFO of capacity C).

So (j - t0 - 1) n <= spi * (3 n_push + C + m - 1) + 2 eb and
lag <= 2 * sync_every + floor((spi * (3 n_push + C + m - 1) + 2 eb) / n).

Ray task events (``topology`` module doc): the calls of a run's shards, weight
store and rollout actors never reach the GCS by default (``ray.timeline()``, read
from the GCS, has none of them after the first run), and do with
``cluster.task_events=true`` (the on-policy run, later on the same Ray).
"""

import itertools
import math
import time

import pytest
import ray
import torch

from gfn_dist.builders import build_rollout_parts
from gfn_dist.config import load_config, resolve_on_policy
from gfn_dist.distributed.rollout_actor import SHIPPED_KEYS, RolloutWorker
from gfn_dist.distributed.wire import td_from_wire
from gfn_dist.metrics import read_jsonl
from gfn_dist.trainer import Trainer

pytestmark = [pytest.mark.slow, pytest.mark.cluster]  # full pipeline runs on a local Ray

BATCH, PUSH, CAPACITY, SPI, TOLERANCE, SYNC_EVERY, STEPS = 16, 8, 16, 1.0, 16.0, 2, 40
#: The actor classes of a run's hot path (module doc).
HOT_PATH_ACTORS = frozenset({"ReplayShard", "WeightStore", "RolloutActor"})


def classes_with_task_events() -> set:
    """Actor classes with task events in the GCS (``ray.timeline``: every task since Ray started)."""
    # an event's "cat" is "task::[<actor name>:]<Class>.<method>" (or "task::<function>")
    cats = [event["cat"].removeprefix("task::") for event in ray.timeline() if "cat" in event]
    return {cat.split(".")[0].split(":")[-1] for cat in cats}


def lag_bound(cfg) -> int:
    """The bound of the module doc, from a resolved config (all shards full, equal shares)."""
    r = cfg.replay
    n = cfg.learner.batch_size // r.num_shards
    assert r.min_size_to_sample == r.capacity_per_shard and cfg.learner.batch_size % r.num_shards == 0
    assert cfg.learner.prefetch
    budget = r.samples_per_insert * (3 * cfg.rollout.trajectories_per_push + 2 * r.capacity_per_shard - 1)
    return 2 * cfg.learner.sync_every + math.floor((budget + 2 * r.samples_per_insert_tolerance) / n)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(run_dir, *extra):
    return load_config(
        None,
        [
            "model.hidden_dim=32",
            "rollout.num_actors=2",
            f"rollout.trajectories_per_push={PUSH}",
            "rollout.num_cpus_per_actor=1",
            "replay.num_shards=2",
            f"replay.capacity_per_shard={CAPACITY}",
            f"replay.min_size_to_sample={CAPACITY}",
            f"replay.samples_per_insert={SPI}",
            f"replay.samples_per_insert_tolerance={TOLERANCE}",
            "replay.timeout_s=60",
            f"learner.batch_size={BATCH}",
            f"learner.sync_every={SYNC_EVERY}",
            f"learner.max_steps={STEPS}",
            "eval.interval_steps=20",
            "logging.log_every=5",
            "logging.progress_bar=false",
            f"run.dir={run_dir}",
            *extra,
        ],
    )


def _ordered(buffer_state):
    """Stored items of a ``ReplayBuffer.state_dict()``, oldest first."""
    size, cap, pos = (int(buffer_state[k]) for k in ("size", "capacity", "write_pos"))
    order = (torch.arange(size) + (pos - size)) % cap
    return {k: v[order] for k, v in buffer_state["storage"].items()}


def test_two_actors_two_shards_one_learner(local_ray, tmp_path):
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path / "run", f"rollout.sampler_batch_size={PUSH // 2}")  # two sampler calls per push
    assert lag_bound(cfg) == 14
    trainer = Trainer(cfg)
    try:
        trainer.train()
        snapshots = trainer.learner.replay.snapshot()
        actor_stats = trainer.actor_stats()
        stats = trainer.learner.replay.stats()
        classes = classes_with_task_events()
    finally:
        trainer.close()
    assert not HOT_PATH_ACTORS & classes, classes  # cluster.task_events=false: no task events in the GCS

    # Every stored trajectory carries int64 policy_version and actor_id, and nothing else beyond the wire format.
    for shard_index, snap in enumerate(snapshots):
        items = _ordered(snap["buffer"])
        assert set(items) == set(SHIPPED_KEYS)  # no recurrent carry, no estimator outputs, no log_probs
        assert items["policy_version"].dtype == torch.int64 and items["actor_id"].dtype == torch.int64
        assert len(items["actor_id"]) == CAPACITY
        assert bool((items["actor_id"] == shard_index).all())  # routing: actor i -> shard i % 2
        versions = items["policy_version"]
        assert bool((versions[1:] >= versions[:-1]).all())  # FIFO order follows the actor's pulls
        assert bool((versions % SYNC_EVERY == 0).all())  # only published versions

    # Each actor loaded several, increasing versions.
    for s in actor_stats:
        used = s["versions_used"]
        assert used[0] == 0 and len(used) >= 3, s
        assert all(b > a for a, b in itertools.pairwise(used)), s
        assert s["num_weight_updates"] >= 3

    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(5, STEPS + 1, 5))
    assert all(r["world_size"] == 1 for r in rows)
    max_lag = max(r["policy_lag_steps_max"] for r in rows)
    assert 0 <= max_lag <= lag_bound(cfg), (max_lag, lag_bound(cfg))
    assert rows[-1]["trajectories"] == STEPS * BATCH
    assert "l1_exact" in rows[-1] and "logZ_err" in rows[-1]
    # The learner consumed what the rate limiter allowed: samples / inserts within the tolerance of the target.
    assert stats["num_samples"] == STEPS * BATCH
    assert stats["num_samples"] <= SPI * stats["num_inserts"] + 2 * TOLERANCE
    assert stats["num_samples"] >= SPI * (stats["num_inserts"] - 2 * CAPACITY) - 2 * TOLERANCE - 2 * PUSH
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "policy.pt").is_file()


def test_on_policy_switch(local_ray, tmp_path):
    """Same code path, on-policy numbers: every trajectory used ~once and a few steps old at most."""
    torch.set_num_threads(1)
    cfg = resolve_on_policy(_cfg(tmp_path / "run", "learner.on_policy=true", "rollout.num_actors=1",
                                 "replay.num_shards=1", "replay.samples_per_insert_tolerance=null",
                                 "learner.max_steps=20", "cluster.task_events=true"))
    assert cfg.replay.capacity_per_shard == cfg.replay.min_size_to_sample == BATCH
    trainer = Trainer(cfg)
    try:
        trainer.train()
        stats = trainer.learner.replay.stats()
        time.sleep(2.0)  # workers send their task events to the GCS every second
        classes = classes_with_task_events()
    finally:
        trainer.close()
    assert classes >= HOT_PATH_ACTORS, classes  # cluster.task_events=true: Ray's debugging view is back
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert max(r["policy_lag_steps_max"] for r in rows) <= lag_bound(cfg) == 5
    assert abs(stats["num_samples"] - stats["num_inserts"]) <= 2 * BATCH


def test_push_of_several_sampler_calls_tags_each_call_with_its_version():
    torch.set_num_threads(1)
    cfg = load_config(None, ["model.hidden_dim=16", "rollout.trajectories_per_push=10", "rollout.sampler_batch_size=4"])
    worker = RolloutWorker(cfg, 1, build_rollout_parts)
    calls = []

    def refresh():  # stands in for a newer published version found before a sampler call
        calls.append(worker.policy_version)
        worker.policy_version += 5
        return False

    worker.refresh_weights = refresh
    fields, n = worker.sample_fields()
    assert n == 10 and set(fields) == set(SHIPPED_KEYS)
    assert all(v.shape[0] == 10 for v in fields.values())
    assert calls == [0, 5]  # checked before the 2nd and 3rd call, not before the 1st (run() does that)
    assert fields["policy_version"].tolist() == [0] * 4 + [5] * 4 + [10] * 2  # 4 + 4 + 2: the last call smaller
    assert worker.versions_used == [0, 5, 10]
    assert bool((fields["actor_id"] == 1).all())
    # Each call's trajectories are complete and padded to the same length.
    assert fields["states"].shape[1] == worker.env.max_traj_len + 1
    assert bool((fields["terminating_idx"] >= 1).all())
    # What run() ships decodes to the same batch.
    back = td_from_wire(worker.encode(fields, n))
    assert all(torch.equal(back[k], fields[k]) for k in SHIPPED_KEYS)


def test_recurrent_carry_never_shipped():
    torch.set_num_threads(1)
    cfg = load_config(None, ["env.name=bitseq", "model.policy=lstm", "model.pb=none", "model.hidden_dim=16",
                             "rollout.trajectories_per_push=5"])
    worker = RolloutWorker(cfg, 3, build_rollout_parts)
    td = worker.sample_batch()
    assert set(td.keys()) == set(SHIPPED_KEYS)
    assert td.batch_size == torch.Size([5])
    assert bool((td["actor_id"] == 3).all()) and td["policy_version"].dtype == torch.int64
    # Nothing shaped like the LSTM state (layers, N, hidden) or per-step hidden outputs.
    assert all(v.shape[-1] != cfg.model.hidden_dim for v in td.values())
    assert td["states"].shape[1] == worker.env.max_traj_len + 1
