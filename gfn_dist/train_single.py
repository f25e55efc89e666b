"""Single-process GFlowNet training loop (reference for tests and benchmarks).

The distributed trainer (``gfn_dist.train``) runs the same phases split across
actors and learners; this loop keeps them in one process: sample on-policy,
loss, backward, step.

    python -m gfn_dist.train_single --ndim 2 --height 8 --n-iterations 1000
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from gfn_dist.estimators import DiscretePolicyEstimator
from gfn_dist.gflownet.base import TrajectoryBasedGFlowNet
from gfn_dist.gflownet.trajectory_balance import TBGFlowNet
from gfn_dist.gym import HyperGrid
from gfn_dist.modules import MLP
from gfn_dist.optim import make_optimizer

logger = logging.getLogger(__name__)


@dataclass
class TrainHistory:
    """What ``train_single`` measured; ``l1`` is recorded every ``eval_every`` iterations."""

    iterations: list = field(default_factory=list)
    l1: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    logZ: list = field(default_factory=list)
    wall_s: float = 0.0


def l1_exact(env, pf) -> float:
    """Σ_x |P_T(x) - R(x)/Z| with the exact P_T of ``pf`` (enumerable envs)."""
    return float((env.exact_terminating_distribution(pf) - env.true_dist()).abs().sum())


def train_single(
    env,
    gflownet: TrajectoryBasedGFlowNet,
    n_iterations: int,
    batch_size: int,
    lr: float = 1e-3,
    lr_logz: float = 0.1,
    eval_every: int = 100,
    target_l1: float | None = None,
    sampler=None,
    sample_kwargs: dict | None = None,
    **policy_kwargs,
) -> TrainHistory:
    """On-policy training; stops early once exact L1 <= ``target_l1`` (if given).

    Args:
        env: an environment (enumerable for the L1 metric).
        gflownet: the loss module (its ``pf`` is trained; pb / logZ too when learnable).
        n_iterations: optimizer steps.
        batch_size: trajectories per step.
        lr, lr_logz: Adam learning rates of the networks and of logZ.
        eval_every: iterations between exact-L1 evaluations (0 disables).
        target_l1: stop at the first evaluation with L1 at or below this.
        sampler: a sampler (default ``Sampler(gflownet.pf)``).
        sample_kwargs: extra keyword arguments of ``sampler.sample_trajectories``.
        **policy_kwargs: exploration kwargs for the behaviour policy (off-policy if any).
    """
    from gfn_dist.samplers import Sampler

    sampler = sampler or Sampler(gflownet.pf)
    opt = make_optimizer(gflownet, lr, lr_logz)
    hist = TrainHistory()
    t0 = time.perf_counter()
    for it in range(1, n_iterations + 1):
        traj = sampler.sample_trajectories(env, n=batch_size, **(sample_kwargs or {}), **policy_kwargs)
        # Sampling runs under no_grad; log P_F is recomputed in one batched forward.
        loss = gflownet.loss(env, traj, recalculate_all_logprobs=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if eval_every and (it % eval_every == 0 or it == n_iterations):
            l1 = l1_exact(env, gflownet.pf)
            hist.iterations.append(it)
            hist.l1.append(l1)
            hist.loss.append(float(loss.detach()))
            logz = getattr(gflownet, "logZ", None)
            hist.logZ.append(float(logz.detach()) if isinstance(logz, torch.Tensor) else math.nan)
            logger.info("it=%d loss=%.4f l1=%.4f", it, hist.loss[-1], l1)
            if target_l1 is not None and l1 <= target_l1:
                break
    hist.wall_s = time.perf_counter() - t0
    return hist


def make_hypergrid_tb(ndim: int = 2, height: int = 8, hidden_dim: int = 256, n_hidden_layers: int = 2):
    """HyperGrid + TB with MLP P_F and P_B (the benchmark / fidelity setting)."""
    env = HyperGrid(ndim, height)
    d = env.preprocessor.output_dim
    pf = DiscretePolicyEstimator(MLP(d, env.n_actions, hidden_dim, n_hidden_layers), env.n_actions, env.preprocessor)
    pb = DiscretePolicyEstimator(
        MLP(d, env.n_actions - 1, hidden_dim, n_hidden_layers), env.n_actions, env.preprocessor, is_backward=True
    )
    return env, TBGFlowNet(pf, pb)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ndim", type=int, default=2)
    p.add_argument("--height", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-iterations", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--compile", action="store_true", help="roll out with Sampler(pf, compile=True)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    env, gfn = make_hypergrid_tb(args.ndim, args.height)
    from gfn_dist.samplers import Sampler

    sampler = Sampler(gfn.pf, compile=args.compile)
    hist = train_single(env, gfn, args.n_iterations, args.batch_size, eval_every=args.eval_every, sampler=sampler)
    logger.info("final exact L1 = %.4f after %d iterations, %.1f s", hist.l1[-1], hist.iterations[-1], hist.wall_s)


if __name__ == "__main__":
    main()
