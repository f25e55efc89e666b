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

Shard failures: a shard whose call fails with ``RayActorError`` (its process
died; Ray may be restarting it), or that is slow to answer while Ray reports it
restarting (calls to a restarting actor wait for it), is *down*: sampling skips
it and its share goes to the live shards; a pending call to it (the probe) tells
when it is back. Shards
in ``starved`` (their rollout actors are all down, set by
``gfn_dist.distributed.health.ActorSupervisor``) are skipped too while another
shard can serve, instead of waiting on a rate limiter no insert will open.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError
from tensordict import TensorDict

from gfn_dist.distributed.health import actor_state, wait_until_alive
from gfn_dist.distributed.routing import allocate_proportional, shard_for_actor
from gfn_dist.distributed.waiting import Deadline
from gfn_dist.distributed.wire import td_from_wire, td_to_wire

logger = logging.getLogger(__name__)


class ReplayClient:
    """Thin client over a list of ``ReplayShard`` actor handles.

    Holds only actor handles and numbers, so it can itself be shipped to Ray actors.

    Args:
        shard_handles: Ray actor handles of the shards, shard 0 first.
        timeout_s: default seconds ``add`` / ``sample`` wait on the rate limiter.
        initial_backoff_s: first wait after a refusal; doubles up to ``max_backoff_s``.
        max_backoff_s: longest wait between retries.
        check_down_after_s: a shard slower than this to answer is asked about (is Ray restarting it?).

    Raises:
        ValueError: if there are no shards or a time is not positive.
    """

    def __init__(
        self,
        shard_handles: Sequence[Any],
        timeout_s: float = 60.0,
        initial_backoff_s: float = 0.001,
        max_backoff_s: float = 0.05,
        check_down_after_s: float = 0.5,
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
        self.check_down_after_s = float(check_down_after_s)
        self.starved: frozenset = frozenset()  # shards fed only by down actors (set by the actor supervisor)
        self.last_stats: dict[str, Any] | None = None  # the latest stats() (down shards: their last answer)
        self._down: dict[int, Any] = {}  # shard -> pending probe call (None: restarting); skipped until it answers
        self._next_look: dict[int, float] = {}  # shard -> when to look at Ray's actor table again
        self._gone: set = set()  # shards that will not come back (Ray's restart budget spent)
        self._shard_stats: list[dict[str, Any] | None] = [None] * len(self.shards)
        self._lock = threading.RLock()  # the learner's prefetch thread and main thread share the client

    def __getstate__(self) -> dict:  # shipped to actors: handles and numbers only, no pending probes
        state = dict(self.__dict__)
        state.update(_down={}, _gone=set(), _next_look={}, last_stats=None, _shard_stats=[None] * len(self.shards))
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    @property
    def num_shards(self) -> int:
        """Number of shards."""
        return len(self.shards)

    def shard_for_actor(self, actor_id: int) -> int:
        """Shard index for rollout actor ``actor_id`` (``actor_id % num_shards``)."""
        return shard_for_actor(actor_id, self.num_shards)

    # ------------------------------------------------------------------ shard failures

    def available(self) -> list[int]:
        """Indices of the shards not known to be down (a down shard is up again once its probe answers)."""
        with self._lock:
            return self._available()

    def _available(self) -> list[int]:
        now = time.monotonic()
        for i, probe in list(self._down.items()):
            if probe is None:  # restarting (calls fail meanwhile): look at Ray's actor table now and then
                if now < self._next_look.get(i, 0.0):
                    continue
                self._next_look[i] = now + 0.2
                state = actor_state(self.shards[i])
                if state == "DEAD":
                    self._give_up(i, "Ray did not restart it")
                elif state in ("ALIVE", None):
                    self._down[i] = self.shards[i].size.remote()
                continue
            ready, _ = ray.wait([probe], timeout=0)
            if not ready:
                continue
            try:
                ray.get(probe)
                del self._down[i]
                logger.warning("ReplayClient: replay shard %d is back", i)
            except RayActorError as err:
                if actor_state(self.shards[i]) == "DEAD":
                    self._give_up(i, str(err).splitlines()[0])
                else:
                    self._down[i] = None
        return [i for i in range(self.num_shards) if i not in self._down and i not in self._gone]

    def _give_up(self, index: int, why: str) -> None:
        del self._down[index]
        self._gone.add(index)
        logger.error("ReplayClient: replay shard %d is gone for good (replay.max_restarts spent?): %s", index, why)

    def mark_down(self, index: int, err: BaseException, probe: Any = None) -> None:
        """Skips shard ``index`` until it answers again.

        Args:
            index: the shard.
            err: why (logged).
            probe: a pending call to the shard whose answer means it is back (None: ask Ray's actor
                table until the shard is alive, then call it).
        """
        with self._lock:
            if index in self._down or index in self._gone:
                return
            self._down[index] = probe
        logger.warning(
            "ReplayClient: replay shard %d is unavailable (%s); sampling from the other shards until it is back",
            index,
            str(err).splitlines()[0] if str(err) else type(err).__name__,
        )

    def _eligible(self) -> list[int]:
        """Live shards to sample from: those not starved, or every live one if all are starved."""
        live = self.available()
        return [i for i in live if i not in self.starved] or live

    def _gather(self, refs: dict[int, Any]) -> dict[int, Any]:
        """The answers of one call per shard, without the shards found down (marked down, left out).

        A shard is down when its call raised ``RayActorError``, or when it is
        slower than ``check_down_after_s`` and Ray reports it not alive (the call
        then waits for the restart; it becomes the shard's probe).
        """
        waiting = {ref: i for i, ref in refs.items()}
        out = {}
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=self.check_down_after_s)
            for ref in ready:
                i = waiting.pop(ref)
                try:
                    out[i] = ray.get(ref)
                except RayActorError as err:
                    self.mark_down(i, err)
            for ref, i in list(waiting.items()):  # slow: a restarting shard holds the call until it is back
                state = actor_state(self.shards[i])
                if state not in ("ALIVE", None):
                    del waiting[ref]
                    self.mark_down(i, RuntimeError(f"Ray reports the shard {state}"), probe=ref)
        return out

    # ------------------------------------------------------------------ insert

    def add(self, td: TensorDict, shard_index: int, timeout_s: float | None = None) -> int:
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
        if not 0 <= int(shard_index) < self.num_shards:
            raise IndexError(f"ReplayClient.add: shard_index {shard_index} not in [0, {self.num_shards})")
        try:
            payload = td_to_wire(td)  # numpy wire format (wire.py): ~100x cheaper to ship
        except TypeError:
            payload = td  # not plain tensors: let the shard validate, refuse and count it
        payload_ref = ray.put(payload)  # ship the batch once, not once per retry
        result = self.complete_add(self.submit_add(payload_ref, shard_index), payload_ref, shard_index, timeout_s)
        return int(result["num_items"])

    def submit_add(self, payload: Any, shard_index: int):
        """Sends a batch (wire bytes, wire dict or an object reference) to shard ``shard_index`` without
        waiting; returns the pending ``try_add`` reference (for ``complete_add``)."""
        return self.shards[int(shard_index)].try_add.remote(payload)

    def complete_add(
        self,
        pending,
        payload: Any,
        shard_index: int,
        timeout_s: float | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """Waits for a submitted insert to be accepted, resubmitting while the rate limiter refuses.

        The one push path: ``add`` and the rollout actors' pipelined pushes both end here.

        Args:
            pending: the reference ``submit_add`` returned.
            payload: what was submitted (resubmitted as is).
            shard_index: its shard.
            timeout_s: seconds to wait on the rate limiter (``self.timeout_s`` if None).
            should_stop: polled between retries; True raises ``WaitStopped`` (the batch is dropped).

        Returns:
            the shard's answer (``accepted``, ``num_items``, ...).

        Raises:
            ValueError: if the shard rejected the batch as invalid (naming the field).
            TimeoutError: if the limiter refused for ``timeout_s``, naming its condition.
            WaitStopped: if ``should_stop`` said so while waiting.
            ray.exceptions.RayActorError: if the shard died (the caller decides what that costs).
        """
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        wait = Deadline(
            timeout, initial_backoff_s=self.initial_backoff_s, max_backoff_s=self.max_backoff_s, should_stop=should_stop
        )
        while True:
            result = ray.get(pending)
            if result["accepted"]:
                return result
            if result["status"] == "invalid":
                raise ValueError(f"replay shard {shard_index} rejected a batch: {result['reason']}")
            if wait.expired:
                raise TimeoutError(
                    f"replay shard {shard_index} refused {result['num_items']} items for {timeout:g} s; "
                    f"rate limiter condition: {result['reason']}"
                )
            wait.pause()  # rate limited: the learners are behind
            pending = self.submit_add(payload, shard_index)

    # ------------------------------------------------------------------ sample

    def sizes(self) -> list[int]:
        """Current number of items in each shard (0 for a shard that is down)."""
        answers = self._gather({i: self.shards[i].size.remote() for i in self.available()})
        return [int(answers.get(i, 0)) for i in range(self.num_shards)]

    def sample(
        self,
        n: int,
        timeout_s: float | None = None,
        *,
        should_stop: Callable[[], bool] | None = None,
        on_pause: Callable[[], None] | None = None,
    ) -> TensorDict:
        """Draws ``n`` items over the shards in proportion to their sizes.

        The split is ``allocate_proportional(n, sizes)`` on the sizes read at
        the start (re-read while every shard is empty). Shares are requested in
        parallel; refused shares are retried (same counts) with backoff, while
        granted ones are kept. The share of a shard that is down, or starved
        while another shard can serve (module doc), is split over the others.

        Args:
            n: number of items (>= 1).
            timeout_s: seconds to wait on the rate limiter (``self.timeout_s`` if None).
            should_stop: polled between retries; True raises ``WaitStopped``.
            on_pause: called between retries (e.g. a health check that raises).

        Returns:
            TensorDict ``(n,)``: shard 0's share first, then shard 1's, ...

        Raises:
            ValueError: if ``n < 1``.
            WaitStopped: if ``should_stop`` said so while waiting.
            TimeoutError: if shards still refused after ``timeout_s``, naming
                each blocking shard and its limiter condition (and the shards down).
        """
        n = int(n)
        if n < 1:
            raise ValueError(f"ReplayClient.sample: n must be >= 1, got {n}")
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        wait = Deadline(
            timeout,
            initial_backoff_s=self.initial_backoff_s,
            max_backoff_s=self.max_backoff_s,
            should_stop=should_stop,
            on_pause=on_pause,
        )
        parts: dict[int, list[TensorDict]] = {}
        pending: dict[int, int] = {}  # shard -> share still to draw from it
        unassigned = n  # items not yet given to a shard (at first; then those of shards that failed)

        def wait_or_raise() -> None:
            if wait.expired:
                live = self.available()
                blocked = {i: k for i, k in pending.items() if i in live}
                if unassigned:  # nothing to draw from: name every live shard's condition
                    blocked.update({i: unassigned for i in live if i not in blocked})
                reasons = self._gather({i: self.shards[i].check_sample.remote(k) for i, k in blocked.items()})
                detail = "; ".join(
                    f"shard {i} (share {k}): {reasons.get(i) or 'unblocked just now'}" for i, k in blocked.items()
                )
                down = sorted(set(range(self.num_shards)) - set(live))
                if down:
                    detail += f"; shards down: {down}"
                raise TimeoutError(
                    f"ReplayClient.sample(n={n}): rate limiter still refused after {timeout:g} s: {detail}"
                )
            wait.pause()

        while True:
            if unassigned:
                eligible = self._eligible()
                sizes = self.sizes()
                weights = [sizes[i] if i in eligible else 0 for i in range(self.num_shards)]
                if sum(weights) > 0:
                    for i, k in enumerate(allocate_proportional(unassigned, weights)):
                        if k:
                            pending[i] = pending.get(i, 0) + k
                    unassigned = 0
            moved = False
            if pending:
                results = self._gather({i: self.shards[i].try_sample.remote(k, wire=True) for i, k in pending.items()})
                for i in list(pending):
                    if i not in results:  # the shard went down: its share goes to the others
                        unassigned += pending.pop(i)
                        moved = True
                    elif results[i] is not None:
                        parts.setdefault(i, []).append(results[i])
                        del pending[i]
            if not pending and not unassigned:
                break
            eligible = self._eligible()
            for i in list(pending):  # refused by a shard that is down or starved while others can serve
                if i not in eligible:
                    unassigned += pending.pop(i)
                    moved = True
            if not moved:
                wait_or_raise()
        return torch.cat([td_from_wire(p) for i in sorted(parts) for p in parts[i]], dim=0)  # type: ignore[return-value]  # torch.cat of TensorDicts is a TensorDict

    # ------------------------------------------------------------------ stats / state

    def stats(self) -> dict[str, Any]:
        """Aggregated shard statistics.

        Returns:
            dict with the sums over shards of ``size``, ``capacity``,
            ``num_inserts``, ``num_samples``, ``num_rejected``,
            ``num_add_throttled``, ``num_sample_throttled``, ``items_lost`` and
            ``num_restarts``; the overall observed ``samples_per_insert``;
            ``num_shards``; ``num_shards_down``; and ``shards``: the list of
            per-shard ``ReplayShard.stats()`` dicts with ``available`` (a shard
            that is down reports its last answer). Also kept as ``last_stats``.
        """
        answers = self._gather({i: self.shards[i].stats.remote() for i in self.available()})
        per_shard = []
        for i in range(self.num_shards):
            if i in answers:
                self._shard_stats[i] = answers[i]
            per_shard.append({**(self._shard_stats[i] or {}), "available": i in answers})
        summed = (
            "size",
            "capacity",
            "num_inserts",
            "num_samples",
            "num_rejected",
            "num_add_throttled",
            "num_sample_throttled",
            "items_lost",
            "num_restarts",
        )
        out: dict[str, Any] = {k: sum(int(s.get(k, 0)) for s in per_shard) for k in summed}
        out["samples_per_insert"] = out["num_samples"] / out["num_inserts"] if out["num_inserts"] else 0.0
        out["num_shards"] = self.num_shards
        out["num_shards_down"] = sum(not s["available"] for s in per_shard)
        out["shards"] = per_shard
        self.last_stats = out
        return out

    def snapshot(self) -> list[dict[str, Any]]:
        """Snapshots of every shard (``ReplayShard.snapshot()``), shard 0 first.

        A shard that Ray is restarting is waited for (up to ``timeout_s``): a
        checkpoint holds every shard.

        Raises:
            RuntimeError: naming the shard, if one is gone or did not come back in time.
        """
        refs = [shard.snapshot.remote() for shard in self.shards]  # in parallel
        out = []
        wait = Deadline(self.timeout_s)
        for i, (shard, ref) in enumerate(zip(self.shards, refs, strict=True)):
            while True:
                try:
                    out.append(ray.get(ref))
                    break
                except RayActorError as err:
                    state = wait_until_alive(shard, wait.remaining_s)
                    if state != "ALIVE" or wait.expired:
                        raise RuntimeError(
                            f"ReplayClient.snapshot: replay shard {i} is {state.lower()} "
                            f"after {self.timeout_s:g} s: {str(err).splitlines()[0]}"
                        ) from err
                    ref = shard.snapshot.remote()
        return out

    def restore(self, states: Sequence[dict[str, Any]]) -> None:
        """Restores every shard from ``snapshot()`` output.

        Raises:
            ValueError: if the number of states differs from ``num_shards``.
        """
        if len(states) != self.num_shards:
            raise ValueError(f"ReplayClient.restore: got {len(states)} shard states for {self.num_shards} shards")
        ray.get([shard.restore.remote(state) for shard, state in zip(self.shards, states, strict=True)])

    # ------------------------------------------------------------------ Stateful (checkpoints)

    def state_dict(self) -> dict[str, Any]:
        """``{"shards": snapshot()}``: every shard's contents, counters and sampling RNG."""
        return {"shards": self.snapshot()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict`` (before any actor pushes)."""
        self.restore(state["shards"])
