"""A local, in-process replay buffer of trajectories (knows nothing about Ray).

Items are trajectories in the wire format of ``Trajectories.to_tensordict``: a
``tensordict.TensorDict`` of batch size ``(N,)`` with

* ``states``: ``(N, T+1, *state_shape)`` int64, padded with the sink state sf;
* ``actions``: ``(N, T, *action_shape)`` int64 (``action_shape == (1,)`` for
  discrete environments), padded with -1;
* ``terminating_idx``: ``(N,)`` int64, number of actions including exit;
* ``log_rewards``: ``(N,)`` float32, log R(x);
* ``log_probs`` (optional): ``(N, T)`` float32, behaviour-policy log P_F;
* ``policy_version``: ``(N,)`` int64, version of the weights that sampled it;
* ``actor_id``: ``(N,)`` int64, rollout actor that produced it.

Extra top-level tensor fields with a leading batch dimension are stored as-is
(e.g. a tag used by tests). Storage is one preallocated ``TensorDict`` of batch
size ``(capacity,)`` allocated from the first inserted batch: every later batch
must carry the same set of fields with the same dtypes and trailing shapes (the
same padded T, i.e. the environment's ``max_traj_len``).

The buffer is a ring: once full, each insert overwrites the oldest items (FIFO
eviction). While it is not full, items occupy storage slots ``0 .. len - 1``.

Sampling is with replacement, either uniform or reward-prioritized with

    P(i) = exp(alpha * log_rewards[i]) / sum_j exp(alpha * log_rewards[j])
         = softmax(alpha * log_rewards)[i],

i.e. proportional to ``R(x_i) ** alpha``: ``alpha = 1`` replays terminal states
in proportion to their reward (the GFlowNet target), ``alpha = 0`` is uniform.
Items with ``log_rewards == -inf`` (zero reward) have probability 0 unless every
stored item has it, in which case sampling falls back to uniform.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from tensordict import TensorDict

logger = logging.getLogger(__name__)

#: Fields every inserted batch must carry.
REQUIRED_KEYS = ("states", "actions", "terminating_idx", "log_rewards", "policy_version", "actor_id")

#: Fields that may be absent (but, once the storage holds them, must always be present).
OPTIONAL_KEYS = ("log_probs",)

#: Expected dtype of each known field; other fields keep the dtype of the first batch.
DEFAULT_FIELD_DTYPES: dict[str, torch.dtype] = {
    "states": torch.int64,
    "actions": torch.int64,
    "terminating_idx": torch.int64,
    "log_rewards": torch.float32,
    "log_probs": torch.float32,
    "policy_version": torch.int64,
    "actor_id": torch.int64,
}

# Minimum number of dimensions of each known field, batch dimension included.
_MIN_NDIM = {"states": 2, "actions": 2, "log_probs": 2}
_PER_ITEM_SCALARS = ("terminating_idx", "log_rewards", "policy_version", "actor_id")


class ReplayBuffer:
    """Bounded FIFO buffer of trajectories with uniform or reward-prioritized sampling.

    Args:
        capacity: maximum number of trajectories held; older ones are evicted first.
        prioritized: if True, ``sample`` draws item i with probability
            ``softmax(alpha * log_rewards)[i]`` (see module doc); else uniformly.
        alpha: prioritization exponent (>= 0) applied to rewards: ``P(i) ∝ R_i ** alpha``.
        device: device of the storage (CPU by default); inserted batches are moved to it.
        field_dtypes: overrides of ``DEFAULT_FIELD_DTYPES`` (e.g. float states for a
            continuous environment).

    Raises:
        ValueError: if ``capacity < 1`` or ``alpha < 0`` or alpha is not finite.
    """

    def __init__(
        self,
        capacity: int,
        prioritized: bool = False,
        alpha: float = 1.0,
        device: str | torch.device = "cpu",
        field_dtypes: Mapping[str, torch.dtype] | None = None,
    ) -> None:
        if int(capacity) < 1:
            raise ValueError(f"ReplayBuffer: capacity must be >= 1, got {capacity}")
        alpha = float(alpha)
        if not (alpha >= 0.0 and alpha != float("inf")):
            raise ValueError(f"ReplayBuffer: alpha must be finite and >= 0, got {alpha}")
        self._capacity = int(capacity)
        self.prioritized = bool(prioritized)
        self.alpha = alpha
        self.device = torch.device(device)
        self.field_dtypes = dict(DEFAULT_FIELD_DTYPES)
        if field_dtypes is not None:
            self.field_dtypes.update(field_dtypes)
        self._storage: TensorDict | None = None
        self._size = 0
        self._write_pos = 0  # next slot to write; the oldest item is at (write_pos - size) % capacity
        self.num_inserts = 0  # items ever inserted (including ones evicted since)
        self.num_samples = 0  # items ever sampled (with replacement, so can exceed num_inserts)
        self._cdf: torch.Tensor | None = None  # cached prioritized CDF, float64 (size,)

    # ------------------------------------------------------------------ properties

    @property
    def capacity(self) -> int:
        """Maximum number of trajectories held."""
        return self._capacity

    def __len__(self) -> int:
        return self._size

    @property
    def storage(self) -> TensorDict | None:
        """The raw ring storage ``(capacity,)`` (None before the first insert); slots >= len are garbage."""
        return self._storage

    def __repr__(self) -> str:
        mode = f"prioritized(alpha={self.alpha})" if self.prioritized else "uniform"
        return f"ReplayBuffer(size={self._size}, capacity={self._capacity}, sampling={mode})"

    # ------------------------------------------------------------------ validation

    def validate(self, td: TensorDict) -> int:
        """Checks a batch against the schema (and the storage, once allocated) without writing.

        Args:
            td: TensorDict of batch size ``(N,)`` in the format of the module doc.

        Returns:
            N, the number of items in the batch.

        Raises:
            TypeError: if ``td`` is not a TensorDict.
            ValueError: naming the offending field, for a missing or unexpected
                field, a wrong dtype, a wrong shape (batch dims, per-item shape or
                trailing shapes different from the storage's), NaN or +inf in
                ``log_rewards``, NaN in ``log_probs``, or ``terminating_idx``
                outside ``[0, T]``.
        """
        if not isinstance(td, TensorDict):
            raise TypeError(f"ReplayBuffer.add: expected a TensorDict, got {type(td).__name__}")
        if td.batch_dims != 1:
            raise ValueError(f"ReplayBuffer.add: batch size must be (N,), got {tuple(td.batch_size)}")
        n = int(td.batch_size[0])
        keys: set[str] = set(td.keys())  # type: ignore[arg-type]  # flat: str keys (checked below)
        for k in REQUIRED_KEYS:
            if k not in keys:
                raise ValueError(f"ReplayBuffer.add: missing field '{k}'")
        for k in keys:
            if not isinstance(k, str) or not isinstance(td.get(k), torch.Tensor):
                raise ValueError(
                    f"ReplayBuffer.add: field '{k}' must be a plain tensor (nested fields are not supported)"
                )
        if self._storage is not None:
            stored: set[str] = set(self._storage.keys())  # type: ignore[arg-type]  # flat: str keys
            for k in sorted(stored - keys):
                raise ValueError(f"ReplayBuffer.add: missing field '{k}' (present in the stored items)")
            for k in sorted(keys - stored):
                raise ValueError(f"ReplayBuffer.add: unexpected field '{k}' (absent from the stored items)")

        for k in sorted(keys):
            x = td.get(k)
            want = self.field_dtypes.get(k)
            if want is None and self._storage is not None:
                want = self._storage.get(k).dtype
            if want is not None and x.dtype != want:
                raise ValueError(f"ReplayBuffer.add: field '{k}' has dtype {x.dtype}, expected {want}")
            if k in _PER_ITEM_SCALARS and tuple(x.shape) != (n,):
                raise ValueError(f"ReplayBuffer.add: field '{k}' must have shape ({n},), got {tuple(x.shape)}")
            if x.dim() < _MIN_NDIM.get(k, 1):
                raise ValueError(
                    f"ReplayBuffer.add: field '{k}' must have at least {_MIN_NDIM[k]} dims, got shape {tuple(x.shape)}"
                )
            if self._storage is not None:
                expected = tuple(self._storage.get(k).shape[1:])
                if tuple(x.shape[1:]) != expected:
                    raise ValueError(
                        f"ReplayBuffer.add: field '{k}' has per-item shape {tuple(x.shape[1:])}, "
                        f"expected {expected} (shape (N, *{expected}))"
                    )

        # Cross-field consistency of the time dimension: states T+1, actions / log_probs T.
        t_states = td.get("states").shape[1]
        t_actions = td.get("actions").shape[1]
        if t_actions != t_states - 1:
            raise ValueError(
                f"ReplayBuffer.add: field 'actions' has T={t_actions} steps but 'states' has "
                f"{t_states} rows (expected T+1={t_actions + 1})"
            )
        if "log_probs" in keys and td.get("log_probs").shape[1] != t_actions:
            raise ValueError(
                f"ReplayBuffer.add: field 'log_probs' has T={td.get('log_probs').shape[1]} steps, "
                f"expected {t_actions} (as 'actions')"
            )
        if n == 0:
            return 0
        log_rewards = td.get("log_rewards")
        if bool(torch.isnan(log_rewards).any()):
            raise ValueError("ReplayBuffer.add: field 'log_rewards' contains NaN")
        if bool(torch.isposinf(log_rewards).any()):
            raise ValueError("ReplayBuffer.add: field 'log_rewards' contains +inf")
        if "log_probs" in keys and bool(torch.isnan(td.get("log_probs")).any()):
            raise ValueError("ReplayBuffer.add: field 'log_probs' contains NaN")
        ti = td.get("terminating_idx")
        if bool(((ti < 0) | (ti > t_actions)).any()):
            raise ValueError(f"ReplayBuffer.add: field 'terminating_idx' has values outside [0, T={t_actions}]")
        return n

    # ------------------------------------------------------------------ insert

    def _allocate(self, td: TensorDict) -> None:
        fields = {
            k: torch.zeros((self._capacity, *td.get(k).shape[1:]), dtype=td.get(k).dtype, device=self.device)
            for k in td.keys()
        }
        self._storage = TensorDict(fields, batch_size=[self._capacity], device=self.device)
        logger.debug("ReplayBuffer: allocated storage %s", {k: tuple(v.shape) for k, v in fields.items()})

    def add(self, td: TensorDict) -> int:
        """Inserts a batch, evicting the oldest items when full.

        The batch is validated in full before anything is written, so a
        rejected batch leaves the buffer (contents and counters) untouched. If
        ``N > capacity`` only the last ``capacity`` items remain (the earlier
        ones are inserted and immediately evicted, as with N single inserts).

        Args:
            td: TensorDict of batch size ``(N,)`` (see module doc).

        Returns:
            N, the number of items inserted (all of them count in ``num_inserts``).

        Raises:
            TypeError, ValueError: see ``validate``.
        """
        n = self.validate(td)
        if n == 0:
            return 0
        if self._storage is None:
            self._allocate(td)
        assert self._storage is not None
        cap = self._capacity
        skip = max(0, n - cap)  # items that would be overwritten within this same batch
        start = (self._write_pos + skip) % cap
        idx = (torch.arange(n - skip, device=self.device) + start) % cap
        for k in self._storage.keys():
            src = td.get(k)[skip:].to(self.device, non_blocking=True)
            self._storage.get(k).index_copy_(0, idx, src)
        self._write_pos = (self._write_pos + n) % cap
        self._size = min(cap, self._size + n)
        self.num_inserts += n
        self._cdf = None
        return n

    # ------------------------------------------------------------------ sample

    def sampling_probs(self) -> torch.Tensor:
        """Probability of each storage slot ``0 .. len-1`` under the current sampling mode.

        Returns:
            float64 tensor ``(len,)`` summing to 1.

        Raises:
            RuntimeError: if the buffer is empty.
        """
        if self._size == 0:
            raise RuntimeError("ReplayBuffer: the buffer is empty")
        if not self.prioritized:
            return torch.full((self._size,), 1.0 / self._size, dtype=torch.float64, device=self.device)
        cdf = self._prioritized_cdf()
        return torch.diff(cdf, prepend=cdf.new_zeros(1)) / cdf[-1]

    def _prioritized_cdf(self) -> torch.Tensor:
        if self._cdf is None:
            assert self._storage is not None
            log_rewards = self._storage.get("log_rewards")[: self._size].to(torch.float64)
            top = log_rewards.max()
            if self.alpha == 0.0 or top == float("-inf"):
                weights = torch.ones_like(log_rewards)  # all rewards zero (or alpha 0): uniform
            else:
                # exp(alpha * (lr - max)) is the softmax numerator, shifted for stability.
                weights = torch.exp(self.alpha * (log_rewards - top))
            self._cdf = torch.cumsum(weights, dim=0)
        return self._cdf

    def sample_indices(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws ``n`` storage slots with replacement (uniform or prioritized); no counters change.

        Args:
            n: number of slots (>= 0).
            generator: torch.Generator on the storage device; the global RNG if None.

        Returns:
            int64 tensor ``(n,)`` of slots in ``[0, len)``.

        Raises:
            ValueError: if ``n < 0``.
            RuntimeError: if ``n > 0`` and the buffer is empty.
        """
        n = int(n)
        if n < 0:
            raise ValueError(f"ReplayBuffer.sample: n must be >= 0, got {n}")
        if n == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        if self._size == 0:
            raise RuntimeError("ReplayBuffer.sample: the buffer is empty")
        if not self.prioritized:
            return torch.randint(self._size, (n,), generator=generator, device=self.device)
        # Inverse-CDF sampling: works for any size (torch.multinomial caps categories at 2**24).
        cdf = self._prioritized_cdf()
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=self.device) * cdf[-1]
        return torch.searchsorted(cdf, u, right=True).clamp_(max=self._size - 1)

    def gather(self, indices: torch.Tensor) -> TensorDict:
        """Copies the items at the given storage slots into a new TensorDict ``(len(indices),)``."""
        assert self._storage is not None
        fields = {k: v.index_select(0, indices) for k, v in self._storage.items()}  # type: ignore[union-attr]  # flat storage: plain tensors
        return TensorDict(fields, batch_size=[indices.shape[0]], device=self.device)

    def sample(self, n: int, generator: torch.Generator | None = None) -> TensorDict:
        """Samples ``n`` trajectories with replacement (see module doc for the distribution).

        Args:
            n: number of items (>= 1).
            generator: torch.Generator on the storage device; the global RNG if None.

        Returns:
            a new TensorDict of batch size ``(n,)`` with the stored fields (a copy).

        Raises:
            ValueError: if ``n < 1``.
            RuntimeError: if the buffer is empty.
        """
        if int(n) < 1:
            raise ValueError(f"ReplayBuffer.sample: n must be >= 1, got {n}")
        out = self.gather(self.sample_indices(n, generator))
        self.num_samples += int(n)
        return out

    # ------------------------------------------------------------------ inspection / state

    def _ordered_slots(self) -> torch.Tensor:
        """Storage slots of the held items, oldest first."""
        oldest = (self._write_pos - self._size) % self._capacity
        return (torch.arange(self._size, device=self.device) + oldest) % self._capacity

    def contents(self) -> TensorDict | None:
        """A copy of the held items ``(len,)``, oldest first; None before the first insert."""
        if self._storage is None:
            return None
        return self.gather(self._ordered_slots())

    def state_dict(self) -> dict[str, object]:
        """Contents and counters as plain tensors (loadable with ``torch.load(weights_only=True)``).

        Returns:
            dict with int64 scalar tensors ``capacity``, ``size``, ``write_pos``,
            ``num_inserts``, ``num_samples`` and ``storage``: a dict field name ->
            tensor ``(len, *trailing_shape)`` of storage slots ``0 .. len-1``
            (empty dict before the first insert).
        """
        storage: dict[str, torch.Tensor] = {}
        if self._storage is not None:
            storage = {k: v[: self._size].clone() for k, v in self._storage.items()}  # type: ignore[misc]  # flat storage: plain tensors
        return {
            "capacity": torch.tensor(self._capacity, dtype=torch.int64),
            "size": torch.tensor(self._size, dtype=torch.int64),
            "write_pos": torch.tensor(self._write_pos, dtype=torch.int64),
            "num_inserts": torch.tensor(self.num_inserts, dtype=torch.int64),
            "num_samples": torch.tensor(self.num_samples, dtype=torch.int64),
            "storage": storage,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores contents and counters exactly from ``state_dict()`` output.

        Args:
            state: the dict returned by ``state_dict``.

        Raises:
            ValueError: if a key is missing, the capacity differs from this
                buffer's, or the stored fields are inconsistent with ``size``.
        """
        for k in ("capacity", "size", "write_pos", "num_inserts", "num_samples", "storage"):
            if k not in state:
                raise ValueError(f"ReplayBuffer.load_state_dict: missing key '{k}'")
        capacity = int(state["capacity"])
        if capacity != self._capacity:
            raise ValueError(
                f"ReplayBuffer.load_state_dict: 'capacity' is {capacity}, this buffer has {self._capacity}"
            )
        size, write_pos = int(state["size"]), int(state["write_pos"])
        if not (0 <= size <= capacity and 0 <= write_pos < capacity):
            raise ValueError(f"ReplayBuffer.load_state_dict: invalid 'size'={size} or 'write_pos'={write_pos}")
        storage = state["storage"]
        assert isinstance(storage, Mapping)
        for k, v in storage.items():
            if v.shape[0] != size:
                raise ValueError(
                    f"ReplayBuffer.load_state_dict: storage field '{k}' has {v.shape[0]} rows, 'size' is {size}"
                )
        if storage:
            fields = {}
            for k, v in storage.items():
                buf = torch.zeros((capacity, *v.shape[1:]), dtype=v.dtype, device=self.device)
                buf[:size] = v.to(self.device)
                fields[k] = buf
            self._storage = TensorDict(fields, batch_size=[capacity], device=self.device)
        else:
            if size != 0:
                raise ValueError(f"ReplayBuffer.load_state_dict: 'storage' is empty but 'size' is {size}")
            self._storage = None
        self._size, self._write_pos = size, write_pos
        self.num_inserts = int(state["num_inserts"])
        self.num_samples = int(state["num_samples"])
        self._cdf = None
