"""The molecule task's forward policy: a GRU / LSTM over the SELFIES tokens, carry kept in the rollout actor.

``make_policy(env, ...)`` returns a ``SelfiesGRU`` (a ``gfn_dist.recurrent.RecurrentDiscreteSequenceModel``)
(it has ``init_carry``, so gfn_dist wraps it in a ``RecurrentDiscretePolicyEstimator``):
each rollout step feeds it one token, the last appended SELFIES token (BOS = the exit
index at s0), through ``LastWordTokenizer`` (the env's states follow BitSequence's
conventions, so the built-in tokenizer reads them). The carry (hidden state) lives in
the sampler's ``RolloutContext`` and is never shipped; learners recompute log P_F by
teacher forcing, one RNN call over each stored token sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from gfn_dist.recurrent import Carry, RecurrentDiscreteSequenceModel
from gfn_dist.tokenizers import LastWordTokenizer


class SelfiesGRU(RecurrentDiscreteSequenceModel):
    """``RecurrentDiscreteSequenceModel`` that also takes one step without a time axis.

    ``forward(tokens (N, T), carry) -> (logits (N, T, A), carry)`` as the recurrent
    protocol says, and ``forward(tokens (N,), carry) -> (logits (N, A), carry)``: the
    form in which ``gfn_dist.builders._check_policy_output`` calls a recurrent user
    module at start-up (it passes the tokenizer's ``(N,)`` tokens without the T = 1
    axis that ``RecurrentDiscretePolicyEstimator.forward`` adds). Without this, a
    recurrent factory fails validation; drop it once that check goes through the
    estimator's ``forward``.
    """

    def forward(self, tokens: torch.Tensor, carry: Carry) -> tuple[torch.Tensor, Carry]:
        if tokens.dim() == (2 if tokens.is_floating_point() else 1):
            logits, new_carry = super().forward(tokens.unsqueeze(1), carry)
            return logits.squeeze(1), new_carry
        return super().forward(tokens, carry)


def make_policy(env, hidden_dim: int = 128, rnn_type: str = "gru", num_layers: int = 1,
                embedding_dim: int | None = None) -> nn.Module:
    """A recurrent P_F for ``SelfiesEnv``: tokens ``(N, T)`` -> logits ``(N, T, V + 1)``.

    Args:
        env: the ``SelfiesEnv`` (``n_tokens`` V, ``n_actions`` = V + 1).
        hidden_dim: RNN hidden size H.
        rnn_type: ``"gru"`` or ``"lstm"``.
        num_layers: stacked RNN layers.
        embedding_dim: token embedding size (default H).

    Raises:
        ValueError: on a bad ``rnn_type`` or size (from ``RecurrentDiscreteSequenceModel``).
    """
    tokenizer = LastWordTokenizer(env.n_tokens)  # V + 1 tokens: V SELFIES tokens and BOS
    model = SelfiesGRU(tokenizer.output_dim, env.n_actions, hidden_dim, rnn_type=rnn_type,
                       num_layers=num_layers, embedding_dim=embedding_dim)
    model.preprocessor = tokenizer  # gfn_dist's builder uses a module's own preprocessor when it has one
    return model
