"""Small helpers shared by the method functions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.aggregation import lowrank
from fedlora.aggregation.types import Adapter, ClientUpdate, LoraPair


MEAN_CHUNK = 64  # clients stacked at a time: a stack of all U (U × the factor) is 25 MB per module at U = 1,000


def weighted_mean(tensors: Sequence[Tensor], weights: Tensor) -> Tensor:
    """Σ_u w_u X_u, stacking at most ``MEAN_CHUNK`` clients at a time (many clients: bounded temporaries)."""
    weights = weights.to(tensors[0].dtype)
    total = torch.einsum("u,u...->...", weights[:MEAN_CHUNK], torch.stack(list(tensors[:MEAN_CHUNK])))
    for lo in range(MEAN_CHUNK, len(tensors), MEAN_CHUNK):
        total += torch.einsum("u,u...->...", weights[lo:lo + MEAN_CHUNK], torch.stack(list(tensors[lo:lo + MEAN_CHUNK])))
    return total


def factors(updates: Sequence[ClientUpdate], module: str) -> tuple[list[Tensor], list[Tensor]]:
    """The clients' ([B_u], [A_u]) for one module."""
    return [u.adapter[module].B for u in updates], [u.adapter[module].A for u in updates]


def stacked_factors(updates: Sequence[ClientUpdate], module: str, weights: Tensor) -> tuple[Tensor, Tensor]:
    """(B_stack, A_stack) = ([w_1 B_1 … w_U B_U] (d, U r), [A_1; …; A_U] (U r, k)), whose product is T."""
    Bs, As = factors(updates, module)
    return torch.cat([w * B for w, B in zip(weights, Bs)], dim=1), torch.cat(As, dim=0)


def target_product(updates: Sequence[ClientUpdate], module: str, weights: Tensor) -> Tensor:
    """T = Σ_u w_u B_u A_u, the ideal aggregate, as one (d, U r) @ (U r, k) matmul."""
    B_stack, A_stack = stacked_factors(updates, module, weights)
    return B_stack @ A_stack  # (d, k)


def balanced(adapter: Adapter) -> Adapter:
    """The same products B A, re-split as B = U√Σ (d, r), A = √ΣVᵀ (r, k): equal factor norms, as ``svd`` writes them.

    The product is unchanged up to the Gram-based SVD's ~1e-8 relative precision
    (:mod:`fedlora.aggregation.lowrank`), so the divergence and the bytes do not change; only the
    factors the next round's local training starts from do (their balance sets how a step on A
    or B moves the product).
    """
    out: Adapter = {}
    for module, pair in adapter.items():
        F, E = lowrank.stack_factors([pair.B], [pair.A], torch.ones(1, dtype=pair.A.dtype, device=pair.A.device))
        if lowrank.product_norm(F, E) == 0.0:  # nothing to balance (B = 0): keep A trainable
            out[module] = pair
            continue
        B, A, _ = lowrank.truncated_svd_factors(F, E, pair.rank)
        out[module] = LoraPair(A=A, B=B)
    return out
