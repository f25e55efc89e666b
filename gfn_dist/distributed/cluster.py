"""Cluster bring-up: the learners' process group and the Ray connection, one code path.

Launch modes:

* ``local`` (``gfn-dist train ...``): one learner in the driver process
  (world size 1, no process group); rank 0 starts an embedded local Ray
  (``ray.init(num_cpus=..., include_dashboard=False)``) or connects to
  ``cluster.address``.
* ``torchrun`` (``torchrun --nproc_per_node=W -m gfn_dist.train ...``, detected
  from torchrun's environment variables): every rank calls
  ``init_process_group`` (gloo on CPU, nccl on CUDA); rank 0 brings up / connects
  to Ray and creates the named actors in a namespace unique to the run, then
  broadcasts ``(address, namespace)`` (``broadcast_object_list``) so the other
  ranks connect and look the actors up with ``ray.get_actor``.
* ``ray`` (``cluster.launcher=ray``): the driver only brings up / connects to Ray
  and creates the actors; the learners are Ray Train workers whose process group
  Ray Train initialises (``gfn_dist.distributed.learner_group``).

``teardown`` always runs (``finally``): stop and kill the actors (rank 0),
disconnect / shut down Ray, destroy the process group. A GCS that no longer
answers (killed, crashed) is met with a warning and a bounded ``ray.shutdown``,
not an error: a run whose training finished still exits 0. The
processes of an embedded Ray are watched by ``session_reaper.SessionReaper``
(started before ``ray.init``): none outlives the driver by more than a few
seconds, however the driver ends (SIGKILL included).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
import torch
import torch.distributed as dist

from gfn_dist.distributed import ray_compat
from gfn_dist.distributed.ray_compat import loopback_only_ray
from gfn_dist.distributed.session_reaper import SessionReaper
from gfn_dist.distributed.waiting import Deadline
from gfn_dist.errors import ConfigError

if TYPE_CHECKING:  # the run layer's config, read through its attributes only (no runtime import)
    from gfn_dist.config import TrainConfig

logger = logging.getLogger(__name__)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
RAY_AUTH_MODE = "RAY_AUTH_MODE"
#: Bound on ``ray.shutdown`` when the GCS does not answer: Ray's calls to a dead GCS retry for up
#: to a minute (``gcs_rpc_server_reconnect_timeout_s``) before Ray gives up.
TEARDOWN_CALL_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------- network exposure


def is_loopback_address(address: str | None) -> bool:
    """Whether a ``host:port`` Ray address is on this machine's loopback interface."""
    host = (address or "").rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def single_node_launch() -> bool:
    """True unless torchrun reports ranks on other nodes (``LOCAL_WORLD_SIZE < WORLD_SIZE``)."""
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        return True
    return int(os.environ.get("LOCAL_WORLD_SIZE", world)) >= int(world)


@dataclass
class DistContext:
    """Where this learner process stands.

    Attributes:
        rank, world_size, local_rank: as torch.distributed spells them.
        launcher: ``local``, ``torchrun`` or ``ray`` (a Ray Train worker).
        device: the learner's device.
        backend: the process-group backend, or None without a process group.
        restart: how often the learner group was restarted before this start (Ray Train's retries
            under ``cluster.learner_max_restarts``; 0 otherwise): a restarted rank resumes from the
            newest checkpoint.
    """

    rank: int
    world_size: int
    local_rank: int
    launcher: str
    device: torch.device
    backend: str | None
    restart: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: owns Ray actors, evaluation, metrics and the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is initialised."""
        return self.backend is not None


@dataclass
class RayContext:
    """The Ray connection of this process.

    Attributes:
        address: GCS address other processes connect to.
        namespace: the run's namespace (named actors live there).
        owns_ray: this process started the embedded Ray (and shuts it down).
        connected: this process called ``ray.init`` (and disconnects at the end).
        auth_mode: ``RAY_AUTH_MODE`` of this Ray (other ranks connect with the same).
        reaper: the watchdog of an embedded Ray's processes (``owns_ray``), else None.
    """

    address: str
    namespace: str
    owns_ray: bool
    connected: bool
    auth_mode: str | None = None
    reaper: SessionReaper | None = None


def detect_launcher(cfg: TrainConfig) -> str:
    """``cluster.launcher``, with ``auto`` resolved from torchrun's environment variables."""
    if cfg.cluster.launcher != "auto":
        return cfg.cluster.launcher
    return "torchrun" if all(k in os.environ for k in TORCHRUN_ENV) else "local"


