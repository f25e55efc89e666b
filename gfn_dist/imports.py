"""User code named in the configuration: import paths and Ray's ``runtime_env``.

An import path is ``"package.module:Attr"`` (``Attr`` may be dotted,
``"pkg.mod:Outer.inner"``), the convention of setuptools entry points and
RLlib / Hydra-style configs. ``resolve(path, key)`` imports it and returns the
attribute; every failure is a ``ConfigError`` of one line that names the
configuration key and the path (and, for a module that does not import, the
``ImportError``'s own text), so ``gfn-dist train`` exits 2 before any actor starts.

User code reaches the processes of a run (learners, rollout actors, replay
shards) through the cluster's own mechanism, never through a copy made by
gfn_dist: on Ray through ``runtime_env_of(cfg)`` (``cluster.working_dir`` /
``cluster.py_modules`` / ``cluster.runtime_env``, passed to ``ray.init``);
under ``torchrun`` / SLURM through the job's environment (``PYTHONPATH`` or an
installed package).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import sys
from pathlib import Path
from typing import Any

from gfn_dist.config import ConfigError, is_import_path

logger = logging.getLogger(__name__)

__all__ = ["accepts_kwarg", "call_user", "is_import_path", "resolve", "runtime_env_of"]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def resolve(path: str, key: str) -> Any:
    """The object named by the import path ``path``.

    Args:
        path: ``"package.module:Attr"``.
        key: the configuration key that holds ``path`` (named in errors).

    Returns:
        the attribute (a class, a function, ...).

    Raises:
        ConfigError: one line naming ``key`` and ``path``: not an import path, the
            module does not import (its exception's text included; an exception
            raised while the module runs is reported the same way), or the module
            has no such attribute.
    """
    if not is_import_path(path):
        raise ConfigError(f"{key}: {path!r} is not an import path 'package.module:Attr'")
    module_name, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module_name.strip())
    except Exception as err:  # ImportError, or anything the module raises at import time
        raise ConfigError(f"{key}: cannot import module {module_name!r} of {path!r}: {_first_line(err)}") from err
    for part in attr.strip().split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    return obj


def call_user(fn, key: str, what: str, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)``, any exception turned into a one-line ``ConfigError``.

    Args:
        fn: the user's class or factory.
        key: the configuration key that named it.
        what: how to name it in the message (e.g. its import path).

    Raises:
        ConfigError: ``"{key}: {what}(...) rejected ...: <ExceptionType>: <its message>"``.
    """
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        names = ", ".join(sorted(kwargs)) or "no kwargs"
        raise ConfigError(f"{key}: {what}({names}) failed: {_first_line(err)}") from err


def accepts_kwarg(fn, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


# ---------------------------------------------------------------------------- Ray runtime_env


def _py_module_entry(entry: str) -> str:
    """A ``cluster.py_modules`` entry as Ray takes it: a URI as is, a local path, or a module's directory."""
    if "://" in entry:
        return entry  # a remote package (s3://..., gs://..., https://...zip): Ray downloads it
    p = Path(entry).expanduser()
    if p.exists():
        return str(p.resolve())
    spec = None
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec(entry)
    if spec is not None and spec.submodule_search_locations:
        return str(Path(next(iter(spec.submodule_search_locations))).resolve())
    if spec is not None and spec.origin:
        return str(Path(spec.origin).resolve())  # a single-file module
    raise ConfigError(f"cluster.py_modules: {entry!r} is neither an existing path, a URI, nor an importable package")


def runtime_env_of(cfg) -> dict | None:
    """Ray's ``runtime_env`` that ships the user's code to every Ray worker of the run, or None.

    Built from ``cluster.runtime_env`` (any of Ray's fields: ``env_vars``, ``pip``,
    ``excludes``, ...) with ``cluster.working_dir`` and ``cluster.py_modules`` on top:

    * ``working_dir``: a local directory (uploaded; each worker starts in it and can
      import its top-level modules) or a remote URI.
    * ``py_modules``: local package directories, ``.whl`` / ``.zip`` files, remote
      URIs, or names of packages importable here (shipped from where they are found).

    Pass the result to ``ray.init(runtime_env=...)`` (job level: actors and Ray
    Train workers inherit it). Ray uploads and caches the files; nothing is copied
    by gfn_dist.

    Args:
        cfg: a ``TrainConfig``.

    Returns:
        a plain dict, or None when no key is set.

    Raises:
        ConfigError: naming ``cluster.working_dir`` / ``cluster.py_modules`` /
            ``cluster.runtime_env`` for a local path that does not exist or a key
            set twice.
    """
    c = cfg.cluster
    env = dict(c.runtime_env or {})
    if isinstance(env.get("env_vars"), dict):  # Ray takes strings only; YAML reads 1 / true as numbers / bools
        env["env_vars"] = {str(k): str(v) for k, v in env["env_vars"].items()}
    if c.working_dir:
        if "working_dir" in env:
            raise ConfigError(
                "cluster.runtime_env: working_dir is set twice (cluster.working_dir and "
                "cluster.runtime_env.working_dir); keep one"
            )
        wd = str(c.working_dir)
        if "://" not in wd:
            p = Path(wd).expanduser()
            if not p.is_dir():
                raise ConfigError(f"cluster.working_dir: not a directory: {wd}")
            wd = str(p.resolve())
        env["working_dir"] = wd
    if c.py_modules:
        if "py_modules" in env:
            raise ConfigError(
                "cluster.runtime_env: py_modules is set twice (cluster.py_modules and "
                "cluster.runtime_env.py_modules); keep one"
            )
        env["py_modules"] = [_py_module_entry(str(m)) for m in c.py_modules]
    return env or None


def add_user_code_to_path(cfg) -> None:
    """Makes this process import the user's code from where ``runtime_env_of`` ships it to Ray workers.

    The driver (and an in-driver learner) imports the user's environment and policy
    too: the local ``cluster.working_dir`` and the parent directories of local
    ``cluster.py_modules`` packages go to the front of ``sys.path`` (remote URIs and
    archives are left to Ray). Under torchrun / SLURM the job's own environment
    (``PYTHONPATH``, an installed package) provides the code.
    """
    c = cfg.cluster
    dirs = []
    if c.working_dir and "://" not in str(c.working_dir):
        dirs.append(Path(str(c.working_dir)).expanduser().resolve())
    for m in c.py_modules or []:
        p = Path(str(m)).expanduser()
        if "://" not in str(m) and p.is_dir():
            dirs.append(p.resolve().parent)
    for d in reversed(dirs):
        if str(d) not in sys.path:
            sys.path.insert(0, str(d))
