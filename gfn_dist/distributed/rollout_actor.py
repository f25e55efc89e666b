"""Rollout actor: samples trajectories with the newest published policy and pushes them to replay.

``RolloutWorker`` is a plain class (usable in-process, e.g. by tests and the
benchmark); ``create_rollout_actors`` runs it on Ray (as ``RolloutActor``). A worker is
built from the (plain-data) ``TrainConfig`` and its ``actor_id``: it builds its
own environment, policy copy (P_F, and P_B for local search) and sampler, so no
live object crosses process boundaries. Its loop (``run``):

1. check the weight store's long poll (answered when a newer version is
   published; checking costs no round trip); load the weights when the version changed;
2. sample a batch (``Sampler`` / ``LocalSearchSampler`` with the exploration
   ``policy_kwargs``);
3. take its fields in the replay format (``Trajectories.batch_fields(max_length=env.max_traj_len)``,
   the keys of ``to_tensordict`` without building the TensorDict), tag every
   trajectory with ``policy_version`` and ``actor_id`` (int64) and pack them into
   one bytes object (``distributed/wire.py``);
4. push it to replay shard ``actor_id % num_shards`` (``ReplayShard.try_add``),
   retrying while the rate limiter refuses. One push stays in flight while
   the next batch is sampled, which hides the transport and insert time.

A recurrent policy's carry lives in the sampler's ``RolloutContext`` for the
duration of one rollout and is never part of the pushed TensorDict.

Faults (``gfn_dist.distributed.health``): trajectories with a NaN / +inf
log-reward, or -inf without ``loss.log_reward_clip_min``, are dropped before the
push and counted; a push whose shard died is dropped and counted (the next one
waits for Ray to restart the shard); Ray restarts a dead actor
(``rollout.max_restarts``) and the driver's ``ActorSupervisor`` starts its loop again.

Seeds: actor ``i`` seeds torch with ``run.seed + i``. Each actor uses one
intra-op thread (``torch.set_num_threads(1)``): actors are the unit of parallelism.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import ray
import torch
from ray.exceptions import RayActorError
from tensordict import TensorDict

from gfn_dist.distributed.health import wait_until_alive
from gfn_dist.distributed.replay_client import ReplayClient
from gfn_dist.distributed.replay_shard import get_replay_shards
from gfn_dist.distributed.reward_screen import RewardScreen
from gfn_dist.distributed.waiting import WaitStopped
from gfn_dist.distributed.weight_store import WeightSubscriber
from gfn_dist.distributed.wire import pack_wire, td_to_wire, tensors_to_wire

if TYPE_CHECKING:  # the run layer's config, read through its attributes only
    from gfn_dist.config import TrainConfig

#: ``build(cfg, device) -> (env, policies, sampler, sample_kwargs)``: how a worker builds its
#: environment, policy copy and sampler; the run layer passes ``gfn_dist.builders.build_rollout_parts``
#: (a module-level function: Ray pickles it by reference, the actor imports it).
RolloutBuilder = Callable[[Any, torch.device], tuple]

logger = logging.getLogger(__name__)

#: Keys of a pushed batch (``log_probs`` is not shipped: learners recompute it).
SHIPPED_KEYS = ("states", "actions", "terminating_idx", "log_rewards", "policy_version", "actor_id")


def actor_device(cfg: TrainConfig) -> torch.device:
    """CUDA when the actor was given a GPU share and CUDA is visible, else CPU."""
    if cfg.rollout.num_gpus_per_actor > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class RolloutWorker:
    """One rollout actor (see module doc).

    Args:
        cfg: the run's configuration.
        actor_id: this actor's index (seed offset and replay routing).
        build: builds ``(env, policies, sampler, sample_kwargs)`` from ``(cfg, device)``
            (``RolloutBuilder``; the run layer's ``gfn_dist.builders.build_rollout_parts``).
        shard_handles: replay shard actor handles (None: ``sample_batch`` only, no pushing).
        weight_store: ``WeightStore`` actor handle (None: keep the initial weights).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        actor_id: int,
        build: RolloutBuilder,
        shard_handles: Sequence[Any] | None = None,
        weight_store: Any = None,
    ) -> None:
        torch.set_num_threads(1)
        self.cfg = cfg
        self.actor_id = int(actor_id)
        self.seed = cfg.run.seed + self.actor_id
        torch.manual_seed(self.seed)
        self.device = actor_device(cfg)
        self.env, policies, self.sampler, self.sample_kwargs = build(cfg, self.device)
        self.policies = policies.to(self.device).eval()
        self.replay = None
        self.shard_index = None
        if shard_handles is not None:
            self.replay = ReplayClient(shard_handles, timeout_s=cfg.replay.timeout_s)
            self.shard_index = self.replay.shard_for_actor(self.actor_id)
        self.weights = None
        if weight_store is not None:
            self.weights = WeightSubscriber(weight_store, self.policies)
        self.policy_version = -1 if weight_store is not None else 0
        self.num_batches = 0
        self.num_trajectories = 0
        self.sample_time_s = 0.0
        self.push_time_s = 0.0
        self.versions_used: list[int] = []
        self._stop = False
        self.screen = RewardScreen(cfg.loss.log_reward_clip_min, self.actor_id)
        self.num_dropped = 0  # trajectories of pushes lost with a dead shard
        # True while a push waits for its shard to accept it (rate limiter): back-pressure, not a stall
        self.waiting_on_replay = False
        self._loop_lock = threading.Lock()  # one run() loop at a time
        self._loop_owner: int | None = None  # thread of the newest run() call; older loops end

    # ------------------------------------------------------------------ one batch

    @torch.no_grad()
    def sample_batch(self) -> TensorDict:
        """Samples one batch and returns it in the wire format, tagged (CPU, batch size ``(N,)``)."""
        fields, n = self.sample_fields()
        return TensorDict(fields, batch_size=[n])

    @torch.no_grad()
    def sample_fields(self) -> tuple[dict[str, torch.Tensor], int]:
        """Samples one push: ``(fields, N)``, the shipped keys (``SHIPPED_KEYS``) as CPU tensors ``(N, ...)``.

        ``ceil(rollout.trajectories_per_push / rollout.sampler_batch_size)`` sampler calls;
        before each call after the first, newer published weights are loaded (a
        local check), and each trajectory is tagged with the version that sampled it.
        What ``run`` pushes; ``sample_batch`` is the same as a TensorDict.
        """
        r = self.cfg.rollout
        per_call = min(r.sampler_batch_size or r.trajectories_per_push, r.trajectories_per_push)
        sizes = [per_call] * (r.trajectories_per_push // per_call)
        if r.trajectories_per_push % per_call:
            sizes.append(r.trajectories_per_push % per_call)
        parts = []
        for i, size in enumerate(sizes):
            if i:
                self.refresh_weights()
            parts.append(self._tagged_fields(self.sampler.sample_trajectories(self.env, n=size, **self.sample_kwargs)))
            if not self.versions_used or self.versions_used[-1] != self.policy_version:
                self.versions_used.append(self.policy_version)
        fields = parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        n = fields["log_rewards"].shape[0]
        if fields["log_rewards"].device.type != "cpu":
            fields = {k: v.cpu() for k, v in fields.items()}
        return fields, n

    def _tagged_fields(self, traj) -> dict[str, torch.Tensor]:
        """The shipped fields of one sampler call, unusable log-rewards screened out, tagged."""
        # Learners recompute log P_F under the current policy: log_probs are not shipped.
        fields = traj.batch_fields(max_length=self.env.max_traj_len, log_probs=False)
        n = traj.n_trajectories
        if not bool(torch.isfinite(fields["log_rewards"]).all()):
            td = self.screen(TensorDict(fields, batch_size=[n]))  # unusable rows dropped and counted
            fields, n = dict(td.items()), td.batch_size[0]
        dev = fields["log_rewards"].device
        fields["policy_version"] = torch.full((n,), self.policy_version, dtype=torch.int64, device=dev)
        fields["actor_id"] = torch.full((n,), self.actor_id, dtype=torch.int64, device=dev)
        return fields

    def refresh_weights(self) -> bool:
        """Loads newer published weights; returns True when the run asked to stop."""
        if self.weights is None:
            return self._stop
        latest, stopped = self.weights.poll_overlapped()
        if self.weights.refresh(latest):
            self.policy_version = self.weights.version
        return stopped or self._stop

    def _superseded(self) -> bool:
        """Whether a newer ``run`` call took over from the loop running in this thread."""
        return self._loop_owner is not None and self._loop_owner != threading.get_ident()

    @staticmethod
    def encode(batch: TensorDict | dict, n: int | None = None) -> bytes:
        """A batch (TensorDict, or ``sample_fields``' dict with its size ``n``) as packed wire bytes."""
        if isinstance(batch, TensorDict):
            return pack_wire(td_to_wire(batch))
        return pack_wire(tensors_to_wire(batch, [n]))  # type: ignore[list-item]  # a dict batch comes with its size n

    def submit_push(self, payload: bytes):
        """Sends a batch (``encode``'s bytes) to this actor's shard without waiting; returns the
        pending ``try_add`` reference."""
        # By value, packed into one bytes object (wire.py: the cheapest argument for a Ray call); Ray
        # inlines small batches in the call and spills large ones to the object store itself.
        return self.replay.submit_add(payload, self.shard_index)  # type: ignore[union-attr, arg-type]  # an actor that pushes has a replay client

    def complete_push(self, pending, payload: bytes, n: int) -> bool:
        """Waits for a submitted push to be accepted (``ReplayClient.complete_add``: resubmitted while
        the rate limiter refuses).

        Args:
            pending: the reference ``submit_push`` returned.
            payload: what was submitted (resubmitted as is).
            n: its number of trajectories.

        Returns:
            False if the run stopped while waiting (the batch is dropped).

        Raises:
            ValueError: if the shard rejected the batch as invalid (naming the field).
            TimeoutError: if the limiter refused for ``replay.timeout_s``, naming its condition.
            RuntimeError: if the shard died and Ray did not restart it (see ``_push_lost``).
        """
        self.waiting_on_replay = True
        try:
            self.replay.complete_add(pending, payload, self.shard_index, should_stop=self._run_stopped)  # type: ignore[union-attr, arg-type]  # an actor that pushes has a replay client
            return True
        except RayActorError as err:  # the shard died: drop this batch, wait for Ray to restart the shard
            return self._push_lost(n, err)
        except WaitStopped:  # rate limited while training ended
            return False
        except (ValueError, TimeoutError) as err:
            raise type(err)(f"rollout actor {self.actor_id}: {err}") from err
        finally:
            self.waiting_on_replay = False

    def _push_lost(self, n: int, err: Exception) -> bool:
        """A push of ``n`` trajectories failed with its shard's death: counts them as dropped, waits
        for the restarted shard.

        Returns:
            False if the run stopped while waiting.

        Raises:
            RuntimeError: if Ray gave the shard up or did not restart it within ``replay.timeout_s``.
        """
        self.num_dropped += n
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        logger.warning(
            "rollout actor %d: replay shard %s died during a push (%s); %d trajectories dropped",
            self.actor_id,
            self.shard_index,
            first,
            n,
        )
        state = wait_until_alive(self.replay.shards[self.shard_index], self.cfg.replay.timeout_s, self._run_stopped)  # type: ignore[union-attr, index]  # an actor that pushes has a replay client
        if state in ("DEAD", "TIMEOUT"):
            raise RuntimeError(
                f"rollout actor {self.actor_id}: replay shard {self.shard_index} is "
                f"{'gone (replay.max_restarts spent)' if state == 'DEAD' else 'not back'} "
                f"after a push failed: {first}"
            ) from err
        return state != "STOPPED"

    def push(self, td: TensorDict) -> bool:
        """Pushes ``td`` and waits until it is accepted (see ``complete_push``)."""
        payload = self.encode(td)
        return self.complete_push(self.submit_push(payload), payload, td.batch_size[0])

    def _run_stopped(self) -> bool:
        """Whether the run asked to stop, or a newer ``run`` call took over (no weight loading: the
        pending batch keeps its version)."""
        if self.weights is None or self._stop or self._superseded():
            return self._stop or self._superseded()
        return self.weights.poll()[1]

    # ------------------------------------------------------------------ loop

    def run(self, max_batches: int | None = None) -> dict:
        """Sample-and-push loop until the weight store says stop (or ``max_batches``).

        Waits for the first published weights before sampling, so no trajectory
        comes from the actor's own random initialisation. One push is kept in
        flight: batch k+1 is sampled while the shard inserts batch k, and batch
        k must be accepted before batch k+1 is sent (so the rate limiter still
        paces every batch).

        One loop runs at a time: a new call (a restarted learner's supervisor; the
        call of the failed one outlives its caller) makes a running loop end after
        its current batch or push wait, then takes over.

        Returns:
            ``stats()`` at the end.

        Raises:
            ValueError: if the worker was built without replay shards, or a shard rejected a batch.
            TimeoutError: if the rate limiter refused a push for ``replay.timeout_s``.
            RuntimeError: if this actor's shard died and Ray did not restart it.
        """
        if self.replay is None:
            raise ValueError("RolloutWorker.run: built without shard_handles; nothing to push to")
        me = threading.get_ident()
        self._loop_owner = me  # a loop still running in another thread ends
        with self._loop_lock:
            try:
                return self.stats() if self._superseded() else self._loop(max_batches)  # superseded while waiting
            finally:
                if self._loop_owner == me:
                    self._loop_owner = None

    def _loop(self, max_batches: int | None) -> dict:
        poll_every = self.cfg.rollout.weight_poll_every
        in_flight = None  # (pending try_add reference, payload, number of trajectories)
        stopped = False
        while (max_batches is None or self.num_batches < max_batches) and not self._superseded():
            if self.policy_version < 0 or self.num_batches % poll_every == 0:
                stopped = self.refresh_weights()
                if stopped:
                    break
                if self.policy_version < 0:
                    time.sleep(0.01)
                    continue
            t0 = time.perf_counter()
            fields, n = self.sample_fields()
            t1 = time.perf_counter()
            payload = self.encode(fields, n)
            if in_flight is not None and not self.complete_push(*in_flight):
                stopped = True
                break
            in_flight = (self.submit_push(payload), payload, n)
            self.push_time_s += time.perf_counter() - t1
            self.sample_time_s += t1 - t0
            self.num_batches += 1
            self.num_trajectories += n
        if in_flight is not None and not stopped:
            self.complete_push(*in_flight)
        return self.stats()

    def stop(self) -> None:
        """Asks ``run`` to return after the current batch (callable concurrently on a Ray actor)."""
        self._stop = True

    def stats(self) -> dict:
        """Counters: ``actor_id``, ``policy_version``, ``num_batches``, ``num_trajectories``,
        ``num_weight_updates``, ``versions_used`` (distinct versions in the order used),
        ``sample_time_s`` and ``push_time_s`` (cumulative), ``rejected_nan`` / ``rejected_posinf`` /
        ``rejected_neginf`` (trajectories dropped for their log-reward), ``dropped_trajectories``
        (lost with a dead shard) and ``waiting_on_replay`` (a push is waiting for its shard)."""
        return {
            "actor_id": self.actor_id,
            "policy_version": self.policy_version,
            "num_batches": self.num_batches,
            "num_trajectories": self.num_trajectories,
            "num_weight_updates": 0 if self.weights is None else self.weights.num_updates,
            "versions_used": list(self.versions_used),
            "sample_time_s": self.sample_time_s,
            "push_time_s": self.push_time_s,
            **self.screen.stats(),
            "dropped_trajectories": self.num_dropped,
            "waiting_on_replay": self.waiting_on_replay,
        }


class RolloutActor(RolloutWorker):
    """The ``RolloutWorker`` that ``create_rollout_actors`` runs on Ray: it looks its
    ``cfg.replay.num_shards`` replay shards (``replay_shard.get_replay_shards``) and its
    weight store up by their Ray actor names.

    Names, not handles, are its constructor arguments: Ray keeps a constructor
    argument that holds actor handles in the object store, and a restartable
    actor's restart then depends on that object surviving (ray-project/ray#53727;
    Ray logs an error when such an actor is created). Strings are inlined in the
    actor's creation task, and a restarted actor looks the names up again.

    Raises:
        ValueError: (from ``ray.get_actor``) if a shard or the store is not found in
            ``namespace``; the actor's creation then fails with it.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        actor_id: int,
        build: RolloutBuilder,
        namespace: str | None,
        replay_prefix: str,
        store_name: str,
    ) -> None:
        shards = get_replay_shards(cfg.replay.num_shards, name_prefix=replay_prefix, namespace=namespace)
        super().__init__(cfg, actor_id, build, shards, ray.get_actor(store_name, namespace=namespace))


def rollout_actor_name(namespace_prefix: str, actor_id: int) -> str:
    """Ray actor name of rollout actor ``actor_id``."""
    return f"{namespace_prefix}_rollout_{int(actor_id)}"


def create_rollout_actors(
    cfg: TrainConfig,
    build: RolloutBuilder,
    replay_prefix: str,
    store_name: str,
    *,
    name_prefix: str | None = None,
    namespace: str | None = None,
) -> list:
    """Creates ``cfg.rollout.num_actors`` ``RolloutWorker`` Ray actors (``RolloutActor``).

    The actors find the ``cfg.replay.num_shards`` replay shards and the weight store
    by name in ``namespace``: ``replay_prefix`` is the shards' ``name_prefix`` in
    ``create_replay_shards``, ``store_name`` the store's ``name``; see ``RolloutActor`` for why.

    Each reserves ``rollout.num_cpus_per_actor`` CPUs and ``rollout.num_gpus_per_actor``
    GPUs (fractional allowed) and allows two concurrent calls, so ``stats`` /
    ``stop`` answer while ``run`` is looping. Ray restarts a dead actor up to
    ``rollout.max_restarts`` times; calls in flight then fail (no retries: the
    ``ActorSupervisor`` calls ``run`` again). Their calls are Ray task events only with
    ``cluster.task_events`` (``topology`` module doc).

    Args:
        build: how each actor builds its environment, policies and sampler (``RolloutBuilder``).

    Returns:
        actor handles, actor 0 first.
    """
    remote_cls = ray.remote(RolloutActor)
    handles = []
    for i in range(cfg.rollout.num_actors):
        options: dict[str, Any] = {
            "num_cpus": cfg.rollout.num_cpus_per_actor,
            "num_gpus": cfg.rollout.num_gpus_per_actor,
            "max_concurrency": 2,
            "max_restarts": cfg.rollout.max_restarts,
            "max_task_retries": 0,
            "enable_task_events": cfg.cluster.task_events,  # topology module doc
        }
        if name_prefix is not None:
            options["name"] = rollout_actor_name(name_prefix, i)
        if namespace is not None:
            options["namespace"] = namespace
        handles.append(remote_cls.options(**options).remote(cfg, i, build, namespace, replay_prefix, store_name))
    return handles
