"""Learner groups: where the W learner ranks run. Every backend runs the same training function.

A training function is ``train_fn(ctx, sink) -> result``: it runs one learner rank
(``ctx``: rank, world size, device, process group) and, on rank 0, logs metric
rows into ``sink`` (``sink.log(row)``) and returns a result dict (None on other
ranks). The run layer's ``gfn_dist.train_loop.run_learner`` is that function.

Backends:

* ``InProcessLearners`` -- this process is a learner rank: the driver of a local
  run (world size 1, no process group) or a torchrun rank (the process group is
  initialised from torchrun's environment; gloo on CPU, nccl on CUDA).
* ``RayTrainLearners`` -- ``cluster.launcher=ray``: Ray Train's ``TorchTrainer``
  starts W worker actors (one bundle of ``cpus_per_worker`` CPUs, plus a GPU when
  ``use_gpu``, each, placed with ``placement_strategy``) and initialises their
  process group; each worker calls ``train_fn``. Rank 0's rows, its placement and
  its result travel to the driver through a ``DriverChannel`` actor (a driver
  thread drains it every 0.25 s into ``on_row``); a stop request on the driver
  (SIGTERM) travels back and raises the preemption flag of rank 0's process
  through ``on_stop``. (``ray.train.report`` is not used for rows: Ray Train v2
  keeps only the metrics attached to checkpoints, and streams nothing to the
  driver during the run.)

  A failed learner fails the run, unless ``max_restarts`` (``cluster.learner_max_restarts``)
  allows Ray Train to restart the worker group (``FailureConfig(max_failures=...)``). The
  restarted workers call ``train_fn`` again with ``ctx.restart`` > 0 (counted by the channel:
  the rollout actors, replay shards and weight store are the driver's and keep running);
  the training function resumes from the newest checkpoint and rank 0 reports the step it
  resumed from (``ChannelMetrics.restarted``): the driver logs one warning and calls
  ``on_restart(restart, step)``, which drops the metric rows past that step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch.distributed as dist
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from gfn_dist.distributed.cluster import DistContext
from gfn_dist.errors import DiskFullError

logger = logging.getLogger(__name__)

TrainFn = Callable[[DistContext, Any], dict | None]


class InProcessLearners:
    """This process is one learner rank (local driver or torchrun rank).

    Args:
        ctx: this rank's ``DistContext`` (``cluster.init_distributed``).
    """

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.world_size = ctx.world_size

    def run(self, train_fn: TrainFn, sink: Any) -> dict | None:
        """Runs ``train_fn`` here; returns its result (rank 0) or None."""
        return train_fn(self.ctx, sink)


# ---------------------------------------------------------------------------- Ray Train backend


class DriverChannel:
    """Learner rank 0 <-> driver (a Ray actor, ``num_cpus=0``): messages up, a stop request down.

    Messages are ``(kind, payload)``: ``("placement", {...})`` per start of the worker group,
    ``("restart", (restart, step))`` when a restarted group resumed, ``("row", metric_row)`` per
    log step, ``("warning", message)`` for the driver's log, ``("disk_full", (errno, message))``
    when a rank stopped on a full disk, ``("final", result)`` at the end.
    """

    def __init__(self) -> None:
        self._messages: list = []
        self._stop = False
        self._starts = 0

    def start(self) -> int:
        """Rank 0 of a (re)started worker group: how many starts came before (0 on the first)."""
        self._starts += 1
        return self._starts - 1

    def put(self, kind: str, payload: Any) -> None:
        self._messages.append((kind, payload))

    def take(self) -> list:
        """Every message since the last call, oldest first."""
        out, self._messages = self._messages, []
        return out

    def request_stop(self) -> None:
        """The driver was asked to stop (SIGTERM / SIGINT): the learners checkpoint and stop."""
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop


class ChannelMetrics:
    """Rank 0's metric sink in a Ray Train worker: forwards rows to the driver (one round trip per log step)."""

    def __init__(self, channel) -> None:
        self.channel = channel

    def log(self, row: dict) -> None:
        ray.get(self.channel.put.remote("row", dict(row)))  # waited on: rows stay in order, errors surface

    def warn(self, message: str) -> None:
        """A warning for the driver's log (this worker's own log does not reach the driver)."""
        ray.get(self.channel.put.remote("warning", str(message)))

    def restarted(self, restart: int, step: int) -> None:
        """The restarted worker group (restart ``restart``) resumed at learner step ``step``: the
        driver drops its metric rows past ``step`` (they are logged again)."""
        ray.get(self.channel.put.remote("restart", (int(restart), int(step))))

    def close(self) -> None:
        pass


