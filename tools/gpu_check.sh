#!/usr/bin/env bash
# One prepared GPU check (make gpu-check), under 8 minutes on one GPU: the CUDA tests, then
# ScaleNet-50 against ResNet-50 with tools/benchmark.py (CUDA-event timed, interleaved, medians,
# max_memory_allocated): backbone eval at batch 1 and 8, fp32 and AMP; the Faster R-CNN
# training step at batch 2 and 8, AMP off and on; ScaleNet's rows shipped / fair / on / plain.
# Writes report.md and one JSON file per table into a new folder (output/gpu_check, -2, ...).
# A failing step (tests or one table) is recorded and the later ones still run: a GPU may be held
# for minutes only. The command exits non-zero at the end if any step failed.
set -uo pipefail
PY=${PY:-python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device here')" || exit 1
out=output/gpu_check
n=1
while [ -e "$out" ]; do n=$((n + 1)); out=output/gpu_check-$n; done
mkdir -p "$out"
R50=configs/COCO-Detection/faster_rcnn_R50_FPN_1x.yaml
S50=configs/COCO-Detection/faster_rcnn_S50_FPN_1x.yaml
failed="$out/failed_steps.txt"

step() {  # step NAME COMMAND...: run it, record a failure, go on
  local name=$1
  shift
  if ! "$@"; then
    echo "$name" >> "$failed"
    echo "gpu-check: FAILED: $name (exit status recorded in $failed)"
  fi
}

{
  echo "# GPU check"
  echo
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  # what the fp32 rows mean: convs and matmuls may run in TF32 on Ampere and later
  "$PY" -c "import torch; b = torch.backends; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {b.cudnn.version()}; cudnn.allow_tf32={b.cudnn.allow_tf32} (fp32 convs run in TF32 where True), cuda.matmul.allow_tf32={b.cuda.matmul.allow_tf32}, cudnn.benchmark={b.cudnn.benchmark}')"
  echo
  echo '## CUDA tests'
  echo
  echo '```'
  step "CUDA tests" bash -c "'$PY' -m pytest tests/test_cuda.py -q -p no:cacheprovider > '$out/cuda_tests.txt' 2>&1"
  tail -n 5 "$out/cuda_tests.txt"
  echo '```'
  for batch in 1 8; do
    for amp in "" --amp; do
      step "eval batch $batch $amp" "$PY" tools/benchmark.py "$R50" "$S50" --sizes 224x224 --speed 800x1344 \
        --batch "$batch" $amp --rounds 10 --markdown --json "$out/eval_b${batch}${amp:+_amp}.json"
    done
  done
  for batch in 2 8; do
    for amp in "" --amp; do
      step "training batch $batch $amp" "$PY" tools/benchmark.py "$R50" "$S50" --sizes 224x224 \
        --train-speed 800x1344 --train-batch "$batch" $amp --rounds 5 --markdown \
        --json "$out/train_b${batch}${amp:+_amp}.json"
    done
  done
} 2>&1 | tee "$out/report.md"
echo "gpu-check: report in $out/report.md"
if [ -s "$failed" ]; then
  echo "gpu-check: these steps failed: $(paste -sd, "$failed")" >&2
  exit 1
fi
