"""Step tokenizers of recurrent policies: state (and previous state) -> token of the last action.

A recurrent policy (``gfn_dist.recurrent``) feeds its sequence model one token per
rollout step: the index of the action that led to the current state, BOS at s0.

* ``LastWordTokenizer`` (``BitSequence``): the state alone identifies the last
  action, its last filled word.
* ``FilledPositionTokenizer`` (``NonAutoregressiveBitSequence``): the last action
  ``position * n_words + word`` is read from the difference between the previous
  state and the current one.
"""

from __future__ import annotations

import torch

from gfn_dist.gym.bitsequence import BitSequence, NonAutoregressiveBitSequence
from gfn_dist.preprocessors import Preprocessor


class StepTokenizer(Preprocessor):
    """Maps each state to the token of the action that led to it (BOS at s0).

    ``output_dim`` is the vocabulary size V (BOS included). Tokens are int64.
    Rows holding the sink state sf map to some valid token (their outputs are
    discarded downstream).

    Attributes:
        bos: the BOS token (s0, or no previous state).
        uses_previous_state: whether ``step_tokens`` needs the previous states.
    """

    uses_previous_state: bool = False

    def __init__(self, vocab_size: int, bos: int):
        super().__init__(vocab_size)
        self.bos = int(bos)

    def step_tokens(self, x: torch.Tensor, prev_x: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``(*B,)`` int64 of states ``x (*B, *state_shape)``; ``prev_x`` same shape or None."""
        raise NotImplementedError  # pragma: no cover - abstract

    def sequence_tokens(self, x_TN: torch.Tensor) -> torch.Tensor:
        """Tokens ``(T, N)`` of a time-major state sequence ``(T, N, *state_shape)`` starting at s0."""
        first = torch.full((1, x_TN.shape[1]), self.bos, dtype=torch.long, device=x_TN.device)
        if x_TN.shape[0] == 1:
            return first
        rest = self.step_tokens(x_TN[1:], x_TN[:-1] if self.uses_previous_state else None)
        return torch.cat([first, rest], dim=0)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return self.step_tokens(x, None)


class LastWordTokenizer(StepTokenizer):
    """``BitSequence`` tokens: the last filled word (= the last action), BOS = ``n_words``.

    States are ``(*B, L)`` words with -1 for empty positions (and -2 for sf, which maps to BOS).

    Args:
        n_words: words per position (``2**word_size``); V = n_words + 1.
    """

    def __init__(self, n_words: int):
        super().__init__(n_words + 1, bos=n_words)
        self.n_words = int(n_words)

    def step_tokens(self, x: torch.Tensor, prev_x: torch.Tensor | None = None) -> torch.Tensor:
        k = (x >= 0).sum(-1, keepdim=True)
        last = x.gather(-1, (k - 1).clamp(min=0)).squeeze(-1)
        return torch.where(k.squeeze(-1) > 0, last, self.bos).long()


class FilledPositionTokenizer(StepTokenizer):
    """``NonAutoregressiveBitSequence`` tokens: ``position * n_words + word`` of the position
    filled between the previous state and this one; BOS = ``L * n_words`` (s0, sf, no change).

    Args:
        length: positions L.
        n_words: words per position; V = L * n_words + 1.
    """

    uses_previous_state = True

    def __init__(self, length: int, n_words: int):
        super().__init__(length * n_words + 1, bos=length * n_words)
        self.length, self.n_words = int(length), int(n_words)

    def step_tokens(self, x: torch.Tensor, prev_x: torch.Tensor | None = None) -> torch.Tensor:
        if prev_x is None:
            return torch.full(x.shape[:-1], self.bos, dtype=torch.long, device=x.device)
        filled = (prev_x < 0) & (x >= 0)
        pos = filled.to(torch.uint8).argmax(-1, keepdim=True)
        word = x.gather(-1, pos).clamp(0, self.n_words - 1)
        tok = (pos * self.n_words + word).squeeze(-1)
        return torch.where(filled.any(-1), tok, self.bos).long()


def last_action_tokenizer(env) -> StepTokenizer:
    """The ``StepTokenizer`` of a built-in sequence environment.

    Raises:
        ValueError: for an environment without a built-in tokenizer.
    """
    if isinstance(env, NonAutoregressiveBitSequence):
        return FilledPositionTokenizer(env.length, env.n_words)
    if isinstance(env, BitSequence):
        return LastWordTokenizer(env.n_words)
    raise ValueError(f"last_action_tokenizer: no built-in tokenizer for {type(env).__name__}; write a StepTokenizer")
