"""Learners never call the reward: log-rewards travel with the batch (issue 14, item 4).

A rollout worker (in-process ``RolloutWorker`` with the run's ``build_rollout_parts``)
samples batches in the replay format; its pushed keys are exactly ``SHIPPED_KEYS``
(``log_rewards`` among them, ``log_probs`` not). Then every reward hook of the
environment class (``log_reward_tensor``, ``log_reward``, ``reward``) is made to
raise, and a ``Learner`` (world size 1) fed those batches by a stand-in replay runs
several training steps: they must succeed, and the loss must move the parameters.
Checked for the built-in HyperGrid and for the user task by import path
(tests/user_task: Multiset), with TB and with DB / SubTB (which also read the
terminal log-reward per transition).
"""

from pathlib import Path

import pytest
import torch

from gfn_dist.builders import build_env, build_gflownet, build_policies, build_rollout_parts
from gfn_dist.config import load_config
from gfn_dist.distributed.cluster import DistContext
from gfn_dist.distributed.learner import Learner
from gfn_dist.distributed.rollout_actor import SHIPPED_KEYS, RolloutWorker

ROOT = Path(__file__).resolve().parents[1]
N_STEPS = 4


class BatchReplay:
    """Stand-in for ``ReplayClient``: ``sample`` returns the next prepared batch, sliced to ``n``."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.calls = 0

    def sample(self, n, timeout_s=None, should_stop=None, on_pause=None):
        td = self.batches[self.calls % len(self.batches)][:n]
        self.calls += 1
        return td

    def sizes(self):
        return [sum(b.batch_size[0] for b in self.batches)]


class RewardCalled(AssertionError):
    pass


def _raise(*args, **kwargs):
    raise RewardCalled("the learner called the reward")


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        (None, ["env.hypergrid.height=4", "loss.name=tb"]),
        (None, ["env.hypergrid.height=4", "loss.name=db"]),
        ("tests/user_task/multiset_tb.yaml", []),
        ("tests/user_task/multiset_tb.yaml", ["loss.name=subtb"]),
    ],
)
def test_learner_steps_with_reward_hooks_raising(preset, overrides, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    cfg = load_config(ROOT / preset if preset else None,
                      ["learner.batch_size=16", "rollout.trajectories_per_push=16", "learner.prefetch=false",
                       "logging.wandb.mode=disabled", *overrides])
    worker = RolloutWorker(cfg, 0, build_rollout_parts)
    batches = [worker.sample_batch() for _ in range(3)]
    for td in batches:
        assert set(td.keys()) == set(SHIPPED_KEYS)
        assert td["log_rewards"].shape == (16,) and torch.isfinite(td["log_rewards"]).all()

    ctx = DistContext(0, 1, 0, "local", torch.device("cpu"), None)
    env = build_env(cfg, ctx.device)
    policies = build_policies(cfg, env)
    gflownet = build_gflownet(cfg, env, policies)
    # The shipped log-rewards are the environment's (before the hooks are disabled).
    x = batches[0]["states"][torch.arange(16), batches[0]["terminating_idx"] - 1]  # (N, T+1, ...): terminal at ti - 1
    torch.testing.assert_close(batches[0]["log_rewards"], env.log_reward(x).float())
    replay = BatchReplay(batches)
    learner = Learner(cfg, env, policies, gflownet, ctx, replay=replay)
    for hook in ("log_reward_tensor", "log_reward", "reward"):
        monkeypatch.setattr(type(env), hook, _raise)
    with pytest.raises(RewardCalled):  # the hooks do raise: a learner that called one would fail
        env.log_reward(x)
    before = [p.detach().clone() for p in policies.parameters()]
    for _ in range(N_STEPS):
        learner.train_step()
    learner.close()
    assert learner.step == N_STEPS and replay.calls == N_STEPS
    assert any(not torch.equal(a, p) for a, p in zip(before, policies.parameters(), strict=True))
    row = learner.reduce_metrics()
    assert row["step"] == N_STEPS and torch.isfinite(torch.tensor(row["loss"]))