def _forward_stop_requests(channel, on_stop: Callable[[], None], done: threading.Event, poll_s: float = 0.5) -> None:
    """Rank 0 thread: calls ``on_stop`` once the driver asks to stop."""
    while not done.wait(poll_s):
        try:
            if ray.get(channel.stop_requested.remote(), timeout=10):
                on_stop()
                return
        except Exception as err:  # the driver is gone: training ends through Ray Train anyway
            logger.debug("stop-request poll: %s", err)
            return


def _ray_train_worker(config: dict) -> None:
    """One learner inside a Ray Train worker (``TorchTrainer``'s ``train_loop_per_worker``)."""
    tctx = ray.train.get_context()
    device = ray.train.torch.get_device()  # cuda:i of this worker's GPU with use_gpu, else cpu
    backend = dist.get_backend() if dist.is_initialized() else None
    rank, world_size = tctx.get_world_rank(), tctx.get_world_size()
    channel = config["channel"]
    node_id = ray.get_runtime_context().get_node_id()
    restart = ray.get(channel.start.remote()) if rank == 0 else 0  # > 0: Ray Train restarted the group
    nodes = [(node_id, restart)] * world_size
    if backend is not None:
        dist.all_gather_object(nodes, (node_id, restart))  # also a first check that the process group works
    restart = nodes[0][1]  # rank 0's count, on every rank
    ctx = DistContext(rank, world_size, tctx.get_local_rank(), "ray", device, backend, restart)
    done = threading.Event()
    if ctx.is_main:
        placement = {"nodes": [n for n, _ in nodes], "backend": backend, "device": str(device)}
        channel.put.remote("placement", placement)
        threading.Thread(target=_forward_stop_requests, args=(channel, config["on_stop"], done), daemon=True).start()
    try:
        result = config["train_fn"](ctx, ChannelMetrics(channel) if ctx.is_main else None)
    except DiskFullError as err:  # the driver stops with this one line, not Ray Train's report
        ray.get(channel.put.remote("disk_full", (err.errno, str(err))))
        raise
    finally:
        done.set()
    if ctx.is_main:
        ray.get(channel.put.remote("final", result))


