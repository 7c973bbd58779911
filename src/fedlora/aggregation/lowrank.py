"""Exact linear algebra on sums of low-rank products, never forming a (d, k) matrix.

A sum of products Σ_j B_j A_j is one product F @ E with F = [B_1 … B_m] (d, m·r) stacked
side by side and E = [A_1; …; A_m] (m·r, k) stacked on top. With thin QRs F = Q_F R_F and
Eᵀ = Q_E R_E, F @ E = Q_F (R_F R_Eᵀ) Q_Eᵀ, so its Frobenius norm and its singular values are
those of the small core R_F R_Eᵀ. This is accurate (no squared Gram cancellation) and costs
O((d + k)(m r)²) instead of O(d k m r).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class CoreFactorization:
    """F @ E = Q_F @ core @ Q_Eᵀ."""

    Q_F: Tensor  # (d, m)
    core: Tensor  # (m, m')
    Q_E: Tensor  # (k, m')


def stack_factors(Bs: Sequence[Tensor], As: Sequence[Tensor], coeffs: Sequence[float] | Tensor) -> tuple[Tensor, Tensor]:
    """F = [c_1 B_1 … c_m B_m] (d, m r) and E = [A_1; …; A_m] (m r, k), so F @ E = Σ c_j B_j A_j."""
    F = torch.cat([c * B for c, B in zip(coeffs, Bs)], dim=1)  # (d, m r)
    E = torch.cat(list(As), dim=0)  # (m r, k)
    return F, E


def core_factorization(F: Tensor, E: Tensor) -> CoreFactorization:
    Q_F, R_F = torch.linalg.qr(F)  # (d, m), (m, m r)
    Q_E, R_E = torch.linalg.qr(E.T)  # (k, m'), (m', m r)
    return CoreFactorization(Q_F, R_F @ R_E.T, Q_E)


def product_norm(F: Tensor, E: Tensor) -> float:
    """‖F @ E‖_F without forming the product."""
    return float(torch.linalg.matrix_norm(core_factorization(F, E).core))


def singular_values(F: Tensor, E: Tensor) -> Tensor:
    """Singular values of F @ E, descending."""
    return torch.linalg.svdvals(core_factorization(F, E).core)


def truncated_svd_factors(F: Tensor, E: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Best rank-``rank`` approximation of F @ E (Eckart–Young), split as B (d, r) @ A (r, k).

    The singular values are shared evenly: B = U_r √Σ_r, A = √Σ_r V_rᵀ, so neither factor
    dwarfs the other (the balanced split LoRA training is most stable from). If F @ E has rank
    below ``rank`` the trailing directions are zero-padded. Returns (B, A, all singular values).
    """
    fact = core_factorization(F, E)
    U, S, Vh = torch.linalg.svd(fact.core, full_matrices=False)  # (m, s), (s,), (s, m')
    keep = min(rank, S.shape[0])
    root = S[:keep].sqrt()
    B = torch.zeros(F.shape[0], rank, dtype=F.dtype)
    A = torch.zeros(rank, E.shape[1], dtype=E.dtype)
    B[:, :keep] = fact.Q_F @ (U[:, :keep] * root)  # (d, keep)
    A[:keep] = (root[:, None] * Vh[:keep]) @ fact.Q_E.T  # (keep, k)
    return B, A, S


def tail_energy(S: Tensor, rank: int) -> float:
    """Σ_{i > rank} σ_i²: the squared error of the best rank-``rank`` approximation."""
    return float((S[rank:] ** 2).sum())
