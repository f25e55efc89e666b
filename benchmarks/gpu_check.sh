#!/usr/bin/env bash
# The GPU check (issue 15 item 5): gfn_dist's CUDA paths, run for real, with the figures recorded.
#
#   bash benchmarks/gpu_check.sh                # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --cpu-dry-run  # the same steps on the CPU, tiny budgets (or GPU_CHECK_DEVICE=cpu)
#
# Steps (each under its own time limit, all under GPU_CHECK_BUDGET_S, default 480 s with a GPU):
#   main_job             the README's main job (configs/hypergrid_tb.yaml, 400 steps) with a CUDA learner
#                        (learner.device=cuda) and a CUDA rollout actor (rollout.num_gpus_per_actor=0.25)
#   main_job_2_learners  the same with cluster.launcher=ray cluster.num_learners=2: two learner workers on
#                        one GPU each, process group over nccl (checked from the log); only with 2+ GPUs
#                        (the dry run runs it over gloo). With exactly 2 GPUs the learners hold both, so
#                        the rollout actor samples on the CPU there.
#   molecules            configs/molecules_qed.yaml, 500 steps (the CI test's budget), CUDA actor and learner
#   core_bench           benchmarks/core_vs_torchgfn.py --device cuda --json (100 timed rounds per case)
#
# Writes to $OUT (default ./gpu_check_out): summary.json (environment; per step: command, exit code, wall
# time, the run's last metrics row and last evaluation, checks), one log per step and core_bench.json
# (7 files at most: the device tool brings back 8). Run directories go to $GPU_CHECK_RUNS (default: a new
# temporary directory). Exit code: 0 when every step that ran passed, 1 otherwise, 2 for bad usage or no GPU.
#
# Needs gfn_dist's dependencies (pip install -e ".[chem]"; torchgfn for the benchmark's torchgfn rows, which
# are left out when it is missing). Python: $PYTHON, default python3. gfn_dist is imported from this checkout.
#
# Budgets on an H200 (16 cores), estimated from the CPU runs in README.md "Results" (to be replaced by the
# figures of the first run): the main job is start-up bound (34 s on the 2-core VM, of which 10 s of steps;
# a 256x2 MLP step at batch 64 is launch-bound on a GPU, a few ms): limit 120 s. Two Ray Train learners add
# their workers' start and the nccl set-up (~30-60 s): 150 s. The molecule run is bound by RDKit's QED in
# the actor (~0.4 ms a molecule on one core, 16 new molecules per step at samples_per_insert 4, ~5 s for 500
# steps) and start-up: 150 s. The benchmark: 3 cases x 120 rounds x up to 6 variants of a few ms each on a
# GPU, plus the compiled rollout's first compile (Inductor + Triton, tens of seconds a case): 180 s.
# Sum of limits 600 s, bounded by the 480 s budget: a step starts only with 30 s left, and gets what is left.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

MODE=${GPU_CHECK_DEVICE:-cuda}
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) MODE=cpu ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$arg' (expected --cpu-dry-run or --help)" >&2; exit 2 ;;
    esac
done
case "$MODE" in
    cpu | cuda) ;;
    *) echo "gpu_check.sh: GPU_CHECK_DEVICE must be cpu or cuda, got '$MODE'" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu_check_out}
