#!/usr/bin/env bash
# The whole head-to-head study of the README's "Results" section, in the order it was run (2 CPU cores,
# about 2.5 hours in all; every step is cached under results/study, so a rerun redoes only what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/study}
PPL="perplexity:source=boolq-wiki,seqlen=128,max_windows=64"

# 1. Quality: twelve methods x 20/30/40/50%, perplexity + seven zero-shot tasks. The eight of the first study take
#    about an hour; SLEB's and BlockPruner's searches take about 1 and 3-4 more (they resume after an interruption).
gisp compare --config benchmarks/configs/quality.yaml --out "$OUT/quality"
# 2. Claims (a) and (b): one-shot GISP beside the quality study's iterative run; (b) reads the quality table.
python benchmarks/study_claims.py --out "$OUT" --claims a,b --json "$OUT/claims_ab.json"
# 3. Cost: wall time, peak memory per method, GISP step / bare forward+backward, speed of the pruned models.
python benchmarks/study_cost.py --out "$OUT"
# 4. Ablations, perplexity only first (the pruning runs are cached for step 6).
python benchmarks/study_ablations.py --out "$OUT" --eval "$PPL" --json "$OUT/ablations_ppl.json"
# 5. Claim (c) at 128 x 128 tokens of each source (the GISP text run is the calibration-size ablation's).
python benchmarks/study_claims.py --out "$OUT" --claims c --task-n-samples 128 --json "$OUT/claims_c.json"
# 6. The normalisation ablation with the quality study's evaluations (perplexity + seven tasks).
python benchmarks/study_ablations.py --out "$OUT" --ablations normalize --json "$OUT/ablations.json"
# 7. Issue 20's methods and GISP with hidden channels (quality_gisp_hidden.yaml's options, run here in the quality
#    folder) against GISP, each difference with its standard error.
python benchmarks/study_methods.py --out "$OUT" --json "$OUT/methods.json"
