"""Versioned policy weights in the Ray object store, behind a small named actor.

Rank 0 of the learners ``ray.put``s a CPU copy of the policies' ``state_dict``
and hands the store the object reference with its version (the learner step
that produced it). Rollout actors poll ``poll()`` (one cheap call per batch)
and fetch the weights only when the version changed. The store holds only the
newest reference, so older weights are freed by Ray's reference counting.

Object references are passed wrapped in a one-element list: Ray resolves a
top-level ``ObjectRef`` argument into its value, which would copy the weights
into the store actor; inside a list the reference itself is kept.

The store also carries the run's stop flag, so actors learn that training is
over from the same poll. Actors long-poll (``WeightSubscriber.poll_overlapped``):
one ``wait_newer`` call stays outstanding and returns as soon as a newer version
is published (or the run stops), and the actor checks it locally between
batches (``ray.wait`` with no timeout, no round trip). So an actor costs the
store one call per published version (or per ``long_poll_s`` when nothing is
published), not one per batch; weights are fetched only when the version changed.
The store is a threaded actor (``max_concurrency``) so that waiting long polls
do not hold up ``publish``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray
import torch
from torch import nn

from gfn_dist.distributed.wire import state_dict_from_wire, state_dict_to_wire

logger = logging.getLogger(__name__)


class WeightStore:
    """Newest published ``(version, [state_dict_ref])`` and a stop flag (wrap with ``create_weight_store``)."""

    def __init__(self) -> None:
        self._version = -1
        self._refs: list | None = None
        self._stopped = False
        self._num_publishes = 0
        self._changed = threading.Condition()  # notified on publish and stop (wakes long polls)

    def publish(self, version: int, state_dict_ref: list, reset: bool = False) -> int:
        """Stores ``state_dict_ref`` (``[ObjectRef]``) as ``version``; older versions are ignored
        unless ``reset``: a learner's first publish (a restarted learner resumes at an older step,
        and the newer weights' owner, the failed learner, is gone).

        Returns:
            the newest version held after the call.

        Raises:
            ValueError: if ``state_dict_ref`` is not a one-element list.
        """
        if not isinstance(state_dict_ref, (list, tuple)) or len(state_dict_ref) != 1:
            raise ValueError("WeightStore.publish: pass the reference wrapped as [ref] (Ray resolves bare refs)")
        with self._changed:
            if int(version) > self._version or reset:
                self._version = int(version)
                self._refs = list(state_dict_ref)
                self._num_publishes += 1
                self._changed.notify_all()
            return self._version

    def latest_version(self) -> int:
        """Newest published version (-1 before the first publish)."""
        return self._version

    def get(self) -> tuple[int, list | None]:
        """``(version, [state_dict_ref])``; ``(-1, None)`` before the first publish."""
        with self._changed:
            return self._version, self._refs

    def poll(self) -> tuple[int, bool]:
        """``(latest_version, stopped)`` now."""
        return self._version, self._stopped

    def wait_newer(self, version: int, timeout_s: float = 1.0) -> tuple[int, bool]:
        """Long poll: ``(latest_version, stopped)`` as soon as a version newer than ``version``
        is published or the run stops, else after ``timeout_s`` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: self._version > version or self._stopped, timeout=timeout_s)
            return self._version, self._stopped

    def stop(self) -> None:
        """Tells every rollout actor to finish its loop."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()

    def stats(self) -> dict:
        """``version``, ``num_publishes`` and ``stopped``."""
        return {"version": self._version, "num_publishes": self._num_publishes, "stopped": self._stopped}


#: Threads of the store actor: one per waiting long poll (one per rollout actor) plus
#: publishes and stats. Beyond it, polls queue and return after their timeout.
STORE_MAX_CONCURRENCY = 256


def create_weight_store(name: str | None = None, namespace: str | None = None, task_events: bool = False):
    """A ``WeightStore`` Ray actor (no CPU reserved, threaded), optionally named for ``ray.get_actor``.

    Ray restarts the store if its process dies, and retries the calls that were
    in flight on the new one (``max_restarts`` / ``max_task_retries`` unlimited). A
    restarted store starts empty (version -1, not stopped): actors keep their
    loaded weights and take the learner's next publish; the weights themselves
    live in the object store, owned by the learner, so a store's death loses none.

    ``task_events``: whether Ray records the store's calls (publishes, long polls) as task
    events in the GCS; off by default (``cluster.task_events``, ``topology`` module doc).
    """
    options: dict[str, Any] = {
        "num_cpus": 0,
        "enable_task_events": bool(task_events),
        "max_concurrency": STORE_MAX_CONCURRENCY,
        "max_restarts": -1,
        "max_task_retries": -1,
    }
    if name is not None:
        options["name"] = name
    if namespace is not None:
        options["namespace"] = namespace
    return ray.remote(WeightStore).options(**options).remote()


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` detached, on CPU, for ``ray.put`` (which copies it into the object store)."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


class WeightPublisher:
    """Learner side: puts weights in the object store and publishes them without blocking.

    Publish calls are fire-and-forget (a Ray actor runs one caller's calls in
    order, so the store sees versions in order); finished calls are reaped on
    the next publish so that an error surfaces there, and at most
    ``max_in_flight`` calls are outstanding (back-pressure if the store lags).

    Args:
        store: a ``WeightStore`` actor handle.
        max_in_flight: outstanding publish calls before ``publish`` blocks.
    """

    def __init__(self, store, max_in_flight: int = 2) -> None:
        self.store = store
        self.max_in_flight = int(max_in_flight)
        self._pending: list = []

    def publish(self, version: int, module: nn.Module, reset: bool = False) -> None:
        """Publishes ``module``'s weights as ``version`` (``reset``: even if the store holds a newer one)."""
        ref = ray.put(state_dict_to_wire(cpu_state_dict(module)))  # numpy: no torch pickling
        self._pending.append(self.store.publish.remote(int(version), [ref], bool(reset)))
        done, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
        if len(self._pending) >= self.max_in_flight:
            done_more, self._pending = ray.wait(self._pending, num_returns=len(self._pending) - self.max_in_flight + 1)
            done += done_more
        ray.get(done)  # re-raises a failed publish

    def flush(self) -> None:
        """Waits for every outstanding publish."""
        ray.get(self._pending)
        self._pending = []


