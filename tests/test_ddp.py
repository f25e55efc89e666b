"""DDP equivalence: 2 gloo ranks on half a batch each == 1 process on the whole batch.

For TB, DDP's gradient average of the two per-rank means is the full-batch
mean. For LPV the batch mean inside the loss must be the *global* one
(``GlobalBatchLoss`` all-reduces it); the test also checks that the naive
per-rank LPV would give a different loss, so the equivalence is not vacuous.
The reference is written independently of ``Learner``: ``gflownet.loss`` on
the whole batch, ``clip_grad_norm_``, ``make_optimizer``'s Adam.
"""

import gc
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gfn_dist.builders import build_env, build_gflownet, build_policies
from gfn_dist.config import load_config
from gfn_dist.containers.trajectories import Trajectories
from gfn_dist.distributed.cluster import DistContext
from gfn_dist.distributed.learner import Learner
from gfn_dist.samplers import Sampler
from gfn_dist.optim import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
BATCH = 16
LOSSES = ("tb", "lpv")


def _cfg(loss: str):
    return load_config(ROOT / "configs" / "hypergrid_tb.yaml",
                       [f"loss.name={loss}", f"learner.batch_size={BATCH}", "model.hidden_dim=32",
                        "learner.grad_clip=1.0"])


def _build(loss: str):
    cfg = _cfg(loss)
    env = build_env(cfg)
    torch.manual_seed(0)
    policies = build_policies(cfg, env)
    return cfg, env, policies, build_gflownet(cfg, env, policies)


def _fixed_batch(cfg, env):
    """A fixed batch of trajectories in the replay format (sampled from a seeded policy)."""
    torch.manual_seed(1)
    behaviour = build_policies(cfg, env)
    traj = Sampler(behaviour["pf"]).sample_trajectories(env, n=BATCH, epsilon=0.3)
    td = traj.to_tensordict(max_length=env.max_traj_len)
    td["policy_version"] = torch.zeros(BATCH, dtype=torch.int64)
    td["actor_id"] = torch.zeros(BATCH, dtype=torch.int64)
    return td


def _params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = {}
        for loss_name in LOSSES:
            cfg, env, policies, gfn = _build(loss_name)
            ctx = DistContext(rank, world_size, rank, "torchrun", torch.device("cpu"), "gloo")
            learner = Learner(cfg, env, policies, gfn, ctx)
            share = _fixed_batch(cfg, env)[rank * BATCH // world_size:(rank + 1) * BATCH // world_size]
            loss = learner.compute_loss(share)
            naive = gfn.loss(env, Trajectories.from_tensordict(env, share)).detach()  # per-rank batch mean
            learner.optimize(loss)
            values = torch.stack([loss.detach(), naive])
            dist.all_reduce(values)
            results[loss_name] = {"params": _params(gfn), "loss": values[0] / world_size,
                                  "naive": values[1] / world_size}
        if rank == 0:
            torch.save(results, Path(out_dir) / "ddp.pt")
        dist.barrier()
    finally:
        # Release DDP (its reducer holds the process group) before destroying the group:
        # a gloo group freed afterwards could wait forever on its threads (seen ~1 run in 8).
        learner = gfn = None
        gc.collect()
        dist.destroy_process_group()


def _reference(loss_name: str):
    """One process, whole batch, written without the Learner."""
    cfg, env, _, gfn = _build(loss_name)
    opt = make_optimizer(gfn, cfg.learner.lr, cfg.learner.lr_logz)
    loss = gfn.loss(env, Trajectories.from_tensordict(env, _fixed_batch(cfg, env)), recalculate_all_logprobs=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in gfn.parameters() if p.requires_grad], cfg.learner.grad_clip)
    opt.step()
    return _params(gfn), loss.detach()


def test_two_gloo_ranks_match_single_process(tmp_path):
    torch.set_num_threads(1)
    # fork: the children inherit the imported modules (spawn would re-import torch, ~10 s on a busy 2-core box);
    # they run with one intra-op thread, so no OpenMP pool is used after the fork.
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for loss_name in LOSSES:
        ref_params, ref_loss = _reference(loss_name)
        got = ddp[loss_name]
        torch.testing.assert_close(got["loss"], ref_loss, atol=1e-6, rtol=1e-6)
        assert set(got["params"]) == set(ref_params)
        for k, v in ref_params.items():
            torch.testing.assert_close(got["params"][k], v, atol=1e-6, rtol=0, msg=f"{loss_name}: {k}")
        moved = max((got["params"][k] - v).abs().max() for k, v in _build(loss_name)[3].named_parameters())
        assert moved > 1e-4  # the step did change the parameters
    # TB is a per-trajectory mean: the naive per-rank loss is already the global one. LPV's is not.
    torch.testing.assert_close(ddp["tb"]["naive"], ddp["tb"]["loss"])
    assert abs(float(ddp["lpv"]["naive"] - ddp["lpv"]["loss"])) > 1e-3


def test_world_size_one_learner_matches_reference():
    torch.set_num_threads(1)
    for loss_name in LOSSES:
        cfg, env, policies, gfn = _build(loss_name)
        learner = Learner(cfg, env, policies, gfn, DistContext(0, 1, 0, "local", torch.device("cpu"), None))
        learner.optimize(learner.compute_loss(_fixed_batch(cfg, env)))
        ref_params, _ = _reference(loss_name)
        for k, v in ref_params.items():
            torch.testing.assert_close(_params(gfn)[k], v, atol=1e-7, rtol=0)
