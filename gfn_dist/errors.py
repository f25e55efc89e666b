"""Errors shared by every layer (no dependencies, so core and distributed code can raise them).

``ConfigError`` is re-exported by ``gfn_dist.config``; ``gfn-dist`` turns it into
one line on stderr and exit code 2.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key (one line)."""


class ReplayStalled(RuntimeError):
    """The learner got no data from replay for ``replay.timeout_s``; a checkpoint was written first.
    ``gfn-dist`` prints it as one line and exits 1."""
