#!/usr/bin/env bash
# Continue stage 2 of the embedded model on one GPU from a saved model, in a wall-clock budget.
#   bash scripts/continue_embedded_gpu.sh INIT_MODEL OUT_DIR SECONDS [extra train_tiny options...]
# Environment: DEVICE (default cuda), WORKERS (default: cores - 1), PYTHON (default python3).
set -euo pipefail
init=${1:?usage: bash scripts/continue_embedded_gpu.sh INIT_MODEL OUT_DIR SECONDS [options]}
out=${2:?OUT_DIR}
seconds=${3:?SECONDS}
shift 3
workers=${WORKERS:-$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))}
amp=bfloat16
[[ ${DEVICE:-cuda} == cpu ]] && amp=float32
exec "${PYTHON:-python3}" -m collab.training.train_tiny --init-model "$init" --out "$out" \
    --device "${DEVICE:-cuda}" --amp-dtype "$amp" --workers "$workers" --scene-reuse 4 \
    --batch 192 --lr 5e-4 --steps 100000 --budget-s "$seconds" --eval-every 100000 --curriculum-offset 1200 "$@"
