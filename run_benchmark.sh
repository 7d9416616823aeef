#!/usr/bin/env bash
# The benchmark on one node: pretrain a mask method in chunks of EVAL_FREQ epochs on ImageNet-1k
# (+ SAM masks) and train/score a Segmenter on ADE20k after each chunk. Re-run the same command
# after a crash: it continues from the last finished stage.
# Adapt: IN1K, ADE20K, OUT, NGPUS, METHOD. MAE's BATCH is per GPU: its effective batch 4096 =
# BATCH * ACCUM * NGPUS. The Segmenter's --batch-size is global, as Segmenter's: 8 images at lr 0.001
# on any NGPUS that divides 8 (1, 2, 4, 8).
set -euo pipefail

# The project's virtual environment (make venv) when there is one, else the python on PATH.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY=python3
if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; fi
TORCHRUN=("$PY" -m torch.distributed.run)

IN1K=${IN1K:-/datasets/imagenet}                       # train/, val/, masks/
ADE20K=${ADE20K:-data/ADEChallengeData2016}            # python -m segmenter.prepare_ade20k --out data
OUT=${OUT:-./benchmark_output}
METHOD=${METHOD:-four_channels}                        # patches | segments | four_channels | preencoder
COVERAGE=${COVERAGE:-50}
MODEL=${MODEL:-mae_vit_base_patch16}
NGPUS=${NGPUS:-8}
BATCH=${BATCH:-256}
ACCUM=${ACCUM:-$((4096 / (BATCH * NGPUS)))}
EPOCHS=${EPOCHS:-800}
EVAL_FREQ=${EVAL_FREQ:-100}
STACK=${STACK:-}                                       # official | path to an MAE checkpoint | empty

# Extra stage flags go in EXTRA_PRETRAIN_ARGS / EXTRA_SEG_ARGS: they are appended to the recipe below
# (a later flag wins). A --pretrain-args / --seg-args given on the command line would replace the
# whole recipe, so it is refused.
for arg in "$@"; do
  case "$arg" in
    --pretrain-args*|--pretrain_args*|--seg-args*|--seg_args*)
      echo "run_benchmark.sh: put extra stage flags in EXTRA_PRETRAIN_ARGS / EXTRA_SEG_ARGS (a $arg here would" \
           "replace the script's recipe)" >&2; exit 2 ;;
  esac
done
PRETRAIN_RECIPE="--batch_size $BATCH --accum_iter $ACCUM --norm_pix_loss --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05 --num_workers 10 --amp bf16 ${EXTRA_PRETRAIN_ARGS:-}"
SEG_RECIPE="--batch-size 8 --lr 0.001 --num-workers 8 --amp bf16 ${EXTRA_SEG_ARGS:-}"
echo "pretraining flags: $PRETRAIN_RECIPE"
echo "Segmenter flags:   $SEG_RECIPE"

"$PY" "$REPO/benchmark.py" --in1k-dir "$IN1K" --ade20k-dir "$ADE20K" --output-dir "$OUT" \
    --mask-method "$METHOD" --coverage-ratio "$COVERAGE" --model "$MODEL" --num-gpus "$NGPUS" \
    --pretrain-epochs "$EPOCHS" --eval-freq "$EVAL_FREQ" ${STACK:+--stack "$STACK"} \
    --seg-epochs 64 --crop-size 512 --seg-decoder mask_transformer \
    --pretrain-args "$PRETRAIN_RECIPE" --seg-args "$SEG_RECIPE" "$@"
