"""Sampler: valid trajectories, padding conventions, backward sampling, bad policies."""

import pytest
import torch

from gfn_dist.containers import Trajectories
from gfn_dist.estimators import DiscretePolicyEstimator
from gfn_dist.gym import BitSequence, HyperGrid, NonAutoregressiveBitSequence
from gfn_dist.modules import MLP, DiscreteUniform
from gfn_dist.samplers import Sampler, compile_supported

ENVS = {
    "hypergrid": lambda: HyperGrid(3, 4),
    "bitseq": lambda: BitSequence(word_size=2, seq_size=6),
    "nar_bitseq": lambda: NonAutoregressiveBitSequence(word_size=1, seq_size=5),
}


def make_pf(env, backward=False):
    n = env.n_actions - 1 if backward else env.n_actions
    return DiscretePolicyEstimator(MLP(env.preprocessor.output_dim, n, 16), env.n_actions, env.preprocessor, is_backward=backward)


def replay_is_consistent(env, traj: Trajectories):
    """Re-applies every action with the checked env.step from s0: states must match."""
    x = env.States(traj.states_tensor[0])
    assert bool(x.is_initial_state.all())
    for t in range(traj.max_length):
        a = traj.actions_tensor[t]
        x = env.step(x, env.Actions(a))
        assert torch.equal(x.tensor, traj.states_tensor[t + 1]), t
    assert bool(env.States(traj.states_tensor[-1]).is_sink_state.all())


@pytest.mark.parametrize("name", list(ENVS))
@pytest.mark.parametrize("kw", [{}, {"epsilon": 0.3, "temperature": 2.0}])
def test_forward_trajectories_are_valid(name, kw):
    torch.manual_seed(0)
    env = ENVS[name]()
    traj = Sampler(make_pf(env)).sample_trajectories(env, n=50, save_logprobs=True, **kw)
    replay_is_consistent(env, traj)
    a = traj.actions_tensor[..., 0]
    # terminating_idx counts actions including exit; the last one is exit.
    n = torch.arange(50)
    assert torch.equal(traj.terminating_idx, (a >= 0).sum(0))
    assert bool((a[traj.terminating_idx - 1, n] == env.n_actions - 1).all())
    assert torch.allclose(traj.log_rewards, env.log_reward(traj.terminating_states))
    assert bool((traj.log_probs[a < 0] == 0).all()) and bool((traj.log_probs[a >= 0] <= 0).all())


@pytest.mark.parametrize("name", list(ENVS))
def test_backward_trajectories_reach_s0(name):
    torch.manual_seed(0)
    env = ENVS[name]()
    fwd = Sampler(make_pf(env)).sample_trajectories(env, n=20)
    bwd = Sampler(make_pf(env, backward=True)).sample_trajectories(env, states=fwd.terminating_states, save_logprobs=True)
    assert bwd.is_backward
    n = torch.arange(20)
    assert bool(env.States(bwd.states_tensor[bwd.terminating_idx, n]).is_initial_state.all())
    assert torch.allclose(bwd.log_rewards, fwd.log_rewards)
    # Undo each backward action with a forward step: we must get back the previous state.
    for t in range(bwd.max_length):
        active = bwd.actions_tensor[t, :, 0] >= 0
        prev = bwd.states_tensor[t][active]
        cur = bwd.states_tensor[t + 1][active]
        assert torch.equal(env.step_tensor(cur, bwd.actions_tensor[t, active, 0]), prev)
    # Uniform P_B on a tree DAG (BitSequence) has probability 1 per step.
    if name == "bitseq":
        pb = DiscretePolicyEstimator(DiscreteUniform(env.n_actions - 1), env.n_actions, env.preprocessor, is_backward=True)
        b2 = Sampler(pb).sample_trajectories(env, states=fwd.terminating_states, save_logprobs=True)
        assert torch.allclose(b2.log_probs, torch.zeros_like(b2.log_probs))


class _BrokenPolicy(DiscretePolicyEstimator):
    """Ignores the mask of rows 1 and 3 (forces action 0 there)."""

    def to_probability_distribution(self, states, module_output, **kw):
        logits = torch.full_like(module_output, -1e9)
        logits[:, -1] = 0.0
        logits[1, :] = -1e9
        logits[1, 0] = 0.0
        logits[3, :] = -1e9
        logits[3, 0] = 0.0
        return torch.distributions.Categorical(logits=logits)


def test_invalid_action_from_custom_policy_names_rows():
    env = HyperGrid(2, 3)
    pf = _BrokenPolicy(DiscreteUniform(env.n_actions), env.n_actions, env.preprocessor)
    with pytest.raises(ValueError, match=r"trajectories \[1, 3\]"):
        Sampler(pf).sample_trajectories(env, n=5)


