"""Launch mode ``cluster.launcher=ray``: the learners are Ray Train workers forming the DDP group.

    gfn-dist train CONFIG cluster.launcher=ray cluster.num_learners=4 [cluster.address=HEAD:6379]

The driver (``RayTrainer``) connects to ``cluster.address`` (or starts an
embedded local Ray), creates the replay shards, the weight store and the
rollout actors exactly as the other launch modes do, writes
``RUN_DIR/config.yaml``, then runs Ray Train's ``TorchTrainer`` with
``W = cluster.num_learners`` workers (``ray.train.ScalingConfig``: one bundle of
``cluster.num_cpus_per_learner`` CPUs, plus one GPU when the learners use CUDA,
per worker, placed with ``cluster.placement_strategy``). Ray Train creates the
worker actors and initialises ``torch.distributed`` in them before our code
runs (gloo on CPU, nccl on GPU; ``use_gpu`` follows ``learner.device``: ``cuda``
yes, ``cpu`` no, ``auto`` when the cluster has a GPU per learner). Every worker
runs the same ``Learner`` as a torchrun rank, with the shard handles passed in
(``ReplayClient``); rank 0 publishes the weights to the store and health-checks
the rollout actors.

Metrics flow: rank 0 -> a ``DriverChannel`` actor -> the driver. Rank 0's
``Learner`` logs into a ``ChannelMetrics`` that puts each row on the channel; a
driver thread drains it every 0.25 s into the run's ``MetricLogger``
(``RUN_DIR/metrics.jsonl`` with ``world_size = W``, TensorBoard, wandb) and the
progress bar. At the end rank 0 sends its policies' CPU state dict and the
driver writes ``RUN_DIR/policy.pt``. Metrics therefore need no filesystem
shared with the learners. (``ray.train.report`` is not used for this: Ray Train
v2 keeps only the metrics attached to checkpoints in its ``Result``, and streams
nothing to the driver during the run.)

Checkpoints, resume and preemption: every worker attaches the same
``gfn_dist.checkpoint.Checkpointer`` as a torchrun rank (rank 0 writes
``CKPT_DIR``, so with learners on other nodes RUN_DIR / ``checkpoint.dir`` must
be on a shared filesystem), restores a checkpoint when ``resume`` asks for it,
and only then does rank 0 start the rollout actors. SIGTERM / SIGINT on the
driver (``install_preemption_handlers``) is forwarded through the channel: rank 0
raises its own preemption flag, the ranks agree at the next step boundary,
checkpoint and stop.

``cluster.address`` is checked first (``wait_for_cluster``): an address that does
not answer within ``cluster.connect_timeout_s`` raises ``ClusterUnreachableError``
naming it (a ``ConnectionError``; also a ``ConfigError``, so ``gfn-dist train``
prints one line and exits 2), where ``ray.init`` alone would keep retrying for minutes.

Not supported in this mode: ``rollout.synchronous``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

# Light imports only: the DriverChannel actor's process imports this module (torch and
# the cluster helpers are imported where they are used).
from gfn_dist.config import ConfigError, TrainConfig, check_world_size, from_dict, to_dict, to_yaml
from gfn_dist.distributed import ray_compat

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- connecting


class ClusterUnreachableError(ConfigError, ConnectionError):
    """``cluster.address`` did not answer in time. A ``ConnectionError``, and a ``ConfigError``
    naming the key, so that ``gfn-dist train`` exits with one line on stderr (exit code 2)."""


def _host_port(address: str) -> tuple[str, int]:
    """``(host, port)`` of a Ray address (``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``).

    Raises:
        ClusterUnreachableError: for ``auto`` when no running cluster is recorded on this host.
        ConfigError: naming ``cluster.address`` if it has no port.
    """
    if address == "auto":
        try:  # Ray's own lookup (RAY_ADDRESS, then the address file of `ray start` on this host)
            resolved = ray_compat.resolve_auto_address()
        except ConnectionError as err:
            raise ClusterUnreachableError(f"cluster.address=auto: no running Ray cluster found ({err})") from err
        if not resolved:
            raise ClusterUnreachableError("cluster.address=auto: no running Ray cluster found on this host")
        address = resolved
    address = address.split("://", 1)[-1]
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"cluster.address: expected HOST:PORT (or ray://HOST:PORT, auto), got {address!r}")
    return host.strip("[]"), int(port)


def wait_for_cluster(address: str, timeout_s: float) -> None:
    """Waits until the Ray cluster at ``address`` accepts TCP connections (its GCS / client port).

    Retries until ``timeout_s`` (a head that is still starting is fine), then gives up.

    Args:
        address: ``cluster.address``.
        timeout_s: ``cluster.connect_timeout_s``, seconds.

    Raises:
        ClusterUnreachableError: naming the address and the timeout, if nothing answered.
        ConfigError: if the address is malformed.
    """
    host, port = _host_port(address)
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        try:
            socket.create_connection((host, port), timeout=max(0.1, min(2.0, remaining))).close()
            return
        except OSError as err:
            if time.monotonic() + 0.25 >= deadline:
                raise ClusterUnreachableError(
                    f"cluster.address={address}: no Ray cluster answered at {host}:{port} within "
                    f"{timeout_s:g} s (cluster.connect_timeout_s; last error: {err}). Start one "
                    f"(`ray start --head --port={port}`) or fix the address."
                ) from err
            time.sleep(0.25)


def learners_use_gpu(cfg: TrainConfig) -> bool:
    """Whether the learner workers reserve a GPU each (``learner.device``; ``auto``: the cluster has W GPUs)."""
    if cfg.learner.device != "auto":
        return cfg.learner.device == "cuda"
    import ray

    return ray.cluster_resources().get("GPU", 0.0) >= cfg.cluster.num_learners


# ---------------------------------------------------------------------------- rank 0 -> driver


class DriverChannel:
    """Learner rank 0 <-> driver (a Ray actor, ``num_cpus=0``): messages up, a stop request down.

    Messages are ``(kind, payload)``: ``("placement", {...})`` once, ``("row", metric_row)``
    per log step, ``("final", {...})`` at the end.
    """

    def __init__(self) -> None:
        self._messages: list = []
        self._stop = False

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
    """Rank 0's metric sink in a Ray Train worker: forwards rows to the driver (one round trip per log step).

    Args:
        channel: the ``DriverChannel`` actor handle.
    """

    def __init__(self, channel) -> None:
        self.channel = channel

    def log(self, row: dict) -> None:
        import ray

        ray.get(self.channel.put.remote("row", dict(row)))  # waited on: rows stay in order, errors surface

    def close(self) -> None:
        pass


def _forward_stop_requests(channel, done: threading.Event, poll_s: float = 0.5) -> None:
    """Rank 0 thread: raises this process's preemption flag once the driver asks to stop."""
    import ray

    from gfn_dist.checkpoint import request_preemption

    while not done.wait(poll_s):
        try:
            if ray.get(channel.stop_requested.remote(), timeout=10):
                request_preemption()
                return
        except Exception as err:  # the driver is gone: training ends through Ray Train anyway
            logger.debug("stop-request poll: %s", err)
            return