class WeightSubscriber:
    """Actor side: loads newer published weights into a module.

    Args:
        store: a ``WeightStore`` actor handle.
        module: the module to load into (on any device).
    """

    #: Seconds a long poll waits at most for a newer version.
    long_poll_s: float = 1.0

    def __init__(self, store, module: nn.Module) -> None:
        self.store = store
        self.module = module
        self.version = -1
        self.num_updates = 0
        self._poll_ref: Any = None  # a ray.ObjectRef
        self._poll_future: Any = None  # the long poll as a concurrent future: done() is a local flag read
        self._known: tuple[int, bool] = (-1, False)

    def poll(self) -> tuple[int, bool]:
        """``(latest published version, stopped)``, asked now (one round trip)."""
        self._known = tuple(ray.get(self.store.poll.remote()))
        return self._known

    def poll_overlapped(self) -> tuple[int, bool]:
        """``(latest published version, stopped)`` as known from the outstanding long poll.

        The first call polls synchronously and sends a ``wait_newer`` long poll;
        later calls only check locally whether it has returned (no round trip and
        no Ray call: a flag set by the reference's completion, ~0.1 us against
        ~60 us for ``ray.wait(timeout=0)`` in a busy actor). When it has, its
        answer is taken and the next long poll sent. A version
        is seen at the first call after its publish reached the store, so policy
        lag stays within the bound of tests/test_trainer_ray.py.
        """
        if self._poll_ref is None:
            self._known = tuple(ray.get(self.store.poll.remote()))
        else:
            if not self._poll_future.done():
                return self._known
            self._known = tuple(ray.get(self._poll_ref))
        self._poll_ref = self._poll_future = None
        if not self._known[1]:  # no poll needed once the run stopped
            self._poll_ref = self.store.wait_newer.remote(max(self._known[0], self.version), self.long_poll_s)
            self._poll_future = self._poll_ref.future()
        return self._known

    def refresh(self, latest_version: int | None = None) -> bool:
        """Loads the newest weights if their version differs from the loaded one (newer, or older
        after a restarted learner's ``reset`` publish).

        Args:
            latest_version: the version ``poll`` returned (asked for when None).

        Returns:
            whether new weights were loaded.
        """
        if latest_version is None:
            latest_version, _ = self.poll()
        if latest_version == self.version or latest_version < 0:
            return False
        version, refs = ray.get(self.store.get.remote())
        if refs is None or version == self.version:
            return False
        self.module.load_state_dict(state_dict_from_wire(ray.get(refs[0])))
        self.version = int(version)
        self.num_updates += 1
        return True
