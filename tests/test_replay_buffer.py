"""Tests of the local ReplayBuffer: FIFO ring, sampling distributions, state round trip, validation."""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict

from gfn_dist.containers import ReplayBuffer

T = 4  # padded number of actions per trajectory
STATE_DIM = 2


def make_batch(ids, log_rewards=None, *, with_log_probs=True, t=T) -> TensorDict:
    """A replay batch whose items are identifiable by ``actor_id == id`` (states also encode the id)."""
    ids = torch.as_tensor(ids, dtype=torch.int64)
    n = ids.shape[0]
    if log_rewards is None:
        log_rewards = ids.to(torch.float32) * 0.01
    fields = {
        "states": ids.view(n, 1, 1).expand(n, t + 1, STATE_DIM).clone(),
        "actions": (ids.view(n, 1, 1) % 3).expand(n, t, 1).clone(),
        "terminating_idx": torch.full((n,), t, dtype=torch.int64),
        "log_rewards": torch.as_tensor(log_rewards, dtype=torch.float32),
        "policy_version": ids // 2,
        "actor_id": ids.clone(),
    }
    if with_log_probs:
        fields["log_probs"] = -ids.to(torch.float32).view(n, 1).expand(n, t).clone()
    return TensorDict(fields, batch_size=[n])


def stored_ids(buf: ReplayBuffer) -> list:
    return buf.contents()["actor_id"].tolist()


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper chi-square quantile (z=3.09: p=0.001) by the Wilson-Hilferty approximation."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2_stat(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


def states_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if isinstance(a[k], dict):
            if not states_equal(a[k], b[k]):
                return False
        elif not torch.equal(a[k], b[k]):
            return False
    return True


# ---------------------------------------------------------------------- ring / FIFO


def test_fifo_eviction_order_and_capacity():
    buf = ReplayBuffer(capacity=5)
    assert len(buf) == 0 and buf.capacity == 5
    assert buf.add(make_batch([0, 1, 2])) == 3
    assert len(buf) == 3 and stored_ids(buf) == [0, 1, 2]
    buf.add(make_batch([3, 4, 5]))
    assert len(buf) == 5
    assert stored_ids(buf) == [1, 2, 3, 4, 5]  # 0 evicted first
    buf.add(make_batch([6, 7]))
    assert stored_ids(buf) == [3, 4, 5, 6, 7]
    assert buf.num_inserts == 8
    # A whole batch larger than the capacity keeps its last `capacity` items and the FIFO order continues.
    assert buf.add(make_batch(list(range(100, 112)))) == 12
    assert stored_ids(buf) == list(range(107, 112))
    buf.add(make_batch([200]))
    assert stored_ids(buf) == [108, 109, 110, 111, 200]
    assert len(buf) == 5 and buf.num_inserts == 21


def test_stored_fields_are_intact_after_wraparound():
    buf = ReplayBuffer(capacity=4)
    for start in range(0, 10, 3):
        buf.add(make_batch(list(range(start, start + 3))))
    got = buf.contents()
    ref = make_batch(stored_ids(buf))
    for k in ref.keys():
        assert torch.equal(got[k], ref[k]), k


def test_sample_returns_copies_and_counts():
    buf = ReplayBuffer(capacity=8)
    buf.add(make_batch(list(range(8))))
    out = buf.sample(5, generator=torch.Generator().manual_seed(0))
    assert out.batch_size == torch.Size([5])
    assert set(out.keys()) == set(make_batch([0]).keys())
    # every sampled item is a stored item, field for field
    for i, item_id in enumerate(out["actor_id"].tolist()):
        assert torch.equal(out["states"][i], make_batch([item_id])["states"][0])
    out["states"].fill_(-7)
    assert not bool((buf.storage["states"] == -7).any())
    assert buf.num_samples == 5
    buf.sample(3)
    assert buf.num_samples == 8


def test_sample_errors():
    buf = ReplayBuffer(capacity=3)
    with pytest.raises(RuntimeError, match="empty"):
        buf.sample(1)
    buf.add(make_batch([1]))
    with pytest.raises(ValueError, match="n must be"):
        buf.sample(0)
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(capacity=0)
    with pytest.raises(ValueError, match="alpha"):
        ReplayBuffer(capacity=3, alpha=-1.0)


# ---------------------------------------------------------------------- sampling distributions


