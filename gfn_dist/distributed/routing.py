"""Replay routing: which shard an actor's inserts go to, and how a draw is split over the shards."""

from __future__ import annotations

from collections.abc import Sequence


def shard_for_actor(actor_id: int, num_shards: int) -> int:
    """Shard index that rollout actor ``actor_id`` inserts into: ``actor_id % num_shards``.

    Raises:
        ValueError: if ``num_shards < 1``.
    """
    if int(num_shards) < 1:
        raise ValueError(f"shard_for_actor: num_shards must be >= 1, got {num_shards}")
    return int(actor_id) % int(num_shards)


def allocate_proportional(n: int, sizes: Sequence[int]) -> list[int]:
    """Splits ``n`` draws over shards in proportion to ``sizes`` (largest-remainder method).

    Shard i first gets ``floor(n * sizes[i] / sum(sizes))``; the draws left over
    go, one each, to the shards with the largest remainders ``n * sizes[i] mod
    sum(sizes)``, ties broken by lower index. Exact integer arithmetic, so the
    result is deterministic given ``(n, sizes)``; empty shards get nothing.

    Args:
        n: number of draws (>= 0).
        sizes: non-negative shard sizes, not all zero when ``n > 0``.

    Returns:
        list of non-negative ints summing to ``n``.

    Raises:
        ValueError: if ``n < 0``, a size is negative, or all sizes are 0 while ``n > 0``.
    """
    n = int(n)
    sizes = [int(s) for s in sizes]
    if n < 0:
        raise ValueError(f"allocate_proportional: n must be >= 0, got {n}")
    if any(s < 0 for s in sizes):
        raise ValueError(f"allocate_proportional: sizes must be >= 0, got {sizes}")
    total = sum(sizes)
    if total == 0:
        if n > 0:
            raise ValueError("allocate_proportional: all shards are empty")
        return [0] * len(sizes)
    counts = [n * s // total for s in sizes]
    remainders = [n * s % total for s in sizes]
    left = n - sum(counts)
    for i in sorted(range(len(sizes)), key=lambda i: (-remainders[i], i))[:left]:
        counts[i] += 1
    return counts
