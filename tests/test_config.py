"""Config validation: bad input gives one clear line naming the key and exit code 2, before any actor starts."""

import subprocess
import sys
from pathlib import Path

import pytest

from gfn_dist.config import ConfigError, TrainConfig, check_world_size, load_config, resolve_on_policy, to_yaml
from gfn_dist.train import main

ROOT = Path(__file__).resolve().parents[1]
PRESET = str(ROOT / "configs" / "hypergrid_tb.yaml")


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize(
    "override, key",
    [
        ("learner.bogus=1", "learner.bogus"),  # unknown key
        ("bogus_section.x=1", "bogus_section"),  # unknown section
        ("learner.batch_size=abc", "learner.batch_size"),  # wrong type
        ("learner.max_steps=1.5", "learner.max_steps"),  # wrong type (float for int)
        ("learner.lr=-1", "learner.lr"),  # out of range
        ("sampler.policy_kwargs.epsilon=2", "sampler.policy_kwargs.epsilon"),  # out of range (nested)
        ("env.name=grid", "env.name"),  # not one of the choices
        ("replay.min_size_to_sample=5000", "replay.min_size_to_sample"),  # > capacity_per_shard
        ("loss.prior_checkpoint=/nonexistent/policy.pt", "loss.prior_checkpoint"),
        ("model.policy=lstm", "model.policy"),  # recurrent policy on a non-autoregressive env
        ("rollout.sampler_batch_size=0", "rollout.sampler_batch_size"),  # out of range
    ],
)
def test_bad_override_names_key_exit_2(override, key, capsys, tmp_path):
    code, err = _run([PRESET, override, f"run.dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    assert len(err) == 1 and key in err[0], err
    assert not (tmp_path / "run").exists()  # failed before anything was created


def test_unknown_key_in_yaml_names_full_key(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("replay:\n  capasity_per_shard: 10\n")
    code, err = _run([str(bad)], capsys)
    assert code == 2 and "replay.capasity_per_shard" in err[0]


def test_batch_not_divisible_by_world_size(monkeypatch, capsys, tmp_path):
    import ray

    # torchrun's environment for rank 0 of 2: the check runs before init_process_group (which would block).
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(k, v)
    code, err = _run([PRESET, "learner.batch_size=63", f"run.dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    assert "learner.batch_size" in err[0] and "world size 2" in err[0]
    assert not ray.is_initialized() and not (tmp_path / "run").exists()


def test_console_script_exit_code_and_single_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gfn_dist.cli", "train", PRESET, "learner.nope=3", f"run.dir={tmp_path}/r"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "learner.nope" in lines[0], proc.stderr


def test_presets_load_and_round_trip(tmp_path):
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert presets
    for p in presets:
        cfg = load_config(p)
        again = tmp_path / p.name
        again.write_text(to_yaml(cfg))
        assert load_config(again) == cfg


def test_overrides_and_budget():
    cfg = load_config(PRESET, ["learner.max_steps=null", "learner.max_trajectories=1000", "learner.batch_size=64"])
    assert cfg.learner.total_steps == 16  # ceil(1000 / 64)
    with pytest.raises(ConfigError, match="learner.max_steps"):
        load_config(PRESET, ["learner.max_steps=null"])  # no budget at all
    check_world_size(cfg, 4)
    with pytest.raises(ConfigError, match="learner.batch_size"):
        check_world_size(cfg, 3)


def test_on_policy_switch_sets_fresh_replay():
    cfg = resolve_on_policy(load_config(PRESET, ["learner.on_policy=true", "learner.sync_every=5"]))
    r = cfg.replay
    assert cfg.learner.sync_every == 1
    assert r.samples_per_insert == 1.0 and r.capacity_per_shard == r.min_size_to_sample
    assert r.capacity_per_shard == max(cfg.rollout.trajectories_per_push, cfg.learner.batch_size)
    # Off: untouched.
    assert resolve_on_policy(load_config(PRESET)) == load_config(PRESET)


def test_defaults_validate():
    TrainConfig()  # the schema's own defaults are valid


def test_sampler_compile_key_builds_a_compiling_sampler():
    """``sampler.compile=true`` reaches the rollout sampler (off by default)."""
    from gfn_dist.builders import build_env, build_policies, build_sampler

    for value in (False, True):
        cfg = load_config(PRESET, [f"sampler.compile={str(value).lower()}"])
        env = build_env(cfg)
        sampler, kwargs = build_sampler(cfg, build_policies(cfg, env))
        assert sampler.compile is value
        assert not sampler._chunks  # nothing compiled before the first rollout (compiling is lazy)
    # The compiled rollout itself (its equality with the eager one, chunks per environment) is
    # tested in tests/test_sampler.py; running it here would add ~40 s of torch.compile.
