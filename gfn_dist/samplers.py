"""Samplers at torchgfn's import path ``gfn.samplers``.

``Sampler`` lives in ``gfn_dist.sampling`` and ``LocalSearchSampler`` (which
subclasses it) in ``gfn_dist.local_search``; this module only re-exports them.
"""

from gfn_dist.compiled_rollout import compile_supported
from gfn_dist.local_search import LocalSearchSampler
from gfn_dist.sampling import Sampler

__all__ = ["LocalSearchSampler", "Sampler", "compile_supported"]
