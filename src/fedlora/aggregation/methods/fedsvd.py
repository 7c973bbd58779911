"""FedSVD: clients train B only; the server re-factorises B̄ A_g by SVD, so A adapts and stays orthonormal.

Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA",
NeurIPS 2025, arXiv 2505.12805. As in FFA-LoRA, every client freezes the global A_g and trains
and uploads only B_u, so the average is exact: B̄ A_g = Σ_u w_u B_u A_g. The server then
re-factorises that product by its SVD,
    B̄ A_g = U Σ Vᵀ,   A_new = V_rᵀ (r, k, orthonormal rows),   B_new = U_r Σ_r (d, r),
and broadcasts both factors: A follows the principal directions of the aggregate instead of
staying at its random init, and its orthonormal rows bound the gradient norm of B (the point of
the paper under DP-SGD). B_new A_new = B̄ A_g exactly: zero divergence whenever the clients really
trained B only (a client's A_u is ignored; the engines send the frozen A_g back as A_u).

Computed without forming the d×k product: thin QRs B̄ = Q_B R_B (Q_B (d, r)) and A_gᵀ = Q_A R_A
(Q_A (k, r)) give B̄ A_g = Q_B (R_B R_Aᵀ) Q_Aᵀ, and the SVD of the r×r core
R_B R_Aᵀ = U' Σ V'ᵀ gives U = Q_B U', V = Q_A V'. Cost O((d + k) r²) per module.

Rank-deficient B̄ (B = 0 before any training, or clients that did not move): the core's SVD is
taken with ``full_matrices=True``, so V' is a full r×r orthogonal matrix and A_new = V'ᵀ Q_Aᵀ
always has r orthonormal rows (an orthonormal completion of the singular directions with σ = 0),
while B_new = Q_B U' Σ has zero columns there: the product stays exactly B̄ A_g (0 when B̄ = 0)
and A keeps full row rank, so B can still learn every direction in later rounds. With B̄ = 0,
A_new is an orthonormal basis of the row space of A_g (when A_g has full row rank). In the
degenerate shape r > k, A cannot have more than k independent rows: its last r − k rows are zero.

Communication: up d·r per client (B only), down r·k + d·r (both factors, since the server
changes A): ``download_full_adapter``. Only the sum Σ w_u B_u is needed (secure aggregation works).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.aggregation.methods.common import weighted_mean
from fedlora.aggregation.registry import register_method
from fedlora.aggregation.types import Adapter, AggregationResult, ClientUpdate, LoraPair, TrainingPolicy


def svd_refactor(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B_new (d, r), A_new (r, k), σ) with B_new A_new = B @ A, A_new = V_rᵀ orthonormal rows, B_new = U_r Σ_r.

    ``B`` is (d, r) and ``A`` is (r, k); nothing of size d×k is formed. σ are the singular values
    of B @ A, descending (min(d, k, r) of them).
    """
    d, r = B.shape
    k = A.shape[1]
    Q_B, R_B = torch.linalg.qr(B)  # (d, s_B), (s_B, r), s_B = min(d, r)
    Q_A, R_A = torch.linalg.qr(A.T)  # (k, s_A), (s_A, r), s_A = min(k, r)
    core = R_B @ R_A.T  # (s_B, s_A): B @ A = Q_B core Q_Aᵀ
    U, S, Vh = torch.linalg.svd(core, full_matrices=True)  # (s_B, s_B), (m,), (s_A, s_A), m = min(s_B, s_A)
    m = S.shape[0]
    s_A = Vh.shape[0]
    A_new = torch.zeros(r, k, dtype=A.dtype, device=A.device)
    B_new = torch.zeros(d, r, dtype=B.dtype, device=B.device)
    A_new[:s_A] = Vh @ Q_A.T  # (s_A, k): orthonormal rows, the first m are V_mᵀ
    B_new[:, :m] = Q_B @ (U[:, :m] * S)  # (d, m): U_m Σ_m
    return B_new, A_new, S


@register_method(
    "fedsvd",
    policy=TrainingPolicy(train_A=False, upload_A=False, download_full_adapter=True, needs_individual_updates=False),
    summary="train B only; server re-factorises B̄A by SVD: A = V_rᵀ (orthonormal), B = U_rΣ_r",
    source="Lee et al., NeurIPS 2025",
)
def fedsvd(global_adapter: Adapter, updates: Sequence[ClientUpdate], weights: Tensor) -> AggregationResult:
    adapter: Adapter = {}
    singular_values: dict[str, Tensor] = {}
    for module, pair in global_adapter.items():
        B_bar = weighted_mean([u.adapter[module].B for u in updates], weights)  # (d, r)
        B_new, A_new, S = svd_refactor(B_bar, pair.A)  # (d, r), (r, k)
        adapter[module] = LoraPair(A=A_new, B=B_new)
        singular_values[module] = S
    return AggregationResult(adapter=adapter, extras={"singular_values": singular_values})
