#!/usr/bin/env bash
# A throw-away SLURM cluster on this machine: for CI and for trying the sbatch
# templates without a real cluster.
#
#   slurm/local_cluster.sh start [--dir DIR] [--nodes N]   # prints the SLURM_CONF line to export
#   slurm/local_cluster.sh status [--dir DIR]
#   slurm/local_cluster.sh stop [--dir DIR] [--keep]
#   slurm/local_cluster.sh install                         # only install slurm-wlm + munge if missing
#
#   eval "$(slurm/local_cluster.sh start --dir /tmp/slurm-gfn)"   # exports SLURM_CONF
#   sbatch --wait -N2 slurm/torchrun_multinode.sbatch configs/hypergrid_tb.yaml learner.max_steps=20
#   slurm/local_cluster.sh stop --dir /tmp/slurm-gfn
#
# What it does (needs root; Debian/Ubuntu):
#   * installs `slurm-wlm` and `munge` with apt-get when `slurmctld`, `slurmd`,
#     `sbatch` or `munged` is missing (Debian 12 ships Slurm 22.05), saying so on
#     stderr; each apt-get call is bounded (GFN_SLURM_APT_TIMEOUT_S, default 300 s);
#     GFN_SLURM_NO_INSTALL=1 fails instead of installing;
#   * writes DIR/slurm.conf: one controller on 127.0.0.1 and N emulated compute
#     nodes n1..nN, all on this host (one `slurmd -N nI` each, on its own port),
#     each with this host's topology as `slurmd -C` reports it; no accounting,
#     no cgroups (proctrack/linuxproc, task/none), cons_tres with CR_Core;
#     finished jobs go to DIR/log/jobcomp.log (jobcomp/filetxt), which is how a
#     caller reads a job's final state and exit code without `sacct`;
#   * starts a private `munged` (own key and socket under DIR), `slurmctld` and
#     the `slurmd`s, then waits until every node is idle.
# All state, spool, logs and PID files live under DIR; ports are picked free at
# start, so several clusters (different DIRs) can run side by side. `stop` ends
# exactly the daemons whose PIDs it recorded (never by name) and removes DIR
# unless --keep.
#
# Exit codes: 0 ok, 2 usage, 3 Slurm could not be installed, 4 a daemon did not
# come up (its log is printed).
set -euo pipefail

DIR=${GFN_SLURM_DIR:-/tmp/gfn_dist_slurm}
NODES=2
KEEP=0
MIN_JOB_AGE=${GFN_SLURM_MIN_JOB_AGE:-5}  # s; <= 5 keeps `sbatch --wait` polling every 2 s (else up to 32 s)
CRED_EXPIRE=${GFN_SLURM_CRED_EXPIRE:-5}  # s; also how long a requeued job waits before it restarts
START_TIMEOUT_S=${GFN_SLURM_START_TIMEOUT_S:-60}
APT_TIMEOUT_S=${GFN_SLURM_APT_TIMEOUT_S:-300}  # s, per apt-get call (update, install)

die() { local code=$1; shift; echo "local_cluster.sh: $*" >&2; exit "$code"; }
log() { echo "local_cluster.sh: $*" >&2; }

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

cmd=${1:-}
[[ -n $cmd ]] || usage
shift
while [[ $# -gt 0 ]]; do
    case $1 in
        --dir) DIR=$2; shift 2 ;;
        --nodes) NODES=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage ;;
        *) log "unknown argument: $1"; usage ;;
    esac
done
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die 2 "--nodes must be a positive integer, got '$NODES'"
CONF=$DIR/slurm.conf

install_slurm() {
    local missing=() apt_log=${TMPDIR:-/tmp}/gfn_slurm_apt.log
    for b in slurmctld slurmd sbatch munged; do
        command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ ${GFN_SLURM_NO_INSTALL:-0} != 1 ]] || die 3 "Slurm is not installed (missing: ${missing[*]}) and GFN_SLURM_NO_INSTALL=1"
    [[ $(id -u) -eq 0 ]] || die 3 "Slurm is not installed (missing: ${missing[*]}) and installing it needs root (apt-get install slurm-wlm munge)"
    command -v apt-get >/dev/null 2>&1 || die 3 "Slurm is not installed (missing: ${missing[*]}) and apt-get is not available"
    log "installing packages slurm-wlm munge with apt-get (missing: ${missing[*]}; at most ${APT_TIMEOUT_S} s per apt-get call; log: $apt_log)"
    local t0=$SECONDS rc=0
    # Bounded: network timeouts, one retry, a held dpkg lock waited for at most 60 s, and `timeout` over each call.
    local apt_opts=(-o Acquire::Retries=1 -o Acquire::http::Timeout=30 -o Acquire::https::Timeout=30
                    -o DPkg::Lock::Timeout=60)
    {
        timeout --kill-after=10 "$APT_TIMEOUT_S" apt-get "${apt_opts[@]}" update -qq &&
            DEBIAN_FRONTEND=noninteractive timeout --kill-after=10 "$APT_TIMEOUT_S" apt-get "${apt_opts[@]}" \
                install -y -qq --no-install-recommends slurm-wlm munge
    } >"$apt_log" 2>&1 || rc=$?
    if [[ $rc -ne 0 ]]; then
        tail -n 20 "$apt_log" >&2
        [[ $rc -eq 124 || $rc -eq 137 ]] && die 3 "apt-get did not finish within $APT_TIMEOUT_S s (no network, or a slow mirror?); install slurm-wlm and munge by hand"
        die 3 "apt-get could not install slurm-wlm and munge (exit $rc; is Debian's package registry reachable?)"
    fi
    for b in slurmctld slurmd sbatch munged; do
        command -v "$b" >/dev/null 2>&1 || die 3 "apt-get finished but '$b' is still missing"
    done
    log "installed slurm-wlm and munge in $((SECONDS - t0)) s"
}

