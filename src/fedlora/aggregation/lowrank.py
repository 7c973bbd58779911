"""Linear algebra on sums of low-rank products, never forming a (d, k) matrix.

A sum of products Σ_j B_j A_j is one product F @ E with F = [B_1 … B_m] (d, m·r) stacked
side by side and E = [A_1; …; A_m] (m·r, k) stacked on top. From the small Gram matrices
FᵀF = V_F Λ_F V_Fᵀ and E Eᵀ = V_E Λ_E V_Eᵀ we get orthonormal Q_F = F V_F Λ_F^-½ and
Q_E = Eᵀ V_E Λ_E^-½ with F @ E = Q_F (Λ_F^½ V_Fᵀ V_E Λ_E^½) Q_Eᵀ, so the norm and singular
values of F @ E are those of the small core. Cost O((d + k)(m r)²) instead of O(d k m r).

Why Gram + eigh and not a thin QR: on this class of CPU, LAPACK's tall-skinny QR is ~50×
slower than the Gram matmul it replaces. The price is precision: singular values below
~1e-8·σ_max are not resolved, which is far below anything the divergence metric reports.
Directions with eigenvalue below ``RTOL``·λ_max are dropped (the factors are rank-deficient there).
Everything runs on the factors' device and creates its tensors there.
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


RTOL = 1e-14


def _gram_root(X: Tensor) -> tuple[Tensor, Tensor]:
    """V (m, s), σ (s,) with XᵀX = V diag(σ²) Vᵀ restricted to its numerically nonzero part."""
    eigvals, V = torch.linalg.eigh(X.T @ X)  # ascending
    keep = eigvals > RTOL * eigvals[-1].clamp_min(torch.finfo(X.dtype).tiny)
    return V[:, keep], eigvals[keep].sqrt()


def core_factorization(F: Tensor, E: Tensor) -> CoreFactorization:
    V_F, s_F = _gram_root(F)  # F = Q_F diag(s_F) V_Fᵀ
    V_E, s_E = _gram_root(E.T)  # Eᵀ = Q_E diag(s_E) V_Eᵀ
    core = s_F[:, None] * (V_F.T @ V_E) * s_E[None, :]  # (s, s')
    return CoreFactorization(Q_F=(F @ V_F) / s_F, core=core, Q_E=(E.T @ V_E) / s_E)


def _core(F: Tensor, E: Tensor) -> Tensor:
    """The core alone (no orthonormal bases): enough for norms and singular values."""
    V_F, s_F = _gram_root(F)
    V_E, s_E = _gram_root(E.T)
    return s_F[:, None] * (V_F.T @ V_E) * s_E[None, :]


def singular_values_from_grams(G_F: Tensor, G_E: Tensor) -> Tensor:
    """Singular values of F @ E, descending, from G_F = FᵀF and G_E = E Eᵀ; batched over a leading dim.

    Same core as :func:`singular_values`, but directions below ``RTOL``·λ_max are zeroed instead of
    dropped so that a batch keeps one shape: this only appends exact zeros to the singular values.
    """
    roots = []
    for G in (G_F, G_E):
        eigvals, V = torch.linalg.eigh(G)  # ascending
        floor = RTOL * eigvals[..., -1:].clamp_min(torch.finfo(G.dtype).tiny)
        roots.append((V, torch.where(eigvals > floor, eigvals, torch.zeros_like(eigvals)).sqrt()))
    (V_F, s_F), (V_E, s_E) = roots
    core = s_F[..., :, None] * (V_F.mT @ V_E) * s_E[..., None, :]
    return torch.linalg.svdvals(core)


def product_norm(F: Tensor, E: Tensor) -> float:
    """‖F @ E‖_F without forming the product: ‖F E‖² = ⟨FᵀF, E Eᵀ⟩."""
    return float((F.T @ F * (E @ E.T)).sum().clamp_min(0)) ** 0.5


def singular_values(F: Tensor, E: Tensor) -> Tensor:
    """Singular values of F @ E, descending."""
    return torch.linalg.svdvals(_core(F, E))


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
    B = torch.zeros(F.shape[0], rank, dtype=F.dtype, device=F.device)
    A = torch.zeros(rank, E.shape[1], dtype=E.dtype, device=E.device)
    B[:, :keep] = fact.Q_F @ (U[:, :keep] * root)  # (d, keep)
    A[:keep] = (root[:, None] * Vh[:keep]) @ fact.Q_E.T  # (keep, k)
    return B, A, S


def tail_energy(S: Tensor, rank: int) -> float:
    """Σ_{i > rank} σ_i²: the squared error of the best rank-``rank`` approximation."""
    return float((S[rank:] ** 2).sum())
