"""A latency-bound reward standing for an external oracle (a docking or LLM-judge service).

``OracleSelfiesEnv`` is ``SelfiesEnv`` whose reward call waits ``delay_ms_per_batch``
milliseconds per batch (one call per sampler batch, as a batched request to a service
would) and spends no CPU meanwhile; the score itself is a cheap stand-in (the string's
length relative to ``max_length``, so that nothing CPU-bound hides in it). What bounds
throughput is then latency, which more rollout actors overlap (``benchmarks/scaling.py``).
"""

from __future__ import annotations

import time

import torch

from examples.molecules.env import SelfiesEnv


class OracleSelfiesEnv(SelfiesEnv):
    """``SelfiesEnv`` with a slow, CPU-free reward (module doc).

    Args:
        delay_ms_per_batch: wall time of one reward call, milliseconds (>= 0).
        **kwargs: ``SelfiesEnv``'s arguments.

    Raises:
        ValueError: a negative delay (and ``SelfiesEnv``'s errors).
    """

    def __init__(self, delay_ms_per_batch: float = 100.0, **kwargs):
        if delay_ms_per_batch < 0:
            raise ValueError(f"OracleSelfiesEnv: delay_ms_per_batch must be >= 0, got {delay_ms_per_batch}")
        self.delay_s = float(delay_ms_per_batch) / 1e3
        super().__init__(**kwargs)

    def log_reward_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """``beta * log(n_tokens / max_length)`` after the oracle's delay: float32 ``(N,)``."""
        time.sleep(self.delay_s)
        frac = (x >= 0).sum(-1).float() / self.max_length
        return self.beta * frac.clamp(min=self.qed_floor).log()