def test_uniform_sampling_frequencies():
    num_items, num_draws = 10, 50_000
    buf = ReplayBuffer(capacity=num_items)
    buf.add(make_batch(list(range(num_items)), log_rewards=torch.linspace(-5, 5, num_items)))
    idx = buf.sample_indices(num_draws, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(idx, minlength=num_items)
    probs = torch.full((num_items,), 1.0 / num_items)
    assert chi2_stat(counts, probs) < chi2_critical(num_items - 1)
    assert torch.allclose(buf.sampling_probs(), probs.double())
    # the rewards vary a lot, so a uniform draw must look nothing like the softmax
    prioritized = torch.softmax(buf.storage["log_rewards"][:num_items].double(), 0)
    assert chi2_stat(counts, prioritized) > 10 * chi2_critical(num_items - 1)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_prioritized_sampling_matches_softmax_of_log_rewards(alpha):
    num_items, num_draws = 8, 100_000
    log_rewards = torch.linspace(-2.0, 1.5, num_items)
    buf = ReplayBuffer(capacity=num_items, prioritized=True, alpha=alpha)
    buf.add(make_batch(list(range(num_items)), log_rewards=log_rewards))
    expected = torch.softmax(alpha * log_rewards.double(), dim=0)
    assert torch.allclose(buf.sampling_probs(), expected, atol=1e-12)
    out = buf.sample(num_draws, generator=torch.Generator().manual_seed(2))
    counts = torch.bincount(out["actor_id"], minlength=num_items)
    assert chi2_stat(counts, expected) < chi2_critical(num_items - 1)
    freqs = counts.double() / num_draws
    tol = 5 * torch.sqrt(expected * (1 - expected) / num_draws)
    assert bool(((freqs - expected).abs() < tol).all()), (freqs, expected)
    uniform = torch.full((num_items,), 1.0 / num_items, dtype=torch.float64)
    assert chi2_stat(counts, uniform) > 10 * chi2_critical(num_items - 1)


def test_prioritized_uses_only_current_items_and_zero_rewards():
    buf = ReplayBuffer(capacity=4, prioritized=True)
    buf.add(make_batch([0, 1], log_rewards=[10.0, 10.0]))  # huge rewards, evicted below
    buf.add(make_batch([2, 3, 4, 5], log_rewards=[0.0, -float("inf"), 1.0, 0.5]))
    assert stored_ids(buf) == [2, 3, 4, 5]
    out = buf.sample(20_000, generator=torch.Generator().manual_seed(3))
    ids = out["actor_id"]
    assert not bool(((ids == 0) | (ids == 1)).any())  # evicted
    assert not bool((ids == 3).any())  # log R = -inf has probability 0
    expected = torch.softmax(torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64), 0)
    counts = torch.stack([(ids == i).sum() for i in (2, 4, 5)])
    assert chi2_stat(counts, expected) < chi2_critical(2)

    all_zero = ReplayBuffer(capacity=3, prioritized=True)
    all_zero.add(make_batch([0, 1, 2], log_rewards=[-float("inf")] * 3))
    assert torch.allclose(all_zero.sampling_probs(), torch.full((3,), 1 / 3, dtype=torch.float64))


# ---------------------------------------------------------------------- state dict


def test_state_dict_round_trip_exact(tmp_path):
    buf = ReplayBuffer(capacity=5, prioritized=True, alpha=0.7)
    buf.add(make_batch([0, 1, 2]))
    buf.add(make_batch([3, 4, 5, 6]))  # wrapped around
    buf.sample(9)
    path = tmp_path / "replay.pt"
    torch.save(buf.state_dict(), path)
    state = torch.load(path, weights_only=True)

    restored = ReplayBuffer(capacity=5, prioritized=True, alpha=0.7)
    restored.load_state_dict(state)
    assert states_equal(restored.state_dict(), buf.state_dict())
    assert len(restored) == len(buf) and restored.num_inserts == 7 and restored.num_samples == 9
    a, b = buf.contents(), restored.contents()
    for k in a.keys():
        assert torch.equal(a[k], b[k]), k
    # same future: same draws for the same seed, same item evicted next
    sa = buf.sample(50, generator=torch.Generator().manual_seed(4))
    sb = restored.sample(50, generator=torch.Generator().manual_seed(4))
    assert torch.equal(sa["actor_id"], sb["actor_id"])
    buf.add(make_batch([42]))
    restored.add(make_batch([42]))
    assert stored_ids(buf) == stored_ids(restored) == [3, 4, 5, 6, 42]


def test_state_dict_empty_and_capacity_mismatch():
    empty = ReplayBuffer(capacity=3)
    other = ReplayBuffer(capacity=3)
    other.load_state_dict(empty.state_dict())
    assert len(other) == 0 and other.storage is None
    other.add(make_batch([1, 2]))
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(capacity=4).load_state_dict(other.state_dict())


