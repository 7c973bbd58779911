"""FedIT: federated averaging of each LoRA factor separately.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning" (FedIT),
ICASSP 2024, arXiv 2305.05644:  Ā = Σ_u w_u A_u,  B̄ = Σ_u w_u B_u.
The product B̄Ā ≠ Σ_u w_u B_u A_u in general: that gap is the aggregation divergence.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fedlora.aggregation.methods.common import balanced, factors, weighted_mean
from fedlora.aggregation.registry import register_method
from fedlora.aggregation.types import Adapter, AggregationResult, ClientUpdate, LoraPair, TrainingPolicy


def fedit_average(updates: Sequence[ClientUpdate], weights: Tensor) -> Adapter:
    """Factor-wise weighted average, shared by FedIT, FedEx-LoRA and FedSA-LoRA."""
    out: Adapter = {}
    for module in updates[0].adapter:
        Bs, As = factors(updates, module)
        out[module] = LoraPair(A=weighted_mean(As, weights), B=weighted_mean(Bs, weights))
    return out


@register_method(
    "fedit",
    policy=TrainingPolicy(needs_individual_updates=False),
    summary="FedAvg of A and B separately",
    source="Zhang et al., ICASSP 2024",
)
def fedit(
    global_adapter: Adapter, updates: Sequence[ClientUpdate], weights: Tensor, *, rebalance: bool = False
) -> AggregationResult:
    # rebalance=True: the same product B̄Ā re-split into balanced factors (as svd writes its result), which
    # isolates the factor balance from the product when comparing FedIT with svd.
    adapter = fedit_average(updates, weights)
    return AggregationResult(adapter=balanced(adapter) if rebalance else adapter)