free_ports() {  # free_ports N: N distinct TCP ports free right now, one a line
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print("\n".join(str(s.getsockname()[1]) for s in socks))
EOF
}

write_conf() {
    local host ctld_port topo i
    host=$(hostname -s)
    mapfile -t ports < <(free_ports $((NODES + 1)))
    ctld_port=${ports[0]}
    # e.g. "CPUs=16 Boards=1 SocketsPerBoard=1 CoresPerSocket=8 ThreadsPerCore=2 RealMemory=128000"
    topo=$(slurmd -C | head -n 1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' | tr '\n' ' ')
    [[ -n $topo ]] || die 4 "could not read this host's topology from 'slurmd -C'"
    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: a local test cluster, all on $host.
ClusterName=gfnlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
MpiDefault=none
ReturnToService=2
MinJobAge=$MIN_JOB_AGE
KillWait=10
InactiveLimit=0
EOF
    for ((i = 1; i <= NODES; i++)); do
        echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[$i]} $topo State=UNKNOWN" >>"$CONF"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for DESCRIPTION LOGFILE COMMAND...: poll COMMAND until it succeeds
    local what=$1 logf=$2; shift 2
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            [[ -f $logf ]] && tail -n 30 "$logf" >&2
            die 4 "$what did not come up within $START_TIMEOUT_S s (log: $logf)"
        fi
        sleep 0.2
    done
}

all_idle() {
    local states
    states=$(SLURM_CONF=$CONF sinfo -h -N -o '%T' 2>/dev/null) || return 1
    [[ $(grep -c '^idle$' <<<"$states") -eq $NODES ]]
}

start() {
    install_slurm
    if [[ -f $DIR/run/slurmctld.pid ]] && pid_alive "$DIR/run/slurmctld.pid"; then
        die 2 "a cluster is already running in $DIR (stop it first)"
    fi
    rm -rf "$DIR"
    mkdir -p "$DIR"/{state,spool,run,log,munge}
    chmod 755 "$DIR"
    chmod 700 "$DIR/munge"
    # A private munged: own key, socket, PID file; runs as root (--force), so
    # the state dir needs no munge-owned path above it.
    head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
    chmod 400 "$DIR/munge/munge.key"
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" --num-threads=2 \
        || die 4 "munged failed to start (log: $DIR/log/munged.log)"
    wait_for munged "$DIR/log/munged.log" test -S "$DIR/munge/munge.socket"
    write_conf
    slurmctld -f "$CONF" -c -i || die 4 "slurmctld failed to start (log: $DIR/log/slurmctld.log)"
    wait_for slurmctld "$DIR/log/slurmctld.log" env SLURM_CONF="$CONF" scontrol ping
    local i
    for ((i = 1; i <= NODES; i++)); do
        slurmd -f "$CONF" -N "n$i" || die 4 "slurmd n$i failed to start (log: $DIR/log/slurmd-n$i.log)"
    done
    wait_for "the $NODES node(s)" "$DIR/log/slurmctld.log" all_idle
    log "cluster up in $DIR: $NODES idle node(s)"
    echo "export SLURM_CONF=$CONF"
}

stop() {
    [[ -d $DIR ]] || { log "nothing to stop: $DIR does not exist"; return 0; }
    # Jobs first: a job's slurmstepd outlives its slurmd, so cancel and wait.
    if pid_alive "$DIR/run/slurmctld.pid"; then
        local jobs deadline=$((SECONDS + 20))
        jobs=$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
            while [[ -n $(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.5; done
        fi
    fi
    local f pids=()
    for f in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid" "$DIR/run/munged.pid"; do
        [[ -s $f ]] || continue
        local pid
        pid=$(cat "$f")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" && pids+=("$pid")
        fi
    done
    local deadline=$((SECONDS + 15)) pid
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    done
    log "stopped ${#pids[@]} daemon(s) in $DIR"
    [[ $KEEP -eq 1 ]] || rm -rf "$DIR"
}

status() {
    [[ -f $CONF ]] || die 2 "no cluster in $DIR"
    local f
    for f in "$DIR"/run/*.pid; do
        if pid_alive "$f"; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"; else echo "$(basename "$f" .pid): not running"; fi
    done
    SLURM_CONF=$CONF sinfo -N
}

case $cmd in
    start) start ;;
    stop) stop ;;
    status) status ;;
    install) install_slurm ;;
    *) usage ;;
esac
