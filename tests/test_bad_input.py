"""Bad input, table-driven: each case gives one clear error naming the key / field / rows, and leaves data intact.

Cases across the config (exit code 2, one stderr line, before any actor
starts), the reward (rows rejected at the rollout actor and counted), the
action (a custom policy's invalid action names the rows), a batch pushed to a
replay shard (refused naming the field; the shard's contents and counters
unchanged; non-tensor fields refused: replay holds tensors only) and the
cluster address (unreachable: one line, exit 2, within the timeout). Config
errors already covered in tests/test_config.py (unknown section, bad choice,
batch vs torchrun world size, ...) are not repeated.
"""

from __future__ import annotations

import logging
import math
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List

import pytest
import ray
import torch
from tensordict import TensorDict

from gfn_dist.builders import build_rollout_parts
from gfn_dist.config import load_config
from gfn_dist.distributed.replay_client import ReplayClient
from gfn_dist.distributed.replay_shard import ReplayShardConfig, create_replay_shards
from gfn_dist.distributed.rollout_actor import RolloutWorker
from gfn_dist.estimators import DiscretePolicyEstimator
from gfn_dist.modules import DiscreteUniform
from gfn_dist.samplers import Sampler
from gfn_dist.train import main

ROOT = Path(__file__).resolve().parents[1]
PRESET = str(ROOT / "configs" / "hypergrid_tb.yaml")
T = 3  # padded length of the hand-made replay batches


@dataclass
class Case:
    """One bad input: ``run(ctx)`` returns the error text; ``intact(ctx)`` checks nothing was damaged."""

    name: str
    run: Callable
    expect: List[str]  # substrings of the error text
    intact: Callable = field(default=lambda ctx: None)


class Ctx:
    """What a case may use: tmp_path, capsys, caplog, monkeypatch, a lazily started Ray shard pair."""

    def __init__(self, request, tmp_path, capsys, caplog, monkeypatch):
        self.request, self.tmp_path, self.capsys, self.caplog, self.monkeypatch = (
            request, tmp_path, capsys, caplog, monkeypatch)
        self.state = {}

    @property
    def replay(self):
        return self.request.getfixturevalue("replay_with_data")


# ---------------------------------------------------------------------- config


def _cli(*overrides):
    """``gfn-dist train PRESET overrides`` in-process; the error is its one stderr line (exit code 2)."""
    def run(ctx):
        ctx.state["ray_before"] = ray.is_initialized()
        code = main([PRESET, *overrides, f"run.dir={ctx.tmp_path / 'run'}"])
        err = ctx.capsys.readouterr().err.strip().splitlines()
        assert code == 2, (code, err)
        assert len(err) == 1, err
        return err[0]
    return run


def _nothing_started(ctx):
    assert not (ctx.tmp_path / "run").exists()  # no run directory, no metrics
    assert ray.is_initialized() == ctx.state["ray_before"]  # no Ray started, hence no actor


def _no_gpu(run):
    def wrapped(ctx):
        ctx.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        ctx.monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
        return run(ctx)
    return wrapped


# ---------------------------------------------------------------------- reward / action (rollout actor, in-process)


def _worker(*overrides) -> RolloutWorker:
    torch.manual_seed(0)
    cfg = load_config(None, ["model.hidden_dim=16", "rollout.trajectories_per_push=64", *overrides])
    return RolloutWorker(cfg, 0, build_rollout_parts)


def _poison_rewards(worker, value: float):
    """Log-reward ``value`` for every terminal state with x0 == 0; records which rows got it."""
    env = worker.env
    clean = env.log_reward_tensor
    worker.poisoned_rows = []

    def log_reward_tensor(x):
        out = clean(x).clone()
        bad = x[..., 0] == 0
        out[bad] = value
        worker.poisoned_rows.append(torch.nonzero(bad).flatten().tolist())
        return out

    env.log_reward_tensor = log_reward_tensor


def _reward_case(value: float, batches: int):
    def run(ctx):
        ctx.caplog.set_level(logging.WARNING, logger="gfn_dist.distributed.health")
        worker = _worker()
        _poison_rewards(worker, value)
        tds = [worker.sample_batch() for _ in range(batches)]
        ctx.state.update(worker=worker, tds=tds)
        messages = [r.getMessage() for r in ctx.caplog.records if "rejected trajectories" in r.getMessage()]
        assert len(messages) == 1, messages  # logged once, however many batches
        return messages[0]
    return run


def _rewards_rejected_and_counted(key):
    def intact(ctx):
        worker, tds = ctx.state["worker"], ctx.state["tds"]
        rejected = sum(len(rows) for rows in worker.poisoned_rows)
        assert 0 < rejected < 64 * len(tds)  # the case did have both kinds of rows
        assert worker.stats()[key] == rejected  # rollout/rejected_*: each rejected row counted
        assert sum(td.batch_size[0] for td in tds) == 64 * len(tds) - rejected  # the rest is kept
        for td in tds:
            assert bool(torch.isfinite(td["log_rewards"]).all())
            terminal = td["states"][torch.arange(td.batch_size[0]), td["terminating_idx"] - 1]
            assert bool((terminal[:, 0] != 0).all())  # exactly the poisoned trajectories are gone
    return intact


