"""Sampled evaluation (gfn_dist.sampled_eval) against direct computations on small enumerable envs."""

import math

import torch
from user_task.multiset import Multiset

from gfn_dist.builders import exact_terminating_distribution
from gfn_dist.estimators import DiscretePolicyEstimator
from gfn_dist.gflownet import TBGFlowNet
from gfn_dist.gym import BitSequence
from gfn_dist.modules import MLP
from gfn_dist.sampled_eval import ModesTracker, sample_for_eval, sampled_metrics
from gfn_dist.samplers import Sampler


def policies(env, hidden=32):
    d = env.preprocessor.output_dim
    pf = DiscretePolicyEstimator(MLP(d, env.n_actions, hidden, 2), env.n_actions, env.preprocessor)
    pb = DiscretePolicyEstimator(MLP(d, env.n_actions - 1, hidden, 2), env.n_actions, env.preprocessor, is_backward=True)
    return pf, pb


def test_reward_mean_within_sampling_error_of_exact_expectation():
    torch.manual_seed(0)
    env = Multiset(n_types=3, size=4, lam=0.3)
    pf, pb = policies(env)
    p_t = exact_terminating_distribution(env, pf)  # the model's exact P_T
    r = env.log_reward(env.terminating_states).double().exp()
    mean, std = float((p_t * r).sum()), float((p_t * (r - (p_t * r).sum()) ** 2).sum().sqrt())
    n = 4000
    m = sampled_metrics(env, pf, pb, n, top_k=5, seed=1)
    assert abs(m["eval/reward_mean"] - mean) < 4 * std / math.sqrt(n), (m["eval/reward_mean"], mean)
    log_r = env.log_reward(env.terminating_states).double()
    assert abs(m["eval/log_reward_mean"] - float((p_t * log_r).sum())) < 4 * float(log_r.std()) / math.sqrt(n)


def test_unique_and_top_k_against_direct_computation():
    torch.manual_seed(0)
    env = Multiset(n_types=3, size=4)
    pf, pb = policies(env)
    m = sampled_metrics(env, pf, pb, 200, top_k=7, seed=5)
    torch.manual_seed(5)
    states, log_r, _, _ = sample_for_eval(env, pf, pb, 200)
    distinct = {tuple(row): float(lr) for row, lr in zip(states.tolist(), log_r.tolist())}
    best = sorted(distinct.values(), reverse=True)[:7]
    assert m["eval/num_unique"] == len(distinct)
    assert abs(m["eval/reward_top7_mean"] - sum(math.exp(v) for v in best) / len(best)) < 1e-5
    assert set(m) == {"eval/log_reward_mean", "eval/reward_mean", "eval/reward_top7_mean", "eval/num_unique",
                      "eval/logZ_elbo"}


def test_seeded_metrics_leave_the_global_rng_alone_and_repeat():
    env = Multiset(n_types=3, size=4)
    pf, pb = policies(env)
    torch.manual_seed(2)
    a = sampled_metrics(env, pf, pb, 64, seed=9)
    x = torch.rand(2)
    torch.manual_seed(2)
    assert torch.equal(x, torch.rand(2))
    assert sampled_metrics(env, pf, pb, 64, seed=9) == a


