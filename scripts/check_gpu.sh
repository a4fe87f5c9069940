#!/usr/bin/env bash
# Every single-GPU check in one go, on a GPU machine with the test extras installed (pytest-xdist optional):
#
#   scripts/check_gpu.sh            # results under $OUT (default runs/check_gpu)
#
# 1. the gpu-marked tests: kernels against the fp32 definition at real sizes and over the head-dim sweep
#    (its table written to $OUT/head_dim_sweep.md), captured steps against eager ones, ZeRO stages 1-2 between
#    replays, the Hugging Face export through fla's kernels, small-head models;
# 2. the quickstart on the GPU, timed from launch to its final recall;
# 3. the training-step benchmark of our MoM-340M and Gated DeltaNet-340M with CUDA graphs (fixed-length and
#    packed documents; add fla with CHECK_FLA=1, whose first autotuning takes minutes per shape).
# Each part runs even when an earlier one fails; the exit code is the number of parts that failed.
# Needs the test extras (mistral-common for the text configs' tokenizer, fla for the export check); on a machine
# without them, install wheels brought along first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/check_gpu}
mkdir -p "$out"
failed=0

workers=()
python -c "import xdist" 2>/dev/null && workers=(-n "${WORKERS:-8}")
echo "== gpu tests"
# one line per test (-v) so that a run cut short still names every result; failures summarised at the end
MOM_SWEEP_TABLE="$out/head_dim_sweep.md" python -m pytest -v -rfE --tb=short -m gpu "${workers[@]}" tests 2>&1 \
  | tee "$out/gpu_tests.log" | grep -E "FAILED|ERROR|passed|failed" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=$((failed + 1))

echo "== quickstart"
start=$(date +%s.%N)
python -m mom_train train --config configs/quickstart.yaml run.dir="$out/runs" logging.progress_bar=false \
  > "$out/quickstart.log" 2>&1 || failed=$((failed + 1))
end=$(date +%s.%N)
tail -2 "$out/quickstart.log"
python -c "print(f'quickstart wall time: {$end - $start:.1f} s')"

echo "== training step"
skip=(--skip fla)
[ "${CHECK_FLA:-0}" = 1 ] && skip=()
python scripts/bench_model.py --mom-projection grouped --cuda-graphs on "${skip[@]}" --iters "${ITERS:-10}" \
  --out "$out/bench_model.json" 2>&1 | tee "$out/bench_model.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=$((failed + 1))

echo "parts failed: $failed (logs under $out)"
exit "$failed"
