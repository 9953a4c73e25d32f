#!/usr/bin/env bash
# DDP launches of train.py with torchrun. Every rank runs the same command line; only rank 0
# writes the run folder (runs/<run.name>/), prints and logs. Each rank reads its own share of
# the data, so the global batch is train.batch_size x train.grad_accum x (nnodes x nproc).
#
#   scripts/torchrun_example.sh single 4 model=llama2c_15m         # one machine, 4 processes
#   NODE_RANK=0 MASTER=10.0.0.1 scripts/torchrun_example.sh multi 8 model=llama2c_110m   # on node 0
#   NODE_RANK=1 MASTER=10.0.0.1 scripts/torchrun_example.sh multi 8 model=llama2c_110m   # on node 1
#
# GPUs: one process per GPU (NCCL). CPU only: processes join with gloo (add run.device=cpu).
# Preemption: torchrun forwards SIGTERM to every rank; they finish the step, save and exit, and
# the same command resumes (checkpoint.resume=auto). Keep the same number of processes.
set -euo pipefail
mode=${1:?single or multi}; nproc=${2:?processes per node}; shift 2
cd "$(dirname "$0")/.."

case "$mode" in
  single)
    # --standalone: a local rendezvous on a free port, no master address needed.
    exec torchrun --standalone --nnodes=1 --nproc_per_node="$nproc" train.py "$@"
    ;;
  multi)
    # Every node runs this with the same --rdzv_id and endpoint; c10d rendezvous assigns ranks.
    # NNODES (default 2) nodes must join; MASTER:PORT must be reachable from every node.
    exec torchrun --nnodes="${NNODES:-2}" --nproc_per_node="$nproc" \
      --rdzv_backend=c10d --rdzv_endpoint="${MASTER:?set MASTER to the address of node 0}:${PORT:-29500}" \
      --rdzv_id="${RDZV_ID:-tinyllama}" --node_rank="${NODE_RANK:-0}" \
      train.py "$@"
    ;;
  *) echo "usage: $0 single|multi NPROC [hydra overrides...]" >&2; exit 2 ;;
esac
