#!/usr/bin/env bash
# Cost benchmarks on one CUDA GPU, no network, about 5 minutes on an H100/H200 (sd3, flux: ~1 min each):
#   bash benchmarks/gpu.sh [OUT_DIR]        -> OUT_DIR/tables/bench.parquet (appends) + the printed tables
# Needs PyTorch with CUDA. Runs the installed package (`python -m benchmarks.cost`, installed with sag-lab). If
# $PYTHON (default python3) cannot import it, this checkout is installed into $PYTHON's environment first
# (editable, offline, without dependencies: PyTorch comes with the machine), together with the wheels in .whl/
# if any (diffusers, hydra-core, omegaconf, antlr4: see BENCHMARKS.md, "Running the GPU benchmark"). Use a
# virtual environment's python as PYTHON where the system one refuses installs.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/bench_gpu}
py=${PYTHON:-python3}
if ! (cd / && "$py" -c "import benchmarks.cost") > /dev/null 2>&1; then
  wheels=()
  if compgen -G ".whl/*.whl" > /dev/null; then wheels=(.whl/*.whl); fi
  "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir ${wheels[@]+"${wheels[@]}"} -e .
  (cd / && "$py" -c "import benchmarks.cost")  # fails loudly if a dependency is still missing
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# SD-1.5-scale UNet (860M, random weights), fp16, 4x64x64 latents: guidance cost + capture at a 64x64 grid
"$py" -m benchmarks.cost --preset sd15 --latent 64 --device cuda --dtype float16 --steps 10 --batch 4 --repeats 3 --out "$out"
# the same UNet on 32x32 latents: capture overhead at a 32x32 token grid
"$py" -m benchmarks.cost --preset sd15 --latent 32 --device cuda --dtype float16 --steps 10 --batch 8 --repeats 3 \
  --benchmarks capture --out "$out"
# SDXL base UNet (2.6B, random weights), fp16, 4x128x128 latents (1024 px), SAG on the first mid-block attn1
"$py" -m benchmarks.cost --preset sdxl --latent 128 --device cuda --dtype float16 --steps 10 --batch 2 --repeats 3 \
  --benchmarks guidance --out "$out"
# SD3 medium MMDiT (2.03B, random weights), fp16, 16x128x128 latents (1024 px), SAG on transformer_blocks.13.attn
# (PAG/SEG/SLG refuse or fail on joint attention: not in --kinds)
"$py" -m benchmarks.cost --preset sd3 --latent 128 --device cuda --dtype float16 --steps 10 --batch 2 --repeats 3 \
  --kinds sag,blur,cfg,sag_cfg --benchmarks guidance --out "$out"
# FLUX.1-dev transformer (11.9B, random weights; 48 GB while built in float32), bf16 (its native dtype), 1024 px =
# 4096 packed tokens + 512 T5 rows, SAG on single_transformer_blocks.9.attn, no CFG (guidance-distilled)
"$py" -m benchmarks.cost --preset flux --latent 128 --device cuda --dtype bfloat16 --steps 10 --batch 1 --repeats 3 \
  --kinds sag,blur --benchmarks guidance --out "$out"
# ADM ImageNet-128 conditional architecture (421.5M, random weights), fp16, SAG at output_blocks[8] (32x32)
"$py" -m benchmarks.cost --preset adm128 --device cuda --dtype float16 --steps 10 --batch 8 --repeats 3 --out "$out"
# the embedded model (shipped weights), fp32, batch 64
"$py" -m benchmarks.cost --preset embedded --device cuda --dtype float32 --steps 20 --batch 64 --repeats 3 --out "$out"
# ours vs diffusers' StableDiffusionSAGPipeline on the tiny offline SD (launch-bound on a GPU: it measures what each side
# does around the UNet calls); last, as it has not run on a GPU yet
"$py" -m benchmarks.pipeline --device cuda --steps 20 --batch 4 --repeats 11 --out "$out"
echo "wrote $out/tables/bench.parquet"
