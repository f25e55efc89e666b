"""Shared pytest fixtures and settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    # CI has 2 cores; tests that train are faster (and reproducible) on one thread.
    torch.set_num_threads(1)
    yield


#: Fixtures that start a distributed runtime (a local or multi-node Ray, a `ray start`, SLURM): a test
#: using one belongs to the `cluster` tier whether or not it carries the mark itself.
CLUSTER_FIXTURES = frozenset(
    {"local_ray", "ray_local", "actors", "runs", "main_job", "two_node_cluster", "head", "slurm", "replay_with_data"}
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if CLUSTER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)
