"""FLoRA-NA, stabilised: FLoRA-NA's product, broadcast as balanced factors.

FLoRA-NA (Nguyen et al., arXiv 2509.26399, Eq. 6; :mod:`fedlora.aggregation.methods.flora_na`)
chooses client coefficients p, q so that B̂(q) Â(p) ≈ T = Σ_u w_u B_u A_u. On SST-2 it nonetheless
loses accuracy to FedIT (docs/flora_na_diagnosis.md): its global model stays in one-class collapse
longer, while its coefficients, step size and direction are not the cause. What differs between it
and the SVD aggregator (which wins) is how the product is split: FLoRA-NA's Â ends ~2.5x larger than
B̂ (‖Â‖ ≈ 7.1, ‖B̂‖ ≈ 2.9 after 8 rounds), svd's factors are balanced. This variant keeps FLoRA-NA's
broadcast product B̂Â exactly and re-splits it as B̂ = U√Σ, Â = √ΣVᵀ (its truncated SVD, rank ≤ r,
so nothing is lost; :func:`fedlora.aggregation.methods.common.balanced`). The divergence, the
objective L(p, q) ≤ L(1, 1) = FedIT's (ALS never increases it) and the bytes are FLoRA-NA's; only
the factors the next round's local training starts from change. Measured in docs/results.md
("The frontier"): above FedIT on every seed at the headline budget and at 16 rounds.

The ridge toward p = q = 1 and the bound on |p − 1|, |q − 1| (options ``ridge``, ``max_deviation``,
off by default here) remove FLoRA-NA's extreme coefficients on tiny clients at almost no divergence
cost, but did not recover accuracy without the rebalancing (docs/results.md).
"""

from __future__ import annotations

import math

from collections.abc import Sequence
from typing import Annotated, Literal

from torch import Tensor

from fedlora.aggregation.methods.flora_na import flora_na
from fedlora.aggregation.options import AtLeast
from fedlora.aggregation.registry import register_method
from fedlora.aggregation.types import Adapter, AggregationResult, ClientUpdate

RIDGE = 0.0  # λ = RIDGE × mean curvature of L in one coefficient at FedIT (0: plain FLoRA-NA objective)
MAX_DEVIATION = math.inf  # max|p − 1|, |q − 1| after the step-back (inf: no bound)
REBALANCE = True  # broadcast the product as balanced factors


@register_method(
    "flora-na-stable",
    summary="FLoRA-NA's product broadcast as balanced factors (same divergence and bytes); beats FedIT on SST-2",
    source="this project (docs/results.md, the frontier)",
    weightings=("examples", "uniform", "authors"),
)
def flora_na_stable(
    global_adapter: Adapter,
    updates: Sequence[ClientUpdate],
    weights: Tensor,
    *,
    weighting: str = "examples",
    scope: Literal["per-module", "global"] = "per-module",
    max_sweeps: Annotated[int, AtLeast(0)] = 100,
    tol: Annotated[float, AtLeast(0)] = 1e-10,
    ridge: Annotated[float, AtLeast(0)] = RIDGE,
    max_deviation: Annotated[float, AtLeast(0)] = MAX_DEVIATION,
    align: Literal["none", "rotation"] = "none",
    rebalance: bool = REBALANCE,
) -> AggregationResult:
    return flora_na(
        global_adapter, updates, weights, weighting=weighting, solver="als", scope=scope, max_sweeps=max_sweeps,
        tol=tol, ridge=ridge, max_deviation=max_deviation, align=align, rebalance=rebalance,
    )
