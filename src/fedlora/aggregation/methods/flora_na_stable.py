"""FLoRA-NA, stabilised: ridge toward FedIT's p = q = 1 and a bound on how far p, q may move.

FLoRA-NA (Nguyen et al., arXiv 2509.26399, Eq. 6; :mod:`fedlora.aggregation.methods.flora_na`)
chooses client coefficients p, q so that B̂(q) Â(p) ≈ T = Σ_u w_u B_u A_u. On some rounds the exact
minimiser drives p, q far from 1 and inflates the broadcast factors (large ‖Â‖, ‖B̂‖ with a small
product error), which local training then starts from. This variant solves, with the same
Gram-form ALS,
    min_{p, q}  L(p, q) + λ (‖p − 1‖² + ‖q − 1‖²),   λ = ridge × κ
(κ the mean diagonal of the U×U normal matrices at p = q = 1, so ``ridge`` is dimensionless; see
:mod:`fedlora.aggregation.methods.flora_na_als`), then, if max|p − 1| or max|q − 1| still exceeds
``max_deviation``, scales the step from (1, 1) back along the segment to the solution, keeping the
grid point t ∈ [0, t_max] of least L (t = 0, FedIT, included). Both stages keep
L ≤ L(1, 1) = FedIT's objective. Defaults ``RIDGE`` and ``MAX_DEVIATION`` below are a starting
point, to be retuned from experiments. Communication equals FedIT's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from torch import Tensor

from fedlora.aggregation.methods.flora_na import flora_na
from fedlora.aggregation.options import AtLeast
from fedlora.aggregation.registry import register_method
from fedlora.aggregation.types import Adapter, AggregationResult, ClientUpdate

RIDGE = 1.0  # λ = RIDGE × mean curvature of L in one coefficient at FedIT
MAX_DEVIATION = 0.5  # max|p − 1|, |q − 1| after the step-back


@register_method(
    "flora-na-stable",
    summary="FLoRA-NA with a ridge toward p = q = 1 and a bounded step from FedIT; never worse than FedIT",
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
    rebalance: bool = False,
) -> AggregationResult:
    return flora_na(
        global_adapter, updates, weights, weighting=weighting, solver="als", scope=scope, max_sweeps=max_sweeps,
        tol=tol, ridge=ridge, max_deviation=max_deviation, align=align, rebalance=rebalance,
    )
