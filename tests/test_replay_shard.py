"""Tests of the replay shard (rate limiter, snapshot) and the client, in-process and on one local Ray."""

from __future__ import annotations

import random
import threading
import time
from fractions import Fraction

import pytest
import ray
import torch
from tensordict import TensorDict

from gfn_dist.distributed.replay_client import ReplayClient
from gfn_dist.distributed.routing import allocate_proportional, shard_for_actor
from gfn_dist.distributed.replay_shard import (
    ReplayShard,
    ReplayShardConfig,
    create_replay_shard,
    create_replay_shards,
    get_replay_shards,
)

T = 3


def make_batch(n: int, shard_id: int = 0, start: int = 0, nan_reward: bool = False) -> TensorDict:
    """n items tagged with ``shard_id`` (extra field) and consecutive ``actor_id`` from ``start``."""
    ids = torch.arange(start, start + n, dtype=torch.int64)
    log_rewards = torch.linspace(-1.0, 0.0, n)
    if nan_reward:
        log_rewards[0] = float("nan")
    return TensorDict(
        {
            "states": ids.view(n, 1, 1).expand(n, T + 1, 2).clone(),
            "actions": torch.zeros(n, T, 1, dtype=torch.int64),
            "terminating_idx": torch.full((n,), T, dtype=torch.int64),
            "log_rewards": log_rewards,
            "policy_version": torch.zeros(n, dtype=torch.int64),
            "actor_id": ids,
            "shard_id": torch.full((n,), shard_id, dtype=torch.int64),
        },
        batch_size=[n],
    )


# ---------------------------------------------------------------------- allocation / routing (no Ray)


def reference_allocation(n, sizes):
    """Largest remainder with exact fractions, written independently of the library."""
    total = sum(sizes)
    quotas = [Fraction(n * s, total) for s in sizes]
    counts = [int(q) for q in quotas]
    order = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def test_allocate_proportional_largest_remainder():
    rng = random.Random(0)
    for _ in range(300):
        sizes = [rng.randint(0, 50) for _ in range(rng.randint(1, 5))]
        if sum(sizes) == 0:
            sizes[0] = 1
        n = rng.randint(0, 200)
        counts = allocate_proportional(n, sizes)
        assert counts == reference_allocation(n, sizes)
        assert sum(counts) == n
        for c, s in zip(counts, sizes):
            assert abs(c - Fraction(n * s, sum(sizes))) < 1
            assert s > 0 or c == 0
    assert allocate_proportional(3, [5, 5, 5, 5]) == [1, 1, 1, 0]  # ties: lower index first
    with pytest.raises(ValueError, match="empty"):
        allocate_proportional(1, [0, 0])


def test_shard_for_actor():
    assert [shard_for_actor(a, 3) for a in range(7)] == [a % 3 for a in range(7)]
    with pytest.raises(ValueError, match="num_shards"):
        shard_for_actor(1, 0)


# ---------------------------------------------------------------------- rate limiter (in-process shard)


def test_min_size_blocks_sampling():
    shard = ReplayShard(capacity=20, min_size_to_sample=4, seed=0)
    shard.try_add(make_batch(3))
    assert shard.try_sample(1) is None
    assert "min_size_to_sample" in shard.check_sample(1)
    assert shard.stats()["num_sample_throttled"] == 1
    shard.try_add(make_batch(1, start=3))
    out = shard.try_sample(5)
    assert out is not None and out.batch_size == torch.Size([5])


def test_rate_limiter_scenario():
    # spi = 1, error_buffer = 2, min_size = 2: the first 2 + 2 items go in without sampling.
    shard = ReplayShard(capacity=100, min_size_to_sample=2, samples_per_insert=1.0, error_buffer=2.0, seed=0)
    for i in range(4):
        assert shard.try_add(make_batch(1, start=i))["accepted"]
    blocked = shard.try_add(make_batch(1, start=4))  # actors ahead
    assert not blocked["accepted"] and blocked["status"] == "rate_limited"
    assert "actors ahead" in blocked["reason"]
    assert shard.try_sample(7) is None  # 0 + 7 > 1 * 4 + 2: learners would be ahead
    assert "learners ahead" in shard.check_sample(7)
    assert shard.try_sample(6) is not None
    assert shard.try_sample(1) is None
    assert shard.try_add(make_batch(4, start=4))["accepted"]  # 6 >= 1 * (4 + 4 - 2) - 2
    s = shard.stats()
    assert (s["num_inserts"], s["num_samples"], s["num_rejected"]) == (8, 6, 0)
    assert (s["num_add_throttled"], s["num_sample_throttled"]) == (1, 2)
    assert s["samples_per_insert"] == pytest.approx(6 / 8)