def _first_rows(ctx) -> str:
    return str(ctx.state["worker"].poisoned_rows[0][:20])


class _AlwaysRight(DiscretePolicyEstimator):
    """A custom policy that ignores the mask: always increments coordinate 0 (invalid at the border)."""

    def to_probability_distribution(self, states, module_output, **kw):
        logits = torch.full_like(module_output, -1e9)
        logits[:, 0] = 0.0
        return torch.distributions.Categorical(logits=logits)


def _invalid_action(ctx):
    worker = _worker("rollout.trajectories_per_push=5")
    env = worker.env
    worker.sampler = Sampler(_AlwaysRight(DiscreteUniform(env.n_actions), env.n_actions, env.preprocessor))
    ctx.state["worker"] = worker
    with pytest.raises(ValueError) as info:
        worker.sample_batch()
    return str(info.value)


def _nothing_sampled(ctx):
    stats = ctx.state["worker"].stats()
    assert stats["num_batches"] == 0 and stats["num_trajectories"] == 0


# ---------------------------------------------------------------------- batches pushed to a shard (Ray)


def _batch(n: int = 4, **changes) -> TensorDict:
    ids = torch.arange(n, dtype=torch.int64)
    fields = {
        "states": ids.view(n, 1, 1).expand(n, T + 1, 2).clone(),
        "actions": torch.zeros(n, T, 1, dtype=torch.int64),
        "terminating_idx": torch.full((n,), T, dtype=torch.int64),
        "log_rewards": torch.linspace(-1.0, 0.0, n),
        "policy_version": torch.zeros(n, dtype=torch.int64),
        "actor_id": ids,
    }
    fields.update({k: v for k, v in changes.items() if v is not None})
    for k in [k for k, v in changes.items() if v is None]:
        del fields[k]
    return TensorDict(fields, batch_size=[n])


@pytest.fixture(scope="module")
def replay_with_data():
    """Two shards on a local Ray, each holding 8 valid items."""
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    client = ReplayClient(create_replay_shards(2, ReplayShardConfig(capacity=32, seed=0), name_prefix=None,
                                               num_cpus=0), timeout_s=10)
    for i in range(2):
        client.add(_batch(8), i)
    yield client
    ray.shutdown()


def _push(td_fn):
    def run(ctx):
        client = ctx.replay
        ctx.state["before"] = ray.get(client.shards[0].snapshot.remote())
        ctx.state["rejected_before"] = client.stats()["shards"][0]["num_rejected"]
        with pytest.raises(ValueError) as info:
            client.add(td_fn(), 0)
        return str(info.value)
    return run


def _push_raw(payload_fn):
    """Calls the shard's ``try_add`` directly with a hand-made payload (e.g. a wire-format dict)."""
    def run(ctx):
        client = ctx.replay
        ctx.state["before"] = ray.get(client.shards[0].snapshot.remote())
        ctx.state["rejected_before"] = client.stats()["shards"][0]["num_rejected"]
        result = ray.get(client.shards[0].try_add.remote(payload_fn()))
        assert not result["accepted"] and result["status"] == "invalid", result
        return result["reason"]
    return run


def _wire_with_python_object():
    from gfn_dist.distributed.wire import td_to_wire

    payload = td_to_wire(_batch())
    payload["note"] = "import os; os.system('echo pwned')"  # a Python object beside the arrays
    return payload


def _shard_untouched(ctx):
    client = ctx.replay
    after = ray.get(client.shards[0].snapshot.remote())
    before = ctx.state["before"]
    for k in ("size", "write_pos", "num_inserts", "num_samples"):
        assert int(after["buffer"][k]) == int(before["buffer"][k]), k
    assert set(after["buffer"]["storage"]) == set(before["buffer"]["storage"])
    for k, v in before["buffer"]["storage"].items():
        assert torch.equal(after["buffer"]["storage"][k], v), k
    assert client.stats()["shards"][0]["num_rejected"] == ctx.state["rejected_before"] + 4  # counted


def _with_non_tensor():
    td = _batch()
    td.set_non_tensor("note", "import os; os.system('echo pwned')")  # would be unpickled as-is
    return td


def _with_nested():
    td = _batch()
    td.set("extra", TensorDict({"x": torch.zeros(4)}, batch_size=[4]))
    return td


def _nan_reward():
    log_rewards = torch.zeros(4)
    log_rewards[2] = math.nan
    return _batch(log_rewards=log_rewards)


# ---------------------------------------------------------------------- cluster address


