"""Import paths (gfn_dist.imports.resolve) and Ray's runtime_env from the cluster keys (runtime_env_of)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gfn_dist.config import ConfigError, load_config
from gfn_dist.imports import resolve, runtime_env_of

TESTS = Path(__file__).resolve().parent


def test_resolve_dotted_attribute_and_errors():
    assert resolve("user_task.nets:ResidualPolicy.forward", "k") is __import__(
        "user_task.nets", fromlist=["x"]).ResidualPolicy.forward
    for path, fragment in [("user_task.nets", "is not an import path"), ("user_task.nets:", "is not an import path"),
                           ("user_task.nets:ResidualPolicy.nope", "has no attribute 'ResidualPolicy.nope'"),
                           ("user_task.broken:X", "ModuleNotFoundError: No module named 'gfn_dist_no_such_dependency'")]:
        with pytest.raises(ConfigError) as info:
            resolve(path, "model.policy")
        assert str(info.value).startswith("model.policy: ") and fragment in str(info.value)


def test_runtime_env_none_by_default():
    assert runtime_env_of(load_config()) is None


def test_runtime_env_from_cluster_keys(tmp_path):
    (tmp_path / "pkg").mkdir()
    cfg = load_config(None, [f"cluster.working_dir={tmp_path}",
                             f"cluster.py_modules=[user_task,{tmp_path / 'pkg'},s3://bucket/m.zip]",
                             "cluster.runtime_env.env_vars.MY_FLAG=1"])
    env = runtime_env_of(cfg)
    assert env == {"working_dir": str(tmp_path.resolve()),
                   "py_modules": [str(TESTS / "user_task"), str((tmp_path / "pkg").resolve()), "s3://bucket/m.zip"],
                   "env_vars": {"MY_FLAG": "1"}}


@pytest.mark.parametrize("overrides,key", [
    (["cluster.working_dir=/no/such/dir"], "cluster.working_dir"),
    (["cluster.py_modules=[no_such_package_xyz]"], "cluster.py_modules"),
    (["cluster.py_modules=[user_task]", "cluster.runtime_env.py_modules=[a]"], "cluster.runtime_env"),
])
def test_runtime_env_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        runtime_env_of(load_config(None, overrides))


@pytest.mark.cluster  # Ray started in a subprocess
def test_ray_workers_import_user_code_only_through_py_modules(tmp_path):
    """A module importable neither by the driver's path nor the workers' reaches a Ray task via py_modules."""
    pkg = tmp_path / "shipped_pkg_gfn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("VALUE = 41 + 1\n")
    script = textwrap.dedent(f"""
        import ray
        from gfn_dist.config import load_config
        from gfn_dist.imports import runtime_env_of
        cfg = load_config(None, ["cluster.py_modules=[{pkg}]"])
        ray.init(address="local", num_cpus=1, include_dashboard=False, runtime_env=runtime_env_of(cfg), log_to_driver=False)

        @ray.remote
        def value():
            import shipped_pkg_gfn
            return shipped_pkg_gfn.VALUE

        print("VALUE", ray.get(value.remote()))
        ray.shutdown()
    """)
    other = tmp_path / "elsewhere"
    other.mkdir()  # the driver runs here: the package is not importable from its cwd
    res = subprocess.run([sys.executable, "-c", script], cwd=other, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "VALUE 42" in res.stdout
