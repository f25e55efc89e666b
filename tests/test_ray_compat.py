"""gfn_dist.distributed.ray_compat against the installed Ray: each wrapped private API
still exists and still means what gfn_dist reads from it. A Ray upgrade that
changes one fails here, naming it.

One local Ray for the module (1 CPU), started inside ``loopback_only_ray`` as the
embedded Ray of a single-node run is.
"""

from __future__ import annotations

import os
import sys
import time

import pytest
import ray

from gfn_dist.distributed import ray_compat
from gfn_dist.distributed.ray_compat import RayAPIChangedError

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actor class and helpers run in workers


@pytest.fixture(scope="module")
def local_ray():
    with ray_compat.loopback_only_ray():
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0, max_restarts=1)
class _Probe:
    def __init__(self):
        self.value = 7

    def pid(self) -> int:
        return os.getpid()

    def restarted(self) -> bool:
        return ray_compat.was_restarted_by_ray()


def _add(actor, x: int) -> int:  # runs inside the actor
    return actor.value + x


def _wait_for(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_loopback_only_ray_binds_loopback_and_restores(local_ray):
    # The module's Ray was started inside the context: its node took the loopback address.
    assert [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]] == ["127.0.0.1"]
    import ray._private.ray_constants as constants

    key = constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    assert key == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    before_env, before_flag = os.environ.get(key), constants.ENABLE_RAY_CLUSTER
    with ray_compat.loopback_only_ray():
        assert os.environ[key] == "0" and constants.ENABLE_RAY_CLUSTER is False
    assert os.environ.get(key) == before_env and constants.ENABLE_RAY_CLUSTER is before_flag


def test_resolve_auto_address_reads_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6390")
    # Ray may rewrite a loopback host to this node's IP (it does on hosts whose node IP is not 127.0.0.1)
    host, port = ray_compat.resolve_auto_address().rsplit(":", 1)
    assert port == "6390" and host in {"127.0.0.1", ray.util.get_node_ip_address()}
    monkeypatch.setenv("RAY_ADDRESS", "local")  # Ray's word for "start a local instance"
    assert ray_compat.resolve_auto_address() is None


def test_actor_info_state_and_restart_count_follow_a_restart(local_ray):
    probe = _Probe.remote()
    pid = ray.get(probe.pid.remote())
    info = ray_compat.actor_info(probe)
    assert info is not None and info["State"] == "ALIVE" and info["NumRestarts"] == 0
    assert ray_compat.actor_state(probe) == "ALIVE" and ray_compat.actor_restart_count(probe) == 0
    assert ray.get(probe.restarted.remote()) is False

    ray.kill(probe, no_restart=False)  # Ray restarts it (max_restarts=1)
    _wait_for(lambda: ray_compat.actor_restart_count(probe) == 1 and ray_compat.actor_state(probe) == "ALIVE")
    assert ray.get(probe.pid.remote()) != pid
    assert ray.get(probe.restarted.remote()) is True

    ray.kill(probe)  # no_restart=True
    _wait_for(lambda: ray_compat.actor_state(probe) == "DEAD")


def test_was_restarted_by_ray_is_false_outside_actors(local_ray):
    assert ray_compat.was_restarted_by_ray() is False


def test_call_in_actor_runs_fn_on_the_instance(local_ray):
    probe = _Probe.remote()
    assert ray.get(ray_compat.call_in_actor(probe, _add, 5), timeout=60) == 12
    ray.kill(probe)


def test_a_missing_private_api_raises_naming_it(local_ray, monkeypatch):
    import ray._private.services as services
    import ray._private.state as state

    monkeypatch.delattr(services, "canonicalize_bootstrap_address")
    with pytest.raises(RayAPIChangedError, match=r"ray\._private\.services\.canonicalize_bootstrap_address"):
        ray_compat.resolve_auto_address()
    monkeypatch.setattr(state, "actors", lambda actor_id: {"State": "ALIVE"})  # NumRestarts gone
    probe = _Probe.remote()
    with pytest.raises(RayAPIChangedError, match=r"ray\._private\.state\.actors"):
        ray_compat.actor_info(probe)
    with pytest.raises(RayAPIChangedError, match="__ray_call__"):
        ray_compat.call_in_actor(object(), _add, 1)
    assert issubclass(RayAPIChangedError, RuntimeError)
    ray.kill(probe)


def test_embedded_session_names_the_gcs_and_the_raylet_this_process_started(local_ray):
    import psutil

    session_dir, pids = ray_compat.embedded_session()
    assert os.path.isdir(session_dir) and os.path.basename(session_dir).startswith("session_"), session_dir
    assert set(pids) == {"gcs_server", "raylet"}, pids
    for name, pid in pids.items():
        proc = psutil.Process(pid)
        assert proc.name() == name and proc.ppid() == os.getpid()  # started by this process's ray.init
        assert any(session_dir in arg or os.path.basename(session_dir) in arg for arg in proc.cmdline()), name


def test_embedded_session_raises_naming_a_changed_node(local_ray, monkeypatch):
    import ray._private.worker as worker

    monkeypatch.setattr(worker, "_global_node", object())  # a Node without get_session_dir_path / all_processes
    with pytest.raises(RayAPIChangedError, match=r"ray\._private\.node\.Node"):
        ray_compat.embedded_session()
    monkeypatch.delattr(worker, "_global_node")
    with pytest.raises(RayAPIChangedError, match=r"ray\._private\.worker\._global_node"):
        ray_compat.embedded_session()
