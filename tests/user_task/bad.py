"""Deliberately wrong user code, for the bad-input tests."""

from torch import nn


class NotAnEnv:
    """Has the right name but is no ``gfn_dist.env.DiscreteEnv``."""


def wrong_width(env, **kwargs) -> nn.Module:
    """Returns one logit too many."""
    return nn.Linear(env.preprocessor.output_dim, env.n_actions + 1)


def not_a_module(env, **kwargs):
    return "not a module"


not_callable = 3
