#!/usr/bin/env bash
# Train the embedded default model on one GPU in a fixed wall-clock budget: the recipe of the
# shipped weights (models/collab-tiny-llava, see README). Same model, data generator and losses as
# the CPU recipe, with stage 1's per-patch labels from the start and half of its images global;
# for throughput: bf16 autocast, every CPU core but one rendering batches, each rendered scene
# reused for 4 examples, batches of 64, and stages that stop on time, not steps.
#
#   bash scripts/train_embedded_gpu.sh OUT_DIR [STAGE1_SECONDS] [STAGE2_SECONDS]
#
# Environment: DEVICE (default cuda), WORKERS (default: cores - 1), PYTHON (default python3).
set -euo pipefail
out=${1:?usage: bash scripts/train_embedded_gpu.sh OUT_DIR [STAGE1_SECONDS] [STAGE2_SECONDS]}
stage1_s=${2:-215}
stage2_s=${3:-285}
workers=${WORKERS:-$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))}
amp=bfloat16
[[ ${DEVICE:-cuda} == cpu ]] && amp=float32
exec "${PYTHON:-python3}" -m collab.training.train_tiny --out "$out" \
    --device "${DEVICE:-cuda}" --amp-dtype "$amp" --workers "$workers" --scene-reuse 4 \
    --pretrain-batch 64 --tower-global-fraction 0.5 --pretrain-steps 100000 --pretrain-budget-s "$stage1_s" \
    --batch 64 --steps 100000 --budget-s "$stage2_s" --eval-every 2000
