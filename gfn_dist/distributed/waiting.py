"""The one waiting primitive of the distributed layer: a deadline with exponential backoff.

Every wait on another process -- the rate limiter refusing a push or a draw, a
restarting actor, a cluster address that does not answer yet, replay warming
up -- is a loop ``while not ready: if wait.expired: raise ...; wait.pause()``
over one ``Deadline``. ``pause`` calls ``on_pause`` first (e.g. the learner's
health check, which raises when the rollout actors failed for good) and raises
``WaitStopped`` once ``should_stop`` says so (training ended, a preemption was
requested), so no wait outlives the reason for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class WaitStopped(RuntimeError):
    """A wait ended early because its ``should_stop`` returned True."""


class Deadline:
    """A deadline ``timeout_s`` from now, and the pauses between attempts until then.

    Args:
        timeout_s: seconds until ``expired`` (> 0; ``inf`` waits forever).
        initial_backoff_s: first pause; doubles after each pause up to ``max_backoff_s``.
        max_backoff_s: longest pause.
        should_stop: polled by ``pause``; True raises ``WaitStopped``.
        on_pause: called by every ``pause`` before it sleeps (may raise to end the wait).

    Raises:
        ValueError: if ``timeout_s`` or a backoff is not > 0.
    """

    def __init__(
        self,
        timeout_s: float,
        *,
        initial_backoff_s: float = 0.001,
        max_backoff_s: float = 0.05,
        should_stop: Callable[[], bool] | None = None,
        on_pause: Callable[[], None] | None = None,
    ) -> None:
        if not timeout_s > 0 or not initial_backoff_s > 0 or not max_backoff_s > 0:
            raise ValueError(
                f"Deadline: timeout_s, initial_backoff_s and max_backoff_s must be > 0, got "
                f"{timeout_s}, {initial_backoff_s}, {max_backoff_s}"
            )
        self.timeout_s = float(timeout_s)
        self.end = time.monotonic() + self.timeout_s
        self.backoff_s = float(initial_backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.should_stop = should_stop
        self.on_pause = on_pause

    @property
    def remaining_s(self) -> float:
        """Seconds left (>= 0)."""
        return max(0.0, self.end - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def pause(self) -> None:
        """``on_pause``, then ``should_stop``, then sleeps the current backoff (at most what is left).

        Raises:
            WaitStopped: if ``should_stop()`` is True.
        """
        if self.on_pause is not None:
            self.on_pause()
        if self.should_stop is not None and self.should_stop():
            raise WaitStopped("the wait was stopped")
        time.sleep(min(self.backoff_s, self.remaining_s))
        self.backoff_s = min(2 * self.backoff_s, self.max_backoff_s)
