"""FLoRA-NA's client bases: the clients' factors stacked per group of same-shape modules, and the broadcast read off them.

The ALS (:mod:`fedlora.aggregation.methods.flora_na`) works on J = U + 1 bases per module, the global factor and
the U clients' (index 0 = global). The Gram route (:mod:`~fedlora.aggregation.methods.flora_na_als`) reads them as
E (M, J r, k) and F (M, d, J r) (:func:`stacked_bases`); the matrix-free route
(:mod:`~fedlora.aggregation.methods.flora_na_factors`) as contiguous blocks A (M, J, r, k) and B (M, J, d, r)
(:func:`stacked_blocks`), built directly so many clients never hold both layouts. The broadcast Â, B̂ is the
coefficients' combination of either (:func:`broadcast_from_bases`), or of the updates themselves for the AdamW
solver (:func:`broadcast_from_deltas`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.aggregation.types import Adapter, ClientUpdate, LoraPair

# What the ALS keeps of each shape group for the broadcast: (module indices, E, F) as stacked_bases builds them,
# or (module indices, A, B) as stacked_blocks builds them for the matrix-free route.
Bases = list[tuple[list[int], Tensor, Tensor]]


def broadcast_from_deltas(
    global_adapter: Adapter, updates: Sequence[ClientUpdate], modules: list[str], weights: Tensor, p: Tensor, q: Tensor
) -> Adapter:
    """Â = A_g + Σ_u w_u p_u ΔA_u and B̂ = B_g + Σ_u w_u q_u ΔB_u, module by module."""
    adapter: Adapter = {}
    for index, module in enumerate(modules):
        g = global_adapter[module]
        dA = torch.stack([u.adapter[module].A - g.A for u in updates])  # (U, r, k)
        dB = torch.stack([u.adapter[module].B - g.B for u in updates])  # (U, d, r)
        adapter[module] = LoraPair(
            A=g.A + torch.einsum("u,urk->rk", weights * p[index], dA),
            B=g.B + torch.einsum("u,udr->dr", weights * q[index], dB),
        )
    return adapter


def broadcast_from_bases(groups: Bases, modules: list[str], weights: Tensor, p: Tensor, q: Tensor) -> Adapter:
    """The same Â, B̂ as :func:`broadcast_from_deltas`, read off the stacked bases the ALS built.

    Â = Σ_j α_j A_j with α = [1 − Σ_u w_u p_u, w ⊙ p] (likewise B̂ from q): one memory-bound
    batched product per shape group instead of U (d, r) and (r, k) differences per module.
    """
    adapter: Adapter = {}
    for indices, E, F in groups:
        M, J = E.shape[0], weights.shape[0] + 1
        r, k = (E.shape[2] if E.dim() == 4 else E.shape[1] // J), E.shape[-1]
        wp, wq = weights * p[indices], weights * q[indices]  # (M, U)
        alpha = torch.cat([1 - wp.sum(1, keepdim=True), wp], dim=1)  # (M, J)
        beta = torch.cat([1 - wq.sum(1, keepdim=True), wq], dim=1)
        A_hat = (alpha[:, None, :] @ E.reshape(M, J, r * k)).view(M, r, k)
        if F.dim() == 4:  # the matrix-free route's blocks (M, J, d, r)
            B_hat = (beta[:, None, :] @ F.view(M, J, -1)).view(M, F.shape[2], r)
        else:  # (M, d, J r)
            B_hat = torch.einsum("mj,mdjr->mdr", beta, F.view(M, F.shape[1], J, r))
        for i, index in enumerate(indices):
            adapter[modules[index]] = LoraPair(A=A_hat[i], B=B_hat[i])
    return {m: adapter[m] for m in modules}


def stacked_bases(global_adapter: Adapter, updates: Sequence[ClientUpdate], group: list[str]) -> tuple[Tensor, Tensor]:
    """E (M, J r, k) = [A_g; A_1; …; A_U] and F (M, d, J r) = [B_g, B_1, …, B_U] per module.

    Written block by block into preallocated buffers: ``torch.stack``/``cat`` of hundreds of
    tensors is many times slower than these copies on small multi-threaded CPUs.
    """
    first = global_adapter[group[0]]
    (r, k), d, J = first.A.shape, first.B.shape[0], len(updates) + 1
    E = torch.empty(len(group), J * r, k, dtype=first.A.dtype, device=first.A.device)
    F = torch.empty(len(group), d, J * r, dtype=first.B.dtype, device=first.B.device)
    for i, module in enumerate(group):
        pairs = [global_adapter[module]] + [u.adapter[module] for u in updates]
        for j, pair in enumerate(pairs):
            E[i, j * r : (j + 1) * r].copy_(pair.A)
            F[i, :, j * r : (j + 1) * r].copy_(pair.B)  # natural layout: 2x faster than copying Bᵀ
    return E, F


def stacked_blocks(global_adapter: Adapter, updates: Sequence[ClientUpdate], group: list[str]) -> tuple[Tensor, Tensor]:
    """A (M, J, r, k) and B (M, J, d, r): the same bases as :func:`stacked_bases`, each block contiguous, as the
    matrix-free ALS reads them (built directly: no second copy of the (M, d, J r) layout at many clients)."""
    first = global_adapter[group[0]]
    (r, k), d, J = first.A.shape, first.B.shape[0], len(updates) + 1
    A = torch.empty(len(group), J, r, k, dtype=first.A.dtype, device=first.A.device)
    B = torch.empty(len(group), J, d, r, dtype=first.B.dtype, device=first.B.device)
    for i, module in enumerate(group):
        pairs = [global_adapter[module]] + [u.adapter[module] for u in updates]
        for j, pair in enumerate(pairs):
            A[i, j].copy_(pair.A)
            B[i, j].copy_(pair.B)
    return A, B