class RayTrainLearners:
    """W learner ranks as Ray Train workers (see module doc).

    Args:
        num_workers: W.
        cpus_per_worker: CPUs each worker reserves.
        use_gpu: whether each worker reserves a GPU (nccl) or not (gloo).
        placement_strategy: Ray placement strategy of the workers' bundles.
        max_restarts: Ray Train restarts of the worker group after a worker failed (-1: unlimited).
        name: the Ray Train run name.
        storage_path: where Ray Train keeps its run state.
        namespace: the run's Ray namespace (the channel actor is created there).
        task_events: whether Ray records the channel's calls (a row per log step, a stop
            poll every 0.5 s) as task events in the GCS (``cluster.task_events``, ``topology`` module doc).
    """

    def __init__(
        self,
        num_workers: int,
        cpus_per_worker: float,
        use_gpu: bool,
        placement_strategy: str,
        max_restarts: int,
        name: str,
        storage_path: str,
        namespace: str,
        task_events: bool = False,
    ) -> None:
        self.world_size = int(num_workers)
        self.cpus_per_worker = float(cpus_per_worker)
        self.use_gpu = bool(use_gpu)
        self.placement_strategy = placement_strategy
        self.max_restarts = int(max_restarts)
        self.name = name
        self.storage_path = storage_path
        self.channel = (
            ray.remote(DriverChannel)
            .options(num_cpus=0, name=f"{namespace}_driver", namespace=namespace, enable_task_events=task_events)
            .remote()
        )
        self.nodes: list[str] = []  # Ray node id of each rank
        self.backend: str | None = None  # the torch.distributed backend Ray Train chose
        self._final: dict | None = None
        self._disk_full: tuple[int, str] | None = None  # a rank's DiskFullError (errno, message)
        self._t_fit = time.perf_counter()

    def run(
        self,
        train_fn: TrainFn,
        on_row: Callable[[dict], None],
        on_stop: Callable[[], None],
        stop_requested: Callable[[], bool],
        on_restart: Callable[[int, int], None] = lambda restart, step: None,
    ) -> dict:
        """Runs ``train_fn`` on the W workers; returns rank 0's result.

        Args:
            train_fn: the training function (pickled by reference: a module-level function).
            on_row: called on the driver with each metric row of rank 0, in order.
            on_stop: called in rank 0's process when the driver asks to stop.
            stop_requested: polled on the driver; once True, the stop request is forwarded.
            on_restart: called on the driver with ``(restart, step)`` when a restarted worker group
                resumed at ``step`` (before the rows it logs again).

        Raises:
            DiskFullError: if a worker stopped on a full disk (its one line).
            ray.train.TrainingFailedError: if a worker failed otherwise (its error attached), after
                ``max_restarts`` restarts.
            RuntimeError: if rank 0 finished without sending its result.
        """
        resources: dict[str, float] = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = 1.0
        trainer = TorchTrainer(
            _ray_train_worker,
            train_loop_config={"train_fn": train_fn, "on_stop": on_stop, "channel": self.channel},
            scaling_config=ScalingConfig(
                num_workers=self.world_size,
                use_gpu=self.use_gpu,
                resources_per_worker=resources,
                placement_strategy=self.placement_strategy,
            ),
            run_config=RunConfig(
                name=self.name,
                storage_path=self.storage_path,
                failure_config=FailureConfig(max_failures=self.max_restarts),  # 0: a failed learner fails the run
            ),
        )
        stop = threading.Event()
        drainer = threading.Thread(
            target=self._drain, args=(stop, on_row, stop_requested, on_restart), name="driver-channel", daemon=True
        )
        drainer.start()
        self._t_fit = time.perf_counter()
        failure: Exception | None = None
        try:
            trainer.fit()
            logger.info("learner workers finished %.1f s after launch", time.perf_counter() - self._t_fit)
        except Exception as err:
            failure = err
        finally:
            stop.set()
            drainer.join()
            self._drain_once(on_row, on_restart)  # what arrived after the last poll
        if failure is not None:
            if self._disk_full is not None:
                raise DiskFullError(*self._disk_full) from None
            raise failure
        if self._final is None:
            raise RuntimeError("learner rank 0 finished without sending its final state")
        return self._final

    def _drain(self, stop: threading.Event, on_row, stop_requested, on_restart, poll_s: float = 0.25) -> None:
        forwarded = False
        while not stop.wait(poll_s):
            try:
                if not forwarded and stop_requested():
                    logger.warning("stop requested: asking the learners to checkpoint and stop")
                    self.channel.request_stop.remote()  # type: ignore[union-attr]  # a Ray actor handle
                    forwarded = True
                self._drain_once(on_row, on_restart)
            except Exception as err:  # the channel is gone: fit() reports the cause
                logger.debug("driver channel: %s", err)
                return

    def _drain_once(self, on_row, on_restart) -> None:
        for kind, payload in ray.get(self.channel.take.remote()):  # type: ignore[union-attr]  # a Ray actor handle
            if kind == "row":
                on_row(payload)
            elif kind == "restart":
                restart, step = payload
                limit = "unlimited" if self.max_restarts < 0 else str(self.max_restarts)
                logger.warning(
                    "learner worker group restarted by Ray Train after a learner failed (restart %d of %s): "
                    "resumed from step %d; the metric rows past it are dropped",
                    restart,
                    limit,
                    step,
                )
                on_restart(restart, step)
            elif kind == "disk_full":
                self._disk_full = (int(payload[0]), str(payload[1]))
            elif kind == "warning":
                logger.warning("learner rank 0: %s", payload)
            elif kind == "placement":
                self.nodes, self.backend = payload["nodes"], payload["backend"]
                logger.info(
                    "%d learner workers (%s, %s) on %d node(s), up %.1f s after launch",
                    len(self.nodes),
                    payload["backend"],
                    payload["device"],
                    len(set(self.nodes)),
                    time.perf_counter() - self._t_fit,
                )
            elif kind == "final":
                self._final = payload

    @property
    def handles(self) -> list:
        """The actors this group created (killed at teardown)."""
        return [self.channel]
