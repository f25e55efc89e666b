"""gfn_dist.compat.torchgfn: a torchgfn 2.4 environment run as it is, checked against the original on all states."""

import pytest
import torch
from gfn.gym import HyperGrid as TorchgfnHyperGrid  # torchgfn==2.4.1, the optional extra
from gfn.gym import SetAddition

from gfn_dist.builders import build_env, build_pb, build_pf, exact_terminating_distribution, validate_task
from gfn_dist.compat.torchgfn import TorchgfnEnv
from gfn_dist.config import ConfigError, load_config
from gfn_dist.gflownet import TBGFlowNet
from gfn_dist.gym import HyperGrid
from gfn_dist.samplers import Sampler

HG = ["env.name=gfn_dist.compat.torchgfn:TorchgfnEnv", "env.kwargs.env=gfn.gym:HyperGrid",
      "env.kwargs.kwargs={ndim: 2, height: 5, store_all_states: true, validate_modes: false}",
      "env.kwargs.preprocessor=one_hot", "model.hidden_dim=32"]


def edges(env, x):
    """Every (state, allowed non-exit action) pair of the states ``x``."""
    parent, action = torch.nonzero(env.forward_mask(x)[:, :-1], as_tuple=True)
    return x[parent], action


def check_against_original(env):
    inner = env.inner
    x = env.all_states.tensor
    orig = inner.states_from_tensor(x)
    assert torch.equal(env.forward_mask(x), orig.forward_masks)
    assert torch.equal(env.backward_mask(x), orig.backward_masks)
    xs, a = edges(env, x)
    mine = env.step(env.States(xs), env.Actions(a.unsqueeze(-1))).tensor
    # The original's own step on the same (non-sink, non-exit) rows; cast: torchgfn's SetAddition
    # returns int64 children of its float states.
    theirs = inner.step(inner.states_from_tensor(xs.clone()), inner.actions_from_tensor(a.unsqueeze(-1))).tensor
    assert torch.equal(mine, theirs.to(mine.dtype))
    back = env.backward_step(env.States(mine), env.Actions(a.unsqueeze(-1))).tensor
    theirs_back = inner.backward_step(inner.states_from_tensor(mine.clone()), inner.actions_from_tensor(a.unsqueeze(-1)))
    assert torch.equal(back, theirs_back.tensor.to(back.dtype)) and torch.equal(back, xs)
    term = env.terminating_states
    assert torch.equal(term.tensor, inner.terminating_states.tensor)
    assert torch.equal(env.log_reward(term), inner.log_reward(inner.terminating_states))
    assert torch.equal(env.get_states_indices(x), inner.get_states_indices(orig))
    assert torch.equal(env.get_terminating_states_indices(term.tensor), torch.arange(len(term)))


def test_hypergrid_by_import_path_equals_the_original_on_all_states():
    cfg = load_config(None, HG)
    validate_task(cfg)
    env = build_env(cfg)
    assert isinstance(env, TorchgfnEnv) and isinstance(env.inner, TorchgfnHyperGrid)
    check_against_original(env)
    assert torch.allclose(env.true_dist(), env.inner.true_dist().double(), atol=1e-6)
    assert abs(env.log_partition() - env.inner.log_partition()) < 1e-5
    native = HyperGrid(2, 5)  # gfn_dist's own HyperGrid, same "original" reward
    assert env.max_traj_len == native.max_traj_len
    assert torch.allclose(env.true_dist(), native.true_dist(), atol=1e-6)


def test_set_addition_instance_with_float_states():
    inner = SetAddition(n_items=4, max_items=3, reward_fn=lambda x: x.sum(-1).float() + 1.0)
    env = TorchgfnEnv(inner, preprocessor="identity")
    assert env.max_traj_len == 4  # three additions, then exit
    check_against_original(env)


def test_sampled_trajectories_are_valid_in_the_original():
    torch.manual_seed(0)
    cfg = load_config(None, HG)
    env = build_env(cfg)
    traj = Sampler(build_pf(cfg, env)).sample_trajectories(env, n=64)
    x = traj.terminating_states.tensor
    assert bool(((x >= 0) & (x < 5)).all())
    assert torch.equal(traj.log_rewards, env.inner.log_reward(env.inner.states_from_tensor(x)))


def test_bad_inner_env_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^env.kwargs: .*not a subclass of torchgfn"):
        build_env(load_config(None, HG[:1] + ["env.kwargs.env=user_task.multiset:Multiset"]))
    with pytest.raises(ConfigError, match=r"^env.kwargs: .*pass max_traj_len"):
        build_env(load_config(None, HG[:2] + ["env.kwargs.kwargs={ndim: 2, height: 5, validate_modes: false}"]))


def test_tb_training_on_the_wrapped_env_reduces_exact_l1():
    torch.manual_seed(0)
    cfg = load_config(None, HG)
    env = build_env(cfg)
    pf, pb = build_pf(cfg, env), build_pb(cfg, env)
    loss_fn = TBGFlowNet(pf, pb)
    opt = torch.optim.Adam([{"params": list(pf.parameters()) + list(pb.parameters()), "lr": 3e-3},
                            {"params": [loss_fn.logZ], "lr": 0.1}])
    target = env.true_dist()
    l1_start = float((exact_terminating_distribution(env, pf) - target).abs().sum())
    sampler = Sampler(pf)
    for _ in range(150):
        loss = loss_fn.loss(env, sampler.sample_trajectories(env, n=16, epsilon=0.05))
        opt.zero_grad()
        loss.backward()
        opt.step()
    l1_end = float((exact_terminating_distribution(env, pf) - target).abs().sum())
    assert l1_end < 0.5 * l1_start, (l1_start, l1_end)