def test_sample_from_given_states_and_arguments():
    torch.manual_seed(0)
    env = HyperGrid(2, 5)
    pf = make_pf(env)
    start = env.States(torch.tensor([[4, 4], [2, 3]]))
    traj = Sampler(pf).sample_trajectories(env, states=start)
    assert torch.equal(traj.states_tensor[0], start.tensor)
    with pytest.raises(ValueError, match="exactly one"):
        Sampler(pf).sample_trajectories(env)
    with pytest.raises(ValueError, match="exactly one"):
        Sampler(pf).sample_trajectories(env, n=2, states=start)
    acts, lp, out = Sampler(pf).sample_actions(env, start, save_logprobs=True, save_estimator_outputs=True)
    assert acts.tensor.shape == (2, 1) and lp.shape == (2,) and out.shape == (2, env.n_actions)


def test_estimator_outputs_saved_per_step():
    torch.manual_seed(0)
    env = HyperGrid(2, 5)
    traj = Sampler(make_pf(env)).sample_trajectories(env, n=6, save_estimator_outputs=True)
    assert traj.estimator_outputs.shape == (traj.max_length, 6, env.n_actions)


class _ClimbsWhenX1IsOne(DiscretePolicyEstimator):
    """Ignores the mask: increments coordinate 0 whenever x1 == 1, else exits."""

    def to_probability_distribution(self, states, module_output, **kw):
        climb = states.tensor[:, 1] == 1
        logits = torch.full_like(module_output, -1e9)
        logits[:, -1] = torch.where(climb, -1e9, 0.0)
        logits[:, 0] = torch.where(climb, 0.0, -1e9)
        return torch.distributions.Categorical(logits=logits)


@pytest.mark.parametrize("n", [5, 40])
def test_invalid_action_after_compaction_names_original_rows(n):
    # n=40: all but rows 1 and 3 exit at step 0 and the working batch is compacted;
    # row 3's invalid action (at step 1) must still be reported by its original index.
    env = HyperGrid(2, 3)
    pf = _ClimbsWhenX1IsOne(DiscreteUniform(env.n_actions), env.n_actions, env.preprocessor)
    start = torch.zeros(n, 2, dtype=torch.long)
    start[1] = torch.tensor([2, 1])  # invalid at step 0
    start[3] = torch.tensor([1, 1])  # valid step to (2, 1), invalid at step 1
    assert n < Sampler.min_rows_to_compact or n // 2 >= 2
    with pytest.raises(ValueError, match=r"trajectories \[1\] at step 0"):
        Sampler(pf).sample_trajectories(env, states=env.States(start))
    start[1] = 0  # now only row 3 is invalid, at step 1 (after compaction when n=40)
    with pytest.raises(ValueError, match=r"trajectories \[3\] at step 1"):
        Sampler(pf).sample_trajectories(env, states=env.States(start))


def test_compacted_rollout_keeps_conventions_and_log_probs():
    """Compaction changes which rows are computed, not the result (long-tailed batch of 256)."""
    from gfn_dist.gflownet import get_trajectory_pfs

    torch.manual_seed(0)
    env = HyperGrid(4, 6)
    pf = make_pf(env)
    traj = Sampler(pf).sample_trajectories(env, n=256, save_logprobs=True)
    replay_is_consistent(env, traj)
    a = traj.actions_tensor[..., 0]
    assert torch.equal(traj.terminating_idx, (a >= 0).sum(0))
    assert bool((traj.log_probs[a < 0] == 0).all())
    assert torch.allclose(get_trajectory_pfs(pf, traj), traj.log_probs, atol=1e-5)


def _general_path_only(monkeypatch):
    """Disables the tensor-level shortcut: every step goes through compute_dist."""
    monkeypatch.setattr(DiscretePolicyEstimator, "masked_logits_fn", lambda self, env, kw=None: None)


@pytest.mark.parametrize("name", list(ENVS))
@pytest.mark.parametrize("n", [8, 80])  # 80 rows: the working batch is compacted
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.5, "sf_bias": 1.0}])
def test_fast_rollout_equals_general_path(name, n, kw, monkeypatch):
    """Same seed, same noise: the shortcut and compute_dist give identical trajectories."""
    env = ENVS[name]()
    torch.manual_seed(1)
    pf = make_pf(env)
    assert pf.masked_logits_fn(env, kw) is not None
    torch.manual_seed(7)
    fast = Sampler(pf).sample_trajectories(env, n=n, save_logprobs=True, **kw)
    _general_path_only(monkeypatch)
    torch.manual_seed(7)
    ref = Sampler(pf).sample_trajectories(env, n=n, save_logprobs=True, **kw)
    assert torch.equal(fast.states_tensor, ref.states_tensor)
    assert torch.equal(fast.actions_tensor, ref.actions_tensor)
    assert torch.equal(fast.terminating_idx, ref.terminating_idx)
    assert torch.allclose(fast.log_probs, ref.log_probs, atol=1e-6)
    assert torch.allclose(fast.log_rewards, ref.log_rewards)
    replay_is_consistent(env, fast)


