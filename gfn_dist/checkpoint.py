"""Checkpoints, resume and preemption of a distributed run.

Layout. Every ``checkpoint.interval_steps`` learner steps, at the end of
training and on preemption, rank 0 writes ``CKPT_DIR/step_N/`` (``CKPT_DIR`` =
``checkpoint.dir``, default ``RUN_DIR/checkpoints``)::

    learner.pt   gflownet state dict (policies + logZ), optimizer, step,
                 policy_version, trajectories_seen, world_size
    rng.pt       {"ranks": [per-rank RNG states]}: torch CPU (+ CUDA), python
                 ``random``, numpy's global RNG (as tensors); gathered from every rank
    replay.pt    {"shards": [ReplayShard.snapshot() per shard]}: contents, counters, sampling RNG
    actors.pt    {"rng": [torch RNG state per Ray rollout actor]} (when they could be read)
    config.yaml  the resolved configuration
    meta.json    step, reason (interval | end | preempt), time: for humans

The directory is written as ``CKPT_DIR/.tmp_step_N``, every file fsynced, a
``manifest.json`` (sizes, SHA-256) last, and renamed into place; reading
verifies the manifest and falls back to the newest intact checkpoint with a
warning (``gfn_dist.checkpoint_files``); only the newest
``checkpoint.keep_last`` are kept. Every ``.pt`` file holds tensors and plain
containers only and is read with ``torch.load(weights_only=True)``. Rank 0 does
all file I/O (other ranks' RNG states travel over the process group), so under
torchrun only rank 0's node needs ``RUN_DIR``.

Resume. ``resume`` (top-level key) is ``false`` (default), ``true`` or ``auto``.
``true`` continues from the newest ``step_N`` in ``CKPT_DIR`` and fails if there
is none; ``auto`` continues when there is one and starts fresh otherwise (what
``torchrun --max-restarts`` needs, since it restarts the same command). Without
``run.dir``, ``true`` picks the newest ``runs/<preset>-*`` run that holds a
checkpoint; ``auto`` does so only on a torchrun restart
(``TORCHELASTIC_RESTART_COUNT > 0``) and otherwise starts a new run. A resumed
run restores the learner (model, optimizer, step), every rank's RNG, the
replay shards (before any actor pushes) and the actors' RNG, then publishes
the restored weights as version ``step`` so actors sample from them. The
checkpoint's ``env``, ``model``, ``loss.name``, ``replay.num_shards`` and
``replay.capacity_per_shard`` must equal the configuration's (a ``ConfigError``
names every key that differs); budgets, logging, actors etc. may change. The
configuration a resumed run has (the checkpoint's, with the command line's
overrides on top) is worked out before the Trainer starts: ``gfn_dist.resume``.

Preemption. ``install_preemption_handlers`` (``gfn_dist.train``) makes SIGTERM
and SIGINT set a flag instead of killing the process (a second SIGINT aborts).
At every step boundary the ranks agree on the flag (MAX all-reduce on a gloo
group), so all of them stop after the same step: checkpoint, last metric row,
actors stopped, exit code 0. SLURM's ``--signal`` and torchrun relay SIGTERM.

Synchronous rollouts (``rollout.synchronous=true``). Ray actors sample
concurrently with the learner, so their data stream depends on timing and a
resumed run cannot replay it. In synchronous mode rank 0 instead runs the
same ``RolloutWorker`` code in its own process before every learner step,
with the current weights and the learner's seeded RNG (which checkpoints
capture), and pushes the batches into the real replay shard actors. The run
is then a deterministic function of the seed and a resumed run equals an
uninterrupted one (tests/test_checkpoint.py).
``SynchronousRollout`` is in ``gfn_dist.distributed.synchronous_rollout``.

Test hook. ``GFN_DIST_FAULT_INJECT=rank:R,step:S[,attempt:A]`` makes learner
rank R raise ``RuntimeError`` right after step S on torchrun attempt A
(``TORCHELASTIC_RESTART_COUNT``, default 0), so a restarted run passes S.

torchrun restarts. ``torchrun --max-restarts=N ... resume=auto run.dir=DIR``
restarts every rank after a failure and they continue from the newest
checkpoint. Export ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for torchrun:
with its default shared rendezvous store, the restarted ranks read the
previous attempt's gloo / NCCL addresses and fail to connect
(pytorch/pytorch#135712; seen with torch 2.13).
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from gfn_dist.checkpoint_files import (  # noqa: F401  (re-exported: the file layer lives there)
    MANIFEST,
    STEP_PREFIX,
    TMP_PREFIX,
    CorruptCheckpointError,
    latest_checkpoint,
    latest_intact_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    load_torch_file,
    newest_intact,
    prune_checkpoints,
    verify_checkpoint,
    write_checkpoint,
)
from gfn_dist.config import ConfigError, TrainConfig, to_yaml
from gfn_dist.distributed import ray_compat
from gfn_dist.preemption import preemption_requested
from gfn_dist.resume import (  # noqa: F401  (re-exported: which run and config a resume continues live there)
    COMPAT_KEYS,
    RESTART_ENV,
    check_resumable,
    checkpoint_root,
    config_differences,
    resume_run_dir,
)

logger = logging.getLogger(__name__)

FAULT_ENV = "GFN_DIST_FAULT_INJECT"


# ---------------------------------------------------------------------------- fault injection (test hook)


def fault_injection_from_env() -> tuple[int, int, int] | None:
    """``(rank, step, attempt)`` from ``GFN_DIST_FAULT_INJECT`` (module doc), or None.

    Raises:
        ValueError: naming the variable if it is malformed.
    """
    spec = os.environ.get(FAULT_ENV, "").strip()
    if not spec:
        return None
    try:
        fields = dict(part.split(":", 1) for part in spec.split(","))
        return int(fields["rank"]), int(fields["step"]), int(fields.get("attempt", 0))
    except (ValueError, KeyError) as err:
        raise ValueError(f"{FAULT_ENV}: expected 'rank:R,step:S[,attempt:A]', got {spec!r}") from err


# ---------------------------------------------------------------------------- compatibility
# (which run a resume continues and which config keys must match: gfn_dist.resume)


def state_dict_differences(saved: dict, module: torch.nn.Module) -> list[str]:
    """Parameter / buffer names or shapes that differ between ``saved`` and ``module.state_dict()``."""
    current = module.state_dict()
    diffs = [f"gflownet.{k}: missing in the checkpoint" for k in current if k not in saved]
    diffs += [f"gflownet.{k}: not in the model" for k in saved if k not in current]
    diffs += [
        f"gflownet.{k}: checkpoint shape {tuple(saved[k].shape)}, model {tuple(current[k].shape)}"
        for k in current
        if k in saved and tuple(saved[k].shape) != tuple(current[k].shape)
    ]
    return diffs


def check_compatible(
    ckpt: dict, cfg: TrainConfig, gflownet: torch.nn.Module | None = None, path: str | Path = "checkpoint"
) -> None:
    """Refuses a checkpoint written under an incompatible configuration.

    Args:
        ckpt: ``load_checkpoint`` output.
        cfg: the configuration of the run that resumes.
        gflownet: the freshly built loss module (its state dict names / shapes are checked too).
        path: the checkpoint's path, for the message.

    Raises:
        ConfigError: (a ValueError) listing every key (config key or parameter
            name) that differs.
    """
    diffs = config_differences(OmegaConf.to_container(OmegaConf.create(ckpt["config"])), cfg)  # type: ignore[arg-type]  # the saved config is a mapping
    if gflownet is not None and not diffs:
        diffs = state_dict_differences(ckpt["learner"]["gflownet"], gflownet)
    if diffs:
        raise ConfigError(f"resume: checkpoint {path} is incompatible with this configuration: " + "; ".join(diffs))


# ---------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """This process's RNG states as tensors and plain containers."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        _name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of ``rng_state``."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np = sys.modules.get("numpy")
    if np is not None and "numpy" in state:
        s = state["numpy"]
        np.random.set_state(
            ("MT19937", s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["cached_gaussian"])
        )


