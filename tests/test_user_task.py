"""A user's task by import path (tests/user_task): the environment's contract, building it from the
config, the bad-input messages, and single-process TB training on it."""

import math

import pytest
import torch
from user_task.multiset import Multiset

from gfn_dist.builders import build_env, build_pb, build_pf, exact_terminating_distribution, validate_task
from gfn_dist.config import ConfigError, load_config
from gfn_dist.gflownet import TBGFlowNet
from gfn_dist.samplers import Sampler

ENV = "user_task.multiset:Multiset"
POLICY = "user_task.nets:make_policy"


def task_cfg(*overrides):
    return load_config(None, [f"env.name={ENV}", "env.kwargs.n_types=3", "env.kwargs.size=4",
                              f"model.policy={POLICY}", f"model.pb={POLICY}", "model.kwargs.hidden_dim=32",
                              "model.pb_kwargs={hidden_dim: 32, backward: true}", *overrides])


# ---------------------------------------------------------------------------- the environment


def test_masks_and_steps_are_consistent_on_every_state():
    env = Multiset(n_types=3, size=4)
    x = env.all_states.tensor
    fwd, bwd = env.forward_mask(x), env.backward_mask(x)
    full = x.sum(-1) == env.size
    assert torch.equal(fwd[:, -1], full)  # exit exactly at full multisets
    assert torch.equal(fwd[:, :-1].any(-1), ~full)
    assert bool(env.forward_mask(env.sf.unsqueeze(0)).any())
    parent, action = torch.nonzero(fwd[:, :-1], as_tuple=True)
    child = env.step(env.States(x[parent]), env.Actions(action.unsqueeze(-1)))
    child_idx = env.get_states_indices(child)
    assert bool((child_idx >= 0).all())  # children are states of the enumeration
    assert bool(bwd[child_idx, action].all())  # the child can undo the action ...
    back = env.backward_step(child, env.Actions(action.unsqueeze(-1)))
    assert torch.equal(back.tensor, x[parent])  # ... and undoing it gives the parent back
    # Every backward-allowed action at a state is the undoing of a forward edge into it.
    assert int(bwd.sum()) == parent.numel()
    assert torch.equal(env.get_states_indices(env.all_states), torch.arange(env.n_states))


def test_several_paths_per_terminal_state():
    """Trajectory counts by DP over the DAG equal the multinomial size! / prod c_i!."""
    env = Multiset(n_types=3, size=4)
    x = env.all_states.tensor
    paths = torch.zeros(env.n_states, dtype=torch.float64)
    paths[env.get_states_indices(env.s0.unsqueeze(0))] = 1
    order = torch.argsort(x.sum(-1))
    for i in order.tolist():  # topological order: by number of items
        for a in torch.nonzero(env.forward_mask(x[i:i + 1])[0, :-1]).flatten().tolist():
            paths[env.get_states_indices(env.step_tensor(x[i:i + 1], torch.tensor([a])))] += paths[i]
    term = env.terminating_states.tensor
    got = paths[env.get_states_indices(term)]
    expected = torch.tensor([math.factorial(env.size) / math.prod(math.factorial(int(c)) for c in row)
                             for row in term], dtype=torch.float64)
    assert torch.equal(got, expected)
    assert float(got.max()) > 1


def test_true_dist_and_log_partition():
    env = Multiset(n_types=4, size=5, values=[0.3, -0.2, 1.0, 0.5], lam=0.7, temperature=0.5)
    p = env.true_dist()
    assert p.dtype == torch.float64 and abs(float(p.sum()) - 1) < 1e-9
    log_r = env.log_reward(env.terminating_states).double()
    assert abs(env.log_partition() - float(torch.logsumexp(log_r, 0))) < 1e-5  # closed form vs enumeration
    assert torch.allclose(p, torch.softmax(log_r, 0), atol=1e-6)
    assert len(env.terminating_states) == math.comb(4 + 5 - 1, 5)
    brute = log_r >= log_r.max() - 1e-5
    assert torch.equal(env.is_mode(env.terminating_states.tensor), brute)


# ---------------------------------------------------------------------------- by import path


def test_builds_by_import_path():
    cfg = task_cfg()
    validate_task(cfg)
    env = build_env(cfg)
    assert isinstance(env, Multiset) and (env.n_types, env.size) == (3, 4)
    pf, pb = build_pf(cfg, env), build_pb(cfg, env)
    states = env.all_states
    assert pf(states).shape == (env.n_states, env.n_actions)
    assert pb(states).shape == (env.n_states, env.n_actions - 1)
    assert type(pf.module).__name__ == "ResidualPolicy"