def test_logz_elbo_is_a_lower_bound_and_tight_after_training():
    torch.manual_seed(0)
    env = Multiset(n_types=3, size=4)
    log_z = env.log_partition()
    pf, pb = policies(env)
    n = 2000
    before = sampled_metrics(env, pf, pb, n, seed=0)
    assert before["eval/logZ_elbo"] < log_z - 0.2  # untrained: far below log Z
    gfn = TBGFlowNet(pf, pb)
    opt = torch.optim.Adam([{"params": list(pf.parameters()) + list(pb.parameters()), "lr": 3e-3},
                            {"params": [gfn.logZ], "lr": 0.1}])
    sampler = Sampler(pf)
    for _ in range(400):
        loss = gfn.loss(env, sampler.sample_trajectories(env, n=32, epsilon=0.05))
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, log_r, log_pf, log_pb = sample_for_eval(env, pf, pb, n)
    w = log_r.double() + log_pb - log_pf
    err = 4 * float(w.std()) / math.sqrt(n)
    after = sampled_metrics(env, pf, pb, n, log_z=float(gfn.logZ.detach()), seed=1)
    assert after["eval/logZ_elbo"] <= log_z + err  # a lower bound, up to sampling error
    assert log_z - after["eval/logZ_elbo"] < 0.05  # and tight for a trained model
    assert after["eval/logZ_elbo"] > before["eval/logZ_elbo"]
    assert abs(after["eval/logZ_elbo_gap"] - (float(gfn.logZ.detach()) - after["eval/logZ_elbo"])) < 1e-12


def test_modes_tracker_distinct_states_against_brute_force():
    torch.manual_seed(0)
    env = Multiset(n_types=3, size=4, values=[1.0, 1.0, 0.0], lam=0.0)  # several maximal multisets
    tracker = ModesTracker(env)
    term = env.terminating_states.tensor
    log_r = env.log_reward(term)
    modes = {tuple(x) for x, lr in zip(term.tolist(), log_r.tolist()) if lr >= float(log_r.max()) - 1e-5}
    assert len(modes) > 1
    seen = set()
    for _ in range(5):
        batch = term[torch.randint(len(term), (6,))]
        seen |= {tuple(x) for x in batch.tolist()} & modes
        assert tracker.update(batch) == len(seen)
    tracker.update(term)
    assert tracker.metrics() == {"eval/modes_found": len(modes)}
    clone = ModesTracker(env)
    clone.load_state_dict(tracker.state_dict())
    assert clone.num_found == len(modes)


def test_modes_tracker_bitsequence_counts_modes_within_radius():
    env = BitSequence(word_size=1, seq_size=8, n_modes=5, seed=3, mode_radius=1)
    tracker = ModesTracker(env)
    term = env.terminating_states.tensor
    ham = torch.tensor([[sum(int(b != mb) for b, mb in zip(x, m)) for m in env.modes.tolist()]
                        for x in env.words_to_bits(term).tolist()])
    found = set()
    for chunk in term[torch.randperm(len(term), generator=torch.Generator().manual_seed(0))].split(40)[:3]:
        idx = env.get_terminating_states_indices(chunk)
        found |= {m for i in idx.tolist() for m in range(env.n_modes) if ham[i, m] <= 1}
        assert tracker.update(chunk) == len(found)
    assert torch.equal(env.is_mode(term), (ham <= 1).any(1))


class _EnvOnAnotherDevice:
    """A BitSequence whose tables live on another device than the states fed to the tracker (a CUDA learner's
    env and the CPU replay batches; "meta" stands for "cuda" on a CPU-only machine). ``mode_hits`` records the
    device of what it is given and answers, on the CPU, that every row finds every mode."""

    def __init__(self, env, device):
        self.inner, self.device, self.seen = env, torch.device(device), []
        self.state_shape, self.s0 = env.state_shape, env.s0

    def mode_hits(self, x):
        self.seen.append(x.device)
        return torch.ones(x.shape[0], self.inner.n_modes, dtype=torch.bool)  # every mode found


def test_modes_tracker_moves_states_to_the_env_device():
    env = _EnvOnAnotherDevice(BitSequence(word_size=1, seq_size=6, n_modes=3), "meta")
    tracker = ModesTracker(env)
    assert tracker.update(env.inner.terminating_states.tensor[:5]) == 3  # CPU states in
    assert env.seen == [torch.device("meta")]  # the env saw them on its own device


