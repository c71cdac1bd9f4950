#!/usr/bin/env bash
# One device call: train the embedded model with the GPU recipe, evaluate it on the calibration
# split, and leave three files in $OUT (model.tar, train.log, eval_1001.json): under 600 s on an
# H200 (the recipe's budgets are 440 s). Prepared so that a session lent a GPU spends its lease
# training, not debugging.
#
# The device image has torch, transformers, numpy, pillow and PyYAML but not pydantic. Once, here,
# in the repository root (the wheels are ignored by git and travel with `carry`):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# then the device call: run(command="bash scripts/device_train.sh", carry=[".whl"], timeout_s=600).
#
# Here, to check the script on a CPU (the same code path, 2 steps a part; about 4 min, bf16 is slow on a CPU):
#   OUT=/tmp/device_out SETS="runtime.device=cpu runtime.workers=0 tower.steps=2 \
#     vlm.steps=2 monitor.batches=1 monitor.attention_items=2 continuations=[{\"seed\":1,\"vlm\":{\"steps\":2}}]" EVAL_SPLIT=1001:4 bash scripts/device_train.sh
set -euo pipefail
: "${OUT:?set OUT to the folder whose files come back}"
RUN=${RUN:-runs/device_train}
EVAL_SPLIT=${EVAL_SPLIT:-1001:200}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ! "$PYTHON" -c "import pydantic" 2>/dev/null && [ -d .whl ]; then  # the device image lacks it
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
overrides=()
for kv in ${SETS:-}; do overrides+=(--set "$kv"); done
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/train.log"; fi
start=$(date +%s)
"$PYTHON" -m collab.training --recipe configs/training/embedded_gpu.yaml --out "$RUN" "${overrides[@]}" 2>&1 |
  tr '\r' '\n' | grep --line-buffered -v -E "[0-9]+/[0-9]+ \[[0-9:]+<" | tee -a "$OUT/train.log"
echo "training wall time: $(($(date +%s) - start)) s" | tee -a "$OUT/train.log"
tar -cf "$OUT/model.tar" -C "$(dirname "$RUN")" "$(basename "$RUN")"
device=cpu
if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then device=cuda; fi
"$PYTHON" -m collab.eval --synthetic "$EVAL_SPLIT" --model "$RUN" --layers 0 --policies never,always \
  --set "model.device=$device" --out "$RUN/eval" 2>&1 | tr '\r' '\n' | grep -v -E "[0-9]+/[0-9]+ \[[0-9:]+<" | tail -40 |
  tee -a "$OUT/train.log"
cp "$RUN/eval/report.json" "$OUT/eval_1001.json"
echo "total wall time: $(($(date +%s) - start)) s" | tee -a "$OUT/train.log"
