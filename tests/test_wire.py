"""Wire format for Ray hops: exact round trips, clear errors, no torch pickling."""

import pickle

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from gfn_dist.distributed.wire import (
    pack_wire,
    state_dict_from_wire,
    state_dict_to_wire,
    td_from_wire,
    td_to_wire,
    tensors_to_wire,
)


def _batch(n=5):
    return TensorDict(
        {
            "states": torch.randint(-1, 8, (n, 4, 2)),
            "actions": torch.randint(-1, 3, (n, 3, 1)),
            "log_rewards": torch.randn(n),
            "done": torch.rand(n) > 0.5,
        },
        batch_size=[n],
    )


def test_tensordict_round_trip_through_pickle5():
    td = _batch()
    wire = td_to_wire(td)
    assert all(isinstance(v, np.ndarray) for k, v in wire.items() if k not in ("__batch_size__", "__dtypes__"))
    # Small integers travel narrowed (states in [-1, 7], actions in [-1, 2]): int8, restored on arrival.
    assert wire["states"].dtype == np.int8 and wire["actions"].dtype == np.int8
    assert wire["__dtypes__"] == {"states": "int64", "actions": "int64"}
    buffers = []
    blob = pickle.dumps(wire, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 4  # every array travels out of band (no copy into the stream)
    back = td_from_wire(pickle.loads(blob, buffers=buffers))
    assert back.batch_size == td.batch_size
    for k in td.keys():
        assert back[k].dtype == td[k].dtype and torch.equal(back[k], td[k])
    assert td_from_wire(td) is td  # a TensorDict passes through


def test_state_dict_round_trip_and_errors():
    sd = torch.nn.Linear(3, 2).state_dict()
    back = state_dict_from_wire(state_dict_to_wire(sd))
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(TypeError, match="'w'.*bfloat16"):
        state_dict_to_wire({"w": torch.zeros(2, dtype=torch.bfloat16)})
    with pytest.raises(TypeError, match="'meta'.*str"):
        state_dict_to_wire({"meta": "x"})
    with pytest.raises(ValueError, match="__batch_size__"):
        td_from_wire({"states": np.zeros(3)})


@pytest.mark.parametrize("lo, hi, wire_dtype", [(-128, 127, np.int8), (-1, 128, np.int16), (0, 40_000, np.int32),
                                                (0, 2**40, np.int64)])
def test_integer_narrowing_is_lossless_at_the_range_limits(lo, hi, wire_dtype):
    td = TensorDict({"x": torch.tensor([lo, hi, 0], dtype=torch.int64), "i32": torch.tensor([lo, 0, 0]).int()
                     if abs(lo) < 2**31 else torch.zeros(3, dtype=torch.int32)}, batch_size=[3])
    wire = td_to_wire(td)
    assert wire["x"].dtype == wire_dtype
    back = td_from_wire(pickle.loads(pickle.dumps(wire, protocol=5)))
    for k in td.keys():
        assert back[k].dtype == td[k].dtype and torch.equal(back[k], td[k])
    empty = td_from_wire(td_to_wire(TensorDict({"x": torch.zeros(0, 2, dtype=torch.int64)}, batch_size=[0])))
    assert empty["x"].dtype == torch.int64 and empty["x"].shape == (0, 2)


def test_packed_bytes_round_trip_and_malformed_payloads():
    td = _batch(7)
    fields = {k: td[k] for k in td.keys()}
    wire = tensors_to_wire(fields, [7])
    ref = td_to_wire(td)
    assert wire.keys() == ref.keys() and wire["__dtypes__"] == ref["__dtypes__"]
    assert all(np.array_equal(wire[k], ref[k]) and wire[k].dtype == ref[k].dtype for k in td.keys())
    blob = pack_wire(wire)
    assert isinstance(blob, bytes)
    back = td_from_wire(blob)
    assert back.batch_size == td.batch_size
    for k in td.keys():
        assert back[k].dtype == td[k].dtype and torch.equal(back[k], td[k])
    with pytest.raises(ValueError, match="does not unpickle"):
        td_from_wire(b"not a pickle")
    with pytest.raises(ValueError, match="holds a list"):
        td_from_wire(pickle.dumps([1, 2]))
    with pytest.raises(TypeError, match="'meta'.*str"):
        tensors_to_wire({"meta": "x"}, [1])
