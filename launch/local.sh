#!/usr/bin/env bash
# Launch mode 1, the default: one process; the trainer starts an embedded local
# Ray (rollout actors, replay shards, weight store) and runs one learner
# (world size 1) in the driver.
#
#   launch/local.sh                                    # configs/hypergrid_tb.yaml
#   launch/local.sh configs/hypergrid_tb.yaml learner.max_steps=200 run.dir=/tmp/run
#   launch/local.sh configs/X.yaml cluster.address=HOST:6379   # an existing Ray instead
#
# Same as `gfn-dist train CONFIG [key.sub=value ...]` (CONFIG: a preset name or a YAML
# file); metrics in RUN_DIR/metrics.jsonl.
set -euo pipefail
config=${1:-configs/hypergrid_tb.yaml}
[[ $# -gt 0 ]] && shift
exec "${GFN_PYTHON:-python}" -m gfn_dist.cli train "$config" cluster.launcher=local "$@"
