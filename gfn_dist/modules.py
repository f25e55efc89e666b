"""Modules at the import paths torchgfn's documentation uses (``gfn.modules``).

torchgfn's quickstart imports ``DiscretePolicyEstimator`` / ``ScalarEstimator``
from ``gfn.modules`` and seed 000 imports ``RecurrentDiscreteSequenceModel`` from
there; ``MLP`` and the other networks are at ``gfn_dist.utils.modules`` (torchgfn's
``gfn.utils.modules``) and also re-exported here. Nothing is defined in this module.
"""

from gfn_dist.policy import DiscretePolicyEstimator, Estimator, ScalarEstimator
from gfn_dist.recurrent import RecurrentDiscreteSequenceModel
from gfn_dist.utils.modules import MLP, DiscreteUniform, Tabular, call_module, no_hooks

__all__ = [
    "MLP",
    "DiscretePolicyEstimator",
    "DiscreteUniform",
    "Estimator",
    "RecurrentDiscreteSequenceModel",
    "ScalarEstimator",
    "Tabular",
    "call_module",
    "no_hooks",
]