def _actor_get_rng(worker) -> torch.Tensor:  # runs inside a rollout actor (``ray_compat.call_in_actor``)
    return torch.get_rng_state()


def _actor_set_rng(worker, state: torch.Tensor) -> None:
    torch.set_rng_state(state)


# ---------------------------------------------------------------------------- stateful components


class RolloutActorsRNG:
    """The rollout actors' torch RNG states as one stateful component (rank 0's checkpoint entry ``actors``).

    Args:
        actors: rollout actor handles, actor 0 first.
    """

    def __init__(self, actors: list) -> None:
        self.actors = list(actors)

    def state_dict(self) -> dict | None:
        """``{"rng": [state per actor]}``, or None when an actor cannot answer (a dead actor must not
        cost the checkpoint; its RNG is then not restored)."""
        try:
            return {"rng": ray.get([ray_compat.call_in_actor(a, _actor_get_rng) for a in self.actors], timeout=30)}
        except Exception as err:
            logger.warning("checkpoint: rollout actors' RNG not saved: %s", err)
            return None

    def load_state_dict(self, state: dict) -> None:
        ray.get(
            [ray_compat.call_in_actor(a, _actor_set_rng, s) for a, s in zip(self.actors, state["rng"], strict=False)]
        )  # a resumed run may have another number of actors


