#!/usr/bin/env bash
# Finetune (or linear-probe) a pretrained encoder on ImageNet-1k, one node, with the MAE paper's
# recommended settings. Works for a checkpoint of any mask method and for the official MAE ones;
# the method is read from the checkpoint.
# Adapt: DATA (train/, val/), CKPT, OUT, NGPUS; keep BATCH * ACCUM * NGPUS = 1024 (the paper's
# effective batch; lr = blr * eff_batch / 256).
set -euo pipefail

# The project's virtual environment (make venv) when there is one, else the python on PATH.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY=python3
if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; fi
TORCHRUN=("$PY" -m torch.distributed.run)

DATA=${DATA:-/datasets/imagenet}
CKPT=${CKPT:-./output_pretrain/checkpoint-799.pth}
OUT=${OUT:-./output_finetune}
SIZE=${SIZE:-base}                    # base | large | huge
NGPUS=${NGPUS:-8}
BATCH=${BATCH:-32}                    # per GPU
ACCUM=${ACCUM:-$((1024 / (BATCH * NGPUS)))}
if [ "$ACCUM" -lt 1 ]; then
  echo "WARNING: BATCH * NGPUS = $((BATCH * NGPUS)) is above the paper's effective batch 1024; using ACCUM=1" >&2
  ACCUM=1
fi
MODE=${MODE:-finetune}                # finetune | linprobe

case "$SIZE" in
  base)  MODEL=vit_base_patch16;  BLR=5e-4; LAYER_DECAY=0.65; DROP_PATH=0.1; EPOCHS=100 ;;
  large) MODEL=vit_large_patch16; BLR=1e-3; LAYER_DECAY=0.75; DROP_PATH=0.2; EPOCHS=50 ;;
  huge)  MODEL=vit_huge_patch14;  BLR=1e-3; LAYER_DECAY=0.75; DROP_PATH=0.3; EPOCHS=50 ;;
  *) echo "SIZE must be base, large or huge" >&2; exit 2 ;;
esac

if [ "$MODE" = linprobe ]; then
  # the paper's linear probing: batch 16384 (512 per GPU x accumulation), LARS, blr 0.1, 90 epochs
  LP_BATCH=${LP_BATCH:-512}
  LP_ACCUM=$((16384 / (LP_BATCH * NGPUS)))
  if [ "$LP_ACCUM" -lt 1 ]; then LP_ACCUM=1; fi
  # main_linprobe.py stops with an error if --accum_iter is more than the steps of an epoch
  "${TORCHRUN[@]}" --standalone --nproc_per_node "$NGPUS" "$REPO/main_linprobe.py" \
      --data_path "$DATA" --finetune "$CKPT" --output_dir "$OUT" --log_dir "$OUT" \
      --model "$MODEL" --cls_token --batch_size "$LP_BATCH" --accum_iter "$LP_ACCUM" \
      --blr 0.1 --weight_decay 0.0 --epochs 90 --warmup_epochs 10 --dist_eval "$@"
else
  "${TORCHRUN[@]}" --standalone --nproc_per_node "$NGPUS" "$REPO/main_finetune.py" \
      --data_path "$DATA" --finetune "$CKPT" --output_dir "$OUT" --log_dir "$OUT" \
      --model "$MODEL" --batch_size "$BATCH" --accum_iter "$ACCUM" \
      --blr "$BLR" --layer_decay "$LAYER_DECAY" --drop_path "$DROP_PATH" --epochs "$EPOCHS" \
      --weight_decay 0.05 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --warmup_epochs 5 --dist_eval "$@"
fi
