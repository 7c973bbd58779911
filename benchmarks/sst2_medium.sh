#!/usr/bin/env bash
# Medium real run for the README: SST-2, 10 clients, Dirichlet alpha = 0.5, 20 rounds,
# flora-na vs fedit vs the svd optimum, all-MiniLM-L6-v2 on CPU. Usage: bash benchmarks/sst2_medium.sh [OUT]
set -euo pipefail
OUT=${1:-runs/sst2-medium}
DATA=${FEDLORA_DATA_DIR:-../shared/data/glue}
for method in flora-na fedit svd; do
  fedlora run --task sst2 --data-dir "$DATA" --method "$method" --clients 10 --alpha 0.5 --rounds 20 \
    --local-steps 5 --batch-size 16 --max-length 48 --lr 5e-3 --eval-local-every 10 --seed 0 --out "$OUT/$method"
done
fedlora compare "$OUT/flora-na" "$OUT/fedit" "$OUT/svd" --out "$OUT"
