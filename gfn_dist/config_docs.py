"""Presets and per-key docs of the configuration (``gfn-dist config``).

* Presets are the ``*.yaml`` files of a ``configs/`` directory: the current
  directory's first, then the one next to the package (a source checkout /
  editable install). ``resolve_config_path("hypergrid_tb")`` finds
  ``configs/hypergrid_tb.yaml``; a path to an existing file is taken as is.
* Key docs are the comments ``config.py`` writes on each dataclass field (the
  trailing ``# ...`` of the field's line, else the comment lines just above
  it), read from the source with ``ast`` / ``tokenize``: declared once, next
  to the default. A section without a comment gets its class docstring.

Listing presets reads only file names and each preset's first comment line, so
``gfn-dist train --help`` stays fast; nothing here imports torch or Ray.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import tokenize
from pathlib import Path
from typing import Any

PRESET_SUFFIXES = (".yaml", ".yml")


# ---------------------------------------------------------------------------- presets


def preset_dirs() -> list[Path]:
    """Where presets are looked up, in order: ``./configs``, then ``configs/`` next to the package."""
    dirs = [Path.cwd() / "configs", Path(__file__).resolve().parent.parent / "configs"]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def list_presets() -> dict[str, Path]:
    """``{name: path}`` of every preset (the first directory of ``preset_dirs`` wins a name), sorted."""
    found: dict[str, Path] = {}
    for d in preset_dirs():
        for p in sorted(d.iterdir()):
            if p.suffix in PRESET_SUFFIXES and p.is_file():
                found.setdefault(p.stem, p)
    return dict(sorted(found.items()))


def preset_summary(path: Path, max_chars: int = 90) -> str:
    """The first sentence of a preset's leading comment (its description), shortened to ``max_chars``."""
    text: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.startswith("#"):
                    break
                text.append(line.lstrip("#").strip())
    except OSError:
        return ""
    summary = " ".join(text)
    if ". " in summary:
        summary = summary[: summary.index(". ")]
    summary = summary.rstrip(".")
    return summary if len(summary) <= max_chars else summary[: max_chars - 3].rstrip() + "..."


def resolve_config_path(name_or_path: str) -> Path:
    """A preset name (``hypergrid_tb``) or a YAML path -> the file.

    Raises:
        ConfigError: ``config: ...`` with the available presets in the same line,
            when neither a file nor a known preset matches.
    """
    from gfn_dist.config import ConfigError  # omegaconf: only when a config is actually loaded

    p = Path(name_or_path)
    if p.is_file():
        return p
    presets = list_presets()
    if p.suffix not in PRESET_SUFFIXES and len(p.parts) == 1 and p.name in presets:
        return presets[p.name]
    if not p.is_absolute() and p.parent == Path("configs") and p.stem in presets:
        # `configs/NAME.yaml` as the docs write it, run from another directory (a Ray job's, a SLURM step's)
        return presets[p.stem]
    available = ", ".join(presets) or f"none (no configs/ directory in {Path.cwd()})"
    what = "config file not found" if p.suffix in PRESET_SUFFIXES or len(p.parts) > 1 else "unknown preset"
    raise ConfigError(f"config: {what}: {name_or_path!r}; presets: {available} (gfn-dist config lists them)")


def format_presets() -> str:
    """One line per preset: name, path, description."""
    presets = list_presets()
    if not presets:
        return f"no presets (no configs/ directory in {Path.cwd()} or next to the package)\n"
    width = max(len(n) for n in presets)
    lines = [f"{n:<{width}}  {preset_summary(p)}  [{_short(p)}]" for n, p in presets.items()]
    return "\n".join(lines) + "\n"


def _short(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


# ---------------------------------------------------------------------------- key docs


def _field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` of a dataclass, from its source (module doc)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = src.splitlines()
    out: dict[str, str] = {}
    node = ast.parse(src).body[0]
    for stmt in getattr(node, "body", []):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        trailing = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if n in comments]
        if trailing:
            out[stmt.target.id] = " ".join(trailing)
            continue
        above: list[str] = []
        n = stmt.lineno - 1  # a block of comment-only lines right above the field
        while n in comments and lines[n - 1].strip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        if above:
            out[stmt.target.id] = " ".join(above)
    return out


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0].strip() if (doc or "").strip() else ""


@functools.cache
def field_docs() -> dict[str, str]:
    """``{"learner.batch_size": "global trajectories per learner step ...", ...}`` for every key and section."""
    from gfn_dist.config import TrainConfig

    docs: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        comments = _field_comments(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            sub = _dataclass_type(cls, f)
            doc = f.metadata.get("doc") or comments.get(f.name) or (_first_line(sub.__doc__) if sub else "")
            docs[key] = doc
            if sub is not None:
                walk(sub, key + ".")

    walk(TrainConfig, "")
    return docs


def _dataclass_type(cls: type, f: dataclasses.Field) -> type | None:
    if f.default_factory is not dataclasses.MISSING:
        sample = f.default_factory()
        if dataclasses.is_dataclass(sample):
            return type(sample)
    return None


def _scalar(v: Any) -> str:
    """A value as YAML writes it in flow style (``null``, ``true``, ``.inf``, quoted strings when needed)."""
    import yaml  # only `gfn-dist config` formats values

    text = yaml.safe_dump(v, default_flow_style=True, width=1000).strip()
    return text.removesuffix("...").strip()


def format_config(cfg: Any, docs: dict[str, str] | None = None) -> str:
    """The resolved config as YAML, each key followed by ``# its doc`` (``gfn-dist config PRESET``)."""
    docs = field_docs() if docs is None else docs
    lines: list[str] = []

    def walk(obj: Any, prefix: str, indent: str) -> None:
        for f in dataclasses.fields(obj):
            key, value = f"{prefix}{f.name}", getattr(obj, f.name)
            doc = docs.get(key, "")
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:" + (f"  # {doc}" if doc else ""))
                walk(value, key + ".", indent + "  ")
            else:
                text = f"{indent}{f.name}: {_scalar(value)}"
                lines.append(f"{text:<40}  # {doc}" if doc else text)

    walk(cfg, "", "")
    return "\n".join(lines) + "\n"
