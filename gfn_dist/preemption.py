"""Preemption: SIGTERM / SIGINT set a flag that the training loop checks at every step boundary.

``install_preemption_handlers`` (``gfn_dist.train``) makes SIGTERM and SIGINT set
the flag instead of killing the process (a second SIGINT aborts). The learners
agree on it at the next step boundary (``Checkpointer.preemption_agreed``), write
a checkpoint and stop with exit code 0. SLURM's ``--signal`` and torchrun relay
SIGTERM; under ``cluster.launcher=ray`` the driver forwards it to learner rank 0.
"""

from __future__ import annotations

import signal
from typing import ClassVar


class _Preemption:
    signum: int | None = None
    previous: ClassVar[dict] = {}


def _on_signal(signum, frame) -> None:
    if _Preemption.signum is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # second Ctrl-C: stop now, no checkpoint
    _Preemption.signum = signum  # only a flag: the step boundary does the work


def install_preemption_handlers() -> None:
    """Clears the flag; SIGTERM / SIGINT then set it (main thread only; call after Ray is
    up, which installs its own SIGTERM handler)."""
    _Preemption.signum = None
    for sig in (signal.SIGTERM, signal.SIGINT):
        prev = signal.signal(sig, _on_signal)
        _Preemption.previous.setdefault(sig, prev)


def uninstall_preemption_handlers() -> None:
    """Restores the handlers replaced by ``install_preemption_handlers``."""
    for sig, prev in _Preemption.previous.items():
        signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
    _Preemption.previous = {}


def request_preemption(signum: int = signal.SIGTERM) -> None:
    """Sets the flag as a signal would (for tests and embedding code)."""
    _Preemption.signum = int(signum)


def clear_preemption() -> None:
    """Resets the flag."""
    _Preemption.signum = None


def preemption_requested() -> int | None:
    """The signal number received on this process, or None."""
    return _Preemption.signum
