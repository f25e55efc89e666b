#!/usr/bin/env bash
# Launch mode 2: learners are torchrun ranks (DDP; gloo on CPU, nccl on GPU).
# Rank 0 starts an embedded Ray (or connects to cluster.address=HOST:PORT) and
# creates the actors; the other ranks connect to it.
#
# One node, 2 ranks:
#   NPROC_PER_NODE=2 launch/torchrun.sh configs/hypergrid_tb.yaml learner.max_steps=200
#
# Several nodes (run the same line on every node; c10d rendezvous on node 0):
#   NNODES=2 NPROC_PER_NODE=4 RDZV_ENDPOINT=node0:29400 RDZV_ID=myrun \
#   RAY_AUTH_TOKEN=<same secret on all nodes> \
#       launch/torchrun.sh configs/X.yaml cluster.address=node0:6379
#   With several nodes start a Ray cluster first (`ray start --head --port=6379`
#   on node0, `ray start --address=node0:6379` on the others) and pass its
#   address, so rollout actors spread over the nodes; the SLURM template
#   slurm/torchrun_multinode.sbatch does all of this for you.
#
# Environment: NPROC_PER_NODE (default: GPUs, else 1), NNODES (1), RDZV_ENDPOINT
# (host:port, required when NNODES > 1), RDZV_ID (default gfn_dist), LOCAL_ADDR
# (this node's address as the others reach it; one node: 127.0.0.1 when the
# hostname does not resolve).
set -euo pipefail
[[ $# -ge 1 ]] || { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
py=${GFN_PYTHON:-python}
nproc=${NPROC_PER_NODE:-$("$py" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
nnodes=${NNODES:-1}

# Recent Ray enables token authentication for the Ray rank 0 starts, but a rank
# that only connects does not switch to token mode by itself: give every rank
# the same token (on several nodes, export the same RAY_AUTH_TOKEN everywhere).
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN:-} && -z ${RAY_AUTH_TOKEN_PATH:-} ]]; then
    ((nnodes == 1)) || { echo "torchrun.sh: export the same RAY_AUTH_TOKEN on every node" >&2; exit 2; }
    RAY_AUTH_TOKEN=$("$py" -c 'import secrets; print(secrets.token_hex(32))')
    export RAY_AUTH_TOKEN
fi

if ((nnodes == 1)); then
    local_addr=${LOCAL_ADDR:-}
    if [[ -z $local_addr ]] && ! getent hosts "$(hostname)" >/dev/null 2>&1; then local_addr=127.0.0.1; fi
    exec torchrun --standalone --nproc-per-node="$nproc" ${local_addr:+--local-addr="$local_addr"} \
        -m gfn_dist.train "$@"
fi
[[ -n ${RDZV_ENDPOINT:-} ]] || { echo "torchrun.sh: NNODES=$nnodes needs RDZV_ENDPOINT=host:port (node 0)" >&2; exit 2; }
exec torchrun --nnodes="$nnodes" --nproc-per-node="$nproc" --rdzv-backend=c10d \
    --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-gfn_dist}" ${LOCAL_ADDR:+--local-addr="$LOCAL_ADDR"} \
    --max-restarts=0 -m gfn_dist.train "$@"
