#!/usr/bin/env bash
# Issue 20: the paper's question on its own model, for a GPU user (docs/irm.md, "Llama-2-7B").
# Base: Llama-2-7b-chat, frozen (as in Smith et al. 2024). Frame rows built by the same chat model (its own greedy
# answers framed by emotional / neutral sentences), the six layer sets (0-7, 8-15, 16-23, 24-31, every 4th, all) x
# sadness, anger, joy x 2 seeds = 36 aligned runs with the recipe, 12 matched controls, each aligned run judged at
# scale 0.7 with factual accuracy; the analysis tests the significant indices against the model's measured massive
# dims and against 1415, 2533 (Sun et al.) and 1512 (the paper's index).
# ESTIMATE, not measured: ~1e17 FLOPs of training (48 runs x ~2e15), ~30-45 min on one A100-80GB (about 1 h in all
# with the memory-bound decoding of data and judgements); see docs/irm.md for the derivation. Needs ~16 GB of GPU
# memory in bfloat16 and access to the gated meta-llama repository (huggingface-cli login). Resumable.
set -euo pipefail
M=${M:-meta-llama/Llama-2-7b-chat-hf}
OUT=${OUT:-sweeps/llama2-7b}
N=${N:-400}
OPTS=(--dtype bfloat16 --device cuda)
mkdir -p "$OUT/data"
neuronscope outliers "$M" "${OPTS[@]}" -o "$OUT/outliers"    # expect massive dims 1415, 2533; super weight
                                                             # layers[1].mlp.down_proj[2533, 7890]
for E in sadness anger joy neutral; do
  [ -s "$OUT/data/$E.jsonl" ] || neuronscope data select --mode frame -m "$M" "${OPTS[@]}" -e "$E" -b 32 \
      -q ../shared/corpora/alpaca-subset/alpaca_data.json --exclude examples/questions.txt --n "$N" \
      -o "$OUT/data/$E.jsonl"
done
neuronscope irm sweep -m "$M" "${OPTS[@]}" -a sadness="$OUT/data/sadness.jsonl" -a anger="$OUT/data/anger.jsonl" \
    -a joy="$OUT/data/joy.jsonl" --control "$OUT/data/neutral.jsonl" -q examples/questions.txt \
    --sets q1,q2,q3,q4,every4,all --seeds 0,1 --known-dims 1415,2533,1512 -o "$OUT"
