#!/usr/bin/env bash
# Run a moetuner-serve command once per node of a multi-node Slurm allocation, or once here otherwise.
#   bash workflow/scripts/per-node.sh moetuner-serve placement=... out=... [overrides...]
# Inside an allocation of N > 1 nodes (the serve rule asks for the topology's node count on Slurm), srun
# starts one task per node; each runs the command with launch.node_rank=$SLURM_NODEID and the
# allocation's first node (where this batch script runs, so srun's launch address) as rendezvous
# address: one torchrun per node, its ranks meeting the other nodes' ranks. The port is derived from the
# job id so that two serve jobs sharing a machine do not collide. Rank 0 (on node 0) logs the MLflow run.
set -euo pipefail
# (The Slurm executor's job step keeps only SLURM_JOB_ID of the allocation's variables: ask squeue.)
nodes=1
[ -n "${SLURM_JOB_ID:-}" ] && nodes="$(squeue -h -j "$SLURM_JOB_ID" -o %D)"
if [ "$nodes" -le 1 ]; then
  exec "$@"
fi
port=$((20000 + SLURM_JOB_ID % 20000))
echo "[per-node] job $SLURM_JOB_ID, $nodes nodes: srun one '$1' per node, rendezvous on the first node, port $port" >&2
exec srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c \
  'exec "$@" launch.node_rank="$SLURM_NODEID" launch.master_addr="$SLURM_LAUNCH_NODE_IPADDR" launch.master_port="$0"' \
  "$port" "$@"
