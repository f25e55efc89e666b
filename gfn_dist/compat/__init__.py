"""Adapters that run other libraries' environments in gfn_dist (optional dependencies, imported lazily).

* ``gfn_dist.compat.torchgfn.TorchgfnEnv``: a torchgfn 2.4 ``DiscreteEnv`` as it is.
"""
