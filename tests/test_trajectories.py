"""Trajectories container: wire format, selection, concatenation, validation."""

import pytest
import torch

from gfn_dist.containers import Trajectories
from gfn_dist.estimators import DiscretePolicyEstimator
from gfn_dist.gym import HyperGrid
from gfn_dist.modules import MLP
from gfn_dist.samplers import Sampler


@pytest.fixture
def env_and_traj():
    torch.manual_seed(0)
    env = HyperGrid(2, 6)
    pf = DiscretePolicyEstimator(MLP(env.preprocessor.output_dim, env.n_actions, 16), env.n_actions, env.preprocessor)
    return env, Sampler(pf).sample_trajectories(env, n=12, save_logprobs=True)


def assert_same(a: Trajectories, b: Trajectories):
    assert torch.equal(a.states_tensor, b.states_tensor)
    assert torch.equal(a.actions_tensor, b.actions_tensor)
    assert torch.equal(a.terminating_idx, b.terminating_idx)
    assert torch.equal(a.log_rewards, b.log_rewards)
    assert torch.equal(a.log_probs, b.log_probs)


def test_tensordict_round_trip(env_and_traj):
    env, traj = env_and_traj
    td = traj.to_tensordict(max_length=env.max_traj_len)
    assert td.batch_size == torch.Size([12])
    assert td["states"].shape == (12, env.max_traj_len + 1, 2)
    assert td["actions"].shape == (12, env.max_traj_len, 1)
    assert set(td.keys()) == {"states", "actions", "terminating_idx", "log_rewards", "log_probs"}
    back = Trajectories.from_tensordict(env, td)
    assert_same(back, traj)
    with pytest.raises(ValueError, match="max_length"):
        traj.to_tensordict(max_length=1)
    del td["log_rewards"]
    with pytest.raises(ValueError, match="log_rewards"):
        Trajectories.from_tensordict(env, td)


def test_indexing_and_extend(env_and_traj):
    env, traj = env_and_traj
    first, second = traj[:5], traj[5:]
    assert len(first) == 5 and first.max_length == int(traj.terminating_idx[:5].max())
    joined = Trajectories.cat([first, second])
    # Padding to the common length restores the original batch.
    assert_same(Trajectories.from_tensordict(env, joined.to_tensordict(traj.max_length)), traj)
    picked = traj[torch.tensor([3, 0])]
    assert torch.equal(picked.terminating_states.tensor, traj.terminating_states.tensor[[3, 0]])


def test_shape_validation():
    env = HyperGrid(2, 4)
    states = torch.zeros(3, 2, 2, dtype=torch.long)
    actions = torch.zeros(2, 2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="terminating_idx"):
        Trajectories(env, states, actions, torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="states"):
        Trajectories(env, states[:2], actions, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="log_probs"):
        Trajectories(env, states, actions, torch.tensor([1, 1]), log_probs=torch.zeros(3, 2))
