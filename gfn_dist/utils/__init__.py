"""Helpers at torchgfn's ``gfn.utils`` paths: ``common`` (seeding), ``modules`` (networks),
``training`` (validation by sampled L1, modes found).

Import the submodules directly (``from gfn_dist.utils.common import set_seed``): this
package imports nothing, so that core modules can use ``gfn_dist.utils.modules``.
"""