def test_validate_task_leaves_the_global_rng_alone():
    cfg = task_cfg()
    torch.manual_seed(3)
    validate_task(cfg)
    a = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(a, torch.rand(3))


@pytest.mark.parametrize("overrides,key,fragment", [
    (["env.name=user_task.broken:Env"], "env.name", "No module named 'gfn_dist_no_such_dependency'"),
    (["env.name=user_task.no_such_module:Env"], "env.name", "No module named 'user_task.no_such_module'"),
    (["env.name=user_task.multiset:Nope"], "env.name", "has no attribute 'Nope'"),
    (["env.name=user_task.bad:NotAnEnv"], "env.name", "not a subclass of gfn_dist.env.DiscreteEnv"),
    (["env.kwargs.n_typez=3"], "env.kwargs", "unexpected keyword argument 'n_typez'"),
    (["env.kwargs.size=0"], "env.kwargs", "need n_types >= 2 and size >= 1"),
    (["model.policy=user_task.bad:wrong_width"], "model.policy", "expected (2, 4)"),
    (["model.policy=user_task.bad:not_a_module"], "model.policy", "expected a torch.nn.Module"),
    (["model.policy=user_task.bad:not_callable"], "model.policy", "is not callable"),
    (["model.pb_kwargs.backward=false"], "model.pb", "expected (2, 3)"),  # a P_F-wide module as P_B
    (["model.kwargs.nonsense=1"], "model.policy", "unexpected keyword argument 'nonsense'"),
])
def test_bad_user_input_is_one_line_naming_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        validate_task(task_cfg(*overrides))
    msg = str(info.value)
    assert msg.startswith(f"{key}: ") and fragment in msg and "\n" not in msg, msg


def test_config_rejects_names_that_are_neither_builtin_nor_import_path():
    with pytest.raises(ConfigError, match=r"^env.name: .*import path"):
        load_config(None, ["env.name=multiset"])
    with pytest.raises(ConfigError, match=r"^env.kwargs: "):
        load_config(None, ["env.kwargs.size=3"])  # kwargs of a built-in env
    with pytest.raises(ConfigError, match=r"^model.policy: "):
        load_config(None, ["model.policy=user_task.nets"])  # no ':Attr'


# ---------------------------------------------------------------------------- training


def test_tb_training_on_the_user_task_reduces_exact_l1():
    torch.manual_seed(0)
    cfg = task_cfg()
    env = build_env(cfg)
    pf, pb = build_pf(cfg, env), build_pb(cfg, env)
    gfn = TBGFlowNet(pf, pb)
    opt = torch.optim.Adam([{"params": list(pf.parameters()) + list(pb.parameters()), "lr": 3e-3},
                            {"params": [gfn.logZ], "lr": 0.1}])
    target = env.true_dist()

    def l1() -> float:
        return float((exact_terminating_distribution(env, pf) - target).abs().sum())

    l1_start = l1()
    sampler = Sampler(pf)
    for _ in range(300):
        traj = sampler.sample_trajectories(env, n=32, epsilon=0.05)
        loss = gfn.loss(env, traj)
        opt.zero_grad()
        loss.backward()
        opt.step()
    l1_end = l1()
    assert l1_end < 0.5 * l1_start, (l1_start, l1_end)
    assert abs(float(gfn.logZ.detach()) - env.log_partition()) < 0.3


def test_recurrent_factory_by_import_path():
    torch.manual_seed(0)
    cfg = task_cfg("model.policy=user_task.nets:make_recurrent", "model.kwargs={hidden_dim: 16}",
                   "model.pb_kwargs={hidden_dim: 16, backward: true}", "model.pb=user_task.nets:make_policy")
    validate_task(cfg)
    env = build_env(cfg)
    pf, pb = build_pf(cfg, env), build_pb(cfg, env)
    assert not pf.is_vectorized
    loss = TBGFlowNet(pf, pb).loss(env, Sampler(pf).sample_trajectories(env, n=8))
    assert torch.isfinite(loss)
    with pytest.raises(ConfigError, match=r"^model.policy: .*make_recurrent maps a dummy batch \(2, 15\) to \(2, 5\), expected \(2, 4\)"):
        validate_task(task_cfg("model.policy=user_task.nets:make_recurrent", "model.kwargs={width: 1}",
                               "model.pb_kwargs={backward: true}"))