def test_fast_rollout_is_skipped_for_epsilon_and_overrides():
    env = HyperGrid(2, 4)
    pf = make_pf(env)
    assert pf.masked_logits_fn(env, {"epsilon": 0.1}) is None
    assert pf.masked_logits_fn(env, {"unknown_kwarg": 1}) is None

    class Shifted(DiscretePolicyEstimator):
        def forward(self, states):
            return super().forward(states) + 1.0

    assert Shifted(pf.module, env.n_actions, env.preprocessor).masked_logits_fn(env, {}) is None
    with pytest.raises(ValueError, match="temperature"):
        pf.masked_logits_fn(env, {"temperature": 0.0})


def test_fast_rollout_runs_module_hooks():
    """A forward hook on the estimator still sees every rollout step."""
    env = HyperGrid(2, 4)
    pf = make_pf(env)
    calls = []
    handle = pf.register_forward_hook(lambda mod, inp, out: calls.append(out.shape[0]))
    traj = Sampler(pf).sample_trajectories(env, n=5)
    handle.remove()
    assert len(calls) == traj.max_length and set(calls) == {5}


@pytest.mark.parametrize("name, chunk, kw", [("hypergrid", 4, {"temperature": 0.5, "sf_bias": 1.0}), ("bitseq", 16, {})])
def test_compiled_rollout_equals_eager(name, chunk, kw):
    """Sampler(compile=True): same seed, same trajectories as the eager rollout (chunked or not)."""
    env = ENVS[name]()
    torch.manual_seed(1)
    pf = make_pf(env)
    assert compile_supported("cpu"), "torch.compile on CPU needs a C++ compiler (g++)"
    compiled = Sampler(pf, compile=True)
    compiled.compile_chunk_steps = chunk  # hypergrid(3, 4): 10 steps in chunks of 4 (3 chunks, the last past the end)
    for seed in (3, 4):
        torch.manual_seed(seed)
        ref = Sampler(pf).sample_trajectories(env, n=16, **kw)
        torch.manual_seed(seed)
        out = compiled.sample_trajectories(env, n=16, **kw)
        assert compiled.compile, "torch.compile failed: the sampler fell back to eager"
        assert torch.equal(out.states_tensor, ref.states_tensor)
        assert torch.equal(out.actions_tensor, ref.actions_tensor)
        assert torch.equal(out.terminating_idx, ref.terminating_idx)
        assert torch.allclose(out.log_rewards, ref.log_rewards)
        replay_is_consistent(env, out)
    # Not covered by the compiled path (saved log-probs): the eager rollout, same numbers.
    torch.manual_seed(5)
    a = compiled.sample_trajectories(env, n=16, save_logprobs=True, **kw)
    torch.manual_seed(5)
    b = Sampler(pf).sample_trajectories(env, n=16, save_logprobs=True, **kw)
    assert torch.equal(a.actions_tensor, b.actions_tensor) and torch.equal(a.log_probs, b.log_probs)


def _compiled_equals_eager(env, pf, n=16, seed=3):
    compiled = Sampler(pf, compile=True)
    torch.manual_seed(seed)
    ref = Sampler(pf).sample_trajectories(env, n=n)
    torch.manual_seed(seed)
    out = compiled.sample_trajectories(env, n=n)
    assert compiled.compile, "torch.compile failed: the sampler fell back to eager"
    assert torch.equal(out.states_tensor, ref.states_tensor)
    assert torch.equal(out.actions_tensor, ref.actions_tensor)
    assert torch.allclose(out.log_rewards, ref.log_rewards)
    return compiled


def test_compiled_chunks_do_not_leak_between_environments():
    """A chunk compiled for an environment that is then freed is never reused for the next
    one (dynamo guards closures by id; a freed env's address is often reused at once)."""
    import gc

    for height in (5, 4):  # the same class and layout, different constants
        env = HyperGrid(2, height)
        torch.manual_seed(0)
        _compiled_equals_eager(env, make_pf(env))
        del env
        gc.collect()


def test_compiled_rollout_computes_an_uncompilable_reward_eagerly(monkeypatch):
    """If the chunk with the environment's reward in it fails to compile, the sampler
    rebuilds the chunk without it (rewards computed eagerly), not the eager rollout."""
    real_compile = torch.compile

    def compile_failing_with_rewards(fn, **kw):
        cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__)))
        if cells["with_rewards"]:
            def broken(*args):
                raise RuntimeError("simulated: the reward does not compile")
            return broken
        return real_compile(fn, **kw)

    monkeypatch.setattr(torch, "compile", compile_failing_with_rewards)
    env = HyperGrid(2, 4)
    torch.manual_seed(0)
    compiled = _compiled_equals_eager(env, make_pf(env))
    (entry,) = [e for _, e in compiled._chunks.values()]
    assert not entry.with_rewards
