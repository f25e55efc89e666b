"""``gfn-dist`` command line.

    gfn-dist train CONFIG.yaml [key.sub=value ...]   train (gfn_dist.train)
    gfn-dist plot RUN_DIR                           PNGs into RUN_DIR/plots (gfn_dist.plot)
    gfn-dist eval RUN_DIR|CHECKPOINT [--n-samples N] exact / sampled metrics, samples (gfn_dist.evaluate)

Subcommands are registered in ``build_parser``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from gfn_dist.train import add_train_arguments

    parser = argparse.ArgumentParser(prog="gfn-dist", description="Distributed GFlowNet training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_arguments(sub.add_parser("train", help="train from a YAML preset (configs/*.yaml)"))
    from gfn_dist.evaluate import add_eval_arguments
    from gfn_dist.plot import add_plot_arguments

    add_plot_arguments(sub.add_parser("plot", help="plot a run's metrics and learned distribution (RUN_DIR/plots)"))
    add_eval_arguments(sub.add_parser("eval", help="evaluate a run's saved policy (exact metrics, samples)"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "train":
        from gfn_dist.train import run_train

        return run_train(ns.config, ns.overrides)
    if ns.command == "plot":
        from gfn_dist.plot import run_plot

        return run_plot(ns)
    if ns.command == "eval":
        from gfn_dist.evaluate import run_eval

        return run_eval(ns)
    raise AssertionError(f"unhandled command {ns.command}")  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
