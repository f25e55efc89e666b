"""The Ray-cluster recipes of README.md and launch/README.md, run as written against a local head.

One ``ray start --head --num-cpus=2`` for the module, started the way the README
says (``export RAY_AUTH_MODE=token``, ``ray get-auth-token --generate``), plus
what a shared host needs: private ports and temp dir (other Ray instances may
run here), and ``--block`` so that the test stops only its own head (``ray
stop`` would stop every Ray on the host). Each recipe line is first checked to
be in its README verbatim, then run by ``bash`` with a small budget appended
(later overrides win).
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LAUNCH_README = (ROOT / "launch" / "README.md").read_text()
# A short run: a few learner steps, no wandb / checkpoints on the way.
BUDGET = "learner.max_steps=6 logging.log_every=3 eval.interval_steps=0 logging.wandb.mode=disabled"
AUTH_NOISE = ("AuthenticationError", "Token authentication is enabled", "RAY_AUTH_MODE is currently")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def head():
    """README: ``export RAY_AUTH_MODE=token``; ``ray get-auth-token --generate``; ``ray start --head ...``."""
    for line in ("export RAY_AUTH_MODE=token", "ray get-auth-token --generate > /dev/null", "ray start --head"):
        assert line in README, line
    tmp = Path(tempfile.mkdtemp(prefix="gfnhead-", dir="/tmp"))  # short: Ray's socket paths are <= 107 bytes
    env = _env(RAY_AUTH_MODE="token")
    subprocess.run("ray get-auth-token --generate > /dev/null", shell=True, env=env, check=True, timeout=120)
    # Up to 3 tries: on a crowded host Ray's client server gives up after its fixed 30 s wait for
    # the raylet to register ("Timed out waiting for node info") and `ray start --block` exits.
    for attempt in range(3):
        proc, url, log = _start_head(tmp, env, attempt)
        if proc.poll() is None:
            break
    assert proc.poll() is None, (tmp / "head.log").read_text()[-3000:]
    yield {"url": url, "log": tmp / "head.log", "cwd": tmp}
    proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()
    shutil.rmtree(tmp, ignore_errors=True)


def _start_head(tmp: Path, env: dict, attempt: int):
    """``ray start --head --block --num-cpus=2`` on private ports; returns (process, dashboard URL, log) once
    the job API answers, or once the process has exited."""
    log = open(tmp / "head.log", "a")
    log.write(f"--- attempt {attempt}\n")
    log.flush()
    dashboard = _free_port()
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--num-cpus=2", f"--port={_free_port()}",
         f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={_free_port()}",
         f"--ray-client-server-port={_free_port()}", f"--temp-dir={tmp / 'ray'}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 180
    while proc.poll() is None:  # the job API answers once the dashboard is up
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2).read()
            break
        except urllib.error.HTTPError:  # an answer (401 without the token): up
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                break
            time.sleep(1)
    settle = time.monotonic() + 35  # outlive the client server's 30 s wait (above) before using the head
    while proc.poll() is None and time.monotonic() < settle:
        time.sleep(1)
    return proc, url, log


def _run(cmd: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


def _assert_job_ok(proc: subprocess.CompletedProcess, run_dir: Path) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out, out[-4000:]
    assert not [n for n in AUTH_NOISE if n in out], out[-4000:]
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert rows and '"step": 6' in rows[-1], rows


def test_readme_ray_job_submit(head, tmp_path):
    line = "ray job submit -- gfn-dist train hypergrid_tb cluster.launcher=ray cluster.address=auto"
    assert line in README
    # RAY_ADDRESS: where `ray job submit` finds this head's dashboard (8265 on a head of its own).
    env = _env(RAY_AUTH_MODE="token", RAY_ADDRESS=head["url"])
    proc = _run(f"{line} {BUDGET} run.dir={tmp_path / 'run'}", env, head["cwd"])
    _assert_job_ok(proc, tmp_path / "run")
    assert "Token authentication is enabled" not in head["log"].read_text()  # the head started quietly


def test_launch_readme_ray_submit_sh(head, tmp_path):
    line = "RAY_ADDRESS=http://HEAD:8265 launch/ray_submit.sh configs/hypergrid_tb.yaml rollout.num_actors=16"
    assert line in LAUNCH_README
    # As written, RAY_AUTH_MODE unset in the submitting shell: the script follows the host's token.
    cmd = line.replace("http://HEAD:8265", head["url"]).replace("rollout.num_actors=16", "rollout.num_actors=1")
    proc = _run(f"{cmd} {BUDGET} run.dir={tmp_path / 'run'}", _env(), ROOT)
    _assert_job_ok(proc, tmp_path / "run")


@pytest.mark.parametrize("template", ["ray_cluster.sbatch", "torchrun_multinode.sbatch"])
def test_slurm_ray_node_stops_with_exit_code_0(template):
    """The SLURM templates' Ray step (GFN_RAY_NODE_SH): banner in its log file; SIGURG to every process of
    the step (what `scancel --signal=URG JOB.STEP` does) -> Ray stopped, exit code 0 (step COMPLETED)."""
    text = (ROOT / "slurm" / template).read_text()
    start = text.index("export GFN_RAY_NODE_SH='") + len("export GFN_RAY_NODE_SH='")
    script = text[start:text.index("'", start)]
    ray_tmp = Path(tempfile.mkdtemp(prefix="gfnrn-", dir="/tmp"))  # short: Ray's socket paths are <= 107 bytes
    log = ray_tmp / "ray-start-n1.log"
    port = _free_port()
    proc = subprocess.Popen(
        ["bash", "-c", script, "ray-node", str(log), "--head", f"--port={port}", f"--temp-dir={ray_tmp}",
         f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
         "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
        env=_env(RAY_AUTH_MODE="token"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    deadline = time.monotonic() + 180
    while "This command will now block forever" not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGURG)  # every process of the step, as `scancel --signal=URG` (stop_ray)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, (out, log.read_text()[-2000:])
    assert out == ""  # the banner went to the log file
    assert "Local node IP" in log.read_text() or "Ray runtime started" in log.read_text()
    left = subprocess.run(["pgrep", "-f", str(ray_tmp)], capture_output=True, text=True).stdout.split()
    assert not left, left  # no Ray process of this node survived
    shutil.rmtree(ray_tmp, ignore_errors=True)
