"""RoLoRA: alternate which LoRA factor the clients train, so that averaging is exact every round.

Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA" (RoLoRA),
NeurIPS 2025, arXiv 2502.01755. In round t (1-based) every client trains and uploads one factor
while the other stays frozen at the global value (the paper's alternating minimisation):
    odd t:   A frozen at A_g, train B:   B̄ = Σ_u w_u B_u,   Σ_u w_u B_u A_g = B̄ A_g   (exact)
    even t:  B frozen at B_g, train A:   Ā = Σ_u w_u A_u,   Σ_u w_u B_g A_u = B_g Ā   (exact)
B trains first because PEFT initialises B = 0, where A's gradient is zero. (The paper writes
ΔW = A B with the roles of the letters swapped; here B is (d, r) and A is (r, k).)

The server averages the trained factor and keeps the frozen one at the global's, exactly as
``ffa-lora`` keeps A: averaging what every honest client left unchanged would give it back, but
would let one client move the frozen factor (it controls what it sends). The product of the
average and the shared frozen factor is the average of the products: zero divergence (with mixed
client ranks too: a rank-r_u client's trained factor is zero beyond r_u, where its frozen one was cut).
The alternation lives in the policy (``alternate=True``, read by the engines via
``policy.for_round(t)``): up is d·r in odd rounds and r·k in even rounds per client; down is always
both factors (``download_full_adapter``), so a client starting a round always holds the current
global adapter. Only sums are needed (secure aggregation works).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fedlora.aggregation.methods.common import weighted_mean
from fedlora.aggregation.registry import register_method
from fedlora.aggregation.types import Adapter, AggregationResult, ClientUpdate, LoraPair, TrainingPolicy

POLICY = TrainingPolicy(alternate=True, download_full_adapter=True, needs_individual_updates=False)


@register_method(
    "rolora",
    policy=POLICY,
    summary="alternate: train/average B in odd rounds, A in even rounds; exact",
    source="Chen et al., 2025 (RoLoRA)",
)
def rolora(
    global_adapter: Adapter, updates: Sequence[ClientUpdate], weights: Tensor, round_index: int = 1
) -> AggregationResult:
    # round_index is positional (aggregate passes it), not a keyword-only user option: the round
    # decides which factor trained, through the same policy.for_round the engines read.
    half = POLICY.for_round(round_index)
    out: Adapter = {}
    for module, pair in global_adapter.items():
        A = weighted_mean([u.adapter[module].A for u in updates], weights) if half.train_A else pair.A.clone()  # (r, k)
        B = weighted_mean([u.adapter[module].B for u in updates], weights) if half.train_B else pair.B.clone()  # (d, r)
        out[module] = LoraPair(A=A, B=B)
    return AggregationResult(adapter=out)
