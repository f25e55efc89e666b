"""Users' tasks written outside ``gfn_dist``, importable from the repository root (``examples.molecules``)."""