def world_size_of(launcher: str) -> int:
    """Number of learners: ``WORLD_SIZE`` under torchrun, 1 locally.

    Raises:
        ValueError: if launcher is torchrun and its environment variables are missing.
    """
    if launcher == "local":
        return 1
    if launcher == "ray":
        raise ValueError(
            "cluster.launcher: ray runs the learners as Ray Train workers "
            "(gfn_dist.distributed.learner_group.RayTrainLearners), not in this process"
        )
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise ValueError(f"cluster.launcher: torchrun requested but {missing} are not set (run under torchrun)")
    return int(os.environ["WORLD_SIZE"])


def learner_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    """``cuda:LOCAL_RANK`` when configured (``learner.device``) and available, else CPU.

    Raises:
        ValueError: if ``learner.device=cuda`` and CUDA is not available.
    """
    want = cfg.learner.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("learner.device: cuda requested but CUDA is not available")
    if want in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(cfg: TrainConfig) -> DistContext:
    """Initialises the learners' process group under torchrun (gloo on CPU, nccl on CUDA)."""
    launcher = detect_launcher(cfg)
    if launcher == "local":
        return DistContext(0, 1, 0, "local", learner_device(cfg, 0), None)
    world_size = world_size_of(launcher)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = learner_device(cfg, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank, world_size, local_rank, launcher, device, backend)


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank (identity without a process group)."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]


def barrier(ctx: DistContext) -> None:
    """Waits for every rank (no-op without a process group)."""
    if ctx.distributed:
        dist.barrier()


