"""``gfn-dist`` command line.

    gfn-dist train PRESET|CONFIG.yaml [key.sub=value ...]   train (gfn_dist.train)
    gfn-dist train resume=true run.dir=DIR [key.sub=value ...]  continue a run with its config (gfn_dist.resume)
    gfn-dist config [PRESET|CONFIG.yaml [key.sub=value ...]]  list presets / print a resolved config with docs
    gfn-dist plot RUN_DIR                                   PNGs into RUN_DIR/plots (gfn_dist.plot)
    gfn-dist eval RUN_DIR|CHECKPOINT [--n-samples N]        exact / sampled metrics, samples (gfn_dist.evaluate)

The parser is built from this module alone, and every subcommand imports its
module only when it runs: ``gfn-dist --help`` must not pay for torch, Ray or
OmegaConf (about 3 s of imports). Bad input (an unknown preset, a bad key, a
missing optional package) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

# Deliberately no gfn_dist.config / torch / Ray import at module level (``--help`` speed, module doc).
from gfn_dist.config_docs import format_presets, list_presets


def _presets_epilog() -> str:
    names = ", ".join(list_presets()) or "none found (no configs/ directory here)"
    return (
        f"presets (a name or a path): {names}\n"
        "gfn-dist config lists them; gfn-dist config PRESET [key=value ...] prints every key with its doc."
    )


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``gfn-dist train`` (and ``python -m gfn_dist.train``) on ``p``."""
    p.add_argument(
        "config",
        nargs="?",
        help="a preset name (e.g. hypergrid_tb) or a YAML file (e.g. configs/hypergrid_tb.yaml); "
        "optional with resume=true run.dir=DIR (the run's own config is used)",
    )
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. learner.max_steps=200 run.dir=/tmp/r")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _presets_epilog()
    return p


def add_config_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", nargs="?", help="a preset name or YAML file; without it, list the presets")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides applied before printing")
    return p


def add_plot_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("run_dir", help="run directory (holds metrics.jsonl, config.yaml, policy.pt / checkpoints)")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")
    p.add_argument("--no-distributions", action="store_true", help="skip the P_T plot (no weights loaded)")
    return p


def add_eval_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("path", help="run directory, checkpoint directory (checkpoints/step_N) or weight file (policy.pt)")
    p.add_argument("--n-samples", type=int, default=10_000, help="terminal states to sample (default 10000; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/eval/step_N)")
    p.add_argument("--no-exact", action="store_true", help="skip the exact metrics (enumeration)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gfn-dist",
        description="Distributed GFlowNet training.",
        epilog=_presets_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_arguments(
        sub.add_parser(
            "train",
            help="train from a preset (configs/*.yaml) or a YAML file",
            description="Train a GFlowNet: embedded local Ray, torchrun ranks or a Ray cluster (cluster.launcher).",
        )
    )
    add_config_arguments(
        sub.add_parser(
            "config",
            help="list presets, or print a resolved config with each key's doc",
            description="Without arguments: list the presets. With one: print its "
            "resolved config (schema defaults <- preset <- overrides), "
            "each key with its doc.",
        )
    )
    add_plot_arguments(sub.add_parser("plot", help="plot a run's metrics and learned distribution (RUN_DIR/plots)"))
    add_eval_arguments(sub.add_parser("eval", help="evaluate a run's saved policy (exact metrics, samples)"))
    return parser


def _config_error(command: str, err: Exception) -> int:
    sys.stderr.write(f"gfn-dist: config error: {err}\n")  # the trainer's own wording (gfn_dist.train)
    return 2


def run_config(ns: argparse.Namespace) -> int:
    """``gfn-dist config``: the presets, or one resolved config with docs (stdout); 2 on bad input."""
    from gfn_dist.config import ConfigError, load_config
    from gfn_dist.config_docs import format_config, resolve_config_path

    if ns.config is None:
        sys.stdout.write(format_presets())
        return 0
    try:
        cfg = load_config(resolve_config_path(ns.config), ns.overrides)
    except ConfigError as err:
        return _config_error("config", err)
    sys.stdout.write(format_config(cfg))
    return 0


def run_train_command(ns: argparse.Namespace) -> int:
    """``gfn-dist train``: resolves a preset name, then ``gfn_dist.train.run_train`` (which validates).

    Resuming needs no preset (``gfn-dist train resume=true run.dir=DIR``, ``gfn_dist.resume``).
    """
    from gfn_dist.config import ConfigError
    from gfn_dist.config_docs import resolve_config_path
    from gfn_dist.resume import split_preset

    config, overrides = split_preset(ns.config, ns.overrides)
    try:
        path = resolve_config_path(config) if config is not None else None
    except ConfigError as err:
        return _config_error("train", err)
    from gfn_dist.train import run_train

    return run_train(str(path) if path is not None else None, overrides)


def run_plot_command(ns: argparse.Namespace) -> int:
    from gfn_dist.config import ConfigError
    from gfn_dist.extras import require_matplotlib

    try:
        require_matplotlib("gfn-dist plot")
    except ConfigError as err:
        sys.stderr.write(f"{err}\n")
        return 2
    from gfn_dist.plot import run_plot

    return run_plot(ns)


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "train":
        return run_train_command(ns)
    if ns.command == "config":
        return run_config(ns)
    if ns.command == "plot":
        return run_plot_command(ns)
    if ns.command == "eval":
        from gfn_dist.evaluate import run_eval

        return run_eval(ns)
    raise AssertionError(f"unhandled command {ns.command}")  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
