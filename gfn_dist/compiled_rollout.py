"""Support for ``Sampler(compile=True)``: whether ``torch.compile`` can build here, and a compiled chunk."""

from __future__ import annotations

import importlib.util
from typing import Any, NamedTuple

import torch


def compile_supported(device: str | torch.device = "cpu") -> bool:
    """Whether ``Sampler(compile=True)`` can build its chunks for ``device`` here: a C++
    compiler for CPU (inductor's), Triton for CUDA. Without it the sampler warns and
    samples eagerly."""
    try:
        if torch.device(device).type == "cpu":
            from torch._inductor import cpp_builder

            return bool(cpp_builder.get_cpp_compiler())
        return importlib.util.find_spec("triton") is not None
    except Exception:  # no compiler / Triton found, or an API change
        return False


class Chunk(NamedTuple):
    """A compiled rollout chunk (``Sampler(compile=True)``) and its schedule."""

    fn: Any  # the torch.compile-d chunk
    n_chunks: int  # chunks per rollout
    steps: int  # steps per chunk (n_chunks * steps >= env.max_traj_len)
    with_rewards: bool  # the chunk returns the terminating states' log-rewards
