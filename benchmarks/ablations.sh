#!/usr/bin/env bash
# The four ablation grids of docs/results.md, three seeds each, in the order they were run.
# Their centre points (alpha=0.5, U=10, r=8, the ALS and AdamW-200 solvers) are exactly the headline
# grid's SST-2 runs, so --reuse copies those instead of training them again: run the headline first
# (fedlora bench --preset headline --workers 2). Two runs at a time with one torch thread each is
# ~1.35x faster than one run with two threads on a 2-core CPU; drop --workers 2 on a GPU.
# Usage: bash benchmarks/ablations.sh [extra fedlora bench options, e.g. --seeds 0]
set -euo pipefail
FEDLORA=${FEDLORA:-fedlora}
for preset in ablation-alpha ablation-solver ablation-rank ablation-clients; do
    "$FEDLORA" bench --preset "$preset" --workers 2 --reuse results/headline "$@"
done
