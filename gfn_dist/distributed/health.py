"""Fault tolerance: supervised rollout actors, recoverable replay shards, screened rewards, a loopback-only Ray.

Rollout actors (``ActorSupervisor``, driver / rank 0). Ray restarts a dead actor
process (``rollout.max_restarts``) by re-running its constructor. A driver
thread watches every actor's ``run`` call; when one ends with an error (the
process died, or ``run`` raised) it calls ``run`` again -- after a death once
Ray reports the actor alive -- and the actor loads the newest published weights
before its first batch. Meanwhile shards fed only by down actors are *starved*
on the learner's ``ReplayClient``, which draws from the other shards instead of
waiting on a rate limiter no insert will open. An actor is up again once it
pushed a batch, which resets its count of consecutive failures; the run fails
with one message (actor, count, last error) after ``rollout.max_consecutive_failures``
failures in a row or once Ray's restart budget is spent.

Replay shards (``ShardPersistence``, re-exported from
``gfn_dist.distributed.shard_persistence``): an insert journal and snapshots, so
a shard Ray restarts restores its contents and reports the items lost.

Stalls. An actor whose batch count has not grown for ``rollout.stall_timeout_s``
(a reward call that never returns, a stopped process) -- time its push spends
waiting on a rate-limited shard (back-pressure) does not count -- is reported (log line
naming the actor and its node; metric ``actors/stalls``), killed, and restarted
by Ray like a crashed actor.

Rewards are screened in the actors (``gfn_dist.distributed.reward_screen``); the
embedded Ray binds loopback only (``gfn_dist.distributed.cluster.loopback_only_ray``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import ray
from ray.exceptions import RayActorError

from gfn_dist.distributed.ray_compat import actor_info, actor_state, was_restarted_by_ray
from gfn_dist.distributed.shard_persistence import ShardPersistence
from gfn_dist.distributed.waiting import Deadline, WaitStopped

__all__ = [
    "ActorFailure",
    "ActorSupervisor",
    "FailureEvent",
    "ShardPersistence",
    "was_restarted_by_ray",
]  # ShardPersistence and was_restarted_by_ray: re-exported

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- rollout actor supervision


@dataclass
class FailureEvent:
    """One failure of a rollout actor.

    Attributes:
        actor_id: the actor.
        kind: ``died`` (the process died; Ray restarts it), ``unreachable`` (calls
            failed but Ray kept it alive), ``error`` (``run`` raised) or
            ``stopped`` (``run`` returned before training ended).
        error: the error's first line.
        step_failed: the learner step when the failure was seen.
        step_recovered: the learner step when the actor had pushed again (None until then).
        time_failed, time_recovered: the same moments, ``time.monotonic()`` seconds.
    """

    actor_id: int
    kind: str
    error: str
    step_failed: int
    step_recovered: int | None = None
    time_failed: float = 0.0
    time_recovered: float | None = None


class ActorFailure(RuntimeError):
    """A rollout actor failed more often than the configuration allows."""


class ActorSupervisor:
    """Watches the rollout actors' ``run`` calls, restarts them, keeps the learner fed (see module doc).

    A death is counted from Ray's own restart count of the actor (the GCS actor
    table): calls to a restarting actor fail at once, so one death can end
    several ``run`` calls; ``run`` is called again when Ray reports the actor
    alive.

    Args:
        actors: rollout actor handles, actor i at index i.
        num_shards: number of replay shards (actor i feeds shard ``i % num_shards``).
        replay: the learner's ``ReplayClient`` (its ``starved`` set is maintained); None to skip.
        max_restarts: ``rollout.max_restarts`` (-1: unlimited).
        max_consecutive_failures: ``rollout.max_consecutive_failures``.
        poll_interval_s: how often the thread looks at the ``run`` calls.
        stats_interval_s: how often it asks the actors for their counters.
        restart_timeout_s: the run fails if Ray has not restarted a dead actor after this.
        step_fn: returns the learner's current step (else the step last passed to ``check``).
        stall_timeout_s: an actor whose batch count has not grown for this long (a hung reward
            call, a stopped process) is reported, killed and restarted like a crashed actor
            (``rollout.stall_timeout_s``; None: never).
        warn: where the supervisor's warnings go (one line each: failures, returns, stalls);
            default this module's logger. A Ray Train learner passes its driver channel, since
            its own log does not reach the driver.
    """

    def __init__(
        self,
        actors: Sequence[Any],
        num_shards: int,
        replay=None,
        max_restarts: int = 3,
        max_consecutive_failures: int = 3,
        poll_interval_s: float = 0.2,
        stats_interval_s: float = 1.0,
        restart_timeout_s: float = 300.0,
        step_fn: Callable[[], int] | None = None,
        stall_timeout_s: float | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        n = len(actors)
        self._warn = warn if warn is not None else lambda message: logger.warning("%s", message)
        self.actors = list(actors)
        self.num_shards = int(num_shards)
        self.replay = replay
        self.max_restarts = int(max_restarts)
        self.max_consecutive_failures = int(max_consecutive_failures)
        self.poll_interval_s = float(poll_interval_s)
        self.stats_interval_s = float(stats_interval_s)
        self.restart_timeout_s = float(restart_timeout_s)
        self._step = 0  # the learner's step, as last reported through check()
        self._step_fn = step_fn
        self.events: list[FailureEvent] = []
        self.restarts = [0] * n  # process deaths (each one a Ray restart)
        self.failures = [0] * n
        self.consecutive = [0] * n
        self._runs: dict[int, Any] = {}  # actor -> pending run() reference
        self._outages: dict[int, dict[str, Any]] = {}  # actor whose process died -> since, Ray restarts before, error
        self._ray_restarts = [0] * n  # Ray's restart count of each actor, as last seen
        self._down: dict[int, int] = {}  # actor -> num_batches it must exceed to count as up again
        self._stats: list[dict] = [{} for _ in range(n)]  # latest stats() of each actor's current process
        self._carried: list[dict[str, int]] = [{} for _ in range(n)]  # counters of its earlier processes
        self._stats_refs: dict[int, Any] = {}
        self._next_stats = 0.0
        self._hinted: set[str] = set()
        self._fatal: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stall_timeout_s = stall_timeout_s
        self.stalls = [0] * n  # stalled processes killed
        self._progress = [(-1, time.monotonic()) for _ in range(n)]  # (num_batches, when it last grew)

    # ------------------------------------------------------------------ public

    def start(self) -> None:
        """Starts every actor's ``run`` and the watching thread.

        Ray's restart count of each actor is read first: after a learner restart the actors
        may have been restarted before, and only later deaths are this supervisor's to count.
        """
        self._ray_restarts = [int((actor_info(a) or {}).get("NumRestarts", 0)) for a in self.actors]
        self._runs = {k: a.run.remote() for k, a in enumerate(self.actors)}
        self._thread = threading.Thread(target=self._loop, name="actor-supervisor", daemon=True)
        self._thread.start()

    @property
    def step(self) -> int:
        """The learner's step (for the failure events)."""
        return int(self._step_fn()) if self._step_fn is not None else self._step

    @property
    def run_refs(self) -> list:
        """The pending ``run`` references (current processes)."""
        return list(self._runs.values())

    def check(self, step: int | None = None) -> None:
        """Records the learner step; raises ``ActorFailure`` if the run must stop (called by the learner)."""
        if step is not None:
            self._step = int(step)
        if self._fatal is not None:
            raise ActorFailure(self._fatal)

    def close(self) -> None:
        """Stops the watching thread (before the actors are told to stop)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def metrics(self) -> dict[str, float]:
        """Metric row entries: ``actors/*``, ``rollout/rejected_*``, ``rollout/dropped`` (the ``replay/*``
        entries come from the learner's ``ReplayClient.stats()``, ``gfn_dist.train_loop``)."""
        with self._lock:
            totals = self._totals()
            row: dict[str, float] = {
                "actors/restarts": sum(self.restarts),
                "actors/failures": sum(self.failures),
                "actors/down": len(self._down),
                "actors/stalls": sum(self.stalls),
                "rollout/rejected_nan": totals.get("rejected_nan", 0),
                "rollout/rejected_posinf": totals.get("rejected_posinf", 0),
                "rollout/rejected_neginf": totals.get("rejected_neginf", 0),
                "rollout/dropped": totals.get("dropped_trajectories", 0),
            }
        return row

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        while not self._stop.is_set() and self._fatal is None:
            try:
                self.poll(timeout_s=self.poll_interval_s)
            except Exception as err:  # never die silently: the learner raises it at its next check
                logger.exception("actor supervisor failed")
                self._fatal = f"actor supervisor failed: {err!r}"

    def poll(self, timeout_s: float = 0.0) -> None:
        """One round: ended ``run`` calls, restarted actors, counters, starved shards."""
        refs = {ref: k for k, ref in self._runs.items()}
        if refs:
            ray.wait(list(refs), num_returns=1, timeout=timeout_s)  # the thread's sleep, cut short by an end
            done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        else:
            done = []
            time.sleep(timeout_s)
        if self._stop.is_set():
            return
        for ref in done:
            self._on_run_ended(refs[ref], ref)
        if self._outages and self._fatal is None:
            self._resume_restarted()
        self._poll_stats()
        self._kill_stalled()
        self._update_starved()

    def _on_run_ended(self, k: int, ref) -> None:
        del self._runs[k]
        try:
            ray.get(ref)
            kind, error = "stopped", "run() returned before training ended"
        except RayActorError as err:  # the process died (or is unreachable): see _resume_restarted
            if k not in self._outages:
                self._start_outage(k, _first_line(err))
            return
        except Exception as err:  # run() raised: the process is alive, its error is the cause
            kind, error = "error", _first_line(getattr(err, "cause", None) or err)
        if self._record_failure(k, kind, error):
            return
        baseline = int(self._stats[k].get("num_batches", 0))
        try:  # the same process goes on counting: it is up again once num_batches grows
            baseline = int(ray.get(self.actors[k].stats.remote(), timeout=10.0)["num_batches"])
        except Exception as err:  # it died meanwhile: the next run() failure says so
            logger.debug("stats of actor %d: %s", k, err)
        with self._lock:
            self._down[k] = baseline
        self._runs[k] = self.actors[k].run.remote()

    def _start_outage(self, k: int, error: str) -> None:
        self._outages[k] = {"since": time.monotonic(), "restarts_before": self._ray_restarts[k], "error": error}
        with self._lock:
            for key, value in self._stats[k].items():  # a new process counts from zero
                if isinstance(value, int) and not isinstance(value, bool):
                    self._carried[k][key] = self._carried[k].get(key, 0) + value
            self._stats[k] = {}
            self._down[k] = 0
            self._stats_refs.pop(k, None)  # an answer from the dead process would be stale
        self._progress[k] = (-1, time.monotonic())  # the new process counts from zero
        self._warning("rollout actor %d is unreachable (%s); waiting for Ray to restart it", k, error)

    def _resume_restarted(self) -> None:
        """Counts the deaths Ray restarted, and calls ``run`` again on each actor Ray reports alive."""
        now = time.monotonic()
        for k, outage in list(self._outages.items()):
            info = actor_info(self.actors[k])
            state = None if info is None else info.get("State")
            seen = outage["restarts_before"] if info is None else int(info.get("NumRestarts", 0))
            if info is None and not outage.get("counted"):  # no actor table: one death per outage
                seen, outage["counted"] = seen + 1, True
            while self._ray_restarts[k] < seen:
                self._ray_restarts[k] += 1
                if self._record_failure(k, "died", outage["error"]):
                    return
            if state == "DEAD":
                self._fatal = (
                    f"rollout actor {k} died and Ray did not restart it (rollout.max_restarts="
                    f"{self.max_restarts}); last failure: {outage['error']}"
                )
                return
            if state == "ALIVE" or (info is None and now > outage["since"] + 2.0):
                if self._ray_restarts[k] == outage["restarts_before"] and info is not None:
                    if now < outage["since"] + 2.0:  # Ray may not have noticed the death yet
                        continue
                    if self._record_failure(k, "unreachable", outage["error"]):  # alive, not restarted
                        return
                del self._outages[k]
                self._progress[k] = (-1, now)  # a restarted process gets stall_timeout_s from its return
                self._runs[k] = self.actors[k].run.remote()
            elif now > outage["since"] + self.restart_timeout_s:
                self._fatal = (
                    f"rollout actor {k} was not restarted within {self.restart_timeout_s:g} s "
                    f"(Ray reports it {state}); last failure: {outage['error']}"
                )
                return

    def _record_failure(self, k: int, kind: str, error: str) -> bool:
        """Counts one failure of actor ``k``; returns True (and sets the fatal message) if the run must stop."""
        with self._lock:
            self.failures[k] += 1
            self.consecutive[k] += 1
            self.events.append(FailureEvent(k, kind, error, self.step, time_failed=time.monotonic()))
            if kind == "died":
                self.restarts[k] += 1
        self._warning(
            "rollout actor %d %s (failure %d in a row, %d in all): %s",
            k,
            kind,
            self.consecutive[k],
            self.failures[k],
            error,
        )
        if self.consecutive[k] >= self.max_consecutive_failures:
            self._fatal = (
                f"rollout actor {k} failed {self.consecutive[k]} times in a row without pushing a batch "
                f"in between (rollout.max_consecutive_failures={self.max_consecutive_failures}); "
                f"last failure ({kind}): {error}"
            )
        elif kind == "died" and 0 <= self.max_restarts < self.restarts[k]:
            self._fatal = (
                f"rollout actor {k} died {self.restarts[k]} times; Ray's restart budget "
                f"(rollout.max_restarts={self.max_restarts}) is spent; last failure: {error}"
            )
        return self._fatal is not None

    def _poll_stats(self) -> None:
        now = time.monotonic()
        every = now >= self._next_stats
        if every:
            self._next_stats = now + self.stats_interval_s
        for k, actor in enumerate(self.actors):  # down actors every round: notice their return at once
            if (every or k in self._down) and k not in self._stats_refs and k not in self._outages:
                self._stats_refs[k] = actor.stats.remote()
        if not self._stats_refs:
            return
        refs = {ref: k for k, ref in self._stats_refs.items()}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in done:
            k = refs[ref]
            if self._stats_refs.get(k) is not ref:
                continue
            del self._stats_refs[k]
            try:
                stats: dict[str, Any] = ray.get(cast(ray.ObjectRef, ref))  # a ready ref from ray.wait
            except Exception as err:  # the process died; its run() reference reports it
                logger.debug("stats of actor %d: %s", k, err)
                continue
            batches = int(stats.get("num_batches", 0))
            # Growing, or answering while its push waits on a rate-limited shard (back-pressure from a
            # slow learner, not a hang; a stopped process does not answer, a hung reward call is not waiting).
            if batches > self._progress[k][0] or stats.get("waiting_on_replay"):
                self._progress[k] = (batches, time.monotonic())
            with self._lock:
                self._stats[k] = stats
                if k in self._down and k not in self._outages and int(stats.get("num_batches", 0)) > self._down[k]:
                    del self._down[k]
                    self.consecutive[k] = 0
                    for event in self.events:
                        if event.actor_id == k and event.step_recovered is None:
                            event.step_recovered, event.time_recovered = self.step, time.monotonic()
                    self._warning(
                        "rollout actor %d is back: pushing again with policy version %s", k, stats.get("policy_version")
                    )
        self._hint_rejections()

    def _kill_stalled(self) -> None:
        """Reports and kills an actor whose batch count has not grown for ``stall_timeout_s``; Ray restarts it
        and its ``run`` call then ends like a crash's (counted against ``rollout.max_restarts``)."""
        if self.stall_timeout_s is None:
            return
        now = time.monotonic()
        for k, actor in enumerate(self.actors):
            if k in self._outages or k not in self._runs or now - self._progress[k][1] < self.stall_timeout_s:
                continue
            info = actor_info(actor) or {}
            node = (info.get("Address") or {}).get("NodeID", "unknown node")
            self._warning(
                "rollout actor %d (node %s) produced nothing for %.0f s (rollout.stall_timeout_s=%g): "
                "killing it; Ray restarts it",
                k,
                node,
                now - self._progress[k][1],
                self.stall_timeout_s,
            )
            with self._lock:
                self.stalls[k] += 1
            self._progress[k] = (self._progress[k][0], now)  # one kill per stall
            ray.kill(actor, no_restart=False)

    def _warning(self, fmt: str, *args: Any) -> None:
        self._warn(fmt % args)

    def _hint_rejections(self) -> None:
        with self._lock:
            totals = self._totals()
        if totals.get("rejected_neginf", 0) and "neginf" not in self._hinted:
            self._hinted.add("neginf")
            self._warning(
                "rollout actors rejected trajectories with log-reward -inf (zero reward); set "
                "loss.log_reward_clip_min (e.g. -100) to train on them (metric rollout/rejected_neginf)"
            )
        for key in ("rejected_nan", "rejected_posinf"):
            if totals.get(key, 0) and key not in self._hinted:
                self._hinted.add(key)
                self._warning(
                    "rollout actors rejected trajectories with %s log-reward (metric rollout/%s): "
                    "check the reward function",
                    "NaN" if key == "rejected_nan" else "+inf",
                    key,
                )

    def _totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for stats, carried in zip(self._stats, self._carried, strict=True):
            for src in (stats, carried):
                for key, value in src.items():
                    if isinstance(value, int) and not isinstance(value, bool):
                        out[key] = out.get(key, 0) + value
        return out

    def _update_starved(self) -> None:
        """Shards whose producers are all down: the learner's client draws from the others meanwhile."""
        if self.replay is None or not self.actors:
            return
        with self._lock:
            down = set(self._down)
        producers: dict[int, list[int]] = {}
        for k in range(len(self.actors)):
            producers.setdefault(k % self.num_shards, []).append(k)
        starved = frozenset(s for s, ks in producers.items() if all(k in down for k in ks))
        if starved != getattr(self.replay, "starved", frozenset()):
            self.replay.starved = starved


def wait_until_alive(handle, timeout_s: float, should_stop=None, interval_s: float = 0.2) -> str:
    """Waits while Ray restarts an actor (calls to it fail meanwhile).

    Args:
        handle: the actor.
        timeout_s: give up after this.
        should_stop: optional callable; True ends the wait early.
        interval_s: seconds between looks at the actor table.

    Returns:
        ``ALIVE``, ``DEAD``, ``TIMEOUT`` or ``STOPPED`` (``ALIVE`` after one
        interval when Ray cannot tell).
    """
    wait = Deadline(
        max(timeout_s, 1e-9), initial_backoff_s=interval_s, max_backoff_s=interval_s, should_stop=should_stop
    )
    while True:
        state = actor_state(handle)
        if state is None:
            time.sleep(interval_s)
            return "ALIVE"
        if state in ("ALIVE", "DEAD"):
            return state
        if wait.expired:
            return "TIMEOUT"
        try:
            wait.pause()
        except WaitStopped:
            return "STOPPED"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
