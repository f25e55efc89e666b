#!/usr/bin/env bash
# Launch mode 3: submit the trainer as a job to a running Ray cluster; the
# driver runs on the head node and connects to its cluster (cluster.address=auto).
#
#   ray start --head --port=6379 --dashboard-host=0.0.0.0   # head node
#   ray start --address=HEAD:6379                           # every other node
#   RAY_ADDRESS=http://HEAD:8265 launch/ray_submit.sh configs/hypergrid_tb.yaml rollout.num_actors=16
#
# Environment: RAY_ADDRESS (the dashboard, default http://127.0.0.1:8265),
# GFN_LAUNCHER (ray: learners are Ray actors forming the DDP group; local: one
# learner in the driver; default ray), RAY_SUBMIT_OPTS (more `ray job submit`
# options, e.g. "--no-wait" or "--working-dir ."; gfn_dist must be installed on
# every node, or shipped with --working-dir / --runtime-env-json).
# A cluster with token authentication needs RAY_AUTH_MODE=token and its token
# (RAY_AUTH_TOKEN or ~/.ray/auth_token) here too.
set -euo pipefail
[[ $# -ge 1 ]] || { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
config=$1; shift
# shellcheck disable=SC2086  # RAY_SUBMIT_OPTS is split on purpose
exec ray job submit --address="${RAY_ADDRESS:-http://127.0.0.1:8265}" ${RAY_SUBMIT_OPTS:-} -- \
    gfn-dist train "$config" "cluster.launcher=${GFN_LAUNCHER:-ray}" cluster.address=auto "$@"
