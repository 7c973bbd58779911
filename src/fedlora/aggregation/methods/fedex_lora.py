"""FedEx-LoRA: FedIT plus the exact residual merged into the frozen weight.

Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models", 2024, arXiv 2410.09432 (Eq. 5–6):  Ā, B̄ as FedIT and
ΔW_res = Σ_u w_u B_u A_u − B̄Ā,  merged as W0 ← W0 + s·ΔW_res.  Exact (zero divergence),
but every client downloads a dense (d, k) residual per module each round.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fedlora.aggregation.methods.common import target_product
from fedlora.aggregation.methods.fedit import fedit_average
from fedlora.aggregation.registry import register_method
from fedlora.aggregation.types import Adapter, AggregationResult, ClientUpdate, TrainingPolicy


@register_method(
    "fedex-lora",
    policy=TrainingPolicy(download_residual=True),
    summary="FedIT + residual T - B̄Ā merged into W0",
    source="Singhal et al., 2024",
)
def fedex_lora(global_adapter: Adapter, updates: Sequence[ClientUpdate], weights: Tensor) -> AggregationResult:
    adapter = fedit_average(updates, weights)
    residual = {
        module: target_product(updates, module, weights) - pair.B @ pair.A  # (d, k)
        for module, pair in adapter.items()
    }
    return AggregationResult(adapter=adapter, base_delta=residual)