def _unreachable_address(ctx):
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx.state["port"] = port
    t0 = time.monotonic()
    # A subprocess: the default launcher reuses a Ray this test process may already run.
    proc = subprocess.run(
        [sys.executable, "-m", "gfn_dist.cli", "train", PRESET, f"cluster.address=127.0.0.1:{port}",
         "cluster.connect_timeout_s=2", f"run.dir={ctx.tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    ctx.state["elapsed"] = time.monotonic() - t0
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    return lines[0]


def _address_intact(ctx):
    assert not (ctx.tmp_path / "run").exists()
    assert ctx.state["elapsed"] < 2 + 120  # the 2 s timeout plus interpreter start-up on a loaded machine


CASES = [
    # config: one line naming the key (and what is allowed), exit 2, nothing started
    Case("config-unknown-key", _cli("rollout.max_restart=2"), ["rollout.max_restart"], _nothing_started),
    Case("config-wrong-type", _cli("replay.snapshot_every_inserts=often"),
         ["replay.snapshot_every_inserts", "often"], _nothing_started),
    Case("config-out-of-range", _cli("rollout.max_consecutive_failures=0"),
         ["rollout.max_consecutive_failures", "> 0", "got 0"], _nothing_started),
    Case("config-restarts-range", _cli("replay.max_restarts=-5"),
         ["replay.max_restarts", ">= 0, or -1 for unlimited", "got -5"], _nothing_started),
    Case("config-batch-vs-learners", _cli("cluster.launcher=ray", "cluster.num_learners=3"),
         ["learner.batch_size", "cluster.num_learners=3"], _nothing_started),
    Case("config-cuda-absent", _no_gpu(_cli("learner.device=cuda")),
         ["learner.device", "no CUDA GPU", "['auto', 'cpu']"], _nothing_started),
    Case("config-actor-gpus-absent", _no_gpu(_cli("rollout.num_gpus_per_actor=0.5")),
         ["rollout.num_gpus_per_actor", "0 are visible", "set it to 0"], _nothing_started),
    # reward: rows rejected at the actor, counted, logged once
    Case("reward-nan", _reward_case(math.nan, 2), ["NaN log-reward", "rollout/rejected_nan"],
         _rewards_rejected_and_counted("rejected_nan")),
    Case("reward-neginf-without-clip", _reward_case(-math.inf, 2),
         ["log-reward -inf", "set loss.log_reward_clip_min", "rollout/rejected_neginf"],
         _rewards_rejected_and_counted("rejected_neginf")),
    Case("reward-posinf", _reward_case(math.inf, 1), ["+inf log-reward", "rollout/rejected_posinf"],
         _rewards_rejected_and_counted("rejected_posinf")),
    # action: a custom policy's invalid action names the rows and the step
    Case("action-invalid", _invalid_action, ["invalid action", "trajectories [0, 1, 2, 3, 4] at step 7"],
         _nothing_sampled),
    # batches pushed to a shard: refused naming the field, shard untouched
    Case("batch-missing-field", _push(lambda: _batch(log_rewards=None)),
         ["shard 0 rejected", "missing field 'log_rewards'"], _shard_untouched),
    Case("batch-wrong-shape", _push(lambda: _batch(states=torch.zeros(4, T + 2, 2, dtype=torch.int64))),
         ["field 'states'", "per-item shape (5, 2)", "expected (4, 2)"], _shard_untouched),
    Case("batch-wrong-dtype", _push(lambda: _batch(log_rewards=torch.zeros(4, dtype=torch.float64))),
         ["field 'log_rewards'", "torch.float64", "expected torch.float32"], _shard_untouched),
    Case("batch-nan-reward", _push(_nan_reward), ["field 'log_rewards' contains NaN"], _shard_untouched),
    Case("batch-non-tensor-field", _push(_with_non_tensor), ["field 'note' must be a plain tensor"],
         _shard_untouched),
    Case("batch-nested-field", _push(_with_nested), ["field 'extra' must be a plain tensor"], _shard_untouched),
    Case("batch-wire-python-object", _push_raw(_wire_with_python_object), ["field 'note' must be a plain tensor"],
         _shard_untouched),
    # cluster address: one line, exit 2, within the timeout
    Case("address-unreachable", _unreachable_address,
         ["cluster.address=127.0.0.1:", "no Ray cluster answered", "within 2 s"], _address_intact),
]


#: cases that start Ray (a shard pair) or a CLI process that dials a Ray address: the cluster tier
_CLUSTER_CASES = ("batch-", "address-")


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.cluster) if c.name.startswith(_CLUSTER_CASES) else c for c in CASES],
    ids=[c.name for c in CASES],
)
def test_bad_input(case, request, tmp_path, capsys, caplog, monkeypatch):
    ctx = Ctx(request, tmp_path, capsys, caplog, monkeypatch)
    message = case.run(ctx)
    for text in case.expect:
        assert text in message, (text, message)
    if case.name.startswith("reward"):
        assert _first_rows(ctx) in message  # the rows are named
    case.intact(ctx)


def test_neginf_reward_is_kept_with_a_clip():
    """The counterpart of reward-neginf-without-clip: with ``loss.log_reward_clip_min`` the rows are kept."""
    worker = _worker("loss.log_reward_clip_min=-50")
    _poison_rewards(worker, -math.inf)
    td = worker.sample_batch()
    assert td.batch_size[0] == 64 and worker.stats()["rejected_neginf"] == 0
    assert int(torch.isneginf(td["log_rewards"]).sum()) == len(worker.poisoned_rows[0]) > 0