# ---------------------------------------------------------------------- validation


def _drop(key):
    def corrupt(td):
        del td[key]
        return td

    return corrupt


def _set(key, fn):
    def corrupt(td):
        td.set(key, fn(td.get(key)))
        return td

    return corrupt


def _replace_with_shape(key, shape_fn, dtype):
    def corrupt(td):
        n = td.batch_size[0]
        fields = {k: v for k, v in td.items() if k != key}
        fields[key] = torch.zeros(shape_fn(n), dtype=dtype)
        return TensorDict(fields, batch_size=[n])

    return corrupt


def _nan_reward(td):
    td["log_rewards"][1] = float("nan")
    return td


def _posinf_reward(td):
    td["log_rewards"][0] = float("inf")
    return td


def _extra_field(td):
    td["surprise"] = torch.zeros(td.batch_size[0])
    return td


def _short_horizon(td):
    return make_batch(td["actor_id"], t=T - 1)


CORRUPTIONS = {
    "missing states": ("states", _drop("states")),
    "missing actions": ("actions", _drop("actions")),
    "missing terminating_idx": ("terminating_idx", _drop("terminating_idx")),
    "missing log_rewards": ("log_rewards", _drop("log_rewards")),
    "missing policy_version": ("policy_version", _drop("policy_version")),
    "missing actor_id": ("actor_id", _drop("actor_id")),
    "missing log_probs (stored)": ("log_probs", _drop("log_probs")),
    "unexpected field": ("surprise", _extra_field),
    "log_rewards float64": ("log_rewards", _set("log_rewards", lambda x: x.double())),
    "states float32": ("states", _set("states", lambda x: x.float())),
    "actor_id int32": ("actor_id", _set("actor_id", lambda x: x.int())),
    "log_probs float64": ("log_probs", _set("log_probs", lambda x: x.double())),
    "states per-item shape": ("states", _replace_with_shape("states", lambda n: (n, T + 1, STATE_DIM + 1), torch.int64)),
    "shorter horizon": ("(states|actions|log_probs)", _short_horizon),
    "log_rewards 2-D": ("log_rewards", _replace_with_shape("log_rewards", lambda n: (n, 1), torch.float32)),
    "actions inconsistent T": ("actions", _replace_with_shape("actions", lambda n: (n, T + 2, 1), torch.int64)),
    "NaN log_rewards": ("log_rewards", _nan_reward),
    "+inf log_rewards": ("log_rewards", _posinf_reward),
    "terminating_idx out of range": ("terminating_idx", _set("terminating_idx", lambda x: x + T)),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_validation_errors_name_the_field_and_leave_data_intact(case):
    field, corrupt = CORRUPTIONS[case]
    buf = ReplayBuffer(capacity=6, prioritized=True)
    buf.add(make_batch([0, 1, 2, 3]))
    buf.sample(2)
    before = buf.state_dict()
    before_probs = buf.sampling_probs()
    bad = corrupt(make_batch([10, 11, 12, 13]))  # would wrap and evict if it were written
    with pytest.raises(ValueError, match=f"'{field}'"):
        buf.add(bad)
    assert states_equal(buf.state_dict(), before)
    assert torch.equal(buf.sampling_probs(), before_probs)
    assert stored_ids(buf) == [0, 1, 2, 3]


def test_validation_on_first_batch_and_types():
    buf = ReplayBuffer(capacity=4)
    bad = make_batch([0, 1])
    bad["log_rewards"] = bad["log_rewards"].double()
    with pytest.raises(ValueError, match="'log_rewards'"):
        buf.add(bad)
    assert len(buf) == 0 and buf.storage is None and buf.num_inserts == 0
    with pytest.raises(TypeError):
        buf.add({"states": torch.zeros(2, T + 1, STATE_DIM, dtype=torch.int64)})
    two_d = TensorDict({"actor_id": torch.zeros(2, 3, dtype=torch.int64)}, batch_size=[2, 3])
    with pytest.raises(ValueError, match="batch size"):
        buf.add(two_d)
    # the optional log_probs may be absent when the storage is allocated without it
    assert buf.add(make_batch([0, 1], with_log_probs=False)) == 2
    with pytest.raises(ValueError, match="'log_probs'"):
        buf.add(make_batch([2]))


def test_field_dtype_override():
    buf = ReplayBuffer(capacity=4, field_dtypes={"states": torch.float32})
    td = make_batch([0, 1])
    td["states"] = td["states"].float()
    assert buf.add(td) == 2
    with pytest.raises(ValueError, match="'states'"):
        buf.add(make_batch([2]))
