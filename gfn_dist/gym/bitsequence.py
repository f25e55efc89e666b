"""Bit-sequence environments (Malkin et al. 2022, arXiv:2201.13259, Sec. 5.3).

A sequence of ``seq_size`` bits is built from ``L = seq_size // word_size`` words of
``word_size`` bits (``n_words = 2**word_size`` values). States are int64 tensors of
shape ``(L,)``: a word value, or ``-1`` for an empty position. s0 is all ``-1``;
sf is all ``-2``. A trajectory fills every position and then exits.

Reward: ``log R(x) = -min_m Hamming(x, m) / temperature`` over ``n_modes`` mode
sequences drawn uniformly at random with ``seed`` (fixed per environment).

Modes found (``mode_hits`` / ``is_mode``): a sample x finds mode m when
``Hamming(x, m) <= mode_radius`` bits, the count reported for bit sequences in
arXiv:2201.13259 (Sec. 5.3) and arXiv:2310.12934; ``mode_radius = 0`` asks for the
mode itself.

* ``BitSequence``: autoregressive, action ``w < n_words`` appends word w; the DAG is
  a tree (``TBGFlowNet(pb=None, constant_pb=True)`` applies).
* ``NonAutoregressiveBitSequence``: action ``position * n_words + word`` fills an
  empty position; many orderings reach each sequence.
"""

from __future__ import annotations

import torch

from gfn_dist.env import DiscreteEnv
from gfn_dist.preprocessors import Preprocessor
from gfn_dist.states import DiscreteStates


class SequencePreprocessor(Preprocessor):
    """One-hot of each position over ``{empty, word_0..word_{n-1}}``: ``(*B, L * (n_words + 1))``."""

    def __init__(self, length: int, n_words: int):
        super().__init__(length * (n_words + 1))
        self.length, self.n_words = length, n_words
        self._table: torch.Tensor | None = None

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        # One embedding lookup of x + 2: rows 0 (sf padding, -2) and 1 (empty, -1) are the
        # one-hot of "empty", row w + 2 that of word w.
        table = self._table
        if table is None or table.device != x.device:
            eye = torch.eye(self.n_words + 1)
            table = self._table = torch.cat([eye[:1], eye]).to(x.device)
        return torch.nn.functional.embedding(x + 2, table).flatten(start_dim=-2)


