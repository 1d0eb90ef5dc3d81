#!/usr/bin/env bash
# One GPU, a few minutes: lorafit and PEFT + TRL on Phi-3-mini's shapes (LoRA bf16 and QLoRA), each
# in its own process; prints tokens/s, torch.cuda.max_memory_allocated and the loss of each run.
# The first run writes Phi-3-mini's random weights (7.6 GB) under $LORAFIT_CACHE/bench.
#   benchmarks/gpu_check.sh [--steps 8] [--warmup 3] [--rows 1] [--only lorafit:defaults,trl:packing]
# Needs a CUDA build of torch, peft, trl and bitsandbytes (pip install -e ".[bench,qlora]").
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device visible')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python benchmarks/gpu_check.py "$@"
