#!/usr/bin/env bash
# Multi-GPU measurements on one node: each row trains a few steps with torchrun and prints the steady-state
# tokens/s and peak memory per GPU from the run's metrics.jsonl (medians of the logged steps after the first).
#
#   scripts/bench_multigpu.sh dp         # MoM-340M, 8 x 2048 tokens per GPU, CUDA graphs: 1 vs 2 GPUs
#   scripts/bench_multigpu.sh cp         # MoM-340M, one 32k- and one 64k-token sequence per step: 1 GPU vs cp=2
#   scripts/bench_multigpu.sh tp         # mom_2.7b.yaml: tp=1 (1 GPU) vs tp=2
#   scripts/bench_multigpu.sh zero       # MoM-1.3B on 2 GPUs: ZeRO 0, 1, 2 (ours) and 3 (DeepSpeed)
#
# Data: synthetic MQAR sequences of the benchmark's length (the content does not change the work); OUT (default
# runs/bench) collects the run directories.
set -euo pipefail
what=${1:?usage: $0 dp|cp|tp|zero}
out=${OUT:-runs/bench}
steps=${STEPS:-12}
common=(data.source=mqar data.mqar.num_pairs=64 data.mqar.num_queries=64 eval.interval=0 checkpoint.interval=0
        logging.interval=1 logging.progress_bar=false training.steps=$steps training.warmup_steps=1
        model.vocab_size=32000 data.mqar.vocab_size=32000)

run() {  # run NAME NPROC CONFIG OVERRIDES...
  local name=$1 nproc=$2 config=$3
  shift 3
  torchrun --standalone --nproc_per_node="$nproc" -m mom_train train --config "$config" run.dir="$out" \
    run.name="$name" "${common[@]}" "$@" > "$out/$name.log" 2>&1 || { echo "$name failed: $out/$name.log"; return 1; }
  python - "$out/$name/metrics.jsonl" "$name" <<'EOF'
import json, statistics, sys
records = [json.loads(line) for line in open(sys.argv[1]) if '"tokens_per_s"' in line]
steady = records[1:] or records
tps = statistics.median(r["tokens_per_s"] for r in steady)
mem = max(r.get("peak_mem_gib", 0.0) for r in records)
print(f"{sys.argv[2]:28s} tokens/s {tps:12,.0f}   peak {mem:6.1f} GiB/GPU   mfu {steady[-1].get('mfu', 0):.3f}")
EOF
}

mkdir -p "$out"
case $what in
  dp)
    for n in 1 2; do
      run "dp${n}_mom340m" $n configs/mom_340m.yaml training.micro_batch_size=8 \
        training.global_batch_tokens=$((n * 8 * 2048))
    done ;;
  cp)
    for len in 32768 65536; do
      base=(training.seq_len=$len training.micro_batch_size=1 training.global_batch_tokens=$len
            training.cuda_graphs=false data.mqar.num_pairs=256 data.mqar.num_queries=256)
      run "cp1_${len}" 1 configs/mom_340m.yaml "${base[@]}"
      run "cp2_${len}" 2 configs/mom_340m.yaml "${base[@]}" parallel.cp=2
    done ;;
  tp)
    run tp1_mom2.7b 1 configs/mom_2.7b.yaml parallel.tp=1 training.global_batch_tokens=8192 training.micro_batch_size=4
    run tp2_mom2.7b 2 configs/mom_2.7b.yaml parallel.tp=2 training.global_batch_tokens=8192 training.micro_batch_size=4 ;;
  zero)
    for stage in 0 1 2 3; do
      extra=()
      [ "$stage" = 3 ] && extra=(training.cuda_graphs=false)
      run "zero${stage}_mom1.3b" 2 configs/mom_1.3b.yaml parallel.zero_stage=$stage training.micro_batch_size=4 \
        training.global_batch_tokens=16384 "${extra[@]}"
    done ;;
  *) echo "unknown benchmark $what (dp|cp|tp|zero)" >&2; exit 2 ;;
esac
