"""Realistic synthetic client adapters for tests and benchmarks of the aggregation library.

On i.i.d. noise every aggregation method ties, so clients here actually *train*: each client u
runs a few steps of gradient descent on its own least-squares regression, from the same global
(A_g, B_g), for every adapted module:
    minimise ½‖(B A − G_u) X_uᵀ‖² / n   over (A, B),
with a client target G_u = G_shared + h · G_u,own (low rank, so nothing d×k is ever formed)
and client inputs X_u (n, k) whose feature scales differ per client. Heterogeneity h and the
input skew make the clients' (A_u, B_u) disagree the way non-IID fine-tuning does.
With ``client_ranks``, client u starts from what a rank-r_u client is sent
(:func:`fedlora.aggregation.ranks.sent_start`): its components beyond r_u are zero and stay zero
under gradient descent (both gradients vanish there), as in the engines.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.aggregation.ranks import sent_start
from fedlora.aggregation.types import Adapter, ClientUpdate, LoraPair


def _low_rank(d: int, k: int, rank: int, g: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    P = torch.randn(d, rank, generator=g, dtype=dtype) / rank**0.5  # (d, s)
    Q = torch.randn(rank, k, generator=g, dtype=dtype) / k**0.5  # (s, k)
    return P, Q


def _spectral_norm_sq(X: Tensor) -> Tensor:
    """‖X_m‖₂² per batch entry (M,), exactly, from the eigenvalues of the smaller Gram matrix."""
    gram = X.mT @ X if X.shape[-1] <= X.shape[-2] else X @ X.mT  # (M, s, s), s = min side
    return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0)


def _gradient_descent(
    A: Tensor, B: Tensor, P: Tensor, Q: Tensor, X: Tensor, steps: int, step_size: float = 0.5
) -> tuple[Tensor, Tensor]:
    """``steps`` of GD on ½‖(B A − P Q) Xᵀ‖² / n for a batch of M modules.

    A (M, r, k), B (M, d, r), P (M, d, 2s), Q (M, 2s, k), X (M, n, k). Step sizes ``step_size`` / (the
    curvature of each block), from spectral norms of r×r and n×n Grams (no SVD of a big matrix).
    """
    n = X.shape[1]
    target = P @ (Q @ X.mT)  # (M, d, n): the client's predictions of G_u, fixed
    X_sq = _spectral_norm_sq(X)  # (M,)
    for _ in range(steps):
        XA = X @ A.mT  # (M, n, r)
        R = B @ XA.mT - target  # (M, d, n): residual of the predictions
        grad_B = R @ XA / n  # (M, d, r)
        grad_A = (B.mT @ R) @ X / n  # (M, r, k)
        # Step sizes from the curvature of each block keep plain GD stable at any shape.
        lr_B = step_size / (_spectral_norm_sq(XA) / n + 1e-12)  # (M,)
        lr_A = step_size / (_spectral_norm_sq(B) * X_sq / n + 1e-12)  # (M,)
        A, B = A - lr_A[:, None, None] * grad_A, B - lr_B[:, None, None] * grad_B
    return A, B


def least_squares_clients(
    shapes: dict[str, tuple[int, int]],
    rank: int,
    num_clients: int,
    *,
    steps: int = 5,
    heterogeneity: float = 1.0,
    samples: int = 32,
    target_rank: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    client_ranks: Sequence[int] = (),
    rank_map: str = "truncate",
    step_size: float = 0.5,
) -> tuple[Adapter, list[ClientUpdate]]:
    """A global adapter and ``num_clients`` trained client updates for modules of ``shapes`` {name: (d, k)}.

    Client u has ``samples · (u % 3 + 1)`` examples, so example weights are unequal.
    ``client_ranks``: one rank <= ``rank`` per client (empty: all at ``rank``), mapped by ``rank_map``.
    ``step_size``: GD's step over the curvature; 0.5 takes large steps, ~0.005 the small ones of
    fine-tuning at a small learning rate (a round's step far smaller than the adapter itself).
    """
    if client_ranks and len(client_ranks) != num_clients:
        raise ValueError(f"client_ranks has {len(client_ranks)} entries; give one per client ({num_clients})")
    g = torch.Generator().manual_seed(seed)
    global_adapter: Adapter = {}
    for module, (d, k) in shapes.items():
        A = (torch.rand(rank, k, generator=g, dtype=dtype) * 2 - 1) / k**0.5  # (r, k) PEFT-style init
        B = torch.randn(d, rank, generator=g, dtype=dtype) * 0.05  # (d, r) as after a few rounds
        global_adapter[module] = LoraPair(A=A, B=B)
    shared_targets = {m: _low_rank(d, k, target_rank, g, dtype) for m, (d, k) in shapes.items()}

    # Modules of equal shape train as one batch; the random draws keep the per-module order.
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for module, (d, k) in shapes.items():
        groups[(d, k)].append(module)

    updates = []
    for u in range(num_clients):
        start = sent_start(global_adapter, client_ranks[u], rank_map) if client_ranks else global_adapter
        n = samples * (u % 3 + 1)
        draws: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        for module, (d, k) in shapes.items():
            P_s, Q_s = shared_targets[module]
            P_u, Q_u = _low_rank(d, k, target_rank, g, dtype)
            P = torch.cat([P_s, heterogeneity * P_u], dim=1)  # G_u = P @ Q, (d, 2s)
            Q = torch.cat([Q_s, Q_u], dim=0)  # (2s, k)
            scale = torch.rand(k, generator=g, dtype=dtype) * 1.5 + 0.25  # client-specific feature skew
            X = torch.randn(n, k, generator=g, dtype=dtype) * scale  # (n, k)
            draws[module] = (P, Q, X)
        adapter: Adapter = {}
        for modules in groups.values():
            P = torch.stack([draws[m][0] for m in modules])  # (M, d, 2s)
            Q = torch.stack([draws[m][1] for m in modules])  # (M, 2s, k)
            X = torch.stack([draws[m][2] for m in modules])  # (M, n, k)
            A = torch.stack([start[m].A for m in modules])  # (M, r, k)
            B = torch.stack([start[m].B for m in modules])  # (M, d, r)
            A, B = _gradient_descent(A, B, P, Q, X, steps, step_size)
            for index, module in enumerate(modules):
                adapter[module] = LoraPair(A=A[index].clone(), B=B[index].clone())
        updates.append(ClientUpdate(adapter={m: adapter[m] for m in shapes}, num_examples=n, client_id=f"client-{u}"))
    return global_adapter, updates


def random_clients(
    shapes: dict[str, tuple[int, int]], rank: int, num_clients: int, *, spread: float = 0.5, seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[Adapter, list[ClientUpdate]]:
    """Unstructured clients: the global adapter plus i.i.d. Gaussian perturbations of size ``spread``."""
    g = torch.Generator().manual_seed(seed)
    global_adapter = {
        m: LoraPair(A=torch.randn(rank, k, generator=g, dtype=dtype), B=torch.randn(d, rank, generator=g, dtype=dtype))
        for m, (d, k) in shapes.items()
    }
    updates = [
        ClientUpdate(
            adapter={
                m: LoraPair(
                    A=p.A + spread * torch.randn(p.A.shape, generator=g, dtype=dtype),
                    B=p.B + spread * torch.randn(p.B.shape, generator=g, dtype=dtype),
                )
                for m, p in global_adapter.items()
            },
            num_examples=10 + 7 * u,
            client_id=f"client-{u}",
        )
        for u in range(num_clients)
    ]
    return global_adapter, updates
