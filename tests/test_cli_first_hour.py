"""The first hour with the CLI (issue 17): presets, ``gfn-dist config``, optional dependencies, --help imports.

Every bad input: exit code 2, one stderr line naming the key (or the preset),
nothing started (no run directory, no Ray).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import ray

from gfn_dist import config_docs
from gfn_dist.cli import main
from gfn_dist.config import ConfigError, load_config, to_dict
from gfn_dist.extras import check_optional_dependencies

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


def _one_error_line(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------------- --help, presets


def test_help_imports_neither_torch_nor_omegaconf():
    code = ("import sys\nfrom gfn_dist.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = sorted(m for m in ('torch', 'ray', 'omegaconf', 'matplotlib', 'wandb') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout


def test_train_help_lists_presets_and_points_to_config(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS), out
    assert "gfn-dist config" in out


def test_unknown_preset_lists_the_presets_in_one_line(capsys, tmp_path):
    line = _one_error_line(capsys, ["train", "hypergrid_t", f"run.dir={tmp_path / 'run'}"])
    assert line.startswith("gfn-dist: config error: config: unknown preset: 'hypergrid_t'"), line
    assert all(name in line for name in PRESETS), line
    assert not (tmp_path / "run").exists()


def test_missing_yaml_path(capsys):
    line = _one_error_line(capsys, ["config", "configs/nope.yaml"])
    assert "config file not found: 'configs/nope.yaml'" in line and "hypergrid_tb" in line


def test_preset_name_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the package's own directory
    assert config_docs.resolve_config_path("hypergrid_tb") == ROOT / "configs" / "hypergrid_tb.yaml"
    # The docs' `configs/NAME.yaml` from another directory (a Ray job's working directory)
    assert config_docs.resolve_config_path("configs/hypergrid_tb.yaml") == ROOT / "configs" / "hypergrid_tb.yaml"
    (tmp_path / "configs").mkdir()  # the working directory's presets come first
    (tmp_path / "configs" / "hypergrid_tb.yaml").write_text("# mine\nlearner: {max_steps: 3}\n")
    (tmp_path / "configs" / "extra.yaml").write_text("learner: {max_steps: 5}\n")
    presets = config_docs.list_presets()
    assert presets["hypergrid_tb"] == tmp_path / "configs" / "hypergrid_tb.yaml"
    assert set(presets) == {*PRESETS, "extra"}
    assert load_config(config_docs.resolve_config_path("extra")).learner.max_steps == 5


# ---------------------------------------------------------------------- gfn-dist config


def test_config_lists_presets_with_descriptions(capsys):
    assert main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == PRESETS
    assert any("main job" in ln for ln in lines if ln.startswith("hypergrid_tb "))


def test_every_key_has_a_doc():
    docs = config_docs.field_docs()

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield f"{prefix}{k}"
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")

    keys = list(leaves(to_dict(load_config(None))))
    assert set(keys) == set(docs)
    assert [k for k in keys if not docs[k].strip()] == []
    assert docs["learner.batch_size"].startswith("global trajectories per learner step")
    assert "rollout.sampler_batch_size" in docs and "sampler call" in docs["rollout.sampler_batch_size"]


def test_config_prints_resolved_values_with_docs(capsys):
    assert main(["config", "hypergrid_tb", "learner.max_steps=7", "replay.samples_per_insert=null"]) == 0
    out = capsys.readouterr().out
    lines = {ln.strip().split(":")[0]: ln for ln in out.splitlines()}
    assert lines["max_steps"].split("#")[0].split(":")[1].strip() == "7"
    assert "# budget in learner steps" in lines["max_steps"]
    assert lines["samples_per_insert"].split("#")[0].split(":")[1].strip() == "null"
    assert "log_reward_clip_min: -.inf" in out
    assert out.splitlines()[0].startswith("env:  # ")


def test_config_bad_override_one_line(capsys):
    line = _one_error_line(capsys, ["config", "hypergrid_tb", "learner.max_stepz=7"])
    assert "learner.max_stepz" in line


# ---------------------------------------------------------------------- optional dependencies


def test_tensorboard_missing_fails_before_ray(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` sees when not installed
    ray_before = ray.is_initialized()
    line = _one_error_line(capsys, ["train", "hypergrid_tb", "logging.tensorboard=true", f"run.dir={tmp_path / 'r'}"])
    assert line == ("gfn-dist: config error: logging.tensorboard: true needs TensorBoard, which is not installed; "
                    "pip install -e '.[tensorboard]' (or set logging.tensorboard=false)")
    assert not (tmp_path / "r").exists() and ray.is_initialized() == ray_before


def _no_wandb_key(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))


def test_wandb_online_without_key_fails_before_ray(capsys, tmp_path, monkeypatch):
    _no_wandb_key(monkeypatch, tmp_path)
    ray_before = ray.is_initialized()
    line = _one_error_line(capsys, ["train", "hypergrid_tb", "logging.wandb.mode=online", f"run.dir={tmp_path / 'r'}"])
    assert line.startswith("gfn-dist: config error: logging.wandb.mode: online needs a wandb API key"), line
    assert "wandb login" in line and "logging.wandb.mode=offline" in line
    assert not (tmp_path / "r").exists() and ray.is_initialized() == ray_before


def test_wandb_online_key_sources(tmp_path, monkeypatch):
    _no_wandb_key(monkeypatch, tmp_path)
    cfg = load_config(None, ["logging.wandb.mode=online"])
    with pytest.raises(ConfigError):
        check_optional_dependencies(cfg)
    (tmp_path / "netrc").write_text("machine example.org login u password p\n")
    with pytest.raises(ConfigError):  # another host's entry is not a wandb key
        check_optional_dependencies(cfg)
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123abcd\n")  # `wandb login`
    check_optional_dependencies(cfg)
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    monkeypatch.setenv("WANDB_API_KEY", "0123abcd")
    check_optional_dependencies(cfg)
    check_optional_dependencies(load_config(None, ["logging.wandb.mode=offline"]))  # offline needs no key


def test_plot_without_matplotlib(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    line = _one_error_line(capsys, ["plot", str(tmp_path)])
    assert line == "gfn-dist plot: needs matplotlib, which is not installed; pip install 'matplotlib>=3.7'"
