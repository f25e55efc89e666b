"""A latency-bound reward standing for an external oracle (a docking or LLM-judge service).

``OracleSelfiesEnv`` is ``SelfiesEnv`` whose reward call waits ``delay_ms_per_batch``
milliseconds per batch (one call per sampler batch, as a batched request to a service
would) and spends no CPU meanwhile. The score is ``score="length"`` (default), a cheap stand-in
(the string's length relative to ``max_length``, so that nothing CPU-bound hides in it), or
``score="qed"``, ``SelfiesEnv``'s QED reward after the wait (~26 ms of CPU per batch of 64 next
to a wait of ~1 s: the oracle's answer is a real chemistry score, for time-to-result comparisons,
``benchmarks/time_to_result.py``). What bounds throughput is then latency, which more rollout
actors overlap (``benchmarks/scaling.py``).
"""

from __future__ import annotations

import time

import torch

from examples.molecules.env import SelfiesEnv


class OracleSelfiesEnv(SelfiesEnv):
    """``SelfiesEnv`` with a slow, CPU-free reward (module doc).

    Args:
        delay_ms_per_batch: wall time of one reward call, milliseconds (>= 0).
        score: ``"length"`` (a CPU-free stand-in) or ``"qed"`` (``SelfiesEnv``'s QED reward).
        **kwargs: ``SelfiesEnv``'s arguments.

    Raises:
        ValueError: a negative delay or an unknown ``score`` (and ``SelfiesEnv``'s errors).
    """

    def __init__(self, delay_ms_per_batch: float = 100.0, score: str = "length", **kwargs):
        if delay_ms_per_batch < 0:
            raise ValueError(f"OracleSelfiesEnv: delay_ms_per_batch must be >= 0, got {delay_ms_per_batch}")
        if score not in ("length", "qed"):
            raise ValueError(f"OracleSelfiesEnv: score must be 'length' or 'qed', got {score!r}")
        self.delay_s = float(delay_ms_per_batch) / 1e3
        self.score = score
        super().__init__(**kwargs)

    def log_reward_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """After the oracle's delay: ``beta * log(n_tokens / max_length)`` (``score="length"``) or
        ``beta * log max(QED, qed_floor)`` (``score="qed"``); float32 ``(N,)``."""
        time.sleep(self.delay_s)
        if self.score == "qed":
            return super().log_reward_tensor(x)
        frac = (x >= 0).sum(-1).float() / self.max_length
        return self.beta * frac.clamp(min=self.qed_floor).log()