class _BitSequenceBase(DiscreteEnv):
    def __init__(
        self,
        n_actions: int,
        word_size: int,
        seq_size: int,
        n_modes: int,
        temperature: float,
        seed: int,
        preprocessor: Preprocessor | None,
        device,
        mode_radius: int = 0,
    ):
        if word_size < 1 or seq_size < 1 or seq_size % word_size != 0:
            raise ValueError(
                f"{type(self).__name__}: seq_size ({seq_size}) must be a positive multiple of word_size ({word_size})"
            )
        if n_modes < 1:
            raise ValueError(f"{type(self).__name__}: n_modes must be >= 1, got {n_modes}")
        if temperature <= 0:
            raise ValueError(f"{type(self).__name__}: temperature must be > 0, got {temperature}")
        if mode_radius < 0:
            raise ValueError(f"{type(self).__name__}: mode_radius must be >= 0, got {mode_radius}")
        self.mode_radius = int(mode_radius)
        self.word_size, self.seq_size = int(word_size), int(seq_size)
        self.length = self.seq_size // self.word_size
        self.n_words = 2**self.word_size
        self.temperature = float(temperature)
        self.seed = int(seed)
        g = torch.Generator().manual_seed(self.seed)
        self.modes = torch.randint(0, 2, (n_modes, self.seq_size), generator=g).to(device)  # bits
        self._bit_shifts = torch.arange(self.word_size - 1, -1, -1, device=device)
        s0 = torch.full((self.length,), -1, dtype=torch.long)
        sf = torch.full((self.length,), -2, dtype=torch.long)
        super().__init__(
            n_actions=n_actions,
            s0=s0,
            sf=sf,
            max_traj_len=self.length + 1,
            preprocessor=preprocessor or SequencePreprocessor(self.length, self.n_words),
            device=device,
        )
        self._all_states: DiscreteStates | None = None
        self._terminating_states: DiscreteStates | None = None

    @property
    def n_modes(self) -> int:
        return self.modes.shape[0]

    def words_to_bits(self, x: torch.Tensor) -> torch.Tensor:
        """Word tensor ``(*B, L)`` to bits ``(*B, seq_size)`` (MSB first per word)."""
        bits = (x.clamp(min=0).unsqueeze(-1) >> self._bit_shifts) & 1
        return bits.flatten(start_dim=-2)

    def hamming_to_modes(self, x: torch.Tensor) -> torch.Tensor:
        """Hamming distance in bits of full sequences ``x (N, L)`` to each mode: int64 ``(N, n_modes)``."""
        return (self.words_to_bits(x).unsqueeze(-2) != self.modes).sum(-1)

    def log_reward_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return -self.hamming_to_modes(x).min(-1).values.float() / self.temperature

    def mode_hits(self, x: torch.Tensor) -> torch.Tensor:
        """Bool ``(N, n_modes)``: full sequence ``x[i]`` lies within ``mode_radius`` bits of mode m."""
        return self.hamming_to_modes(x) <= self.mode_radius

    def is_mode(self, x: torch.Tensor) -> torch.Tensor:
        """Bool ``(N,)``: full sequence ``x[i]`` lies within ``mode_radius`` bits of some mode."""
        return self.mode_hits(x).any(-1)

    #: Enumeration (exact metrics) is refused above this many states: the standard 120-bit
    #: task has 2**120 sequences; ``NotImplementedError`` makes it a non-enumerable env.
    max_enumerable_states: int = 1 << 24

    def _check_enumerable(self) -> None:
        if self.n_states > self.max_enumerable_states:
            raise NotImplementedError(
                f"{type(self).__name__} with {self.n_states} states is too large to enumerate "
                f"(max_enumerable_states={self.max_enumerable_states})"
            )

    def _full_sequences(self) -> torch.Tensor:
        self._check_enumerable()
        n = self.n_words**self.length
        idx = torch.arange(n, device=self.device)
        powers = self.n_words ** torch.arange(self.length - 1, -1, -1, device=self.device)
        return (idx.unsqueeze(-1) // powers) % self.n_words

    @property
    def terminating_states(self) -> DiscreteStates:
        """All full sequences, lexicographic order of words."""
        if self._terminating_states is None:
            self._terminating_states = self.States(self._full_sequences())
        return self._terminating_states

    def get_terminating_states_indices(self, states) -> torch.Tensor:
        x = states.tensor if hasattr(states, "tensor") else states
        powers = self.n_words ** torch.arange(self.length - 1, -1, -1, device=x.device)
        return (x * powers).sum(-1)


class BitSequence(_BitSequenceBase):
    """Autoregressive bit sequences (tree DAG).

    Args:
        word_size: bits per word (n_words = 2**word_size).
        seq_size: bits per sequence, a multiple of word_size.
        n_modes: number of mode sequences.
        temperature: reward temperature (> 0).
        seed: seed of the modes.
        preprocessor: default ``SequencePreprocessor``.
        device: device of states.
        mode_radius: Hamming radius in bits within which a sample finds a mode (``mode_hits``).

    Raises:
        ValueError: on inconsistent sizes or a non-positive temperature.
    """

    def __init__(
        self,
        word_size: int = 1,
        seq_size: int = 8,
        n_modes: int = 4,
        temperature: float = 1.0,
        seed: int = 0,
        preprocessor: Preprocessor | None = None,
        device: str | torch.device = "cpu",
        mode_radius: int = 0,
    ):
        n_actions = 2**word_size + 1
        self._exit_pattern = torch.arange(n_actions, device=device) == n_actions - 1
        super().__init__(n_actions, word_size, seq_size, n_modes, temperature, seed, preprocessor, device, mode_radius)

    def forward_mask(self, x: torch.Tensor) -> torch.Tensor:
        # Positions fill left to right: a sequence is full iff its last position is.
        # Words are allowed iff not full, exit iff full: one compare against the
        # pattern (False, ..., False, True). sf (all -2) reads as not full.
        pattern = self._exit_pattern
        if pattern.device != x.device:
            pattern = self._exit_pattern = pattern.to(x.device)
        return (x[..., -1:] >= 0) == pattern

    def backward_mask(self, x: torch.Tensor) -> torch.Tensor:
        k = (x >= 0).sum(-1, keepdim=True)
        last = x.gather(-1, (k - 1).clamp(min=0))
        words = torch.arange(self.n_words, device=x.device)
        return (last == words) & (k > 0)

    def step_tensor(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        # The first empty position (-1) is the first minimum: argmin returns the first.
        # Full and sf rows only reach here as exit / padding rows whose result is discarded.
        return x.scatter(-1, x.argmin(-1, keepdim=True), a.unsqueeze(-1))

    def backward_step_tensor(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        k = (x >= 0).sum(-1, keepdim=True)
        return x.scatter(-1, k - 1, -1)

    @property
    def n_states(self) -> int:
        return sum(self.n_words**k for k in range(self.length + 1))

    @property
    def all_states(self) -> DiscreteStates:
        """Prefixes ordered by length, then lexicographically."""
        if self._all_states is None:
            self._check_enumerable()
            rows = []
            for k in range(self.length + 1):
                n = self.n_words**k
                idx = torch.arange(n, device=self.device)
                powers = self.n_words ** torch.arange(k - 1, -1, -1, device=self.device)
                prefix = (idx.unsqueeze(-1) // powers) % self.n_words
                pad = torch.full((n, self.length - k), -1, dtype=torch.long, device=self.device)
                rows.append(torch.cat([prefix, pad], dim=-1))
            self._all_states = self.States(torch.cat(rows, dim=0))
        return self._all_states

    def get_states_indices(self, states) -> torch.Tensor:
        x = states.tensor if hasattr(states, "tensor") else states
        k = (x >= 0).sum(-1, keepdim=True)  # (*B, 1)
        pos = torch.arange(self.length, device=x.device)
        exps = (k - 1 - pos).clamp(min=0)
        value = (x.clamp(min=0) * (self.n_words**exps) * (pos < k)).sum(-1)
        # offset_k = sum_{j<k} n_words^j
        offsets = torch.tensor(
            [sum(self.n_words**j for j in range(kk)) for kk in range(self.length + 1)], device=x.device
        )
        return offsets[k.squeeze(-1)] + value


class NonAutoregressiveBitSequence(_BitSequenceBase):
    """Bit sequences filled in any order: action = ``position * n_words + word``.

    Same arguments as ``BitSequence``. ``n_actions = L * n_words + 1``; backward
    action ``position * n_words + word`` empties ``position`` (holding ``word``).
    """

    def __init__(
        self,
        word_size: int = 1,
        seq_size: int = 8,
        n_modes: int = 4,
        temperature: float = 1.0,
        seed: int = 0,
        preprocessor: Preprocessor | None = None,
        device: str | torch.device = "cpu",
        mode_radius: int = 0,
    ):
        L = seq_size // word_size if word_size > 0 else 0
        super().__init__(
            L * 2**word_size + 1, word_size, seq_size, n_modes, temperature, seed, preprocessor, device, mode_radius
        )

    def forward_mask(self, x: torch.Tensor) -> torch.Tensor:
        empty = x < 0
        # sf (all -2) counts as empty: padding rows keep finite logits.
        m = empty.unsqueeze(-1).expand(*x.shape, self.n_words).reshape(*x.shape[:-1], -1)
        exit_ok = (x >= 0).all(-1, keepdim=True)
        return torch.cat([m, exit_ok], dim=-1)

    def backward_mask(self, x: torch.Tensor) -> torch.Tensor:
        words = torch.arange(self.n_words, device=x.device)
        return (x.unsqueeze(-1) == words).reshape(*x.shape[:-1], -1)

    def step_tensor(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        # Exit (a = L * n_words) maps past the last position: clamp; the row becomes sf.
        pos, word = (a // self.n_words).clamp(max=self.length - 1), a % self.n_words
        return x.scatter(-1, pos.unsqueeze(-1), word.unsqueeze(-1))

    def backward_step_tensor(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        pos = a // self.n_words
        return x.scatter(-1, pos.unsqueeze(-1), -1)

    @property
    def n_states(self) -> int:
        return (self.n_words + 1) ** self.length

    @property
    def all_states(self) -> DiscreteStates:
        """Every partial assignment, index = Σ (x_i + 1) (n_words + 1)^(L-1-i)."""
        if self._all_states is None:
            self._check_enumerable()
            b = self.n_words + 1
            idx = torch.arange(self.n_states, device=self.device)
            powers = b ** torch.arange(self.length - 1, -1, -1, device=self.device)
            self._all_states = self.States((idx.unsqueeze(-1) // powers) % b - 1)
        return self._all_states

    def get_states_indices(self, states) -> torch.Tensor:
        x = states.tensor if hasattr(states, "tensor") else states
        b = self.n_words + 1
        powers = b ** torch.arange(self.length - 1, -1, -1, device=x.device)
        return ((x.clamp(min=-1) + 1) * powers).sum(-1)
