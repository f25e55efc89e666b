"""Checkpoints and resume (gfn_dist.checkpoint).

Oracle of the resume test: with ``rollout.synchronous=true`` a run is a
deterministic function of its seed, so a run of 2k steps must equal a run of k
steps that is checkpointed, torn down and resumed for k more: same parameters,
same optimizer state, same replay contents (which travel through the real
replay shard actors' ``snapshot`` / ``restore``).
"""

import os
import random

import numpy as np
import pytest
import ray
import torch

from gfn_dist import checkpoint as ck
from gfn_dist.builders import build_env, build_gflownet, build_policies
from gfn_dist.config import ConfigError, load_config
from gfn_dist.metrics import read_jsonl

K = 3  # steps before the interruption; the reference runs 2K


def _cfg(run_dir, *extra):
    return load_config(None, [
        "model.hidden_dim=32", "rollout.synchronous=true", "rollout.trajectories_per_push=16",
        "replay.capacity_per_shard=40", "replay.min_size_to_sample=16", "learner.batch_size=16",
        "eval.interval_steps=0", "logging.log_every=1", "logging.progress_bar=false",
        "logging.wandb.mode=disabled", "checkpoint.interval_steps=2", "checkpoint.keep_last=2",
        f"run.dir={run_dir if run_dir is not None else 'null'}", *extra,
    ])


