#!/usr/bin/env bash
# GPU figures for bench/RESULTS.md, run on a machine with one CUDA GPU from the repository root:
#   bash bench/gpu.sh atlas            # Llama-3.1-8B-shaped atlas decode (random weights; no model needed)
#   bash bench/gpu.sh stats GGUF CORPORA_DIR   # corpus statistics of SmolLM2 vs its plain forward
# Results go to $OUT (or ./gpu-out). Uses the machine's own python3 with torch, and src/ on PYTHONPATH.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src" PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
case "${1:-}" in
  atlas)
    python3 bench/atlas.py --llama8b | tee "$OUT/atlas_llama8b.json" ;;
  stats)
    GGUF=$2; CORPORA=$3
    python3 bench/stats.py --device cuda --batch 256 --tokens 0 --model "$GGUF" --corpora "$CORPORA" \
      --atlas /tmp/ns-gpu-256 --restart --plain-batches 8 --json "$OUT/stats_gpu_b256.json" 2>&1 \
      | grep -v "it/s\]" | tee "$OUT/stats_gpu_b256.log" | tail -40 ;;
  *) echo "usage: bash bench/gpu.sh atlas | stats GGUF CORPORA_DIR"; exit 2 ;;
esac
