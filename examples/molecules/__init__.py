"""Molecule design with a real chemistry reward: SELFIES strings, RDKit's QED (the ``[chem]`` extra).

Named in ``configs/molecules_qed.yaml`` by import path::

    env:   {name: examples.molecules:SelfiesEnv, kwargs: {max_length: 24, beta: 8.0}}
    model: {policy: examples.molecules:make_policy, kwargs: {hidden_dim: 128, rnn_type: gru}, pb: none}

RDKit and selfies are imported on first use (``examples.molecules.chem.require_chem``).
"""

from examples.molecules.env import SMALL_ALPHABET, SelfiesEnv, uniform_terminal_states
from examples.molecules.metrics import count_modes, distinct_by_qed, mean_pairwise_distance, molecule_metrics
from examples.molecules.policy import make_policy

__all__ = [
    "SMALL_ALPHABET",
    "SelfiesEnv",
    "count_modes",
    "distinct_by_qed",
    "make_policy",
    "mean_pairwise_distance",
    "molecule_metrics",
    "uniform_terminal_states",
]