def learner_num_threads(cfg: TrainConfig, ctx: DistContext) -> int:
    """Intra-op threads of a CPU learner: this node's cores not reserved by embedded rollout actors,
    shared by the learners on the node (at least 1). Oversubscribing a small machine slows every step."""
    cores = os.cpu_count() or 1
    if not cfg.cluster.address:
        cores -= int(cfg.rollout.num_actors * cfg.rollout.num_cpus_per_actor)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    return max(1, cores // max(local_world, 1))


def embedded_num_cpus(cfg: TrainConfig) -> float:
    """CPUs of the embedded Ray: ``cluster.num_cpus``, else what the rollout actors (and, with
    ``cluster.launcher=ray``, the learner workers) reserve, rounded up (Ray wants whole CPUs; >= 1)."""
    if cfg.cluster.num_cpus is not None:
        return cfg.cluster.num_cpus
    learners = cfg.cluster.num_learners * cfg.cluster.num_cpus_per_learner if cfg.cluster.launcher == "ray" else 0.0
    return float(max(1, math.ceil(cfg.rollout.num_actors * cfg.rollout.num_cpus_per_actor + learners)))  # whole CPUs


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
    wait = Deadline(timeout_s, initial_backoff_s=0.25, max_backoff_s=0.25)
    while True:
        try:
            socket.create_connection((host, port), timeout=max(0.1, min(2.0, wait.remaining_s))).close()
            return
        except OSError as err:
            if wait.remaining_s <= 0.25:
                raise ClusterUnreachableError(
                    f"cluster.address={address}: no Ray cluster answered at {host}:{port} within "
                    f"{timeout_s:g} s (cluster.connect_timeout_s; last error: {err}). Start one "
                    f"(`ray start --head --port={port}`) or fix the address."
                ) from err
            wait.pause()


def learners_use_gpu(cfg: TrainConfig, cluster_gpus: float | None = None) -> bool:
    """Whether the learner workers reserve a GPU each (``learner.device``; ``auto``: the cluster has W
    whole GPUs beside the rollout actors' shares, ``cluster_gpus`` or ``ray.cluster_resources()``'s)."""
    if cfg.learner.device != "auto":
        return cfg.learner.device == "cuda"
    if cluster_gpus is None:
        cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
    actors = cfg.rollout.num_actors * cfg.rollout.num_gpus_per_actor
    return cluster_gpus >= cfg.cluster.num_learners + actors - 1e-9


def start_ray(
    cfg: TrainConfig, namespace: str | None = None, temp_dir: str | None = None, runtime_env: dict | None = None
) -> RayContext:
    """Rank 0: connects to ``cluster.address``, or starts an embedded local Ray (or reuses one already up).

    Args:
        cfg: the configuration.
        namespace: the run's Ray namespace (default ``gfn_dist_<random>``).
        temp_dir: Ray's temp directory when it starts an embedded cluster (Ray's default if None;
            the run layer passes a directory private to the user).
        runtime_env: the job's Ray ``runtime_env`` (ships the user's code to every worker), or None.

    Raises:
        ConnectionError: if ``cluster.address`` does not answer within ``cluster.connect_timeout_s``.
    """
    namespace = namespace or f"gfn_dist_{uuid.uuid4().hex[:12]}"
    if ray.is_initialized():
        # Reuse the caller's Ray (tests, notebooks): actors get the namespace explicitly.
        return RayContext(ray.get_runtime_context().gcs_address, namespace, owns_ray=False, connected=False)
    common: dict[str, Any] = {
        "namespace": namespace,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
        "runtime_env": runtime_env,
    }
    if cfg.cluster.address:
        wait_for_cluster(cfg.cluster.address, cfg.cluster.connect_timeout_s)  # ray.init alone may wait for minutes
        ray.init(address=cfg.cluster.address, **common)
        owns = False
    else:
        # address="local": a new Ray even if RAY_ADDRESS or a `ray start` on this host
        # (/tmp/ray/ray_current_cluster) points elsewhere; with None, ray.init would connect there
        # and refuse num_cpus.
        # One node: every Ray server binds 127.0.0.1 only, and no dashboard (health.loopback_only_ray);
        # torchrun across nodes without cluster.address needs the node's routable address instead.
        # No num_gpus: Ray counts this node's GPUs itself (NVML, capped by CUDA_VISIBLE_DEVICES), which
        # is what check_devices compared the actors' and learners' GPU reservations with (torch's count).
        # The watchdog starts first: a driver killed while Ray starts leaves nothing either.
        reaper = SessionReaper.start()
        try:
            with loopback_only_ray() if single_node_launch() else contextlib.nullcontext(), reaper.tagged():
                ray.init(
                    address="local",
                    num_cpus=embedded_num_cpus(cfg),  # type: ignore[arg-type]  # a whole number of CPUs
                    include_dashboard=False,
                    _temp_dir=temp_dir,
                    **common,
                )
        except BaseException:
            reaper.close()
            raise
        owns = True
        _log_session(reaper)
    address = ray.get_runtime_context().gcs_address
    logger.info("Ray up at %s (namespace %s, embedded=%s)", address, namespace, owns)
    # A new local Ray turns token authentication on in this process's environment
    # (RAY_AUTH_MODE=token); other ranks must use the same mode to connect.
    return RayContext(
        address,
        namespace,
        owns_ray=owns,
        connected=True,
        auth_mode=os.environ.get(RAY_AUTH_MODE),
        reaper=reaper if owns else None,
    )


def _log_session(reaper: SessionReaper) -> None:
    """Logs where the embedded Ray lives (its session directory, GCS and raylet PIDs) and its watchdog."""
    try:
        session_dir, pids = ray_compat.embedded_session()
    except ray_compat.RayAPIChangedError as err:  # only this log line needs it: the run goes on
        logger.warning("%s", err)
        return
    logger.info(
        "embedded Ray session %s (%s), watched by pid %s",
        session_dir,
        ", ".join(f"{name} pid {pid}" for name, pid in pids.items()),
        reaper.watchdog.pid if reaper.watchdog is not None else None,
    )


def connect_ray(address: str, namespace: str, auth_mode: str | None = None) -> RayContext:
    """Ranks > 0: connects to rank 0's Ray (reuses a connection already up).

    Args:
        address: rank 0's GCS address.
        namespace: the run's namespace.
        auth_mode: rank 0's ``RAY_AUTH_MODE`` (the token itself is read by Ray from
            its usual places, e.g. ``~/.ray/auth_token`` on the same node).
    """
    if auth_mode and RAY_AUTH_MODE not in os.environ:
        # Ray reads its auth mode from the environment when it connects.
        os.environ[RAY_AUTH_MODE] = auth_mode

    if ray.is_initialized():
        return RayContext(address, namespace, owns_ray=False, connected=False)
    # Rank 0's Ray on 127.0.0.1: this process must register with the same (loopback) node address.
    with loopback_only_ray() if is_loopback_address(address) else contextlib.nullcontext():
        ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level=logging.WARNING)
    return RayContext(address, namespace, owns_ray=False, connected=True, auth_mode=auth_mode)


