"""FFA-LoRA: A frozen at its shared random init, only B is trained and averaged.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
arXiv 2403.12313:  A = A_g (never changes),  B̄ = Σ_u w_u B_u.  Because every client shares
A, B̄ A_g = Σ_u w_u B_u A_g exactly: zero divergence, bought with half the trainable parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fedlora.aggregation.methods.common import weighted_mean
from fedlora.aggregation.registry import register_method
from fedlora.aggregation.types import Adapter, AggregationResult, ClientUpdate, LoraPair, TrainingPolicy


@register_method(
    "ffa-lora",
    policy=TrainingPolicy(train_A=False, upload_A=False, needs_individual_updates=False),
    summary="A frozen at its init, average B",
    source="Sun et al., ICLR 2024",
)
def ffa_lora(global_adapter: Adapter, updates: Sequence[ClientUpdate], weights: Tensor) -> AggregationResult:
    out: Adapter = {}
    for module, pair in global_adapter.items():
        B = weighted_mean([u.adapter[module].B for u in updates], weights)  # (d, r)
        out[module] = LoraPair(A=pair.A.clone(), B=B)
    return AggregationResult(adapter=out)