@pytest.mark.parametrize("spi,error_buffer,min_size", [(1.0, 3.0, 2), (2.5, 4.0, 5), (0.5, 0.0, 3), (None, 0.0, 4)])
def test_rate_limiter_matches_its_definition(spi, error_buffer, min_size):
    """Random insert / sample calls: each decision equals the documented condition, evaluated here."""
    shard = ReplayShard(
        capacity=1000, min_size_to_sample=min_size, samples_per_insert=spi, error_buffer=error_buffer, seed=1
    )
    rng = random.Random(5)
    inserts = samples = 0
    decisions = set()
    for step in range(400):
        n = rng.randint(1, 4)
        if rng.random() < 0.5:
            allowed = not spi or samples >= spi * (inserts + n - min_size) - error_buffer
            result = shard.try_add(make_batch(n, start=step))
            assert result["accepted"] == allowed, (step, inserts, samples, n)
            inserts += n * allowed
        else:
            allowed = min(inserts, 1000) >= min_size and (not spi or samples + n <= spi * inserts + error_buffer)
            out = shard.try_sample(n)
            assert (out is not None) == allowed, (step, inserts, samples, n)
            samples += n * allowed
        decisions.add(allowed)
        if spi:
            assert spi * (inserts - min_size) - error_buffer <= samples <= spi * inserts + error_buffer
    assert decisions == {True, False}
    assert (shard.stats()["num_inserts"], shard.stats()["num_samples"]) == (inserts, samples)


def test_invalid_items_are_rejected_and_counted_in_process():
    shard = ReplayShard(capacity=10)
    shard.try_add(make_batch(3))
    result = shard.try_add(make_batch(4, nan_reward=True))
    assert result == {**result, "accepted": False, "status": "invalid", "num_items": 4}
    assert "log_rewards" in result["reason"]
    assert shard.stats()["num_rejected"] == 4 and shard.size() == 3


def test_config_validation():
    with pytest.raises(ValueError, match="min_size_to_sample"):
        ReplayShardConfig(capacity=3, min_size_to_sample=4)
    with pytest.raises(ValueError, match="samples_per_insert"):
        ReplayShardConfig(samples_per_insert=-1.0)
    with pytest.raises(ValueError, match="both"):
        ReplayShard(ReplayShardConfig(), capacity=4)


# ---------------------------------------------------------------------- on one local Ray
#
# Every actor is a fresh Python process importing torch + tensordict (~3 s of CPU on
# the 2 test cores), so the module creates its 4 actors once, all at the same time,
# and each test empties the ones it uses by restoring the snapshot of a new shard.

POOL_CONFIG = ReplayShardConfig(capacity=50, prioritized=True, alpha=0.5, seed=10)
LIMITED_CONFIG = ReplayShardConfig(capacity=100, min_size_to_sample=4, samples_per_insert=2.0, error_buffer=1.0, seed=0)
NUM_POOL_SHARDS = 3


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def actors(ray_local):
    pool = create_replay_shards(NUM_POOL_SHARDS, POOL_CONFIG, name_prefix="test_pool", namespace="gfn_test")
    limited = create_replay_shard(LIMITED_CONFIG, name="test_limited", namespace="gfn_test")
    ray.get([h.size.remote() for h in [*pool, limited]])  # wait until all are up
    return {"pool": pool, "limited": limited}


def emptied(handles, config):
    """Resets shards to a new shard's state (empty, zero counters) through the public restore()."""
    ray.get([h.restore.remote(ReplayShard(config).snapshot()) for h in handles])
    return handles


