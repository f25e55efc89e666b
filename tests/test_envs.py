"""Environment oracles: closed-form partition functions, masks, steps, enumeration."""

import math

import pytest
import torch

from gfn_dist.gym import BitSequence, HyperGrid, NonAutoregressiveBitSequence


def test_hypergrid_2x8_partition_and_modes():
    env = HyperGrid(2, 8)
    # Closed form: per coordinate x/(H-1)-0.5 for x in 0..7; R1 term needs |.|>0.25 in both
    # dims (x in {0,1,6,7}: 4 values), R2 term needs 0.3<|.|<0.4 (x in {1,6}: 2 values).
    Z = 0.1 * 64 + 0.5 * 4**2 + 2.0 * 2**2
    assert Z == pytest.approx(22.4)
    assert env.log_partition() == pytest.approx(math.log(Z), abs=1e-5)
    assert env.log_partition() == pytest.approx(3.10906, abs=1e-5)
    assert env.n_modes == 4
    modes = env.terminating_states.tensor[env.mode_mask()]
    assert torch.allclose(env.reward(modes), torch.full((4,), 2.6))
    assert sorted(map(tuple, modes.tolist())) == [(1, 1), (1, 6), (6, 1), (6, 6)]
    assert torch.allclose(env.true_dist().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_hypergrid_masks_and_steps():
    env = HyperGrid(2, 3)
    s = env.States(torch.tensor([[0, 0], [2, 1], [2, 2]]))
    assert s.forward_masks.tolist() == [[True, True, True], [False, True, True], [False, False, True]]
    assert s.backward_masks.tolist() == [[False, False], [True, True], [True, True]]
    nxt = env.step(s[:2], env.Actions(torch.tensor([[1], [2]])))
    assert nxt.tensor.tolist() == [[0, 1], [-1, -1]]
    assert nxt.is_sink_state.tolist() == [False, True]
    back = env.backward_step(s[1:], env.Actions(torch.tensor([[0], [1]])))
    assert back.tensor.tolist() == [[1, 1], [2, 1]]


def test_invalid_actions_name_rows():
    env = HyperGrid(2, 3)
    s = env.States(torch.tensor([[0, 0], [2, 0], [2, 2], [1, 1]]))
    with pytest.raises(ValueError, match=r"rows \[1, 2\]"):
        env.step(s, env.Actions(torch.tensor([[1], [0], [0], [2]])))
    with pytest.raises(ValueError, match=r"out of range.*rows \[0\]"):
        env.step(s, env.Actions(torch.tensor([[7], [1], [2], [2]])))
    with pytest.raises(ValueError, match=r"backward mask in rows \[0\]"):
        env.backward_step(s, env.Actions(torch.tensor([[0], [0], [1], [1]])))


@pytest.mark.parametrize(
    "env",
    [
        HyperGrid(3, 4),
        BitSequence(word_size=1, seq_size=5),
        BitSequence(word_size=2, seq_size=4),
        NonAutoregressiveBitSequence(word_size=1, seq_size=4),
        NonAutoregressiveBitSequence(word_size=2, seq_size=4),
    ],
    ids=["hypergrid", "bitseq", "bitseq_w2", "nar", "nar_w2"],
)
def test_enumeration_is_a_bijection(env):
    x = env.all_states.tensor
    assert x.shape[0] == env.n_states
    idx = env.get_states_indices(x)
    assert torch.equal(idx, torch.arange(env.n_states))
    # Every state reachable by a forward step is in the enumeration and indexed consistently.
    mask = env.forward_mask(x)[:, :-1]
    parent, action = torch.nonzero(mask, as_tuple=True)
    child = env.step_tensor(x[parent], action)
    assert torch.equal(env.all_states.tensor[env.get_states_indices(child)], child)
    # Backward step undoes forward step.
    assert torch.equal(env.backward_step_tensor(child, action), x[parent])
    # Terminating states are the ones where exit is allowed.
    term = env.terminating_states.tensor
    assert env.forward_mask(term)[:, -1].all()
    assert int(env.forward_mask(x)[:, -1].sum()) == term.shape[0]


def test_bitsequence_reward_is_hamming_to_nearest_mode():
    env = BitSequence(word_size=2, seq_size=6, n_modes=3, temperature=2.0, seed=3)
    term = env.terminating_states.tensor
    bits = env.words_to_bits(term)
    # Reference: Python loop over sequences and modes.
    for i in [0, 5, 17, 63]:
        b = bits[i].tolist()
        dists = [sum(int(u != v) for u, v in zip(b, m)) for m in env.modes.tolist()]
        assert env.log_reward(term[i : i + 1]).item() == pytest.approx(-min(dists) / 2.0)
    # The modes themselves have log R = 0.
    assert bool((env.log_reward(term).max() == 0.0))


def test_bad_env_arguments():
    with pytest.raises(ValueError, match="height"):
        HyperGrid(2, 1)
    with pytest.raises(ValueError, match="R0"):
        HyperGrid(2, 4, R0=0.0)
    with pytest.raises(ValueError, match="multiple of word_size"):
        BitSequence(word_size=3, seq_size=8)
