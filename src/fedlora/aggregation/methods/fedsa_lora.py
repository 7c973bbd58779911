"""FedSA-LoRA: share A only; every client keeps its own B.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025,
arXiv 2410.01463:  Ā = Σ_u w_u A_u is broadcast; B_u never leaves client u (A learns general
knowledge, B client-specific). The server's B̄ = Σ_u w_u B_u is used only to evaluate one
global model; clients continue from their own B_u.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fedlora.aggregation.methods.fedit import fedit_average
from fedlora.aggregation.registry import register_method
from fedlora.aggregation.types import Adapter, AggregationResult, ClientUpdate, TrainingPolicy


@register_method(
    "fedsa-lora",
    policy=TrainingPolicy(upload_B=False, local_B=True, needs_individual_updates=False),
    summary="share A, keep B local; server B = mean, for evaluation only",
    source="Guo et al., ICLR 2025",
)
def fedsa_lora(global_adapter: Adapter, updates: Sequence[ClientUpdate], weights: Tensor) -> AggregationResult:
    # The server needs the clients' B only to report a global model and its divergence; in a
    # deployment that evaluation would use the clients' own B and no B would be uploaded.
    return AggregationResult(adapter=fedit_average(updates, weights))
