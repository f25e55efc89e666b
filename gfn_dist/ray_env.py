"""Ray's environment variables that must be set before ``import ray``.

Token authentication (Ray >= 2.5x): a new local Ray (``ray.init()`` without an
address, what ``gfn-dist train`` does by default) turns token authentication on
when ``RAY_AUTH_MODE`` is unset, writes ``~/.ray/auth_token`` if missing, and
logs ``Token authentication is enabled for this Ray cluster. Set
RAY_AUTH_MODE=disabled to opt out`` (Ray's internal ``authentication.
authentication_token_setup.enable_token_auth_by_default``). Ray documents the
variable as the switch and stays silent when it is set explicitly, so for an
embedded Ray we set ``RAY_AUTH_MODE=token``: the same behaviour, minus the
warning. Ray caches its config when it is imported, hence "before ``import
ray``"; a process that already imported Ray (a notebook, the test suite) is
left alone.

A process that connects to an existing cluster (``cluster.address``) keeps
Ray's own rules (``address=auto`` follows a token found on this host; an
explicit address needs ``RAY_AUTH_MODE=token`` and the cluster's token,
``launch/README.md``).
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

RAY_AUTH_MODE = "RAY_AUTH_MODE"


def set_embedded_ray_auth(address: str | None) -> bool:
    """Sets ``RAY_AUTH_MODE=token`` for an embedded Ray (``address`` None) when unset; returns whether it did.

    Call before anything imports ``ray`` (``gfn_dist.cli`` does, before importing the trainer).
    """
    if address or RAY_AUTH_MODE in os.environ:
        return False
    if "ray" in sys.modules:  # Ray read its config already: a changed mode would not match its own
        logger.debug("ray already imported; RAY_AUTH_MODE left unset")
        return False
    os.environ[RAY_AUTH_MODE] = "token"
    return True
