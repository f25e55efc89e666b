"""Every bad value refused before start (gfn_dist.preflight, gfn_dist.config): one line naming the key,
exit 2, nothing created, Ray not started. No Ray."""

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import ray

from gfn_dist.config import ConfigError, TrainConfig, load_config
from gfn_dist.preflight import (
    GiB,
    check_memory,
    check_run_dir,
    memory_estimate,
    validate_before_start,
)
from gfn_dist.train import main

ROOT = Path(__file__).resolve().parents[1]
PRESET = str(ROOT / "configs" / "hypergrid_tb.yaml")


def _float_keys(obj=None, prefix=""):
    """Every key of the schema whose type is float or Optional[float]."""
    obj = obj if obj is not None else TrainConfig()
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _float_keys(value, key + ".")
        elif hints[f.name] is float or hints[f.name] == typing.Optional[float]:
            yield key


FLOAT_KEYS = list(_float_keys())


def _train(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_the_walk_finds_the_float_keys():
    assert len(FLOAT_KEYS) >= 20 and "replay.timeout_s" in FLOAT_KEYS and "cluster.connect_timeout_s" in FLOAT_KEYS


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_nan_and_infinity(key, value, capsys, tmp_path):
    if key == "loss.log_reward_clip_min" and value == "-inf":  # the default: no clipping
        load_config(PRESET, [f"{key}={value}"])
        return
    code, err = _train([PRESET, f"{key}={value}", f"run.dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"gfn-dist: config error: {key}: "), err
    assert not (tmp_path / "run").exists() and not ray.is_initialized()


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("[1, 2]\n", "list")])
def test_yaml_top_level_must_be_a_mapping(text, kind, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=f"top level must be a mapping.*got a {kind}"):
        load_config(bad)
    code, err = _train([str(bad)], capsys)
    assert code == 2 and len(err) == 1 and str(bad) in err[0]


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this user cannot write. Permission bits do not bind root, so as root a
    read-only tmpfs mount stands in (root may mount in this project's test machines)."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_check_run_dir(tmp_path, read_only_dir):
    check_run_dir(tmp_path / "a" / "b" / "new")  # creatable
    check_run_dir(tmp_path)  # existing, writable
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"^run.dir: .*file exists and is not a directory$"):
        check_run_dir(tmp_path / "file")
    with pytest.raises(ConfigError, match=r"^checkpoint.dir: cannot create .*: .*file is not a directory$"):
        check_run_dir(tmp_path / "file" / "sub", "checkpoint.dir")
    with pytest.raises(ConfigError, match=r"^run.dir: .*ro is not writable"):
        check_run_dir(read_only_dir)
    with pytest.raises(ConfigError, match=r"^run.dir: cannot create .*ro/run: .*ro is not writable"):
        check_run_dir(read_only_dir / "run")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="dangling symbolic link"):
        check_run_dir(tmp_path / "link")
    assert not (tmp_path / "a").exists()  # pure: nothing created


def test_memory_estimate_and_check():
    cfg = load_config(None, ["replay.num_shards=4", "replay.capacity_per_shard=10000"])
    est = memory_estimate(cfg)
    # HyperGrid 2 x 8: T = 15 actions, states (16, 2) int64, actions (15, 1) int64, 3 int64 + 1 float32 scalars
    assert est["bytes_per_trajectory"] == 16 * 2 * 8 + 15 * 8 + 3 * 8 + 4
    assert est["replay"] == 2 * 4 * 10000 * est["bytes_per_trajectory"]
    check_memory(cfg, available=est["replay"] + est["batch"] + est["rollout"])  # just fits
    with pytest.raises(ConfigError) as info:
        check_memory(cfg, available=est["replay"] // 2)
    msg = str(info.value)
    assert msg.startswith("replay.capacity_per_shard: ") and "replay.num_shards=4" in msg
    assert "run.skip_memory_check=true" in msg and "\n" not in msg
    big_batch = load_config(None, ["learner.batch_size=100000"])
    with pytest.raises(ConfigError, match=r"^learner.batch_size: "):
        check_memory(big_batch, available=memory_estimate(big_batch)["batch"] // 2)
    expert = load_config(None, ["run.skip_memory_check=true"])
    check_memory(expert, available=0)  # skipped


def test_run_dir_mode_key():
    assert load_config(None, []).run.dir_mode == 0o700
    assert load_config(None, ["run.dir_mode=0750"]).run.dir_mode == 0o750
    assert load_config(None, ["run.dir_mode='0o755'"]).run.dir_mode == 0o755
    for bad in ("run.dir_mode=0600", "run.dir_mode=rwx", "run.dir_mode=01777"):
        with pytest.raises(ConfigError, match=r"^run.dir_mode: "):
            load_config(None, [bad])


def test_validate_before_start_runs_every_check(tmp_path):
    validate_before_start(load_config(None, [f"run.dir={tmp_path / 'run'}"]))
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="^checkpoint.dir: "):
        validate_before_start(load_config(None, [f"run.dir={tmp_path / 'run'}", f"checkpoint.dir={tmp_path / 'f'}"]))
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}"])
    cfg.learner.lr = float("nan")  # a config built in code, not by load_config
    with pytest.raises(ConfigError, match="^learner.lr: must be a finite number"):
        validate_before_start(cfg)


# ---------------------------------------------------------------------------- the real command line


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "gfn_dist.cli", "train", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    return proc.returncode, proc.stderr.strip().splitlines()


def test_cli_bad_inputs_exit_2_with_one_line_before_ray(tmp_path, read_only_dir):
    (tmp_path / "list.yaml").write_text("- env\n- learner\n")
    (tmp_path / "file").write_text("x")
    cases = [
        ([str(tmp_path / "list.yaml")], str(tmp_path / "list.yaml")),
        ([PRESET, f"run.dir={tmp_path / 'file'}"], "run.dir:"),
        ([PRESET, f"run.dir={read_only_dir / 'run'}"], "run.dir:"),
        ([PRESET, "replay.timeout_s=nan", f"run.dir={tmp_path / 'r'}"], "replay.timeout_s:"),
        ([PRESET, "cluster.connect_timeout_s=inf", f"run.dir={tmp_path / 'r'}"], "cluster.connect_timeout_s:"),
        ([PRESET, "replay.capacity_per_shard=2000000000", f"run.dir={tmp_path / 'r'}"], "replay.capacity_per_shard:"),
    ]
    for args, needle in cases:
        code, err = _cli(*args)
        assert code == 2 and len(err) == 1 and needle in err[0], (args, err)
        assert "Traceback" not in err[0] and "ray" not in err[0].lower()
    assert not (tmp_path / "r").exists()
    assert 2_000_000_000 * 404 > 64 * GiB  # the capacity case is impossible on any test machine
