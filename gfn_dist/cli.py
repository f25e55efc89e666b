"""``gfn-dist`` command line: ``gfn-dist train CONFIG.yaml [key.sub=value ...]``.

Subcommands are registered in ``build_parser``; ``plot`` and ``eval`` will join
``train`` there.
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "train":
        from gfn_dist.train import run_train

        return run_train(ns.config, ns.overrides)
    raise AssertionError(f"unhandled command {ns.command}")  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
