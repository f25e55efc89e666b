"""Waits on replay that every learner rank leaves together (several ranks).

A rank that leaves a wait alone -- on SIGTERM, on its own ``replay.timeout_s``, on
a failed health check -- would break the next collective (DDP's gradient
all-reduce, a checkpoint's gather): the other ranks would block in it forever.
So with W > 1 ranks a wait on replay is a sequence of *rounds*: in each round
every rank looks at its own wait (its draw done? failed? a stop requested on
this rank?), and one MAX all-reduce of three int32 flags over a CPU (gloo)
group tells every rank the same outcome:

* some rank was asked to stop (SIGTERM / SIGINT: ``should_stop``): every rank
  raises ``WaitStopped`` and ``stop_agreed`` is True, so the run layer
  checkpoints the same step on every rank;
* some rank's wait failed: every rank raises -- its own error, or, where its
  own wait was fine, ``TimeoutError`` (the failed rank timed out) or
  ``RuntimeError`` (it failed otherwise); a timeout is then checkpointed on
  every rank like a stop;
* every rank is ready: the round returns, the step goes on;
* else (some rank still waits): another round, ``poll_s`` later.

A step whose data is there at once costs one all-reduce of 12 bytes. A
SIGTERM reaches every rank's decision within ``poll_s`` plus one all-reduce,
however long replay would have kept a rank waiting.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist

from gfn_dist.distributed.waiting import WaitStopped

#: Seconds between agreement rounds while some rank waits on replay.
POLL_S = 0.25

_OK, _TIMEOUT, _FAILED = 0, 1, 2


def cpu_group(ctx: Any) -> Any:
    """A process group of the learner ranks for CPU flags: the world group under gloo, a new gloo
    group under nccl (collective: every rank calls it, in the same order as its other groups)."""
    return dist.group.WORLD if ctx.backend == "gloo" else dist.new_group(backend="gloo")


class RankAgreement:
    """The learner ranks' agreement on how a wait on replay ends (module doc).

    Args:
        group: a process group of the learner ranks on which a CPU int32 all-reduce works
            (gloo: ``dist.group.WORLD`` under gloo, a ``new_group(backend="gloo")`` under nccl).
        should_stop: polled each round on this rank (its preemption flag).
        poll_s: seconds between rounds while some rank waits (> 0).
    """

    def __init__(self, group: Any, should_stop: Callable[[], bool], poll_s: float = POLL_S) -> None:
        if not poll_s > 0:
            raise ValueError(f"RankAgreement: poll_s must be > 0, got {poll_s}")
        self.group = group
        self.should_stop = should_stop
        self.poll_s = float(poll_s)
        self.stop_agreed = False  # some rank asked to stop; every rank raised WaitStopped
        self.rounds = 0

    def result(self, future: Future) -> Any:
        """The result of this rank's replay draw ``future``, once every rank's draw is done.

        Raises:
            WaitStopped: if some rank was asked to stop (``stop_agreed`` is then True).
            TimeoutError: this rank's draw timed out, or another rank's did.
            RuntimeError: another rank's draw failed otherwise (this rank's own error is re-raised as is).
        """
        while True:
            concurrent.futures.wait([future], timeout=self.poll_s)  # at once when the draw is done
            done = future.done()
            error = future.exception() if done else None
            if not self._round(waiting=not done, error=None if isinstance(error, WaitStopped) else error):
                return future.result()

    def until(self, ready: Callable[[], bool], check: Callable[[], None]) -> None:
        """Returns once ``ready()`` held on every rank in the same round.

        Args:
            ready: this rank's condition (e.g. every shard holds ``replay.min_size_to_sample``).
            check: called on this rank while it is not ready; raises to end the wait (its deadline,
                a health check). Its error is agreed on like a draw's.

        Raises:
            WaitStopped, TimeoutError, RuntimeError: as ``result``.
        """
        while True:
            done, error = False, None
            try:
                done = bool(ready())
                if not done:
                    check()
            except WaitStopped:  # this rank's stop request: its flag is read in the round
                pass
            except Exception as err:  # agreed on in the round, then re-raised on this rank
                error = err
            if not self._round(waiting=not done, error=error):
                return
            if not done:
                time.sleep(self.poll_s)

    def _round(self, waiting: bool, error: BaseException | None) -> bool:
        """One round (one all-reduce); returns whether some rank still waits.

        Raises:
            WaitStopped, TimeoutError, RuntimeError: as ``result``.
        """
        failure = _OK if error is None else (_TIMEOUT if isinstance(error, TimeoutError) else _FAILED)
        flags = torch.tensor([int(waiting), int(bool(self.should_stop())), failure], dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        self.rounds += 1
        any_waiting, any_stop, worst = (int(v) for v in flags.tolist())
        if any_stop:
            self.stop_agreed = True
            raise WaitStopped("a learner rank was asked to stop while the ranks waited on replay")
        if worst != _OK:
            if error is not None:
                raise error
            if worst == _TIMEOUT:
                raise TimeoutError("another learner rank found no replay data within replay.timeout_s")
            raise RuntimeError("another learner rank failed while waiting on replay (its log names the error)")
        return bool(any_waiting)