RUNS=${GPU_CHECK_RUNS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" # this checkout's gfn_dist and examples/
export PYTHONUNBUFFERED=1
# A raylet whose dashboard agent starts slowly (a loaded machine) gives up after 30 s by default.
export RAY_agent_register_timeout_ms=${RAY_agent_register_timeout_ms:-180000}
HELPER=("$PY" "$ROOT/benchmarks/gpu_check_summary.py")
STEPS="$RUNS/steps.jsonl"
: >"$STEPS"

if [[ $MODE == cuda ]]; then
    BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
    MAIN_CAP=120 MULTI_CAP=150 MOL_CAP=150 BENCH_CAP=180
    MAIN_STEPS=400 MOL_STEPS=500
    MAIN_EXTRA=() # the preset's own evaluation and logging
    MOL_EXTRA=(eval.interval_steps=250)
    BENCH_ARGS=(--iterations 100 --warmup 20)
    DEVICE=(learner.device=cuda rollout.num_gpus_per_actor=0.25)
else # the script itself, tested on a CPU-only machine (tests/test_gpu_check.py): tiny budgets
    BUDGET_S=${GPU_CHECK_BUDGET_S:-900}
    MAIN_CAP=240 MULTI_CAP=300 MOL_CAP=240 BENCH_CAP=240
    MAIN_STEPS=20 MOL_STEPS=20
    MAIN_EXTRA=(eval.interval_steps=10 logging.log_every=10)
    MOL_EXTRA=(eval.interval_steps=10 eval.num_samples=128 logging.log_every=10)
    BENCH_ARGS=(--iterations 3 --warmup 1 --cases hypergrid_2x8)
    DEVICE=(learner.device=cpu rollout.num_gpus_per_actor=0)
fi
COMMON=(logging.wandb.mode=disabled logging.progress_bar=false)
TRAIN=("$PY" -m gfn_dist.train)

summarize() {
    "${HELPER[@]}" summary "$STEPS" "$RUNS/env.json" "$OUT/summary.json" \
        --mode "$MODE" --budget-s "$BUDGET_S" --elapsed-s "$SECONDS"
}

# run_step NAME CAP_S [helper options ...] -- COMMAND ...
# Runs COMMAND with stdout + stderr in $OUT/NAME.log, killed after min(CAP_S, budget left) seconds; records it.
run_step() {
    local name=$1 cap=$2
    shift 2
    local opts=()
    while [[ $1 != -- ]]; do
        opts+=("$1")
        shift
    done
    shift
    local left=$((BUDGET_S - SECONDS)) rc=0 t0 t1 poller=""
    if ((left < 30)); then
        "${HELPER[@]}" skip "$STEPS" "$name" "budget spent (${SECONDS} s of ${BUDGET_S} s used)"
        summarize
        return 0
    fi
    local limit=$((cap < left ? cap : left))
    echo "== $name (limit ${limit} s): $*"
    if [[ $MODE == cuda ]] && command -v nvidia-smi >/dev/null; then
        # Which processes hold the GPU during the step (the driver's learner, the actor): polled every 2 s.
        while sleep 2; do
            nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null || true
        done >"$RUNS/$name.gpu" &
        poller=$!
        opts+=(--gpu-log "$RUNS/$name.gpu")
    fi
    t0=$(date +%s.%N)
    timeout -k 30 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    t1=$(date +%s.%N)
    if [[ -n $poller ]]; then
        kill "$poller" 2>/dev/null || true
        wait "$poller" 2>/dev/null || true
    fi
    if ((rc != 0)); then
        echo "-- $name: exit code $rc; the end of $OUT/$name.log:"
        tail -n 20 "$OUT/$name.log" | sed 's/^/   /'
    fi
    "${HELPER[@]}" step "$STEPS" "$name" "$rc" "$t0" "$t1" "$OUT/$name.log" "${opts[@]}" -- "$@"
    summarize
}

echo "== environment (mode $MODE; run directories in $RUNS; results in $OUT)"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L 2>&1 | tee "$RUNS/nvidia_smi.txt" || true
else
    echo "nvidia-smi: not found" | tee "$RUNS/nvidia_smi.txt"
fi
NGPU=$("${HELPER[@]}" env "$RUNS/env.json" --nvidia-smi "$RUNS/nvidia_smi.txt" --mode "$MODE") || {
    summarize # the environment, no steps
    exit 2
}
echo "CUDA devices visible to torch: $NGPU"
summarize

# (a) the main job: one learner (in the driver) and one rollout actor, both on the GPU.
run_step main_job "$MAIN_CAP" --run-dir "$RUNS/main_job" --expect-step "$MAIN_STEPS" --expect-eval -- \
    "${TRAIN[@]}" configs/hypergrid_tb.yaml "${DEVICE[@]}" learner.max_steps="$MAIN_STEPS" "${MAIN_EXTRA[@]}" \
    "${COMMON[@]}" run.dir="$RUNS/main_job"

# (a') two learners as Ray Train workers: nccl on two GPUs (gloo in the dry run).
if [[ $MODE == cpu ]] || ((NGPU >= 2)); then
    NOTE="learners and actor on the CPU (dry run)"
    BACKEND=gloo
    MULTI_DEVICE=("${DEVICE[@]}")
    if [[ $MODE == cuda ]]; then
        BACKEND=nccl
        NOTE="two learners on a GPU each, the rollout actor on a third"
        ACTOR_GPUS=0.25
        if ((NGPU == 2)); then # each learner holds a whole GPU: none is left for the actor
            NOTE="two learners on a GPU each, the rollout actor on the CPU (no third GPU)"
            ACTOR_GPUS=0
        fi
        MULTI_DEVICE=(learner.device=cuda rollout.num_gpus_per_actor="$ACTOR_GPUS")
    fi
    run_step main_job_2_learners "$MULTI_CAP" --run-dir "$RUNS/main_job_2_learners" --expect-step "$MAIN_STEPS" \
        --expect-eval --expect-backend "$BACKEND" --note "$NOTE" -- \
        "${TRAIN[@]}" configs/hypergrid_tb.yaml cluster.launcher=ray cluster.num_learners=2 "${MULTI_DEVICE[@]}" \
        learner.max_steps="$MAIN_STEPS" "${MAIN_EXTRA[@]}" "${COMMON[@]}" run.dir="$RUNS/main_job_2_learners"
else
    "${HELPER[@]}" skip "$STEPS" main_job_2_learners "$NGPU GPU(s) visible: two nccl learners need 2"
fi

# (b) the molecule preset on a short budget: GRU policy on the GPU in the actor and the learner, QED on the CPU.
run_step molecules "$MOL_CAP" --run-dir "$RUNS/molecules" --expect-step "$MOL_STEPS" --expect-eval -- \
    "${TRAIN[@]}" configs/molecules_qed.yaml "${DEVICE[@]}" learner.max_steps="$MOL_STEPS" "${MOL_EXTRA[@]}" \
    "${COMMON[@]}" run.dir="$RUNS/molecules"

# (c) the core benchmark on the device (torchgfn's rows too when it is installed).
NO_TG=()
"$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("gfn") is None)' || NO_TG=(--no-torchgfn)
run_step core_bench "$BENCH_CAP" --bench-json "$OUT/core_bench.json" -- \
    "$PY" benchmarks/core_vs_torchgfn.py --device "$MODE" "${BENCH_ARGS[@]}" "${NO_TG[@]}" --json "$OUT/core_bench.json"

summarize
echo "== done in ${SECONDS} s: $OUT/summary.json"
"$PY" -c 'import json, sys; s = json.load(open(sys.argv[1])); sys.exit(0 if s["ok"] else 1)' "$OUT/summary.json"
