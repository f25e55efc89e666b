"""Optional dependencies, checked before anything starts.

A run that needs a package outside the base install (TensorBoard for
``logging.tensorboard=true``) or a credential (a wandb API key for
``logging.wandb.mode=online``) fails during config validation with one line
naming the key and what to install or set, exit code 2 (``gfn_dist.train``
turns ``ConfigError`` into that), not a traceback after Ray has started.

The checks only look (``importlib.util.find_spec``, environment variables, the
netrc file): nothing heavy is imported here.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

from gfn_dist.config import ConfigError, TrainConfig

WANDB_DEFAULT_HOST = "https://api.wandb.ai"


def has_module(name: str) -> bool:
    """Whether ``import name`` would find the package (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken __spec__
        return False


def _netrc_path() -> Path:
    """The netrc file wandb reads: ``$NETRC``, else ``~/.netrc`` (``~/_netrc`` where only that exists)."""
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    unix, windows = Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()
    return windows if windows.exists() and not unix.exists() else unix


def wandb_credentials_source() -> str | None:
    """Where wandb would find an API key for ``WANDB_BASE_URL``, or None.

    The places wandb documents for a non-interactive login: the
    ``WANDB_API_KEY`` environment variable, an identity token file
    (``WANDB_IDENTITY_TOKEN_FILE``), or the netrc entry ``wandb login`` writes
    (machine = the API host, ``api.wandb.ai`` by default).
    """
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    if os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "WANDB_IDENTITY_TOKEN_FILE"
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or WANDB_DEFAULT_HOST).netloc
    path = _netrc_path()
    try:
        entry = netrc.netrc(str(path)).authenticators(host) if path.is_file() else None
    except (netrc.NetrcParseError, OSError):
        entry = None
    return str(path) if entry and entry[2] else None


def check_optional_dependencies(cfg: TrainConfig) -> None:
    """Checks that what ``cfg`` enables is installed / logged in; call before Ray starts.

    Raises:
        ConfigError: one line naming the key and the extra to install (or the
            credential to set).
    """
    if cfg.logging.tensorboard and not has_module("tensorboard"):
        raise ConfigError(
            "logging.tensorboard: true needs TensorBoard, which is not installed; "
            "pip install -e '.[tensorboard]' (or set logging.tensorboard=false)"
        )
    if cfg.logging.wandb.mode != "disabled" and not has_module("wandb"):
        raise ConfigError(
            f"logging.wandb.mode: {cfg.logging.wandb.mode} needs wandb, which is not installed; "
            "pip install wandb (or set logging.wandb.mode=disabled)"
        )
    if cfg.logging.wandb.mode == "online" and wandb_credentials_source() is None:
        raise ConfigError(
            "logging.wandb.mode: online needs a wandb API key (none in WANDB_API_KEY or in the netrc file "
            f"{_netrc_path()}); run `wandb login` or export WANDB_API_KEY, or use logging.wandb.mode=offline"
        )


def require_matplotlib(command: str = "gfn-dist plot") -> None:
    """Raises ``ConfigError`` (one line) when matplotlib, which ``command`` draws with, is missing."""
    if not has_module("matplotlib"):
        raise ConfigError(f"{command}: needs matplotlib, which is not installed; pip install 'matplotlib>=3.7'")
