"""Several learner ranks leave a wait on replay together (gfn_dist.distributed.rank_agreement).

Two real gloo ranks (forked processes, file rendezvous). Each scenario gives the ranks different
local outcomes -- one rank's draw never returns, one is asked to stop, one times out, one fails
its health check -- and checks that both ranks end the wait the same way, in the same round,
and that the collective after the wait still matches (a rank left alone would hang in it: the
join timeout fails the test).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gfn_dist.distributed.rank_agreement import RankAgreement
from gfn_dist.distributed.waiting import WaitStopped

POLL_S = 0.05


def _outcome(fn) -> tuple:
    try:
        return ("ok", fn())
    except WaitStopped:
        return ("stopped", None)
    except TimeoutError as err:
        return ("timeout", str(err))
    except RuntimeError as err:
        return ("failed", str(err))


def _future(result=None, error: BaseException | None = None, after_s: float | None = 0.0) -> Future:
    """A draw's future: done after ``after_s`` (None: never) with ``result`` or ``error``."""
    fut: Future = Future()

    def finish() -> None:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    if after_s == 0.0:
        finish()
    elif after_s is not None:
        threading.Timer(after_s, finish).start()
    return fut


def _scenario(name: str, rank: int) -> tuple:
    stop = {"flag": False}
    agree = RankAgreement(dist.group.WORLD, should_stop=lambda: stop["flag"], poll_s=POLL_S)
    if name == "both_ready":
        out = _outcome(lambda: agree.result(_future(result=rank)))
    elif name == "one_late":  # rank 1's data arrives 0.5 s later: rank 0 waits for it
        out = _outcome(lambda: agree.result(_future(result=rank, after_s=0.5 if rank else 0.0)))
    elif name == "stop_while_other_waits":  # rank 1's draw never returns; rank 0 gets SIGTERM at 0.3 s
        if rank == 0:
            threading.Timer(0.3, lambda: stop.update(flag=True)).start()
        out = _outcome(lambda: agree.result(_future(result=rank, after_s=0.0 if rank == 0 else None)))
    elif name == "timeout_on_one":
        err = TimeoutError("rank 1: replay.timeout_s") if rank == 1 else None
        out = _outcome(lambda: agree.result(_future(result=rank, error=err, after_s=0.2 if rank else 0.0)))
    elif name == "warmup_health_check_fails_on_one":
        def check() -> None:
            if rank == 0:
                raise RuntimeError("rank 0: rollout actors failed beyond rollout.max_restarts")

        out = _outcome(lambda: agree.until(ready=lambda: rank == 0 and False, check=check))
    elif name == "warmup_ready_in_turn":  # rank 0 ready at once, rank 1 after 0.4 s
        t0 = time.monotonic()
        out = _outcome(lambda: agree.until(ready=lambda: rank == 0 or time.monotonic() - t0 > 0.4,
                                           check=lambda: None))
    else:
        raise AssertionError(name)
    after = torch.tensor([rank + 1])
    dist.all_reduce(after)  # the collective after the wait: both ranks reach it
    return out + (agree.stop_agreed, agree.rounds, int(after))


SCENARIOS = ("both_ready", "one_late", "stop_while_other_waits", "timeout_on_one",
             "warmup_health_check_fails_on_one", "warmup_ready_in_turn")


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = {}
        for name in SCENARIOS:
            t0 = time.monotonic()
            results[name] = _scenario(name, rank) + (time.monotonic() - t0,)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agree")
    ctx = mp.start_processes(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        assert time.monotonic() < deadline, "a rank hung: the ranks left a wait apart"
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_ready_ranks_return_their_own_batch_after_one_round(outcomes):
    (r0, r1) = (o["both_ready"] for o in outcomes)
    assert r0[:2] == ("ok", 0) and r1[:2] == ("ok", 1)
    assert r0[3] == r1[3] == 1 and r0[4] == r1[4] == 3  # one all-reduce each; the next collective matched


def test_a_ready_rank_waits_for_a_late_one(outcomes):
    (r0, r1) = (o["one_late"] for o in outcomes)
    assert r0[:2] == ("ok", 0) and r1[:2] == ("ok", 1)
    assert r0[3] == r1[3] > 1  # the same number of rounds on both ranks
    assert r0[5] >= 0.45  # rank 0 did not go on alone


def test_a_stop_on_one_rank_ends_every_ranks_wait(outcomes):
    (r0, r1) = (o["stop_while_other_waits"] for o in outcomes)
    assert r0[0] == r1[0] == "stopped" and r0[2] and r1[2]  # stop_agreed on both
    assert r0[3] == r1[3]
    assert r1[5] < 0.3 + 5 * POLL_S + 2.0  # within a few rounds of the signal, though its draw never returned


def test_a_timeout_on_one_rank_is_a_timeout_on_every_rank(outcomes):
    (r0, r1) = (o["timeout_on_one"] for o in outcomes)
    assert r1[:2] == ("timeout", "rank 1: replay.timeout_s")
    assert r0[0] == "timeout" and "another learner rank" in r0[1]  # rank 0 had its batch, still stops
    assert not r0[2] and not r1[2] and r0[3] == r1[3]


def test_a_failed_health_check_during_warm_up_ends_it_on_every_rank(outcomes):
    (r0, r1) = (o["warmup_health_check_fails_on_one"] for o in outcomes)
    assert r0[:2] == ("failed", "rank 0: rollout actors failed beyond rollout.max_restarts")
    assert r1[0] == "failed" and "another learner rank failed" in r1[1]
    assert r0[3] == r1[3] == 1


def test_warm_up_ends_when_every_rank_is_ready(outcomes):
    (r0, r1) = (o["warmup_ready_in_turn"] for o in outcomes)
    assert r0[0] == r1[0] == "ok" and r0[3] == r1[3] > 1
    assert r0[5] >= 0.35


def test_poll_interval_must_be_positive():
    with pytest.raises(ValueError, match="poll_s"):
        RankAgreement(None, should_stop=lambda: False, poll_s=0)