def bring_up_ray(
    cfg: TrainConfig, ctx: DistContext, temp_dir: str | None = None, runtime_env: dict | None = None
) -> RayContext:
    """Rank 0 starts / connects (``temp_dir``, ``runtime_env``: see ``start_ray``); the others receive
    ``(address, namespace, auth_mode)`` and connect."""
    if ctx.is_main:
        ray_ctx = start_ray(cfg, temp_dir=temp_dir, runtime_env=runtime_env)
        broadcast_object((ray_ctx.address, ray_ctx.namespace, ray_ctx.auth_mode), ctx)
        return ray_ctx
    address, namespace, auth_mode = broadcast_object(None, ctx)
    return connect_ray(address, namespace, auth_mode)


def gcs_answers(address: str, timeout_s: float = 2.0) -> bool:
    """Whether Ray's GCS at ``address`` (``HOST:PORT``) accepts a TCP connection within ``timeout_s``."""
    try:
        host, port = _host_port(address)
        socket.create_connection((host, port), timeout=timeout_s).close()
    except (OSError, ConfigError):
        return False
    return True


def call_bounded(fn: Callable[[], Any], timeout_s: float, what: str) -> bool:
    """Runs ``fn()`` in a daemon thread for at most ``timeout_s``; errors are logged, not raised.

    A Ray call that waits on a dead GCS retries for up to a minute and may not be interruptible;
    the thread is left behind (a daemon: it does not keep the process alive).

    Returns:
        True if ``fn`` returned in time without raising.
    """
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as err:  # reported below, in the caller's thread
            outcome.append(err)

    thread = threading.Thread(target=target, name=f"teardown: {what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        logger.warning("%s did not return within %.0f s; continuing without it", what, timeout_s)
        return False
    if outcome[0] is not None:
        logger.warning("%s failed: %s", what, outcome[0])
        return False
    return True


def teardown(ctx: DistContext | None, ray_ctx: RayContext | None, actors: list) -> None:
    """Kills ``actors`` (rank 0), disconnects / shuts down Ray, ends what is left of an embedded Ray,
    destroys the process group.

    Every step runs even if an earlier one fails; errors are logged, not raised. When the GCS no
    longer answers, the actors are not killed one by one (each call would wait on the GCS; with an
    embedded Ray the session reaper ends their processes, on an external cluster Ray ends a job's
    actors when its driver leaves) and ``ray.shutdown`` is bounded by ``TEARDOWN_CALL_TIMEOUT_S``.
    """
    gcs_up = ray_ctx is None or not ray_ctx.connected or gcs_answers(ray_ctx.address)
    if not gcs_up:
        logger.warning(
            "Ray's control plane (GCS at %s) does not answer at shutdown; %s",
            ray_ctx.address,  # type: ignore[union-attr]  # gcs_up is True without a context
            "the embedded Ray's processes are stopped directly"
            if ray_ctx is not None and ray_ctx.reaper is not None
            else "the actors are left to Ray (they end with this driver)",
        )
    try:
        if actors and gcs_up:
            _kill_all(actors)
    finally:
        try:
            if ray_ctx is not None and ray_ctx.connected and gcs_up:
                ray.shutdown()
            elif ray_ctx is not None and ray_ctx.connected:  # may wait on the dead GCS: bounded
                call_bounded(ray.shutdown, TEARDOWN_CALL_TIMEOUT_S, "ray.shutdown")
        except Exception as err:
            logger.warning("ray.shutdown failed: %s", err)
        finally:
            try:
                if ray_ctx is not None and ray_ctx.reaper is not None:
                    ray_ctx.reaper.close()
            finally:
                if ctx is not None and ctx.distributed and dist.is_initialized():
                    dist.destroy_process_group()


def _kill_all(actors: list) -> None:
    for handle in actors:
        try:
            ray.kill(handle)
        except Exception as err:  # already dead
            logger.debug("ray.kill failed: %s", err)
