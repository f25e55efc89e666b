"""Estimators at torchgfn's import path ``gfn.estimators``.

The classes live in ``gfn_dist.policy`` (feed-forward estimators, the policy
rollout API) and ``gfn_dist.recurrent`` (recurrent policies); this module only
re-exports them, so that neither of those modules imports the other's importer.
"""

from gfn_dist.policy import (
    DiscretePolicyEstimator,
    Estimator,
    MaskedCategorical,
    PolicyMixin,
    RolloutContext,
    ScalarEstimator,
)
from gfn_dist.recurrent import RecurrentDiscretePolicyEstimator, RecurrentPolicyMixin

__all__ = [
    "DiscretePolicyEstimator",
    "Estimator",
    "MaskedCategorical",
    "PolicyMixin",
    "RecurrentDiscretePolicyEstimator",
    "RecurrentPolicyMixin",
    "RolloutContext",
    "ScalarEstimator",
]