def test_sampled_metrics_feeds_the_tracker():
    torch.manual_seed(0)
    env = BitSequence(word_size=1, seq_size=6, n_modes=3, mode_radius=0)
    pf, _ = policies(env)
    tracker = ModesTracker(env)
    m = sampled_metrics(env, pf, None, 300, modes=tracker, seed=0)
    torch.manual_seed(0)
    states = sample_for_eval(env, pf, None, 300)[0]
    brute = {tuple(x) for x in states.tolist()} & {tuple(x) for x in env.terminating_states.tensor[
        (env.log_reward(env.terminating_states) == 0)].tolist()}
    assert m["eval/modes_found"] == len(brute) == tracker.num_found


def test_modes_tracker_uses_mode_mask_of_hypergrid():
    from gfn_dist.gym import HyperGrid

    env = HyperGrid(2, 8)
    tracker = ModesTracker(env)
    assert tracker.update(env.all_states.tensor[:8]) == 0  # the row x_0 = 0 holds no mode
    assert tracker.update(env.all_states) == env.n_modes == 4


def test_gfn_dist_eval_reports_the_sampled_metrics(tmp_path):
    """``evaluate`` (``gfn-dist eval``) on a run of the user's task reports exactly ``sampled_metrics``."""
    from gfn_dist.builders import build_env, build_policies
    from gfn_dist.config import load_config, to_yaml
    from gfn_dist.evaluate import evaluate, load_policy

    cfg = load_config(None, ["env.name=user_task.multiset:Multiset", "env.kwargs.size=3", "model.hidden_dim=16",
                             "eval.top_k=4", f"run.dir={tmp_path}"])
    torch.manual_seed(0)
    policies = build_policies(cfg, build_env(cfg))
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    torch.save({"policies": policies.state_dict(), "step": 7}, tmp_path / "policy.pt")
    metrics, _ = evaluate(tmp_path, n_samples=300, seed=3, out_dir=tmp_path / "eval")
    lp = load_policy(tmp_path)
    expected = sampled_metrics(lp.env, lp.pf, lp.policies["pb"], 300, 4, None, ModesTracker(lp.env), seed=3)
    assert {k: metrics[k] for k in expected} == expected
    assert "eval/reward_top4_mean" in metrics and "eval/modes_found" in metrics and "l1_exact" in metrics


def test_standard_bitsequence_is_not_enumerable_and_has_sampled_metrics():
    """The 120-bit, 8-bit-word task (60 modes, arXiv:2201.13259 Sec. 5.3): no enumeration, sampled metrics only."""
    from gfn_dist.builders import is_enumerable

    env = BitSequence(word_size=8, seq_size=120, n_modes=60, mode_radius=44)  # wide: an untrained P_F finds some
    assert not is_enumerable(env)
    pf, _ = policies(env, hidden=16)
    tracker = ModesTracker(env)
    m = sampled_metrics(env, pf, None, 200, top_k=10, modes=tracker, seed=0)
    assert m["eval/num_unique"] == 200 and math.isfinite(m["eval/logZ_elbo"])
    torch.manual_seed(0)
    states = sample_for_eval(env, pf, None, 200)[0]
    ham = (env.words_to_bits(states).unsqueeze(1) != env.modes).sum(-1)  # brute force (200, 60)
    assert m["eval/modes_found"] == int((ham <= 44).any(0).sum()) > 0


def test_mode_radius_from_the_config():
    from gfn_dist.builders import build_env
    from gfn_dist.config import ConfigError, load_config

    env = build_env(load_config(None, ["env.name=nar_bitseq", "env.bitseq.mode_radius=2"]))
    assert env.mode_radius == 2
    x = env.terminating_states.tensor
    assert torch.equal(env.is_mode(x), env.hamming_to_modes(x).min(-1).values <= 2)
    try:
        load_config(None, ["env.bitseq.mode_radius=-1"])
        raise AssertionError("accepted a negative radius")
    except ConfigError as err:
        assert str(err).startswith("env.bitseq.mode_radius: ")
