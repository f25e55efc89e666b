"""Seeding (torchgfn's ``gfn.utils.common.set_seed``)."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def set_seed(seed: int, deterministic_mode: bool = False) -> None:
    """Seeds Python's ``random``, NumPy and torch (CPU and every CUDA device).

    Inside an initialised ``torch.distributed`` group each rank uses ``seed + rank``
    (ranks then draw different samples), as torchgfn does.

    Args:
        seed: base seed (int).
        deterministic_mode: also ask torch for deterministic kernels
            (``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN
            deterministic, no cuDNN benchmark).

    Raises:
        TypeError: if ``seed`` is not an int.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"set_seed: seed must be an int, got {type(seed).__name__}")
    if dist.is_available() and dist.is_initialized():
        seed = seed + dist.get_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too
    os.environ["PYTHONHASHSEED"] = str(seed)  # for subprocesses started from here
    if deterministic_mode:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    logger.debug("set_seed: %d (deterministic_mode=%s)", seed, deterministic_mode)