# ---------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Periodic / final / preemption checkpoints and resume of one learner rank's stateful components.

    ``states`` maps a checkpoint entry to a component with ``state_dict`` /
    ``load_state_dict`` (the pattern of torchtitan's ``CheckpointManager(states=...)``):
    every rank passes ``"learner"`` (replicated: identical on every rank, saved by
    rank 0, broadcast on resume); rank 0 adds ``"replay"`` (the ``ReplayClient``:
    every shard) and ``"actors"`` (``RolloutActorsRNG``). Each entry is the file
    ``<name>.pt`` of ``step_N/``; the RNG states of every rank are gathered into
    ``rng.pt``. Every method is collective: all ranks call it.

    Args:
        cfg: the run's configuration (``checkpoint.*``, ``resume``; written as ``config.yaml``).
        ctx: the rank's ``DistContext``.
        run_dir: the run directory (``checkpoint.dir`` defaults to ``run_dir/checkpoints``).
        states: entry name -> stateful component (see above).
        replicated: the entries every rank holds.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        ctx,
        run_dir: str | Path,
        states: Mapping[str, Any],
        replicated: Sequence[str] = ("learner",),
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.root = checkpoint_root(cfg, run_dir)
        self.states = dict(states)
        self.replicated = tuple(replicated)
        self.interval = cfg.checkpoint.interval_steps
        self.last_saved_step: int | None = None
        self.resumed_from: Path | None = None
        self.fault = fault_injection_from_env()
        self._group = None
        if ctx.distributed:  # a CPU group for the flag, so a NCCL run does not sync the GPU every step
            self._group = dist.new_group(backend="gloo") if ctx.backend != "gloo" else dist.group.WORLD

    # ------------------------------------------------------------------ when

    def preemption_agreed(self, step: int) -> bool:
        """Whether any rank received SIGTERM / SIGINT (MAX all-reduce, so all ranks stop after the same step).

        Also the fault-injection test hook (``GFN_DIST_FAULT_INJECT``), which raises.
        """
        self._maybe_inject_fault(step)
        flag = preemption_requested() is not None
        if self.ctx.distributed:
            t = torch.tensor([1 if flag else 0], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
            flag = bool(t.item())
        if flag:
            logger.warning(
                "preemption (signal %s on some rank): checkpointing at step %d and stopping",
                preemption_requested(),
                step,
            )
        return flag

    def is_due(self, step: int) -> bool:
        """Every ``checkpoint.interval_steps`` steps (0: never)."""
        return self.interval > 0 and step % self.interval == 0

    def _maybe_inject_fault(self, step: int) -> None:
        if self.fault is None:
            return
        rank, at_step, attempt = self.fault
        if self.ctx.rank == rank and step == at_step and int(os.environ.get(RESTART_ENV, "0")) == attempt:
            raise RuntimeError(f"{FAULT_ENV}: injected failure of rank {rank} after step {step} (attempt {attempt})")

    # ------------------------------------------------------------------ save

    def save(self, step: int, reason: str = "interval") -> Path | None:
        """Writes ``step_<step>`` (collective). Returns the path on rank 0, None elsewhere or when
        this step is already saved."""
        if self.last_saved_step == step:
            return None
        rngs = self._gather(rng_state())
        self.last_saved_step = step
        if not self.ctx.is_main:
            return None
        t0 = time.perf_counter()
        files: dict[str, Any] = {name: obj.state_dict() for name, obj in self.states.items()}
        files = {name: state for name, state in files.items() if state is not None}
        files["rng"] = {"ranks": rngs}
        meta = {
            "step": step,
            "world_size": self.ctx.world_size,
            "reason": reason,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            **{k: files["learner"][k] for k in ("policy_version", "trajectories_seen") if k in files["learner"]},
        }
        path = write_checkpoint(self.root, step, files, to_yaml(self.cfg), meta, self.cfg.checkpoint.keep_last)
        logger.info("checkpoint (%s) at step %d: %s (%.2f s)", reason, step, path, time.perf_counter() - t0)
        return path

    def _gather(self, obj: Any) -> list | None:
        if not self.ctx.distributed:
            return [obj]
        out = [None] * self.ctx.world_size if self.ctx.is_main else None
        dist.gather_object(obj, out, dst=0, group=self._group)
        return out

    # ------------------------------------------------------------------ resume

    def resume(self) -> Path | None:
        """Restores the newest checkpoint when ``resume`` asks for it (collective).

        Call before the rollout actors run: rank 0 restores its own entries (replay
        shards, actor RNG), then every rank loads the replicated entries and its RNG.

        Raises:
            ConfigError: if ``resume=true`` finds no checkpoint, or the checkpoint is incompatible.
        """
        if self.cfg.resume is False:
            return None
        payload: Any = None
        if self.ctx.is_main:
            try:
                payload = self._read_for_resume()
            except (ConfigError, ValueError, OSError, RuntimeError) as err:
                payload = {"error": f"{type(err).__name__}: {err}", "config_error": isinstance(err, ConfigError)}
        if self.ctx.distributed:
            box = [payload]
            dist.broadcast_object_list(box, src=0, group=self._group)
            payload = box[0]
        if payload is None:
            return None
        if "error" in payload:
            msg = payload["error"].split(": ", 1)[1]
            raise ConfigError(msg) if payload["config_error"] else RuntimeError(msg)
        for name in self.replicated:
            self.states[name].load_state_dict(payload["replicated"][name])
        rngs = payload["rngs"]
        if self.ctx.rank < len(rngs):
            set_rng_state(rngs[self.ctx.rank])
        else:
            logger.warning(
                "resume: the checkpoint has no RNG state for rank %d (world size was %d)", self.ctx.rank, len(rngs)
            )
        self.last_saved_step = int(payload["step"])
        self.resumed_from = Path(payload["path"])
        logger.info("resumed from %s at step %d", self.resumed_from, self.last_saved_step)
        return self.resumed_from

    def _read_for_resume(self) -> dict | None:
        """Rank 0: loads and checks the newest intact checkpoint, restores its own entries."""
        found = load_latest_checkpoint(self.root)  # torn newer ones are skipped with a warning
        if found is None:
            if self.cfg.resume is True:
                raise ConfigError(f"resume: true, but there is no checkpoint in {self.root}")
            logger.info("resume=auto: no checkpoint in %s, starting fresh", self.root)
            return None
        _, path, ckpt = found
        check_compatible(ckpt, self.cfg, getattr(self.states.get("learner"), "gflownet", None), path)
        for name, obj in self.states.items():
            if name not in self.replicated and ckpt.get(name) is not None:
                obj.load_state_dict(ckpt[name])  # replay before any actor pushes
        return {
            "replicated": {name: ckpt[name] for name in self.replicated},
            "rngs": ckpt["rng"]["ranks"],
            "step": int(ckpt["learner"]["step"]),
            "path": str(path),
        }
