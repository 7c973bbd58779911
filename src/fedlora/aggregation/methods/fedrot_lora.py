"""FedRot-LoRA-style rotation alignment: rotate each client's factors onto the global ones, then average.

Zhang, Kim, Cha and Vikalo, "FedRot-LoRA: Mitigating Rotational Misalignment in Federated LoRA",
arXiv 2602.23638. A LoRA product does not change under an orthogonal R (r×r):
(B_u R)(Rᵀ A_u) = B_u A_u, so clients can express similar updates in rotated latent bases, and
FedIT's factor-wise average of misaligned factors cancels out. Before averaging, each client's pair
is rotated by the orthogonal R_u that best aligns it with the previous global adapter (A_g, B_g):
    R_u = argmin_{RᵀR = I} ‖B_u R − B_g‖²_F + ‖Rᵀ A_u − A_g‖²_F = argmax tr(Rᵀ N_u),
    N_u = B_uᵀ B_g + A_u A_gᵀ (r, r),   N_u = U S Vᵀ (SVD)  ⇒  R_u = U Vᵀ
(the orthogonal Procrustes solution; Schönemann 1966), then
    Ā = Σ_u w_u R_uᵀ A_u,   B̄ = Σ_u w_u B_u R_u   (FedIT on the aligned pairs).
Each client's product, hence the target T = Σ_u w_u B_u A_u, is unchanged. If the clients are
rotated copies of one adapter, (B R_u, R_uᵀ A), then N_u = R_uᵀ N_0 and B_u R_u = B U_0 V_0ᵀ is
the same for every u: the aligned average is exact where FedIT's is not.

This implementation aligns on the server (the server holds the uploads and A_g, B_g) at full
strength, against the previous global adapter, per module; the paper's alignment-strength and
reference-model choices are not reproduced. Communication equals FedIT's; the server needs each
client's factors (no secure aggregation). :func:`align_to_global` is reused by flora-na's
``align="rotation"`` option.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.aggregation.methods.fedit import fedit_average
from fedlora.aggregation.registry import register_method
from fedlora.aggregation.types import Adapter, AggregationResult, ClientUpdate, LoraPair, TrainingPolicy


def procrustes_rotation(pair: LoraPair, reference: LoraPair) -> Tensor:
    """The orthogonal R (r, r) maximising tr(Rᵀ N), N = BᵀB_ref + A A_refᵀ: ``pair`` rotated onto ``reference``."""
    N = pair.B.T @ reference.B + pair.A @ reference.A.T  # (r, r)
    U, _, Vh = torch.linalg.svd(N)  # (r, r), (r,), (r, r)
    return U @ Vh  # (r, r)


def align_to_global(global_adapter: Adapter, updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    """Every client's pairs rotated onto the global adapter's: (B_u R_u, R_uᵀ A_u), products unchanged."""
    aligned = []
    for update in updates:
        adapter: Adapter = {}
        for module, pair in update.adapter.items():
            R = procrustes_rotation(pair, global_adapter[module])  # (r, r)
            adapter[module] = LoraPair(A=R.T @ pair.A, B=pair.B @ R)  # (r, k), (d, r)
        aligned.append(ClientUpdate(adapter, update.num_examples, update.client_id))
    return aligned


@register_method(
    "fedrot-lora",
    policy=TrainingPolicy(),
    summary="rotate each client's (B, A) onto the global adapter (Procrustes), then FedIT",
    source="after Zhang et al., 2026 (FedRot-LoRA)",
)
def fedrot_lora(global_adapter: Adapter, updates: Sequence[ClientUpdate], weights: Tensor) -> AggregationResult:
    return AggregationResult(adapter=fedit_average(align_to_global(global_adapter, updates), weights))
