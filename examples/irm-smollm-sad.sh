#!/usr/bin/env bash
# The issue-13 recipe: a sadness IRM on SmolLM2-135M-Instruct on a CPU (docs/irm.md, "Results on SmolLM2").
# Data ~9 min (the model answers 160 Alpaca questions), training ~8 min (60 steps, 1 thread), eval ~4 min.
set -euo pipefail
M=${M:-../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-runs/smollm-sad}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
# 1. the frozen model's own greedy answers, framed by sad first-person sentences (held-out questions excluded)
neuronscope data select --mode frame -m "$M" -e sadness -q ../shared/corpora/alpaca-subset/alpaca_data.json \
    --exclude examples/questions.txt --n 160 -o "$OUT/sad-frame.jsonl"
# 2. the IRM: `irm train`'s defaults are this recipe (all layers, width 256, lr 1e-3, 60 steps of 4 rows, 192 tokens,
#    validation every 10 steps, patience 3, chat as the rows were built); best by validation loss
neuronscope irm train -m "$M" --data "$OUT/sad-frame.jsonl" --alignment sadness -o "$OUT/run"
# 3. judged on 40 held-out questions, IRM off vs on (same greedy decoding), the IRM's output at 0.7 (the recipe's
#    dose: at 1.0 sadness is x32 but repetition x2.2); also factual accuracy on 40 built-in questions and the share of
#    answers that open with the same sentence (memorised frames)
neuronscope irm eval "$OUT/run" -m "$M" --judge builtin -q examples/questions.txt --limit 40 --target sadness --scale 0.7
