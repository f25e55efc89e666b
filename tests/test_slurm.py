"""SLURM launch templates, run on a real SLURM: a local cluster of two emulated
nodes on this machine (``slurm/local_cluster.sh``), brought up once per module.

When Slurm is missing, the fixture says so on the terminal and installs
``slurm-wlm`` and ``munge`` with apt-get (``local_cluster.sh install``; CI runs as
root on a fresh Debian machine), bounded in time; if that is impossible the tests
fail with the script's message, they are never skipped. All but the two script
checks are marked ``cluster`` (``pytest -m "not cluster"`` leaves them out).

Oracles: the job's final state and exit code come from Slurm itself (the
``jobcomp/filetxt`` completion log, one record per finished attempt, and
``sbatch --wait``'s exit status); the training side from ``RUN_DIR/metrics.jsonl``
(``world_size`` = nodes x ranks per node proves that every node's torchrun
joined the rendezvous).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster  # a local SLURM

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "slurm" / "local_cluster.sh"
TORCHRUN_SBATCH = REPO / "slurm" / "torchrun_multinode.sbatch"
STANDIN = REPO / "tests" / "slurm_standin.py"
CONFIG = REPO / "configs" / "hypergrid_tb.yaml"
TINY = ["learner.max_steps=4", "logging.log_every=2", "eval.interval_steps=2", "logging.progress_bar=false"]
JOB_TIMEOUT_S = 300
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}


def test_scripts_parse():
    """Every template and launcher is valid bash; the sbatch templates ask for the time-limit signal and requeue."""
    scripts = sorted([*REPO.glob("slurm/*.sbatch"), *REPO.glob("slurm/*.sh"), *REPO.glob("launch/*.sh")])
    names = {p.name for p in scripts}
    assert {"torchrun_multinode.sbatch", "ray_cluster.sbatch", "local_cluster.sh",
            "local.sh", "torchrun.sh", "ray_submit.sh"} <= names, names
    for path in scripts:
        r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, f"{path.name}: {r.stderr}"
    for path in REPO.glob("slurm/*.sbatch"):
        text = path.read_text()
        assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text, path.name
        assert "resume=true" in text and "SLURM_RESTART_COUNT" in text, path.name


@dataclass
class Cluster:
    state: Path
    env: dict

    def jobcomp(self, jobid: str) -> list[dict]:
        """The completion-log records of ``jobid`` (one per finished or requeued attempt), oldest first."""
        path = self.state / "log" / "jobcomp.log"
        records = []
        for line in path.read_text().splitlines() if path.exists() else []:
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if fields.get("JobId") == jobid:
                records.append(fields)
        return records

    def job_log(self, jobid: str) -> str:
        path = self.state / f"job-{jobid}.out"
        return path.read_text(errors="replace") if path.exists() else "(no job output)"


SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")
APT_TIMEOUT_S = 300  # per apt-get call (local_cluster.sh bounds each with `timeout`)
INSTALL_TIMEOUT_S = 2 * APT_TIMEOUT_S + 60  # update + install, and a margin; then the fixture gives up
START_TIMEOUT_S = 300  # munged, slurmctld, every slurmd idle (the script waits <= 60 s for each)


def _announce(request, line: str) -> None:
    """Prints ``line`` on pytest's terminal even under -q and output capture."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)
    else:
        sys.stderr.write(line + "\n")


