"""Reward screening in the rollout actors: trajectories whose log-reward the loss cannot use are dropped.

Trajectories with a NaN or +inf log-reward, or -inf while ``loss.log_reward_clip_min``
is -inf (an infinite loss), are dropped before the push and counted
(``rollout/rejected_nan``, ``rollout/rejected_posinf``, ``rollout/rejected_neginf``),
with a one-time hint to set ``loss.log_reward_clip_min`` for zero rewards.
"""

from __future__ import annotations

import logging

import torch
from tensordict import TensorDict

logger = logging.getLogger(__name__)


class RewardScreen:
    """Drops trajectories whose log-reward the loss cannot use, and counts them (rollout actor side).

    Args:
        log_reward_clip_min: ``loss.log_reward_clip_min``; when finite, -inf
            log-rewards are kept (the loss clamps them).
        actor_id: for the log messages.
    """

    def __init__(self, log_reward_clip_min: float = float("-inf"), actor_id: int = 0) -> None:
        self.keep_neginf = bool(torch.isfinite(torch.tensor(float(log_reward_clip_min))))
        self.actor_id = int(actor_id)
        self.num_nan = 0
        self.num_posinf = 0
        self.num_neginf = 0
        self._logged: set[str] = set()

    def __call__(self, td: TensorDict) -> TensorDict:
        """``td`` without its unusable rows (TensorDict ``(N,)`` with ``log_rewards (N,)``)."""
        log_rewards = td.get("log_rewards")
        if bool(torch.isfinite(log_rewards).all()):  # the common case: one check, no copy
            return td
        nan = torch.isnan(log_rewards)
        posinf = torch.isposinf(log_rewards)
        neginf = torch.isneginf(log_rewards) & (not self.keep_neginf)
        self.num_nan += int(nan.sum())
        self.num_posinf += int(posinf.sum())
        self.num_neginf += int(neginf.sum())
        for name, mask in (("NaN", nan), ("+inf", posinf)):
            if bool(mask.any()):
                self._log_once(
                    name,
                    f"rollout actor {self.actor_id}: rejected trajectories with {name} log-reward "
                    f"(rows {_rows(mask)}); counted in rollout/rejected_"
                    f"{'nan' if name == 'NaN' else 'posinf'}",
                )
        if bool(neginf.any()):
            self._log_once(
                "-inf",
                f"rollout actor {self.actor_id}: rejected trajectories with log-reward -inf "
                f"(zero reward; rows {_rows(neginf)}); set loss.log_reward_clip_min (e.g. -100) "
                f"to train on them (counted in rollout/rejected_neginf)",
            )
        bad = nan | posinf | neginf
        return td[~bad] if bool(bad.any()) else td

    def _log_once(self, kind: str, message: str) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            logger.warning(message)

    def stats(self) -> dict[str, int]:
        """``rejected_nan``, ``rejected_posinf``, ``rejected_neginf``: trajectories dropped so far."""
        return {"rejected_nan": self.num_nan, "rejected_posinf": self.num_posinf, "rejected_neginf": self.num_neginf}


def _rows(mask: torch.Tensor, limit: int = 20) -> list[int]:
    return torch.nonzero(mask).flatten()[:limit].tolist()
