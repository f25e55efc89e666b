"""Client of the replay shards, used by learners (sample) and rollout actors (add).

Shard calls never block on the shard side (``ReplayShard.try_add`` /
``try_sample`` refuse at once when the rate limiter says no); this client does
the waiting: it retries refused calls with exponential backoff until a timeout,
then raises ``TimeoutError`` naming the limiter condition that blocked.

Routing: inserts from rollout actor ``actor_id`` go to shard
``actor_id % num_shards`` (``shard_for_actor``). Sampling: ``sample(n)`` splits
n over the shards in proportion to their current sizes with the
largest-remainder method (``allocate_proportional``), draws every share in
parallel and concatenates the results, shard 0's items first.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from tensordict import TensorDict

logger = logging.getLogger(__name__)


def shard_for_actor(actor_id: int, num_shards: int) -> int:
    """Shard index that rollout actor ``actor_id`` inserts into: ``actor_id % num_shards``.

    Raises:
        ValueError: if ``num_shards < 1``.
    """
    if int(num_shards) < 1:
        raise ValueError(f"shard_for_actor: num_shards must be >= 1, got {num_shards}")
    return int(actor_id) % int(num_shards)


def allocate_proportional(n: int, sizes: Sequence[int]) -> List[int]:
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


class ReplayClient:
    """Thin client over a list of ``ReplayShard`` actor handles.

    Holds only actor handles and numbers, so it can itself be shipped to Ray actors.

    Args:
        shard_handles: Ray actor handles of the shards, shard 0 first.
        timeout_s: default seconds ``add`` / ``sample`` wait on the rate limiter.
        initial_backoff_s: first wait after a refusal; doubles up to ``max_backoff_s``.
        max_backoff_s: longest wait between retries.

    Raises:
        ValueError: if there are no shards or a time is not positive.
    """

    def __init__(
        self,
        shard_handles: Sequence[Any],
        timeout_s: float = 60.0,
        initial_backoff_s: float = 0.001,
        max_backoff_s: float = 0.05,
    ) -> None:
        self.shards = list(shard_handles)
        if not self.shards:
            raise ValueError("ReplayClient: shard_handles is empty")
        if timeout_s <= 0 or initial_backoff_s <= 0 or max_backoff_s <= 0:
            raise ValueError(
                f"ReplayClient: timeout_s, initial_backoff_s and max_backoff_s must be > 0, "
                f"got {timeout_s}, {initial_backoff_s}, {max_backoff_s}"
            )
        self.timeout_s = float(timeout_s)
        self.initial_backoff_s = float(initial_backoff_s)
        self.max_backoff_s = float(max_backoff_s)

    @property
    def num_shards(self) -> int:
        """Number of shards."""
        return len(self.shards)

    def shard_for_actor(self, actor_id: int) -> int:
        """Shard index for rollout actor ``actor_id`` (``actor_id % num_shards``)."""
        return shard_for_actor(actor_id, self.num_shards)

    # ------------------------------------------------------------------ insert

    def add(self, td: TensorDict, shard_index: int, timeout_s: Optional[float] = None) -> int:
        """Inserts a batch into one shard, waiting while the rate limiter refuses.

        Args:
            td: TensorDict ``(N,)`` in the replay format.
            shard_index: target shard (use ``shard_for_actor`` to route by actor id).
            timeout_s: seconds to wait on the rate limiter (``self.timeout_s`` if None).

        Returns:
            N, the number of items inserted.

        Raises:
            IndexError: if ``shard_index`` is out of range.
            ValueError: if the shard rejected the batch as invalid (message from
                the buffer's validation, naming the field).
            TimeoutError: if the limiter still refused after ``timeout_s``,
                naming the condition.
        """
        import ray

        if not 0 <= int(shard_index) < self.num_shards:
            raise IndexError(f"ReplayClient.add: shard_index {shard_index} not in [0, {self.num_shards})")
        shard = self.shards[int(shard_index)]
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        deadline = time.monotonic() + timeout
        backoff = self.initial_backoff_s
        td_ref = ray.put(td)  # ship the batch once, not once per retry
        while True:
            result = ray.get(shard.try_add.remote(td_ref))
            if result["accepted"]:
                return int(result["num_items"])
            if result["status"] == "invalid":
                raise ValueError(f"ReplayClient.add: shard {shard_index} rejected the batch: {result['reason']}")
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(
                    f"ReplayClient.add: shard {shard_index} refused {result['num_items']} items for "
                    f"{timeout:g} s; rate limiter condition: {result['reason']}"
                )
            time.sleep(min(backoff, deadline - now))
            backoff = min(2 * backoff, self.max_backoff_s)

    # ------------------------------------------------------------------ sample

    def sizes(self) -> List[int]:
        """Current number of items in each shard."""
        import ray

        return [int(s) for s in ray.get([shard.size.remote() for shard in self.shards])]

    def sample(self, n: int, timeout_s: Optional[float] = None) -> TensorDict:
        """Draws ``n`` items over the shards in proportion to their sizes.

        The split is ``allocate_proportional(n, sizes)`` on the sizes read at
        the start (re-read while every shard is empty). Shares are requested in
        parallel; refused shares are retried (same counts) with backoff, while
        granted ones are kept.

        Args:
            n: number of items (>= 1).
            timeout_s: seconds to wait on the rate limiter (``self.timeout_s`` if None).

        Returns:
            TensorDict ``(n,)``: shard 0's share first, then shard 1's, ...

        Raises:
            ValueError: if ``n < 1``.
            TimeoutError: if shards still refused after ``timeout_s``, naming
                each blocking shard and its limiter condition.
        """
        import ray

        n = int(n)
        if n < 1:
            raise ValueError(f"ReplayClient.sample: n must be >= 1, got {n}")
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        deadline = time.monotonic() + timeout
        backoff = self.initial_backoff_s

        def wait_or_raise(blocked: Dict[int, int]) -> None:
            nonlocal backoff
            now = time.monotonic()
            if now >= deadline:
                reasons = ray.get([self.shards[i].check_sample.remote(k) for i, k in blocked.items()])
                detail = "; ".join(
                    f"shard {i} (share {k}): {r or 'unblocked just now'}" for (i, k), r in zip(blocked.items(), reasons)
                )
                raise TimeoutError(
                    f"ReplayClient.sample(n={n}): rate limiter still refused after {timeout:g} s: {detail}"
                )
            time.sleep(min(backoff, deadline - now))
            backoff = min(2 * backoff, self.max_backoff_s)

        sizes = self.sizes()
        while sum(sizes) == 0:
            wait_or_raise({i: n for i in range(self.num_shards)})
            sizes = self.sizes()
        counts = allocate_proportional(n, sizes)
        pending = {i: k for i, k in enumerate(counts) if k > 0}
        parts: Dict[int, TensorDict] = {}
        while True:
            refs = {i: self.shards[i].try_sample.remote(k) for i, k in pending.items()}
            results = dict(zip(refs.keys(), ray.get(list(refs.values()))))
            for i, part in results.items():
                if part is not None:
                    parts[i] = part
                    del pending[i]
            if not pending:
                break
            wait_or_raise(pending)
        return torch.cat([parts[i] for i in sorted(parts)], dim=0)

    # ------------------------------------------------------------------ stats / state

    def stats(self) -> Dict[str, Any]:
        """Aggregated shard statistics.

        Returns:
            dict with the sums over shards of ``size``, ``capacity``,
            ``num_inserts``, ``num_samples``, ``num_rejected``,
            ``num_add_throttled``, ``num_sample_throttled``; the overall
            observed ``samples_per_insert``; ``num_shards``; and ``shards``:
            the list of per-shard ``ReplayShard.stats()`` dicts.
        """
        import ray

        per_shard = ray.get([shard.stats.remote() for shard in self.shards])
        summed = (
            "size", "capacity", "num_inserts", "num_samples",
            "num_rejected", "num_add_throttled", "num_sample_throttled",
        )
        out: Dict[str, Any] = {k: sum(int(s[k]) for s in per_shard) for k in summed}
        out["samples_per_insert"] = out["num_samples"] / out["num_inserts"] if out["num_inserts"] else 0.0
        out["num_shards"] = self.num_shards
        out["shards"] = per_shard
        return out

    def snapshot(self) -> List[Dict[str, Any]]:
        """Snapshots of every shard (``ReplayShard.snapshot()``), shard 0 first."""
        import ray

        return ray.get([shard.snapshot.remote() for shard in self.shards])

    def restore(self, states: Sequence[Dict[str, Any]]) -> None:
        """Restores every shard from ``snapshot()`` output.

        Raises:
            ValueError: if the number of states differs from ``num_shards``.
        """
        import ray

        if len(states) != self.num_shards:
            raise ValueError(f"ReplayClient.restore: got {len(states)} shard states for {self.num_shards} shards")
        ray.get([shard.restore.remote(state) for shard, state in zip(self.shards, states)])