def _run_bounded(cmd: list[str], timeout_s: float, env: dict | None = None) -> subprocess.CompletedProcess | None:
    """Runs ``cmd`` in its own process group; None when it ran past ``timeout_s`` (the whole group is killed)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        return None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def slurm(request):
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:  # CI: a fresh Debian machine, as root
        _announce(request, f"test_slurm: Slurm is missing ({', '.join(missing)}): installing the Debian "
                           f"packages slurm-wlm and munge with apt-get ({CLUSTER_SH.name} install, "
                           f"at most {INSTALL_TIMEOUT_S} s)")
        t0 = time.monotonic()
        r = _run_bounded([str(CLUSTER_SH), "install"], INSTALL_TIMEOUT_S,
                         env=dict(os.environ, GFN_SLURM_APT_TIMEOUT_S=str(APT_TIMEOUT_S)))
        if r is None or r.returncode != 0:
            why = f"gave up after {INSTALL_TIMEOUT_S} s" if r is None else r.stderr.strip()[-2000:]
            pytest.fail(f"Slurm is not installed and {CLUSTER_SH.name} could not install it: {why}\n"
                        "Install slurm-wlm and munge (apt-get install slurm-wlm munge), or leave these tests out "
                        "with -m 'not cluster'.", pytrace=False)
        _announce(request, f"test_slurm: installed slurm-wlm and munge in {time.monotonic() - t0:.0f} s")
    # Short path in /tmp: the munge socket lives under it (UNIX socket paths are <= 107 bytes).
    state = Path(tempfile.mkdtemp(prefix="gfn-slurm-", dir="/tmp"))
    t0 = time.monotonic()
    r = _run_bounded([str(CLUSTER_SH), "start", "--dir", str(state), "--nodes", "2"], START_TIMEOUT_S)
    if r is None or r.returncode != 0:
        msg = f"gave up after {START_TIMEOUT_S} s" if r is None else f"exit {r.returncode}: {r.stderr.strip()[-2000:]}"
        _run_bounded([str(CLUSTER_SH), "stop", "--dir", str(state)], 120)
        pytest.fail(f"could not bring up the local SLURM cluster with {CLUSTER_SH.name} ({msg})", pytrace=False)
    sys.stderr.write(f"\nlocal SLURM up in {time.monotonic() - t0:.1f} s\n")
    env = dict(os.environ, SLURM_CONF=str(state / "slurm.conf"), GFN_PYTHON=sys.executable,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    yield Cluster(state, env)
    pids = [int(p.read_text()) for p in (state / "run").glob("*.pid") if p.read_text().strip()]
    subprocess.run([str(CLUSTER_SH), "stop", "--dir", str(state)], capture_output=True, timeout=120)
    alive = [p for p in pids if _alive(p)]
    assert not alive, f"local_cluster.sh stop left daemons running: {alive}"
    assert not state.exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _sbatch_wait(cluster: Cluster, sbatch_args: list[str], job_args: list[str], env: dict) -> tuple[str, int]:
    """Submits with ``sbatch --wait``; returns (job id, sbatch's exit status = the job's)."""
    cmd = ["sbatch", "--wait", "--parsable", "--output", str(cluster.state / "job-%j.out"),
           *sbatch_args, str(TORCHRUN_SBATCH), str(CONFIG), *job_args]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, env=dict(cluster.env, **env), cwd=cluster.state, capture_output=True, text=True,
                           timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        subprocess.run(["scancel", "--full", "--name=gfn-torchrun"], env=cluster.env, timeout=30)
        raise AssertionError(f"sbatch --wait did not return within {JOB_TIMEOUT_S} s") from err
    jobid = r.stdout.strip().split(";")[0]
    assert jobid.isdigit(), f"sbatch failed: {r.stderr}"
    sys.stderr.write(f"\njob {jobid} ({' '.join(sbatch_args)}): {time.monotonic() - t0:.1f} s under sbatch --wait\n")
    return jobid, r.returncode


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    assert path.exists(), f"no {path}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _assert_completed(cluster: Cluster, jobid: str, rc: int) -> None:
    deadline = time.monotonic() + 15  # slurmctld writes the completion record as the job ends
    while not cluster.jobcomp(jobid) and time.monotonic() < deadline:
        time.sleep(0.2)
    records = cluster.jobcomp(jobid)
    assert rc == 0 and records and records[-1]["JobState"] == "COMPLETED", (
        f"job {jobid}: sbatch exit {rc}, completion records {[r.get('JobState') for r in records]}\n"
        f"{cluster.job_log(jobid)[-6000:]}")
    assert records[-1]["ExitCode"] == "0:0", records[-1]


@pytest.mark.slow
@pytest.mark.cluster
def test_torchrun_template_single_node(slurm, tmp_path):
    """-N1, 2 ranks on one node, embedded Ray: the real trainer finishes a tiny budget."""
    run_dir = tmp_path / "run"
    jobid, rc = _sbatch_wait(slurm, ["--nodes=1", "--cpus-per-task=1"], [*TINY, f"run.dir={run_dir}"],
                             {"GFN_NPROC_PER_NODE": "2"})
    _assert_completed(slurm, jobid, rc)
    rows = _metrics(run_dir)
    assert rows and rows[-1]["step"] == 4
    assert all(r["world_size"] == 2 and math.isfinite(r["loss"]) for r in rows), rows
    assert "Ray: embedded" in slurm.job_log(jobid)


@pytest.mark.slow
@pytest.mark.cluster
def test_torchrun_template_two_nodes(slurm, tmp_path):
    """-N2 (two emulated nodes), 1 rank per node, c10d rendezvous across the nodes, a
    Ray head + worker started by the template: the real trainer finishes a tiny budget."""
    run_dir = tmp_path / "run"
    jobid, rc = _sbatch_wait(slurm, ["--nodes=2", "--cpus-per-task=1"], [*TINY, f"run.dir={run_dir}"],
                             {"GFN_NPROC_PER_NODE": "1"})
    _assert_completed(slurm, jobid, rc)
    assert slurm.jobcomp(jobid)[-1]["NodeCnt"] == "2"
    rows = _metrics(run_dir)
    assert rows and rows[-1]["step"] == 4
    # One rank per node: world size 2 means both nodes' torchruns joined the rendezvous.
    assert all(r["world_size"] == 2 and math.isfinite(r["loss"]) for r in rows), rows
    # Printed only once `ray.nodes()` at the head counts both nodes alive.
    assert "Ray cluster up: head " in slurm.job_log(jobid) and "1 worker node(s)" in slurm.job_log(jobid)
    assert not list(Path("/tmp").glob(f"gfnray-{jobid}-*")), "the job's Ray temp dir was left behind"
    # A clean end: the Ray steps stopped with exit code 0 (no `srun: error: n1: task 0: Killed`,
    # no `STEP ... CANCELLED`), and `ray start`'s banner went to its own log, not the job's.
    log = slurm.job_log(jobid)
    assert not [ln for ln in log.splitlines() if "error" in ln.lower() or "CANCELLED" in ln], log[-4000:]
    assert "Ray runtime started" not in log and "ray stop" not in log, log[-4000:]


@pytest.mark.slow
@pytest.mark.cluster
def test_time_limit_signal_checkpoint_requeue_resume(slurm, tmp_path):
    """USR1 to the batch script (what `--signal=B:USR1@120` sends before the time limit):
    every rank gets SIGTERM (checkpoints), the job requeues itself, and the restart gets
    `resume=true` and completes. Uses the stand-in trainer (no Ray), which records it all."""
    run_dir = tmp_path / "run"
    env = dict(slurm.env, GFN_NPROC_PER_NODE="2", GFN_TRAIN=str(STANDIN))
    r = subprocess.run(["sbatch", "--parsable", "--output", str(slurm.state / "job-%j.out"), "--nodes=1",
                        "--cpus-per-task=1", str(TORCHRUN_SBATCH), str(CONFIG), f"run.dir={run_dir}",
                        "standin.sleep_s=240"], env=env, cwd=slurm.state, capture_output=True, text=True, timeout=60)
    jobid = r.stdout.strip().split(";")[0]
    assert r.returncode == 0 and jobid.isdigit(), r.stderr
    t0 = time.monotonic()
    try:
        while not (run_dir / "metrics.jsonl").exists():  # both ranks are up and waiting
            assert time.monotonic() - t0 < JOB_TIMEOUT_S, f"stand-in never started\n{slurm.job_log(jobid)}"
            time.sleep(0.3)
        subprocess.run(["scancel", "--signal=USR1", "--batch", jobid], env=env, check=True, timeout=30)
        while not (slurm.jobcomp(jobid) and slurm.jobcomp(jobid)[-1]["JobState"] in TERMINAL):
            assert time.monotonic() - t0 < JOB_TIMEOUT_S, f"job never finished\n{slurm.job_log(jobid)}"
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", jobid], env=env, timeout=30)
    sys.stderr.write(f"\njob {jobid} (signal, requeue, resume): {time.monotonic() - t0:.1f} s after start\n")
    records = slurm.jobcomp(jobid)
    # Attempt 1 ends requeued (Slurm 22.05 records it as PENDING), attempt 2 completes.
    states = [rec["JobState"] for rec in records]
    assert len(states) == 2 and states[0] in ("PENDING", "REQUEUED") and states[1] == "COMPLETED", (
        f"{states}\n{slurm.job_log(jobid)}")
    rows = _metrics(run_dir)
    first, checkpoints, resumed = rows[0], [x for x in rows if x.get("event") == "checkpoint"], rows[-1]
    assert "resume" not in first["overrides"] and first["world_size"] == 2
    assert sorted(c["rank"] for c in checkpoints) == [0, 1], rows
    assert resumed.get("step") == 1 and resumed["overrides"].get("resume") == "true", rows
    assert resumed["overrides"]["run.dir"] == str(run_dir)
    log = slurm.job_log(jobid)
    assert "got SIGUSR1" in log and f"requeueing job {jobid}" in log and "restart 1:" in log, log


def test_cluster_script_rejects_bad_arguments():
    r = subprocess.run([str(CLUSTER_SH), "start", "--nodes", "zero"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--nodes" in r.stderr
    r = subprocess.run(["bash", str(TORCHRUN_SBATCH)], capture_output=True, text=True, timeout=30,
                       env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    assert r.returncode == 2 and "usage" in r.stderr



def test_cluster_script_install_says_what_and_fails_in_bounded_time(tmp_path):
    """No Slurm on PATH: the script names the packages it installs, and an apt-get that hangs
    (a stand-in that sleeps) is cut off at GFN_SLURM_APT_TIMEOUT_S with a clear message."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("timeout", "tail", "sleep"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for name, body in (("id", "echo 0"), ("apt-get", "exec sleep 60")):
        (bin_dir / name).write_text(f"#!{shutil.which('bash')}\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=str(bin_dir), TMPDIR=str(tmp_path), GFN_SLURM_APT_TIMEOUT_S="1")
    bash = shutil.which("bash")
    t0 = time.monotonic()
    r = subprocess.run([bash, str(CLUSTER_SH), "install"], env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 30
    assert "installing packages slurm-wlm munge with apt-get (missing: slurmctld slurmd sbatch munged" in r.stderr
    assert r.returncode == 3 and "apt-get did not finish within 1 s" in r.stderr, r.stderr
    r = subprocess.run([bash, str(CLUSTER_SH), "install"], env=dict(env, GFN_SLURM_NO_INSTALL="1"),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 3 and "Slurm is not installed (missing: slurmctld" in r.stderr, r.stderr
