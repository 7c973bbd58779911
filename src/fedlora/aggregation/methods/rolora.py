"""RoLoRA: alternate which LoRA factor the clients train, so that averaging is exact every round.

Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA" (RoLoRA),
NeurIPS 2025, arXiv 2502.01755. In round t (1-based) every client trains and uploads one factor
while the other stays frozen at the global value (the paper's alternating minimisation):
    odd t:   A frozen at A_g, train B:   B̄ = Σ_u w_u B_u,   Σ_u w_u B_u A_g = B̄ A_g   (exact)
    even t:  B frozen at B_g, train A:   Ā = Σ_u w_u A_u,   Σ_u w_u B_g A_u = B_g Ā   (exact)
B trains first because PEFT initialises B = 0, where A's gradient is zero. (The paper writes
ΔW = A B with the roles of the letters swapped; here B is (d, r) and A is (r, k).)

The server's work is FedIT's factor-wise average (:func:`fedit_average`): since the frozen factor is
the same on every client, its average is itself (up to float64 round-off, which vanishes in the
float32 broadcast), and the product of the averages is the average of the products: zero divergence.
The alternation lives in the policy (``alternate=True``, read by the engines via
``policy.for_round(t)``): up is d·r in odd rounds and r·k in even rounds per client; down is always
both factors (``download_full_adapter``), so a client starting a round always holds the current
global adapter. Only sums are needed (secure aggregation works).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fedlora.aggregation.methods.fedit import fedit_average
from fedlora.aggregation.registry import register_method
from fedlora.aggregation.types import Adapter, AggregationResult, ClientUpdate, TrainingPolicy


@register_method(
    "rolora",
    policy=TrainingPolicy(alternate=True, download_full_adapter=True, needs_individual_updates=False),
    summary="alternate: train/average B in odd rounds, A in even rounds; exact",
    source="Chen et al., 2025 (RoLoRA)",
)
def rolora(global_adapter: Adapter, updates: Sequence[ClientUpdate], weights: Tensor) -> AggregationResult:
    # Which factor moved this round is the engines' business (policy.for_round); the average of
    # the frozen one is itself, so one factor-wise average serves both kinds of round.
    return AggregationResult(adapter=fedit_average(updates, weights))