def test_named_shards_lookup_and_proportional_sampling(actors):
    emptied(actors["pool"], POOL_CONFIG)
    sizes = [3, 7, 12]
    looked_up = get_replay_shards(NUM_POOL_SHARDS, name_prefix="test_pool", namespace="gfn_test")
    client = ReplayClient(looked_up, timeout_s=5.0)
    for i, size in enumerate(sizes):
        client.add(make_batch(size, shard_id=i, start=100 * i), shard_index=i)
    assert client.sizes() == sizes
    draws = (1, 10, 17, 64)
    for n in draws:
        out = client.sample(n)
        assert out.batch_size == torch.Size([n])
        expected = reference_allocation(n, sizes)
        per_shard = torch.bincount(out["shard_id"], minlength=len(sizes)).tolist()
        assert per_shard == expected, (n, per_shard, expected)
        # concatenated in shard order, and every item comes from the shard its tag says
        assert out["shard_id"].tolist() == sorted(out["shard_id"].tolist())
        assert bool(((out["actor_id"] // 100) == out["shard_id"]).all())
    stats = client.stats()
    assert stats["num_samples"] == sum(draws) and stats["size"] == sum(sizes)
    assert stats["num_shards"] == 3 and stats["capacity"] == 3 * POOL_CONFIG.capacity
    assert [s["num_samples"] for s in stats["shards"]] == [
        sum(reference_allocation(n, sizes)[i] for n in draws) for i in range(3)
    ]


def test_client_rate_limiter_waits_blocks_and_names_conditions(actors):
    (handle,) = emptied([actors["limited"]], LIMITED_CONFIG)
    client = ReplayClient([handle], timeout_s=5.0)
    # min_size_to_sample = 4, samples_per_insert = 2, error_buffer = 1
    with pytest.raises(TimeoutError, match="min_size_to_sample"):
        client.sample(2, timeout_s=0.2)
    client.add(make_batch(3), shard_index=0)  # 0 >= 2 * (0 + 3 - 4) - 1

    def late_insert():  # a concurrent insert unblocks the waiting sample
        time.sleep(0.3)
        client.add(make_batch(1, start=3), shard_index=0)

    thread = threading.Thread(target=late_insert)
    start = time.monotonic()
    thread.start()
    out = client.sample(4, timeout_s=10.0)  # 0 + 4 <= 2 * 4 + 1 once size >= 4
    thread.join()
    assert out.batch_size == torch.Size([4]) and time.monotonic() - start >= 0.25
    assert client.stats()["num_sample_throttled"] >= 2

    client.add(make_batch(2, start=4), shard_index=0)  # 4 >= 2 * (4 + 2 - 4) - 1
    with pytest.raises(TimeoutError, match="actors ahead"):
        client.add(make_batch(1, start=6), shard_index=0, timeout_s=0.2)  # 4 < 2 * (6 + 1 - 4) - 1
    client.sample(9)  # 4 + 9 <= 2 * 6 + 1
    with pytest.raises(TimeoutError, match="learners ahead"):
        client.sample(1, timeout_s=0.2)  # 13 + 1 > 2 * 6 + 1
    assert client.add(make_batch(1, start=6), shard_index=0) == 1  # 13 >= 2 * (6 + 1 - 4) - 1
    assert client.sample(2).batch_size == torch.Size([2])  # 13 + 2 <= 2 * 7 + 1
    stats = client.stats()
    assert (stats["num_inserts"], stats["num_samples"], stats["num_rejected"]) == (7, 15, 0)
    assert stats["num_add_throttled"] >= 1 and stats["samples_per_insert"] == pytest.approx(15 / 7)
    assert stats["shards"][0]["target_samples_per_insert"] == 2.0


def test_rejected_items_counted(actors):
    client = ReplayClient(emptied(actors["pool"][:2], POOL_CONFIG))
    client.add(make_batch(4), shard_index=1)
    with pytest.raises(ValueError, match="log_rewards"):
        client.add(make_batch(3, nan_reward=True), shard_index=1)
    bad_dtype = make_batch(2)
    bad_dtype["actor_id"] = bad_dtype["actor_id"].int()
    with pytest.raises(ValueError, match="actor_id"):
        client.add(bad_dtype, shard_index=0)
    stats = client.stats()
    assert [s["num_rejected"] for s in stats["shards"]] == [2, 3]
    assert stats["num_rejected"] == 5 and stats["size"] == 4 and stats["num_inserts"] == 4
    with pytest.raises(IndexError):
        client.add(make_batch(1), shard_index=2)


def test_snapshot_restore_round_trip(actors, tmp_path):
    client = ReplayClient(emptied(actors["pool"][:2], POOL_CONFIG))
    client.add(make_batch(30, shard_id=0), shard_index=0)
    client.add(make_batch(40, shard_id=1, start=100), shard_index=1)
    client.add(make_batch(30, shard_id=1, start=200), shard_index=1)  # wraps shard 1 (capacity 50)
    client.sample(7)
    with pytest.raises(ValueError, match="log_rewards"):
        client.add(make_batch(2, nan_reward=True), shard_index=0)  # a rejection to carry over
    path = tmp_path / "shards.pt"
    torch.save(client.snapshot(), path)
    states = torch.load(path, weights_only=True)
    saved_stats = client.stats()
    expected_next = client.sample(25)

    # change everything the snapshot holds: contents (evictions), counters, RNG state
    client.add(make_batch(45, shard_id=0, start=300), shard_index=0)
    client.sample(11)
    client.restore(states)
    assert client.stats() == saved_stats
    assert saved_stats["num_rejected"] == 2 and saved_stats["size"] == 80
    # identical contents, counters and RNG state: the next draws are identical, field for field
    again = client.sample(25)
    for k in expected_next.keys():
        assert torch.equal(again[k], expected_next[k]), k
    with pytest.raises(ValueError, match="shard states"):
        client.restore(states[:1])
