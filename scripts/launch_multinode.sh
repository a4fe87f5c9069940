#!/usr/bin/env bash
# several nodes: run this once on every node with the same MASTER_ADDR/MASTER_PORT and its own NODE_RANK.
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/launch_multinode.sh configs/mom_1.3b.yaml run.name=mom13b
# the run dir (run.dir) must be on a filesystem every node sees: checkpoints are written by all ranks.
#
# slurm (one task per node; torchrun starts the GPU processes), e.g. in an sbatch script:
#   #SBATCH --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 --signal=TERM@120
#   export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
#   srun bash -c 'NNODES=$SLURM_NNODES NODE_RANK=$SLURM_NODEID scripts/launch_multinode.sh configs/mom_1.3b.yaml'
# --signal=TERM@120 sends SIGTERM two minutes before the time limit: the trainer finishes its step, saves a
# checkpoint and exits 0; resubmitting the same job resumes it (checkpoint.resume=auto).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: NNODES=N NODE_RANK=i MASTER_ADDR=host [MASTER_PORT=29500] [NPROC=8] $0 CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
: "${NNODES:?set NNODES, the number of nodes}"
: "${NODE_RANK:?set NODE_RANK, this node's index in [0, NNODES)}"
: "${MASTER_ADDR:?set MASTER_ADDR, the address of node 0}"
config=$1
shift
exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="${NPROC:-8}" \
  --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}" \
  -m mom_train train --config "$config" "$@"
