"""exact_terminating_distribution against brute-force path enumeration and against sampling."""

import pytest
import torch

from gfn_dist.estimators import DiscretePolicyEstimator
from gfn_dist.gym import BitSequence, HyperGrid, NonAutoregressiveBitSequence
from gfn_dist.modules import MLP, DiscreteUniform
from gfn_dist.samplers import Sampler


def brute_force_pt(env, pf):
    """Σ over every complete path of Π P_F, by depth-first search (one state at a time)."""
    pt = {}

    def visit(x, prob):
        lp = pf.log_prob_table(env.States(x.unsqueeze(0)))[0].double()
        mask = env.forward_mask(x.unsqueeze(0))[0]
        for a in torch.nonzero(mask).flatten().tolist():
            p = prob * float(lp[a].exp())
            if a == env.n_actions - 1:
                key = tuple(x.tolist())
                pt[key] = pt.get(key, 0.0) + p
            else:
                visit(env.step_tensor(x.unsqueeze(0), torch.tensor([a]))[0], p)

    with torch.no_grad():
        visit(env.s0, 1.0)
    term = env.terminating_states.tensor
    return torch.tensor([pt.get(tuple(t.tolist()), 0.0) for t in term], dtype=torch.float64)


ENVS = {
    "hypergrid_2x4": lambda: HyperGrid(2, 4),
    "hypergrid_3x3": lambda: HyperGrid(3, 3),
    "bitseq": lambda: BitSequence(word_size=1, seq_size=4),
    "nar_bitseq": lambda: NonAutoregressiveBitSequence(word_size=1, seq_size=3),
}


@pytest.mark.parametrize("name", list(ENVS))
@pytest.mark.parametrize("policy", ["uniform", "mlp"])
def test_exact_matches_brute_force(name, policy):
    torch.manual_seed(0)
    env = ENVS[name]()
    module = DiscreteUniform(env.n_actions) if policy == "uniform" else MLP(env.preprocessor.output_dim, env.n_actions, 16)
    pf = DiscretePolicyEstimator(module, env.n_actions, env.preprocessor)
    exact = env.exact_terminating_distribution(pf)
    ref = brute_force_pt(env, pf)
    assert exact.shape == (env.n_terminating_states,)
    assert torch.allclose(exact, ref, atol=1e-10)
    assert exact.sum().item() == pytest.approx(1.0, abs=1e-6)  # float32 policy probabilities


def test_exact_distribution_of_uniform_pf_on_1d_grid_closed_form():
    # 1-D grid of height H, uniform P_F: P(exit at x) = (1/2)^(x+1) for x < H-1, and the rest at H-1.
    env = HyperGrid(1, 5)
    pf = DiscretePolicyEstimator(DiscreteUniform(env.n_actions), env.n_actions, env.preprocessor)
    exact = env.exact_terminating_distribution(pf)
    expected = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625], dtype=torch.float64)
    assert torch.allclose(exact, expected, atol=1e-12)


@pytest.mark.parametrize("name", ["hypergrid_2x4", "nar_bitseq"])
def test_sampler_terminal_frequencies_match_exact(name):
    """Chi-square test of the Sampler's terminal states against the exact P_T (joint oracle)."""
    torch.manual_seed(0)
    env = ENVS[name]()
    pf = DiscretePolicyEstimator(MLP(env.preprocessor.output_dim, env.n_actions, 16), env.n_actions, env.preprocessor)
    exact = env.exact_terminating_distribution(pf)
    n = 20000
    traj = Sampler(pf).sample_trajectories(env, n=n)
    idx = env.get_terminating_states_indices(traj.terminating_states)
    counts = torch.bincount(idx, minlength=env.n_terminating_states).double()
    expected = exact * n
    keep = expected > 5
    chi2 = (((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum().item()
    dof = int(keep.sum()) - 1
    # 0.999 quantile of chi-square, Wilson-Hilferty approximation.
    z = 3.09
    q = dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3
    assert chi2 < q, (chi2, q)
