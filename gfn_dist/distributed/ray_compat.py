"""The one module that touches Ray's private or deprecated APIs.

gfn_dist is tested with the Ray range pinned in ``pyproject.toml``. What it
needs beyond Ray's public API is wrapped here, one small function each, and
``tests/test_ray_compat.py`` checks every one against the installed Ray, so that
an upgrade that moves or changes one fails there, by name, rather than quietly
in a run. At run time a missing API raises ``RayAPIChangedError`` (a
``RuntimeError``) naming it; nothing here turns a failure into a default value.

    Ray API                                          function here
    ray._private.services.canonicalize_bootstrap_address  resolve_auto_address
    ray._private.ray_constants.ENABLE_RAY_CLUSTER(S_ENV_VAR)  loopback_only_ray
    ray._private.state.actors, ActorHandle._actor_id      actor_info, actor_state, actor_restart_count,
                                                          was_restarted_by_ray
    ActorHandle.__ray_call__                              call_in_actor
    ray._private.worker._global_node (Node.all_processes,  embedded_session
      Node.get_session_dir_path, ray_constants.PROCESS_TYPE_*)

``was_restarted_by_ray`` replaces ``RuntimeContext.was_current_actor_reconstructed``
(it reads the deprecated ``RuntimeContext.actor_id``): it reads the same actor
table entry through ``actor_restart_count``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import ray

__all__ = [
    "RayAPIChangedError",
    "actor_info",
    "actor_restart_count",
    "actor_state",
    "call_in_actor",
    "embedded_session",
    "loopback_only_ray",
    "resolve_auto_address",
    "was_restarted_by_ray",
]

# Fields of Ray's actor table entry (``ray._private.state.actors``) that gfn_dist reads.
ACTOR_INFO_KEYS = ("State", "NumRestarts")


class RayAPIChangedError(RuntimeError):
    """A Ray API that gfn_dist relies on is missing or changed shape in the installed Ray.

    Args:
        api: the Ray API, dotted (``ray._private.state.actors``).
        detail: what is wrong with it.
    """

    def __init__(self, api: str, detail: str):
        super().__init__(
            f"Ray {ray.__version__}: {api} {detail}. gfn_dist is tested with the Ray range pinned in "
            "pyproject.toml; install a Ray in that range, or adapt gfn_dist/distributed/ray_compat.py"
        )
        self.api = api


def _private(module: str, name: str) -> Any:
    """``module.name`` from Ray.

    Raises:
        RayAPIChangedError: the module or the name does not exist.
    """
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise RayAPIChangedError(f"{module}.{name}", f"is gone ({err})") from err


# ---------------------------------------------------------------------------- addresses and network


def resolve_auto_address() -> str | None:
    """The ``HOST:PORT`` that ``ray.init(address="auto")`` would connect to, or None.

    Ray's own lookup: ``RAY_ADDRESS``, then the cluster that ``ray start`` recorded
    on this host, then any running GCS found on it. None when ``RAY_ADDRESS`` is
    ``local`` (start a local Ray).

    Raises:
        ConnectionError: no running Ray cluster was found (Ray's own error).
        RayAPIChangedError: ``ray._private.services.canonicalize_bootstrap_address`` is gone.
    """
    canonicalize = _private("ray._private.services", "canonicalize_bootstrap_address")
    return canonicalize("auto") or None


@contextlib.contextmanager
def loopback_only_ray() -> Iterator[None]:
    """While active, a Ray started or joined here takes 127.0.0.1 as this node's address.

    On Linux Ray uses the machine's routable address (and servers listen on all
    interfaces) unless it believes clusters are disabled
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, inherited by the raylet and workers;
    the module constant ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` is read
    at call time). Then the raylet, GCS and workers bind 127.0.0.1 only. Both are
    restored on exit, so a later connection to a real cluster from this process
    is unaffected.

    Raises:
        RayAPIChangedError: ``ray._private.ray_constants`` lacks either name.
    """
    key = _private("ray._private.ray_constants", "ENABLE_RAY_CLUSTERS_ENV_VAR")
    old_flag = _private("ray._private.ray_constants", "ENABLE_RAY_CLUSTER")
    constants: Any = importlib.import_module("ray._private.ray_constants")
    old_env = os.environ.get(key)
    os.environ[key] = "0"
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old_env


# ---------------------------------------------------------------------------- the embedded node

#: The processes of an embedded Ray node whose PIDs ``embedded_session`` reports (Ray's process types).
NODE_PROCESS_TYPES = ("gcs_server", "raylet")


def embedded_session() -> tuple[str, dict[str, int]]:
    """The session directory and the PIDs of the GCS and the raylet of the Ray node this process started.

    Reads ``ray._private.worker._global_node`` (the ``Node`` that ``ray.init(address="local")``
    started): ``get_session_dir_path()`` and ``all_processes[PROCESS_TYPE_GCS_SERVER /
    PROCESS_TYPE_RAYLET][0].process.pid``.

    Returns:
        ``(session_dir, {"gcs_server": pid, "raylet": pid})``; the mapping is empty when this
        process only connected to a cluster started elsewhere.

    Raises:
        RayAPIChangedError: the module attribute, the ``Node`` methods or the process types are gone.
        RuntimeError: Ray is not initialised in this process.
    """
    node = _private("ray._private.worker", "_global_node")
    if node is None:
        raise RuntimeError("embedded_session: Ray is not initialised in this process")
    constants = [_private("ray._private.ray_constants", f"PROCESS_TYPE_{t.upper()}") for t in NODE_PROCESS_TYPES]
    if tuple(constants) != NODE_PROCESS_TYPES:
        raise RayAPIChangedError("ray._private.ray_constants.PROCESS_TYPE_*", f"changed: {constants}")
    try:
        session_dir = str(node.get_session_dir_path())
        processes = node.all_processes
        pids = {t: int(processes[t][0].process.pid) for t in NODE_PROCESS_TYPES if processes.get(t)}
    except (AttributeError, IndexError, TypeError) as err:
        raise RayAPIChangedError("ray._private.node.Node", f"changed shape ({err!r})") from err
    return session_dir, pids


# ---------------------------------------------------------------------------- actors


def _actor_record(actor_id: str) -> dict[str, Any] | None:
    """Ray's actor table entry for the hex ``actor_id``; None when the GCS has no record of it.

    Raises:
        RayAPIChangedError: ``ray._private.state.actors`` is gone, or its entry lacks ``ACTOR_INFO_KEYS``.
        ray.exceptions.RaySystemError: Ray is not initialised in this process.
    """
    actors = _private("ray._private.state", "actors")
    info = actors(actor_id)
    if not info:
        return None
    if not isinstance(info, dict) or not all(k in info for k in ACTOR_INFO_KEYS):
        raise RayAPIChangedError("ray._private.state.actors", f"returned an entry without {ACTOR_INFO_KEYS}: {info!r}")
    return info


def actor_info(handle: ray.actor.ActorHandle) -> dict[str, Any] | None:
    """Ray's record of an actor: ``State`` (ALIVE, RESTARTING, DEAD, ...), ``NumRestarts``, ...

    Reads the GCS actor table through ``ray._private.state`` (Ray's debugging API;
    the public ``ray.util.state`` needs the dashboard, which is off).

    Returns:
        The record, or None when the GCS has no record of the actor (yet).

    Raises:
        RayAPIChangedError: ``ray._private.state.actors`` or ``ActorHandle._actor_id`` is gone or changed.
        ray.exceptions.RaySystemError: Ray is not initialised in this process.
    """
    try:
        actor_id = handle._actor_id.hex()
    except AttributeError as err:
        raise RayAPIChangedError("ray.actor.ActorHandle._actor_id", f"is gone ({err})") from err
    return _actor_record(actor_id)


def actor_state(handle: ray.actor.ActorHandle) -> str | None:
    """``actor_info(handle)["State"]``, or None when the GCS has no record of the actor (yet).

    Raises:
        RayAPIChangedError: as ``actor_info``.
    """
    info = actor_info(handle)
    return None if info is None else str(info["State"])


def actor_restart_count(handle: ray.actor.ActorHandle) -> int:
    """How many times Ray restarted the actor (0 when the GCS has no record of it yet).

    Raises:
        RayAPIChangedError: as ``actor_info``.
    """
    info = actor_info(handle)
    return 0 if info is None else int(info["NumRestarts"])


def was_restarted_by_ray() -> bool:
    """Whether the current process is a Ray actor that Ray restarted (False outside Ray actors).

    Raises:
        RayAPIChangedError: as ``actor_info``.
    """
    if not ray.is_initialized():
        return False
    actor_id = ray.get_runtime_context().get_actor_id()
    if actor_id is None:
        return False
    info = _actor_record(actor_id)
    return info is not None and int(info["NumRestarts"]) > 0


def call_in_actor(handle: ray.actor.ActorHandle, fn: Callable[..., Any], *args: Any) -> ray.ObjectRef:
    """Runs ``fn(actor_instance, *args)`` inside the actor's process (``ActorHandle.__ray_call__``).

    ``fn`` must be picklable by value or importable in the actor's process.

    Returns:
        The ``ObjectRef`` of its result.

    Raises:
        RayAPIChangedError: ``ActorHandle.__ray_call__`` is gone.
    """
    try:
        method = handle.__ray_call__
    except AttributeError as err:
        raise RayAPIChangedError("ray.actor.ActorHandle.__ray_call__", f"is gone ({err})") from err
    return method.remote(fn, *args)
