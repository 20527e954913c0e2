#!/usr/bin/env bash
# Train the natural-scenes model (sag.data.natural) and its three evaluators on one CUDA GPU, then measure the model
# card, in one go (about 7 minutes on an H200: 418 s for the shipped model's first run):
#   bash experiments/retrain_natural.sh [OUT_DIR]     -> OUT_DIR/{model/export, evaluators/<kind>, card/quality.json}
# The evaluators train on the GPU beside the diffusion model (they are small: the GPU is shared, the CPU draws their
# batches); the noise-aware classifier starts from the clean one. Budgets are wall-clock (train.max_minutes,
# <kind>.max_minutes); the step counts reached are in the logs and config.json files. SMOKE=1 runs every command at
# toy size on the CPU in about a minute (the check that the script works; its numbers mean nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/natural}
py=${PYTHON:-python3}
mkdir -p "$out"
if [ "${SMOKE:-0}" = 1 ]; then
  dev=cpu; prec=fp32; n=10; steps=2
  model_args="data.pool_size=256 data.workers=1 unet.block_out_channels=[16,32,32] unet.layers_per_block=1 \
    unet.attention_head_dim=8 train.batch_size=8 train.max_steps=3 train.ckpt_every=2 threads=1"
  eval_args="eval_size=64 classifier.steps=2 noisy_classifier.steps=2 segmenter.steps=2 classifier.max_minutes=null \
    noisy_classifier.max_minutes=null segmenter.max_minutes=null threads=1"
else
  dev=cuda; prec=bf16; n=1000; steps=50
  # (64, 128, 128) channels, 2 resnets per level, attention at 16x16 and 8x8 (8 heads of 16 at 128 channels)
  model_args="data.pool_size=300000 data.workers=12 unet.block_out_channels=[64,128,128] unet.layers_per_block=2 \
    unet.attention_head_dim=16 train.batch_size=512 train.lr=0.0003 train.warmup_steps=300 train.ema_decay=0.9995 \
    train.max_minutes=${TRAIN_MINUTES:-6.0} train.ckpt_every=1000 threads=4"
  eval_args="eval_size=2000 classifier.batch_size=256 classifier.steps=100000 classifier.max_minutes=2.2 \
    noisy_classifier.batch_size=256 noisy_classifier.steps=100000 noisy_classifier.max_minutes=3.0 \
    segmenter.batch_size=128 segmenter.steps=100000 segmenter.max_minutes=4.5 threads=2"
fi
common_eval="domain=natural-scenes device=$dev progress=false"
# shellcheck disable=SC2086
"$py" -m experiments.train_evaluators out_dir="$out/evaluators" kinds=[classifier,noisy_classifier] $common_eval \
  $eval_args > "$out/evaluators_classifiers.log" 2>&1 &
cls=$!
# shellcheck disable=SC2086
"$py" -m experiments.train_evaluators out_dir="$out/evaluators_seg" kinds=[segmenter] $common_eval $eval_args \
  > "$out/evaluators_segmenter.log" 2>&1 &
seg=$!
# shellcheck disable=SC2086
"$py" -m experiments.train out_dir="$out/model" device=$dev precision=$prec data.domain=natural-scenes progress=false \
  $model_args 2>&1 | tee "$out/train.log" | tail -n 20
wait $cls $seg || { tail -n 30 "$out"/evaluators_*.log; exit 1; }
rm -rf "$out/evaluators/segmenter" && mv "$out/evaluators_seg/segmenter" "$out/evaluators/segmenter"
tail -n 3 "$out"/evaluators_*.log
"$py" -m experiments.model_card --model-dir "$out/model/export" --evaluators "$out/evaluators" --device $dev \
  --n $n --steps $steps --out "$out/card/quality.json"
