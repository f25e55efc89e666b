"""A module that does not import (its ImportError must reach the user)."""

import gfn_dist_no_such_dependency  # noqa: F401
