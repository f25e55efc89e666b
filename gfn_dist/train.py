"""Entry point: ``gfn-dist train CONFIG.yaml [key.sub=value ...]``.

Resuming: ``gfn-dist train [CONFIG.yaml] resume=true run.dir=DIR [key.sub=value ...]``
continues with the run's own config plus the overrides (``gfn_dist.resume``);
a run already at its budget is reported in one line, exit code 0.

Also ``python -m gfn_dist.train CONFIG.yaml [...]``, the form torchrun runs::

    torchrun --standalone --nproc_per_node=2 -m gfn_dist.train configs/hypergrid_tb.yaml

Parse the config, build the trainer, ``trainer.train()``, close in ``finally``
(actors killed, Ray shut down, process group destroyed). Exit codes: 0 done,
2 bad configuration (one line on stderr naming the key, before any actor
starts), 1 any other error.

SIGTERM / SIGINT during training (SLURM ``--signal``, torchrun, Ctrl-C): every
rank finishes its step, a checkpoint is written, actors stop, exit code 0;
``resume=true`` continues (``gfn_dist.checkpoint``). A second Ctrl-C aborts.

Shutdown tolerates a dead Ray control plane: a run whose training finished exits 0
even if the GCS dies before or during the shutdown (a warning says so;
``gfn_dist.distributed.cluster.teardown``).

Test hook: with ``GFN_DIST_SHUTDOWN_GATE=PATH`` in the environment, a run whose
training finished writes ``PATH.waiting`` (its PID) and waits, up to
``SHUTDOWN_GATE_TIMEOUT_S``, for ``PATH`` to exist before it shuts down, so that
a test can fault Ray's processes at exactly that moment (tests/test_clean_ends.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gfn_dist.config import ConfigError
from gfn_dist.errors import DiskFullError, ReplayStalled
from gfn_dist.extras import check_optional_dependencies
from gfn_dist.ray_env import set_embedded_ray_auth
from gfn_dist.resume import is_global_rank0, log_changes, resolve_train_config, split_preset

logger = logging.getLogger("gfn_dist")

SHUTDOWN_GATE_ENV = "GFN_DIST_SHUTDOWN_GATE"
SHUTDOWN_GATE_TIMEOUT_S = 600.0


def wait_at_shutdown_gate() -> None:
    """The test hook of the module doc: returns at once unless ``GFN_DIST_SHUTDOWN_GATE`` is set."""
    gate = os.environ.get(SHUTDOWN_GATE_ENV)
    if not gate:
        return
    Path(f"{gate}.waiting").write_text(str(os.getpid()))
    end = time.monotonic() + SHUTDOWN_GATE_TIMEOUT_S
    while not Path(gate).exists() and time.monotonic() < end:
        time.sleep(0.1)


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", nargs="?", help="YAML preset, e.g. configs/hypergrid_tb.yaml (optional when resuming)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. learner.max_steps=200 run.dir=/tmp/r")
    return p


def run_train(config: str | None, overrides: Sequence[str]) -> int:
    """Trains with ``config`` + ``overrides`` (a resumed run: its checkpoint's config + ``overrides``,
    ``gfn_dist.resume``); returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    trainer = None
    try:
        config, overrides = split_preset(config, overrides)  # `train resume=true run.dir=D`: no preset
        resolved = resolve_train_config(config, overrides)  # reads files only: no lock, no write, no Ray
        if resolved.finished:  # nothing left to train: say so, exit 0
            if is_global_rank0():
                sys.stdout.write(f"gfn-dist: {resolved.finished_message()}\n")
            return 0
        log_changes(resolved)  # resume: key: old -> new
        cfg = resolved.cfg
        check_optional_dependencies(cfg)  # before the heavy imports: seconds, not tens
        set_embedded_ray_auth(cfg.cluster.address)  # before `import ray`: no token-auth warning (gfn_dist.ray_env)
        from gfn_dist.preemption import install_preemption_handlers, preemption_requested
        from gfn_dist.trainer import Trainer  # heavy imports (Ray) only for a valid config

        trainer = Trainer(cfg, preset=Path(config).stem if config else "run")
        install_preemption_handlers()  # after Ray is up (it installs its own SIGTERM handler)
        row = trainer.train()
        if not trainer.owner:  # torchrun ranks > 0: global rank 0 reports for the run
            return 0
        if trainer.preempted:
            logger.warning(
                "stopped by signal %s at step %d after a checkpoint; continue with resume=true",
                preemption_requested() or "(on another learner rank)",
                trainer.learner.step,
            )
        logger.info("done: %s", {k: row[k] for k in ("step", "loss", "l1_exact", "logZ_err") if k in row})
        logger.info("run directory: %s", trainer.run_dir)
        wait_at_shutdown_gate()
        return 0
    except ConfigError as err:
        sys.stderr.write(f"gfn-dist: config error: {err}\n")
        return 2
    except DiskFullError as err:  # a metric row skipped, or a checkpoint / file not written: one line
        sys.stderr.write(f"gfn-dist: {err}\n")
        return 1
    except ReplayStalled as err:  # a checkpoint was written first
        sys.stderr.write(f"gfn-dist: {err}\n")
        return 1
    finally:
        if trainer is not None:
            trainer.close()
            from gfn_dist.preemption import uninstall_preemption_handlers

            uninstall_preemption_handlers()


def main(argv: Sequence[str] | None = None) -> int:
    args = add_train_arguments(
        argparse.ArgumentParser(
            prog="python -m gfn_dist.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    )
    ns = args.parse_args(argv)
    return run_train(ns.config, ns.overrides)


if __name__ == "__main__":
    sys.exit(main())
