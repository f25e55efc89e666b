"""Shared pytest fixtures and settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    # CI has 2 cores; tests that train are faster (and reproducible) on one thread.
    torch.set_num_threads(1)
    yield