def learner_worker_loop(config: dict) -> None:
    """One learner, inside a Ray Train worker (``TorchTrainer``'s ``train_loop_per_worker``).

    ``torch.distributed`` is already initialised by Ray Train. Builds the env,
    policies and loss from the config (same seed on every rank), a ``Learner``
    on the shard handles and a ``Checkpointer`` (resuming if asked), then rank 0
    starts the rollout actors under an ``ActorSupervisor`` (as the ``Trainer``
    does), and every rank trains. Rank 0 publishes weights
    and talks to the driver (``DriverChannel``).

    Args:
        config: ``cfg`` (``to_dict`` of the ``TrainConfig``), ``shards``, ``store``,
            ``actors`` (rollout actor handles), ``channel``.
    """
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from gfn_dist.builders import build_env, build_gflownet, build_policies
    from gfn_dist.checkpoint import Checkpointer
    from gfn_dist.distributed import cluster
    from gfn_dist.distributed.health import ActorSupervisor
    from gfn_dist.distributed.learner import Learner
    from gfn_dist.distributed.replay_client import ReplayClient
    from gfn_dist.distributed.weight_store import WeightPublisher, cpu_state_dict

    cfg = from_dict(config["cfg"])
    tctx = ray.train.get_context()
    device = ray.train.torch.get_device()  # cuda:i of this worker's GPU with use_gpu, else cpu
    backend = dist.get_backend() if dist.is_initialized() else None
    ctx = cluster.DistContext(tctx.get_world_rank(), tctx.get_world_size(), tctx.get_local_rank(), "ray",
                              device, backend)
    channel, actors = config["channel"], config["actors"]
    node_id = ray.get_runtime_context().get_node_id()
    nodes = [node_id] * ctx.world_size
    if ctx.distributed:
        dist.all_gather_object(nodes, node_id)  # also a first check that the process group works
    if ctx.is_main:
        channel.put.remote("placement", {"nodes": nodes, "backend": backend, "device": str(device)})
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cluster.num_cpus_per_learner)))
    torch.manual_seed(cfg.run.seed)  # every rank builds the same initial weights
    env = build_env(cfg, device)
    policies = build_policies(cfg, env).to(device)
    gflownet = build_gflownet(cfg, env, policies)
    learner = Learner(
        cfg, env, policies, gflownet, ctx,
        replay=ReplayClient(config["shards"], timeout_s=cfg.replay.timeout_s),
        publisher=WeightPublisher(config["store"]) if ctx.is_main else None,
        metrics=ChannelMetrics(channel) if ctx.is_main else None,
    )
    learner.checkpointer = Checkpointer(cfg, ctx, cfg.run.dir, replay=learner.replay if ctx.is_main else None,
                                        actors=actors if ctx.is_main else None)
    learner.checkpointer.maybe_resume(learner)  # collective; before the actors push anything
    done, supervisor = threading.Event(), None
    if ctx.is_main:  # as the Trainer's rank 0: supervised actors (restarts, fault counters in the metrics)
        supervisor = ActorSupervisor(actors, cfg.replay.num_shards, replay=learner.replay,
                                     max_restarts=cfg.rollout.max_restarts,
                                     max_consecutive_failures=cfg.rollout.max_consecutive_failures)
        learner.health_check = lambda: supervisor.check(learner.step)
        learner.extra_metrics = supervisor.metrics
        supervisor.start()  # calls the actors' run()
        threading.Thread(target=_forward_stop_requests, args=(channel, done), daemon=True).start()
    try:
        learner.train(progress_bar=False)
    finally:
        done.set()
        if supervisor is not None:
            supervisor.close()  # before the driver stops the actors: an ending run() is no failure
    if ctx.is_main:
        ray.get(channel.put.remote("final", {"policies": cpu_state_dict(policies), "step": learner.step,
                                             "preempted": bool(learner.preempted)}))


