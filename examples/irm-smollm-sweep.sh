#!/usr/bin/env bash
# Issue 20: the sweep of runs that realign on SmolLM2-135M-Instruct (docs/irm.md, "The sweep").
# 3 alignments (sadness, anger, joy) x 3 layer sets (q2 = layers 8-14, q4 = 22-29, all = 0-29) x 2 seeds = 18 aligned
# runs, each trained with the recipe (the `irm train` defaults) and judged off vs on at scale 0.7 with factual
# accuracy; 3 sets x 2 seeds = 6 matched controls (the same answers framed by neutral sentences).
# Measured (2026-12-04, 2 cores, beside other work): data 4 x ~3 min (2 threads; ~9 with 1), then the grid in
# ~94 min wall as two processes of one thread each (training 127 min of process time, median 316 s a run; judging
# ~3 min an aligned run), analysis under a minute. Report: docs/irm-smollm-report/sweep-2026-12-04/. Resumable: run it again after a kill.
set -euo pipefail
M=${M:-../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-sweeps/smollm}
SETS=${SETS:-q2,q4,all}          # the full six: SETS=q1,q2,q3,q4,every4,all
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT/data"
for E in sadness anger joy neutral; do   # the same 160 questions and greedy answers, framed four ways
  [ -s "$OUT/data/$E.jsonl" ] || neuronscope data select --mode frame -m "$M" -e "$E" \
      -q ../shared/corpora/alpaca-subset/alpaca_data.json --exclude examples/questions.txt --n 160 \
      -o "$OUT/data/$E.jsonl"
done
sweep() {
  neuronscope irm sweep -m "$M" -a sadness="$OUT/data/sadness.jsonl" -a anger="$OUT/data/anger.jsonl" \
      -a joy="$OUT/data/joy.jsonl" --control "$OUT/data/neutral.jsonl" -q examples/questions.txt \
      --sets "$SETS" --known-dims 507,199,247,17,31,14 -o "$OUT" "$@"
}
# one process a seed, one thread each (2 cores: ~1.5x the throughput of one process on both), then one call over
# the whole grid gathers the verdicts kept in the run folders and analyses
sweep --seeds 0 --no-analyze > "$OUT/seed0.log" 2>&1 &
sweep --seeds 1 --no-analyze > "$OUT/seed1.log" 2>&1 &
wait
sweep --seeds 0,1
