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

The directory is written as ``CKPT_DIR/.tmp_step_N`` and renamed into place,
so a ``step_N`` directory is always complete; only the newest
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
names every key that differs); budgets, logging, actors etc. may change.

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

import json
import logging
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from gfn_dist.config import ConfigError, TrainConfig, to_dict, to_yaml
from gfn_dist.distributed import ray_compat

logger = logging.getLogger(__name__)

FAULT_ENV = "GFN_DIST_FAULT_INJECT"
RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp_"
#: Configuration keys a checkpoint must share with the run that resumes it (shapes of
#: the model, the environment and the replay snapshots). A section name covers all its keys.
COMPAT_KEYS = ("env", "model", "loss.name", "replay.num_shards", "replay.capacity_per_shard")


# ---------------------------------------------------------------------------- preemption


class _Preemption:
    signum: Optional[int] = None
    previous: dict = {}


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


def preemption_requested() -> Optional[int]:
    """The signal number received on this process, or None."""
    return _Preemption.signum


# ---------------------------------------------------------------------------- fault injection (test hook)


def fault_injection_from_env() -> Optional[tuple[int, int, int]]:
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


# ---------------------------------------------------------------------------- locating checkpoints


def checkpoint_root(cfg: TrainConfig, run_dir: str | Path) -> Path:
    """``checkpoint.dir``, or ``run_dir/checkpoints``."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(run_dir) / "checkpoints"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        suffix = p.name[len(STEP_PREFIX):]
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and suffix.isdigit() and (p / "learner.pt").is_file():
            found.append((int(suffix), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest complete ``step_N`` under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resume_run_dir(cfg: TrainConfig, preset: str, runs_root: str | Path = "runs") -> Optional[str]:
    """The run directory to continue when ``run.dir`` is not given (module doc), else None.

    Raises:
        ConfigError: if ``resume=true`` and no ``runs_root/<preset>-*`` run holds a checkpoint.
    """
    if cfg.resume is False or cfg.run.dir or cfg.checkpoint.dir:
        return None
    if cfg.resume == "auto" and int(os.environ.get(RESTART_ENV, "0")) == 0:
        return None
    for d in sorted(Path(runs_root).glob(f"{preset}-*"), reverse=True):  # names end in a sortable timestamp
        if latest_checkpoint(checkpoint_root(cfg, d)) is not None:
            logger.info("resume: continuing the latest %s run with a checkpoint: %s", preset, d)
            return str(d)
    if cfg.resume is True:
        raise ConfigError(f"resume: true, but run.dir is not set and no {runs_root}/{preset}-*/checkpoints/step_* "
                          "exists (set run.dir to the run to continue)")
    return None


# ---------------------------------------------------------------------------- compatibility


def _lookup(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return "<missing>"
        tree = tree[part]
    return tree


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """``COMPAT_KEYS`` whose values differ between a checkpoint's config and ``cfg``, as
    ``"key: checkpoint X, config Y"`` lines (empty when compatible)."""
    current = to_dict(cfg)
    diffs = []
    for key in COMPAT_KEYS:
        a, b = _flatten(_lookup(saved, key), key), _flatten(_lookup(current, key), key)
        for k in sorted(set(a) | set(b)):
            if a.get(k, "<missing>") != b.get(k, "<missing>"):
                diffs.append(f"{k}: checkpoint {a.get(k, '<missing>')!r}, config {b.get(k, '<missing>')!r}")
    return diffs


def state_dict_differences(saved: dict, module: torch.nn.Module) -> list[str]:
    """Parameter / buffer names or shapes that differ between ``saved`` and ``module.state_dict()``."""
    current = module.state_dict()
    diffs = [f"gflownet.{k}: missing in the checkpoint" for k in current if k not in saved]
    diffs += [f"gflownet.{k}: not in the model" for k in saved if k not in current]
    diffs += [f"gflownet.{k}: checkpoint shape {tuple(saved[k].shape)}, model {tuple(current[k].shape)}"
              for k in current if k in saved and tuple(saved[k].shape) != tuple(current[k].shape)]
    return diffs


def check_compatible(ckpt: dict, cfg: TrainConfig, gflownet: Optional[torch.nn.Module] = None,
                     path: str | Path = "checkpoint") -> None:
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
    from omegaconf import OmegaConf

    diffs = config_differences(OmegaConf.to_container(OmegaConf.create(ckpt["config"])), cfg)
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
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
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
        np.random.set_state(("MT19937", s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))


def _actor_get_rng(worker) -> torch.Tensor:  # runs inside a rollout actor (``ray_compat.call_in_actor``)
    return torch.get_rng_state()


def _actor_set_rng(worker, state: torch.Tensor) -> None:
    torch.set_rng_state(state)


# ---------------------------------------------------------------------------- files


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: str | Path) -> dict:
    """Every file of a ``step_N`` directory: ``learner``, ``rng``, ``replay``, ``actors`` (.pt,
    ``weights_only=True``; absent files are None) and ``config`` (YAML text)."""
    path = Path(path)
    out: dict[str, Any] = {k: _load(path / f"{k}.pt") if (path / f"{k}.pt").is_file() else None
                           for k in ("learner", "rng", "replay", "actors")}
    out["config"] = (path / "config.yaml").read_text()
    return out


def write_checkpoint(root: str | Path, step: int, files: dict[str, Any], config_yaml: str, meta: dict,
                     keep_last: Optional[int] = None) -> Path:
    """Writes ``root/step_<step>/`` atomically (temporary directory + rename) and prunes.

    Args:
        root: the checkpoint directory.
        step: learner step of the checkpoint.
        files: ``name -> object`` saved as ``name.pt`` (tensors and plain containers only).
        config_yaml: the resolved configuration.
        meta: JSON-serialisable summary (``meta.json``).
        keep_last: newest checkpoints to keep (None keeps all).

    Returns:
        the checkpoint directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"{STEP_PREFIX}{step}", root / f"{TMP_PREFIX}{STEP_PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, obj in files.items():
        torch.save(_to_cpu(obj), tmp / f"{name}.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if final.exists():  # e.g. a run resumed at step N and stopped again at N
        old = root / f"{TMP_PREFIX}old_{STEP_PREFIX}{step}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    prune_checkpoints(root, keep_last)
    return final


def prune_checkpoints(root: str | Path, keep_last: Optional[int]) -> None:
    """Deletes all but the newest ``keep_last`` checkpoints (None: keeps all) and stale temporaries."""
    found = list_checkpoints(root)
    if keep_last is not None:
        for _, p in found[: max(len(found) - keep_last, 0)]:
            shutil.rmtree(p, ignore_errors=True)
    for p in Path(root).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------- the learner's hook


class Checkpointer:
    """Periodic / final / preemption checkpoints and resume for one learner rank.

    Built by the ``Trainer`` on every rank (the process-group calls are collective)
    and attached to the ``Learner`` (``learner.checkpointer``), which calls
    ``after_step`` after every step and ``at_end`` when training finishes.

    Args:
        cfg: the run's configuration.
        ctx: the rank's ``DistContext``.
        run_dir: the run directory.
        replay: rank 0's ``ReplayClient`` (None: no replay in checkpoints).
        actors: rank 0's Ray rollout actor handles (their RNG is checkpointed).
    """

    def __init__(self, cfg: TrainConfig, ctx, run_dir: str | Path, replay=None, actors: Optional[list] = None) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.root = checkpoint_root(cfg, run_dir)
        self.replay = replay
        self.actors = list(actors or [])
        self.interval = cfg.checkpoint.interval_steps
        self.last_saved_step: Optional[int] = None
        self.preempted = False
        self.resumed_from: Optional[Path] = None
        self.fault = fault_injection_from_env()
        self._group = None
        if ctx.distributed:  # a CPU group for the flag, so a NCCL run does not sync the GPU every step
            self._group = dist.new_group(backend="gloo") if ctx.backend != "gloo" else dist.group.WORLD

    # ------------------------------------------------------------------ hooks

    def after_step(self, learner) -> bool:
        """Fault injection, preemption agreement and periodic checkpoints; True means stop now."""
        self._maybe_inject_fault(learner.step)
        flag = preemption_requested() is not None
        if self.ctx.distributed:
            t = torch.tensor([1 if flag else 0], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
            flag = bool(t.item())
        if flag:
            logger.warning("preemption (signal %s on some rank): checkpointing at step %d and stopping",
                           preemption_requested(), learner.step)
            self.preempted = True
            if not learner.is_log_step():
                learner.log()  # the metrics end at the step the checkpoint holds
            self.save(learner, reason="preempt")
            return True
        if self.interval > 0 and learner.step % self.interval == 0:
            self.save(learner, reason="interval")
        return False

    def at_end(self, learner) -> None:
        """The final checkpoint (unless this step is already saved)."""
        if self.last_saved_step != learner.step:
            self.save(learner, reason="end")

    def _maybe_inject_fault(self, step: int) -> None:
        if self.fault is None:
            return
        rank, at_step, attempt = self.fault
        if self.ctx.rank == rank and step == at_step and int(os.environ.get(RESTART_ENV, "0")) == attempt:
            raise RuntimeError(f"{FAULT_ENV}: injected failure of rank {rank} after step {step} (attempt {attempt})")

    # ------------------------------------------------------------------ save

    def save(self, learner, reason: str = "interval") -> Optional[Path]:
        """Writes ``step_<learner.step>`` (collective: every rank calls it). Returns the path on rank 0."""
        rngs = self._gather(rng_state())
        if not self.ctx.is_main:
            self.last_saved_step = learner.step
            return None
        t0 = time.perf_counter()
        step = learner.step
        state = learner.state_dict()
        state.update(policy_version=step, trajectories_seen=step * self.cfg.learner.batch_size,
                     world_size=self.ctx.world_size)
        files: dict[str, Any] = {"learner": state, "rng": {"ranks": rngs}}
        if self.replay is not None:
            files["replay"] = {"shards": self.replay.snapshot()}
        actor_rng = self._actor_rngs()
        if actor_rng is not None:
            files["actors"] = {"rng": actor_rng}
        meta = {"step": step, "policy_version": step, "trajectories_seen": state["trajectories_seen"],
                "world_size": self.ctx.world_size, "reason": reason, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        path = write_checkpoint(self.root, step, files, to_yaml(self.cfg), meta, self.cfg.checkpoint.keep_last)
        self.last_saved_step = step
        logger.info("checkpoint (%s) at step %d: %s (%.2f s)", reason, step, path, time.perf_counter() - t0)
        return path

    def _gather(self, obj: Any) -> Optional[list]:
        if not self.ctx.distributed:
            return [obj]
        out = [None] * self.ctx.world_size if self.ctx.is_main else None
        dist.gather_object(obj, out, dst=0, group=self._group)
        return out

    def _actor_rngs(self) -> Optional[list]:
        if not self.actors:
            return None
        import ray

        try:
            return ray.get([ray_compat.call_in_actor(a, _actor_get_rng) for a in self.actors], timeout=30)
        except Exception as err:  # a dead actor must not cost the checkpoint
            logger.warning("checkpoint: rollout actors' RNG not saved: %s", err)
            return None

    # ------------------------------------------------------------------ resume

    def maybe_resume(self, learner) -> Optional[Path]:
        """Restores the newest checkpoint when ``resume`` asks for it (collective).

        Call before the rollout actors start: restores learner, RNG of every
        rank, replay shards and actor RNG. ``Learner.train`` then publishes the
        restored weights as version ``step``.

        Raises:
            ConfigError: if ``resume=true`` finds no checkpoint, or the checkpoint is incompatible.
        """
        if self.cfg.resume is False:
            return None
        payload: Any = None
        if self.ctx.is_main:
            try:
                payload = self._read_for_resume(learner)
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
        learner.load_state_dict(payload["learner"])
        rngs = payload["rngs"]
        if self.ctx.rank < len(rngs):
            set_rng_state(rngs[self.ctx.rank])
        else:
            logger.warning("resume: the checkpoint has no RNG state for rank %d (world size was %d)",
                           self.ctx.rank, len(rngs))
        self.last_saved_step = learner.step
        self.resumed_from = Path(payload["path"])
        logger.info("resumed from %s at step %d", self.resumed_from, learner.step)
        return self.resumed_from

    def _read_for_resume(self, learner) -> Optional[dict]:
        """Rank 0: loads and checks the newest checkpoint, restores shards / actors."""
        path = latest_checkpoint(self.root)
        if path is None:
            if self.cfg.resume is True:
                raise ConfigError(f"resume: true, but there is no checkpoint in {self.root}")
            logger.info("resume=auto: no checkpoint in %s, starting fresh", self.root)
            return None
        ckpt = load_checkpoint(path)
        check_compatible(ckpt, self.cfg, learner.gflownet, path)
        if self.replay is not None and ckpt["replay"] is not None:
            self.replay.restore(ckpt["replay"]["shards"])  # before any actor pushes
        if self.actors and ckpt["actors"] is not None:
            import ray

            ray.get([ray_compat.call_in_actor(a, _actor_set_rng, s)
                     for a, s in zip(self.actors, ckpt["actors"]["rng"])])
        return {"learner": ckpt["learner"], "rngs": ckpt["rng"]["ranks"], "path": str(path)}