# ---------------------------------------------------------------------------- driver


@dataclass
class LearnerSummary:
    """What the driver knows of rank 0's learner at the end (``step``, ``preempted``), as ``Trainer.learner``."""

    step: int = 0
    preempted: bool = False


class RayTrainer:
    """The driver of a ``cluster.launcher=ray`` run (see module doc); same surface as ``Trainer``.

        trainer = RayTrainer(cfg)
        try:
            row = trainer.train()
        finally:
            trainer.close()

    Args:
        cfg: the validated configuration (``cluster.launcher=ray``).
        preset: preset name, for the default run directory.

    Raises:
        ConfigError: if the launcher is not ``ray`` or the batch does not split over the learners.
        ClusterUnreachableError: (a ``ConnectionError``) if ``cluster.address`` does not answer
            within ``cluster.connect_timeout_s``.
    """

    def __init__(self, cfg: TrainConfig, preset: str = "run") -> None:
        if cfg.cluster.launcher != "ray":
            raise ConfigError(f"cluster.launcher: RayTrainer needs 'ray', got {cfg.cluster.launcher!r}")
        if cfg.rollout.synchronous:
            raise ConfigError("rollout.synchronous: not supported with cluster.launcher=ray")
        check_world_size(cfg, cfg.cluster.num_learners)  # before anything starts
        self.cfg = cfg
        self.world_size = cfg.cluster.num_learners
        self.ray_ctx = None  # cluster.RayContext
        self.handles: list = []  # actors the driver created (killed at close)
        self.actors: list = []
        self.store = None
        self.channel = None
        self.metrics = None
        self.learner = LearnerSummary()  # rank 0's step / preempted once training ended (as Trainer.learner)
        self.learner_nodes: list[str] = []  # Ray node id of each learner rank
        self.learner_backend: Optional[str] = None  # torch.distributed backend Ray Train chose
        self.last_row: dict = {}
        self._final: Optional[dict] = None
        self._t_fit = time.perf_counter()
        self._bar = None
        try:
            self._setup(preset)
        except BaseException:
            self.close()
            raise

    def _setup(self, preset: str) -> None:
        import ray

        from gfn_dist.checkpoint import resume_run_dir
        from gfn_dist.distributed import cluster
        from gfn_dist.distributed.replay_shard import create_replay_shards
        from gfn_dist.distributed.rollout_actor import create_rollout_actors
        from gfn_dist.distributed.weight_store import create_weight_store
        from gfn_dist.metrics import MetricLogger
        from gfn_dist.trainer import default_run_dir, replay_shard_config

        cfg = self.cfg
        self.run_dir = Path(cfg.run.dir or resume_run_dir(cfg, preset) or default_run_dir(preset)).absolute()
        cfg.run.dir = str(self.run_dir)  # absolute: the learner workers run elsewhere
        self.ray_ctx = cluster.start_ray(cfg)
        ns = self.ray_ctx.namespace
        replay_prefix, store_name = f"{ns}_replay", f"{ns}_weights"
        self.shards = create_replay_shards(cfg.replay.num_shards, replay_shard_config(cfg, self.world_size),
                                           name_prefix=replay_prefix, namespace=ns, num_cpus=0)
        self.store = create_weight_store(name=store_name, namespace=ns)
        self.actors = create_rollout_actors(cfg, replay_prefix, store_name, name_prefix=ns, namespace=ns)
        self.channel = ray.remote(DriverChannel).options(num_cpus=0, name=f"{ns}_driver", namespace=ns).remote()
        # Not waited for: the actors start while Ray Train brings the learners up (an actor that
        # fails to start fails rank 0's first replay or publish call, and so the run).
        self.handles = [*self.actors, *self.shards, self.store, self.channel]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.metrics = MetricLogger.from_config(cfg, self.run_dir)
        self.use_gpu = learners_use_gpu(cfg)

    # ------------------------------------------------------------------ training

    def _torch_trainer(self):
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        c = self.cfg.cluster
        resources: dict[str, float] = {"CPU": c.num_cpus_per_learner}
        if self.use_gpu:
            resources["GPU"] = 1.0
        return TorchTrainer(
            learner_worker_loop,
            train_loop_config={"cfg": to_dict(self.cfg), "shards": self.shards, "store": self.store,
                               "actors": self.actors, "channel": self.channel},
            scaling_config=ScalingConfig(num_workers=self.world_size, use_gpu=self.use_gpu,
                                         resources_per_worker=resources, placement_strategy=c.placement_strategy),
            run_config=RunConfig(name=f"{self.ray_ctx.namespace}_learners",
                                 storage_path=str(self.run_dir / "ray_train"),
                                 failure_config=FailureConfig(max_failures=0)),  # a failed learner fails the run
        )

    def train(self) -> dict:
        """Runs the W learner workers to the budget (rank 0 starts the rollout actors); returns the last row.

        Raises:
            ray.train.TrainingFailedError: if a learner worker failed (its error attached).
        """
        import torch
        from tqdm import tqdm

        self._bar = tqdm(total=self.cfg.learner.total_steps, disable=not self.cfg.logging.progress_bar,
                         desc=f"train (W={self.world_size})", unit="step", mininterval=1.0, dynamic_ncols=True)
        stop = threading.Event()
        drainer = threading.Thread(target=self._drain, args=(stop,), name="driver-channel", daemon=True)
        drainer.start()
        self._t_fit = time.perf_counter()
        try:
            self._torch_trainer().fit()
            logger.info("learner workers finished %.1f s after launch", time.perf_counter() - self._t_fit)
        finally:
            stop.set()
            drainer.join()
            self._drain_once()  # what arrived after the last poll
            self._bar.close()
        if self._final is None:
            raise RuntimeError("learner rank 0 finished without sending its final state")
        self.learner = LearnerSummary(self._final["step"], self._final["preempted"])
        if self.cfg.run.save_policy:
            torch.save({"policies": self._final["policies"], "step": self._final["step"]},
                       self.run_dir / "policy.pt")
        return self.last_row

    def _drain(self, stop: threading.Event, poll_s: float = 0.25) -> None:
        """Driver thread: handles rank 0's messages; forwards a SIGTERM / SIGINT on the driver as a stop request."""
        from gfn_dist.checkpoint import preemption_requested

        forwarded = False
        while not stop.wait(poll_s):
            try:
                if not forwarded and preemption_requested() is not None:
                    logger.warning("signal %s: asking the learners to checkpoint and stop", preemption_requested())
                    self.channel.request_stop.remote()
                    forwarded = True
                self._drain_once()
            except Exception as err:  # the channel is gone: fit() reports the cause
                logger.debug("driver channel: %s", err)
                return

    def _drain_once(self) -> None:
        import ray

        for kind, payload in ray.get(self.channel.take.remote()):
            self._handle(kind, payload)

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "row":
            self.metrics.log(payload)
            self.last_row = payload
            self._bar.update(int(payload["step"]) - self._bar.n)
            self._bar.set_postfix({k: f"{payload[k]:.4g}" for k in ("loss", "l1_exact") if k in payload},
                                  refresh=False)
        elif kind == "placement":
            self.learner_nodes, self.learner_backend = payload["nodes"], payload["backend"]
            logger.info("%d learner workers (%s, %s) on %d node(s), up %.1f s after launch", len(self.learner_nodes),
                        payload["backend"], payload["device"], len(set(self.learner_nodes)),
                        time.perf_counter() - self._t_fit)
        elif kind == "final":
            self._final = payload

    def actor_stats(self) -> list[dict]:
        """Each rollout actor's ``stats()``."""
        import ray

        return ray.get([a.stats.remote() for a in self.actors])

    def close(self) -> None:
        """Stops the rollout actors, closes the metric sinks, kills the actors, disconnects / shuts down Ray."""
        try:
            if self.store is not None:
                import ray

                try:
                    ray.get(self.store.stop.remote(), timeout=5.0)  # actors end their loop at the next poll
                except Exception as err:  # best effort: the actors are killed next anyway
                    logger.debug("stopping actors: %s", err)
            if self.metrics is not None:
                self.metrics.close()
        finally:
            from gfn_dist.distributed import cluster

            cluster.teardown(None, self.ray_ctx, self.handles)
            self.handles = []
