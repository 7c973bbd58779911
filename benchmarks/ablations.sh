#!/usr/bin/env bash
# The four ablation grids of docs/results.md, one seed each, in the order they were run.
# Their centre points (alpha=0.5, U=10, r=8, the ALS and AdamW-200 solvers, seed 0) are exactly the
# headline grid's SST-2 runs, so --reuse copies those instead of training them again.
# Usage: bash benchmarks/ablations.sh [extra fedlora bench options, e.g. --seeds 0 1 2]
set -euo pipefail
FEDLORA=${FEDLORA:-fedlora}
for preset in ablation-alpha ablation-solver ablation-rank ablation-clients; do
    "$FEDLORA" bench --preset "$preset" --seeds 0 --reuse results/headline "$@"
done
