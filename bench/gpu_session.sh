#!/usr/bin/env bash
# The accelerator checks in two parts that each fit a 10-minute command (cold inductor compiles of ViT-L take
# minutes). Results (JSON + Markdown) go to ${OUT:-bench/results}.
#   bash bench/gpu_session.sh 1   # correctness (bench/cuda_check.py) + the headline jobs: ViT-L b64 bf16
#                                 # (baseline / eager / compile), checkpointing scopes, loader
#   bash bench/gpu_session.sh 2   # the rest of the gpu suite: ViT-B b32/b64, ViT-L b32, fp16, max-autotune
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
case "${1:-1}" in
  1)
    $PY bench/cuda_check.py > "$OUT_DIR/cuda_check.json" || echo "cuda_check: FAILED (see $OUT_DIR/cuda_check.json)"
    cat "$OUT_DIR/cuda_check.json"
    $PY bench/run.py --suite gpu --out "$OUT_DIR" \
      --only gpu_vit_large_b64_bf16,gpu_vit_large_b32_bf16_ckpt,gpu_loader > /dev/null || echo "some jobs failed"
    ;;
  2)
    $PY bench/run.py --suite gpu --out "$OUT_DIR" \
      --only gpu_vit_base_b32_bf16,gpu_vit_base_b64_bf16,gpu_vit_large_b32_bf16,gpu_vit_large_b32_fp16,gpu_vit_large_b64_bf16_modes \
      > /dev/null || echo "some jobs failed"
    ;;
  *) echo "usage: $0 1|2" >&2; exit 2 ;;
esac
cat "$OUT_DIR"/gpu-*.md | tail -n 60
