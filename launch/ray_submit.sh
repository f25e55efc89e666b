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
# Token authentication (Ray >= 2.5x): `ray start --head` turns it on when this
# host has a token (~/.ray/auth_token, written by any local `ray.init()`, e.g.
# a `gfn-dist train`), but the `ray job submit` client does not follow: it must
# run with RAY_AUTH_MODE=token. This script sets it, as `ray start` decides,
# when RAY_AUTH_MODE is unset and a token is found (RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); RAY_AUTH_MODE=disabled opts out.
# A remote cluster's token must be here too (same file or RAY_AUTH_TOKEN).
set -euo pipefail
[[ $# -ge 1 ]] || { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
config=$1; shift
if [[ -z ${RAY_AUTH_MODE:-} ]] && [[ -n ${RAY_AUTH_TOKEN:-} || -s ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} ]]; then
    export RAY_AUTH_MODE=token
fi
# shellcheck disable=SC2086  # RAY_SUBMIT_OPTS is split on purpose
exec ray job submit --address="${RAY_ADDRESS:-http://127.0.0.1:8265}" ${RAY_SUBMIT_OPTS:-} -- \
    gfn-dist train "$config" "cluster.launcher=${GFN_LAUNCHER:-ray}" cluster.address=auto "$@"
