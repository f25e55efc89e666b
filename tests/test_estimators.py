"""Policy distributions against direct reference computations; the rollout API."""

import math

import pytest
import torch

from gfn_dist.estimators import DiscretePolicyEstimator, MaskedCategorical, RolloutContext, ScalarEstimator
from gfn_dist.gym import HyperGrid
from gfn_dist.modules import MLP


def reference_probs(logits, mask, temperature=1.0, sf_bias=0.0, epsilon=0.0, backward=False):
    """Row-by-row Python reference of the exploration policy."""
    out = []
    for row, m in zip(logits.tolist(), mask.tolist()):
        row = list(row)
        if not backward:
            row[-1] -= sf_bias
        z = [math.exp(v / temperature) if ok else 0.0 for v, ok in zip(row, m)]
        s = sum(z)
        p = [v / s for v in z]
        n_valid = sum(m)
        out.append([(1 - epsilon) * pi + (epsilon / n_valid if ok else 0.0) for pi, ok in zip(p, m)])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"temperature": 2.5},
        {"temperature": 0.3},
        {"sf_bias": 1.7},
        {"epsilon": 0.2},
        {"epsilon": 1.0},
        {"temperature": 1.5, "sf_bias": -0.5, "epsilon": 0.1},
    ],
)
@pytest.mark.parametrize("backward", [False, True])
def test_exploration_distribution_matches_reference(kw, backward):
    torch.manual_seed(0)
    env = HyperGrid(3, 4)
    n_out = env.n_actions - 1 if backward else env.n_actions
    est = DiscretePolicyEstimator(MLP(env.preprocessor.output_dim, n_out, 16), env.n_actions, env.preprocessor, is_backward=backward)
    x = torch.tensor([[0, 0, 0], [3, 1, 2], [3, 3, 1], [1, 2, 3], [3, 3, 3]])
    if backward:
        x = x[1:]  # s0 has no parent
    states = env.States(x)
    logits = est(states)
    dist = est.to_probability_distribution(states, logits, **kw)
    mask = states.backward_masks if backward else states.forward_masks
    ref = reference_probs(logits.detach(), mask, backward=backward, **kw)
    assert torch.allclose(dist.probs.double(), ref, atol=1e-6)
    # log_prob agrees with probs on every allowed action.
    for a in range(n_out):
        allowed = mask[:, a]
        lp = dist.log_prob(torch.full((len(x),), a))[allowed]
        assert torch.allclose(lp.double().exp(), ref[allowed, a], atol=1e-6)


def test_bad_exploration_parameters():
    env = HyperGrid(2, 4)
    est = DiscretePolicyEstimator(MLP(env.preprocessor.output_dim, env.n_actions, 8), env.n_actions, env.preprocessor)
    st = env.reset(3)
    with pytest.raises(ValueError, match="temperature"):
        est.to_probability_distribution(st, est(st), temperature=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        est.to_probability_distribution(st, est(st), epsilon=1.5)


def test_wrong_output_dim_is_reported():
    env = HyperGrid(2, 4)
    est = DiscretePolicyEstimator(MLP(env.preprocessor.output_dim, env.n_actions + 1, 8), env.n_actions, env.preprocessor)
    with pytest.raises(ValueError, match="expected 3"):
        est(env.reset(2))


def test_gumbel_sampling_frequencies():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, -math.inf, 2.0], [3.0, -math.inf, -math.inf, 0.0]])
    dist = MaskedCategorical(logits)
    n = 20000
    samples = dist.sample((n,))
    assert samples.shape == (n, 2, 1)  # torchgfn's categorical shape: the action dimension is kept
    samples = samples.squeeze(-1)
    probs = dist.probs
    for row in range(2):
        counts = torch.bincount(samples[:, row], minlength=4).double()
        assert counts[probs[row] == 0].sum() == 0
        expected = probs[row].double() * n
        nz = expected > 0
        chi2 = (((counts[nz] - expected[nz]) ** 2) / expected[nz]).sum().item()
        assert chi2 < 16.27  # chi-square 0.999 quantile, <= 3 dof
    # The pre-drawn noise path is the same Gumbel-max draw.
    noise = torch.empty(n, 2, 4).exponential_().log_()
    s2 = dist.sample_with_log_noise(noise)
    counts = torch.bincount(s2[:, 0], minlength=4).double()
    assert abs(counts[3] / n - probs[0, 3].item()) < 0.02


def test_rollout_api_records_padded_outputs():
    torch.manual_seed(0)
    env = HyperGrid(2, 4)
    est = DiscretePolicyEstimator(MLP(env.preprocessor.output_dim, env.n_actions, 8), env.n_actions, env.preprocessor)
    ctx = est.init_context(4, "cpu")
    assert isinstance(ctx, RolloutContext) and ctx.batch_size == 4
    mask = torch.tensor([True, False, True, True])
    st = env.States(torch.tensor([[0, 0], [1, 0], [3, 3]]))
    dist, ctx = est.compute_dist(st, ctx, step_mask=mask, save_estimator_outputs=True)
    assert ctx.trajectory_estimator_outputs[0].shape == (4, env.n_actions)
    assert bool((ctx.trajectory_estimator_outputs[0][1] == 0).all())
    assert est.get_current_estimator_output(ctx).shape == (3, env.n_actions)
    lp, ctx = est.log_probs(torch.tensor([0, 1, 2]), dist, ctx, step_mask=mask, save_logprobs=True)
    assert lp.shape == (4,) and lp[1] == 0 and ctx.trajectory_log_probs[0] is lp
    # Per-step path refuses actions outside the mask; the vectorized path returns -inf.
    with pytest.raises(ValueError, match="infinite"):
        est.log_probs(torch.tensor([0, 1, 0]), dist, ctx, step_mask=mask)
    raw, _ = est.log_probs(torch.tensor([0, 1, 0]), dist, ctx, vectorized=True)
    assert torch.isinf(raw[2])


def test_scalar_estimator_shape():
    env = HyperGrid(2, 4)
    est = ScalarEstimator(MLP(env.preprocessor.output_dim, 1, 8), env.preprocessor)
    assert est(env.reset(5)).shape == (5, 1)


def test_mlp_fast_path_matches_module_calls():
    """The functional Linear/ReLU path gives the module path's outputs and gradients; hooks force the latter."""
    torch.manual_seed(0)
    mlp = MLP(6, 3, 32, 2)
    x = torch.randn(10, 6)
    out = mlp(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    ref = mlp.last_layer(mlp.trunk(x))  # the plain module calls
    ref.square().sum().backward()
    assert torch.allclose(out, ref, atol=1e-6)
    for g, p in zip(grads, mlp.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)
    seen = []
    h = mlp.trunk[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    mlp(x)
    h.remove()
    assert seen == [torch.Size([10, 32])]
    mlp(x)
    assert len(seen) == 1


def test_masked_logits_fn_equals_distribution_logits():
    env = HyperGrid(3, 4)
    for backward in (False, True):
        n_out = env.n_actions - 1 if backward else env.n_actions
        est = DiscretePolicyEstimator(MLP(env.preprocessor.output_dim, n_out, 16), env.n_actions, env.preprocessor, is_backward=backward)
        x = env.all_states.tensor
        kw = {"temperature": 1.7, "sf_bias": 0.4}
        fn = est.masked_logits_fn(env, kw)
        with torch.no_grad():
            ref = est.to_probability_distribution(env.States(x), est(env.States(x)), **kw)
            assert torch.equal(fn(x), ref._raw_logits)
