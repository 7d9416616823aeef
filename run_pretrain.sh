#!/usr/bin/env bash
# MAE pretraining on ImageNet-1k with SAM masks, one node.
# Adapt: DATA (train/, masks/), OUT, NGPUS, and BATCH so that BATCH * NGPUS * ACCUM = 4096
# (the paper's effective batch; the lr follows it: lr = blr * eff_batch / 256).
set -euo pipefail

# The project's virtual environment (make venv) when there is one, else the python on PATH.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY=python3
if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; fi
TORCHRUN=("$PY" -m torch.distributed.run)

DATA=${DATA:-/datasets/imagenet}          # holds train/<class>/<img>, masks/<class>/<stem>.json
OUT=${OUT:-./output_pretrain}
METHOD=${METHOD:-four_channels}           # patches | segments | four_channels | preencoder
COVERAGE=${COVERAGE:-50}                  # percent of the image the hidden SAM segment should cover
MODEL=${MODEL:-mae_vit_base_patch16}
NGPUS=${NGPUS:-8}
BATCH=${BATCH:-256}                       # per GPU; ViT-B bf16 fits 256 on 80 GB, ViT-L 128
ACCUM=${ACCUM:-2}
EPOCHS=${EPOCHS:-800}

"${TORCHRUN[@]}" --standalone --nproc_per_node "$NGPUS" "$REPO/main_pretrain.py" \
    --data_path "$DATA" --output_dir "$OUT" --log_dir "$OUT" \
    --model "$MODEL" --mask_method "$METHOD" --coverage_ratio "$COVERAGE" \
    --batch_size "$BATCH" --accum_iter "$ACCUM" \
    --norm_pix_loss --mask_ratio 0.75 \
    --epochs "$EPOCHS" --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05 \
    --num_workers 10 --amp bf16 "$@"
