#!/usr/bin/env bash
# One prepared GPU check (make gpu-check), under 8 minutes on one GPU: the CUDA tests, then
# ScaleNet-50 against ResNet-50 with tools/benchmark.py (CUDA-event timed, interleaved, medians,
# max_memory_allocated): backbone eval at batch 1 and 8, fp32 and AMP; the Faster R-CNN
# training step at batch 2 and 8, AMP off and on; ScaleNet's rows shipped / on / plain.
# Writes report.md and one JSON file per table into a new folder (output/gpu_check, -2, ...).
set -euo pipefail
PY=${PY:-python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device here')"
out=output/gpu_check
n=1
while [ -e "$out" ]; do n=$((n + 1)); out=output/gpu_check-$n; done
mkdir -p "$out"
R50=configs/COCO-Detection/faster_rcnn_R50_FPN_1x.yaml
S50=configs/COCO-Detection/faster_rcnn_S50_FPN_1x.yaml
{
  echo "# GPU check"
  echo
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  echo
  echo '## CUDA tests'
  echo
  echo '```'
  # a failing test must not cost the timings of this (short) GPU session: recorded, then exited with
  "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider > "$out/cuda_tests.txt" 2>&1 || echo fail > "$out/.tests_failed"
  tail -n 5 "$out/cuda_tests.txt"
  echo '```'
  for batch in 1 8; do
    for amp in "" --amp; do
      "$PY" tools/benchmark.py "$R50" "$S50" --sizes 224x224 --speed 800x1344 --batch "$batch" $amp \
        --rounds 10 --markdown --json "$out/eval_b${batch}${amp:+_amp}.json"
    done
  done
  for batch in 2 8; do
    for amp in "" --amp; do
      "$PY" tools/benchmark.py "$R50" "$S50" --sizes 224x224 --train-speed 800x1344 --train-batch "$batch" $amp \
        --rounds 5 --markdown --json "$out/train_b${batch}${amp:+_amp}.json"
    done
  done
} 2>&1 | tee "$out/report.md"
echo "gpu-check: report in $out/report.md"
if [ -e "$out/.tests_failed" ]; then
  rm "$out/.tests_failed"
  echo "gpu-check: CUDA tests failed: $out/cuda_tests.txt" >&2
  exit 1
fi
