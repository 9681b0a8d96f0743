#!/usr/bin/env bash
# GPU check of issue 28 (run on a CUDA machine; nothing is downloaded): full-size FLUX.1 (19 double + 38 single
# blocks, T5-XXL, CLIP-L) and SD 3.5 Large (38 joint blocks, CLIP-L, CLIP-G, T5-XXL) built from config with random
# weights, bfloat16, 1024x1024, 4 steps, N = 3 LoRAs (rank 16, diffusers/PEFT layout). For each model it prints
# benchmarks/bench_dit.py's lines: our Composite vs the set_adapters reference loop (composite_vs_reference), our
# single LoRA vs diffusers' own load_lora_weights (info single_vs_diffusers), Switch, Merge and the LoRA memory.
# One copy of each model is held (--shared-weights: ours is timed first, then the LoRAs go into the same model
# through PEFT for the diffusers references). About 40 GB of GPU memory at most (FLUX.1 + T5-XXL in bf16).
#
#   benchmarks/gpu_check.sh                 # both models, 3 timed rounds each
#   REPEATS=5 MODELS=flux-shape benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'gpu_check.sh needs a CUDA device'; print('device', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
for model in ${MODELS:-flux-shape sd35-shape}; do
  "$PY" benchmarks/bench_dit.py --model "$model" --full --device cuda --dtype bfloat16 --size 1024 --steps 4 --n 3 \
    --repeats "${REPEATS:-3}" --shared-weights --clock wall
done