def _run(cfg) -> dict:
    from gfn_dist.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        start = trainer.learner.step
        trainer.train()
        return {
            "start": start,
            "params": {k: v.detach().clone() for k, v in trainer.gflownet.state_dict().items()},
            "optimizer": trainer.learner.optimizer.state_dict(),
            "replay": trainer.learner.replay.snapshot(),
            "step": trainer.learner.step,
        }
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Reference run of 2K steps; run of K steps, then resumed to 2K in a new Trainer."""
    root = tmp_path_factory.mktemp("ckpt")
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        ref = _run(_cfg(root / "ref", f"learner.max_steps={2 * K}"))
        first = _run(_cfg(root / "split", f"learner.max_steps={K}"))
        resumed = _run(_cfg(root / "split", f"learner.max_steps={2 * K}", "resume=true"))
    finally:
        ray.shutdown()
    return {"root": root, "ref": ref, "first": first, "resumed": resumed}


def _assert_tree_equal(a, b, path="", atol=0.0):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, path
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=path)
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_tree_equal(a[k], b[k], f"{path}.{k}", atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_tree_equal(x, y, f"{path}[{i}]", atol)
    else:
        assert a == b, path


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(runs):
    ref, first, resumed = runs["ref"], runs["first"], runs["resumed"]
    assert first["start"] == 0 and first["step"] == K
    assert resumed["start"] == K and resumed["step"] == ref["step"] == 2 * K
    # The interrupted run really diverged from the reference at the split (else the test proves nothing).
    assert any(not torch.equal(first["params"][k], ref["params"][k]) for k in ref["params"])
    _assert_tree_equal(ref["params"], resumed["params"], "gflownet", atol=1e-6)
    _assert_tree_equal(ref["optimizer"]["state"], resumed["optimizer"]["state"], "optimizer", atol=1e-6)
    _assert_tree_equal(ref["replay"], resumed["replay"], "replay")  # contents, counters, sampling RNG
    rows = read_jsonl(runs["root"] / "split" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 2 * K + 1))  # the step count continues
    ref_rows = read_jsonl(runs["root"] / "ref" / "metrics.jsonl")
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], abs=1e-6)


@pytest.mark.slow
def test_checkpoint_files_and_pruning(runs):
    """keep_last=2 of interval 2 + final; every .pt loads with weights_only=True and matches the live run."""
    split = runs["root"] / "split" / "checkpoints"
    assert [s for s, _ in ck.list_checkpoints(split)] == [4, 6]  # step_2, step_3 pruned
    assert [s for s, _ in ck.list_checkpoints(runs["root"] / "ref" / "checkpoints")] == [4, 6]
    assert not [p for p in split.iterdir() if p.name.startswith(ck.TMP_PREFIX)]
    path = ck.latest_checkpoint(split)
    for f in path.glob("*.pt"):
        torch.load(f, weights_only=True)  # raises on any pickled object
    data = ck.load_checkpoint(path)
    assert data["learner"]["step"] == 6 and data["learner"]["policy_version"] == 6
    assert data["learner"]["trajectories_seen"] == 6 * 16
    _assert_tree_equal(data["learner"]["gflownet"], runs["resumed"]["params"], "file")
    _assert_tree_equal(data["replay"]["shards"], runs["resumed"]["replay"], "file replay")
    assert data["actors"] is None  # synchronous: no Ray rollout actors
    assert len(data["rng"]["ranks"]) == 1 and "run:" in data["config"]
    # policy_version tags: a batch pushed before step s was sampled with version s.
    versions = data["replay"]["shards"][0]["buffer"]["storage"]["policy_version"]
    assert versions.min() >= 0 and versions.max() == 5


@pytest.mark.slow
def test_incompatible_checkpoint_refused(runs, tmp_path):
    path = ck.latest_checkpoint(runs["root"] / "split" / "checkpoints")
    data = ck.load_checkpoint(path)
    cfg = _cfg(tmp_path, "model.hidden_dim=64", "env.hypergrid.ndim=3")
    with pytest.raises(ConfigError, match=r"model\.hidden_dim: checkpoint 32, config 64") as err:
        ck.check_compatible(data, cfg, None, path)
    assert "env.hypergrid.ndim: checkpoint 2, config 3" in str(err.value)
    # Same config, but a parameter of another shape in the file (e.g. an edited model class).
    cfg = _cfg(tmp_path)
    env = build_env(cfg)
    gfn = build_gflownet(cfg, env, build_policies(cfg, env))
    ck.check_compatible(data, cfg, gfn, path)  # compatible: no error
    name = next(k for k, v in data["learner"]["gflownet"].items() if v.ndim == 2)
    data["learner"]["gflownet"][name] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=rf"gflownet\.{name}: checkpoint shape \(3, 3\)"):
        ck.check_compatible(data, cfg, gfn, path)
    assert ck.config_differences(load_config_dict(data), _cfg(tmp_path, "learner.max_steps=99")) == []


def load_config_dict(data):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(data["config"]))


# ---------------------------------------------------------------------------- without Ray


def test_write_is_atomic_and_prunes(tmp_path):
    (tmp_path / ".tmp_step_9").mkdir(parents=True)  # a crash mid-write
    (tmp_path / "step_8").mkdir()  # incomplete (no learner.pt): not a checkpoint
    assert ck.latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3, 10):
        ck.write_checkpoint(tmp_path, step, {"learner": {"step": step, "w": torch.ones(2)}}, "a: 1\n",
                            {"step": step}, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 10]  # numeric, not lexicographic
    assert not list(tmp_path.glob(".tmp_*"))
    ck.write_checkpoint(tmp_path, 10, {"learner": {"step": 11}}, "", {}, keep_last=None)  # replaced in place
    assert torch.load(tmp_path / "step_10" / "learner.pt", weights_only=True)["step"] == 11


def test_rng_round_trip():
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    state = ck.rng_state()
    expected = (torch.rand(4), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    ck.set_rng_state(state)
    got = (torch.rand(4), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_resume_locates_checkpoints(tmp_path, monkeypatch):
    monkeypatch.delenv(ck.RESTART_ENV, raising=False)
    runs_root = tmp_path / "runs"
    old, new, empty = (runs_root / f"p-2026010{i}-000000" for i in (1, 2, 3))
    for d, step in ((old, 5), (new, 7)):
        ck.write_checkpoint(d / "checkpoints", step, {"learner": {}}, "", {})
    empty.mkdir()
    assert ck.resume_run_dir(_cfg(None, "resume=true", "run.dir=null"), "p", runs_root) == str(new)
    assert ck.resume_run_dir(_cfg(None, "resume=auto", "run.dir=null"), "p", runs_root) is None  # not a restart
    monkeypatch.setenv(ck.RESTART_ENV, "1")
    assert ck.resume_run_dir(_cfg(None, "resume=auto", "run.dir=null"), "p", runs_root) == str(new)
    with pytest.raises(ConfigError, match="resume: true, but run.dir is not set"):
        ck.resume_run_dir(_cfg(None, "resume=true", "run.dir=null"), "other", runs_root)
    assert ck.resume_run_dir(_cfg(tmp_path, "resume=true"), "p", runs_root) is None  # run.dir given: used as is
    # resume=true with a run.dir that holds no checkpoint is refused; auto starts fresh.
    from gfn_dist.distributed.cluster import DistContext

    ctx = DistContext(0, 1, 0, "local", torch.device("cpu"), None)
    with pytest.raises(ConfigError, match="resume: true, but there is no checkpoint"):
        ck.Checkpointer(_cfg(empty, "resume=true"), ctx, empty, states={}).resume()
    assert ck.Checkpointer(_cfg(empty, "resume=auto"), ctx, empty, states={}).resume() is None


def test_fault_injection_spec(monkeypatch):
    monkeypatch.setenv(ck.FAULT_ENV, "rank:1,step:5")
    assert ck.fault_injection_from_env() == (1, 5, 0)
    monkeypatch.setenv(ck.FAULT_ENV, "rank:0,step:2,attempt:1")
    assert ck.fault_injection_from_env() == (0, 2, 1)
    monkeypatch.setenv(ck.FAULT_ENV, "rank=1")
    with pytest.raises(ValueError, match=ck.FAULT_ENV):
        ck.fault_injection_from_env()
    monkeypatch.delenv(ck.FAULT_ENV)
    assert ck.fault_injection_from_env() is None
    assert os.environ.get(ck.FAULT_ENV) is None
