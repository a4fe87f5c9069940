#!/usr/bin/env bash
# one node, data parallel over NPROC processes (default 8 GPUs):
#   NPROC=8 scripts/launch.sh configs/mom_340m.yaml run.name=mom340m training.lr=3e-4
# on a CPU-only machine torchrun works too (gloo): NPROC=2 scripts/launch.sh configs/quickstart.yaml
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: [NPROC=8] $0 CONFIG.yaml [section.key=value ...]" >&2
  exit 2
fi
config=$1
shift
exec torchrun --standalone --nproc_per_node="${NPROC:-8}" -m mom_train train --config "$config" "$@"
