"""Realistic synthetic client adapters for tests and benchmarks of the aggregation library.

On i.i.d. noise every aggregation method ties, so clients here actually *train*: each client u
runs a few steps of gradient descent on its own least-squares regression, from the same global
(A_g, B_g), for every adapted module:
    minimise ½‖(B A − G_u) X_uᵀ‖² / n   over (A, B),
with a client target G_u = G_shared + h · G_u,own (low rank, so nothing d×k is ever formed)
and client inputs X_u (n, k) whose feature scales differ per client. Heterogeneity h and the
input skew make the clients' (A_u, B_u) disagree the way non-IID fine-tuning does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora.aggregation.types import Adapter, ClientUpdate, LoraPair


def _low_rank(d: int, k: int, rank: int, g: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    P = torch.randn(d, rank, generator=g, dtype=dtype) / rank**0.5  # (d, s)
    Q = torch.randn(rank, k, generator=g, dtype=dtype) / k**0.5  # (s, k)
    return P, Q


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
) -> tuple[Adapter, list[ClientUpdate]]:
    """A global adapter and ``num_clients`` trained client updates for modules of ``shapes`` {name: (d, k)}.

    Client u has ``samples · (u % 3 + 1)`` examples, so example weights are unequal.
    """
    g = torch.Generator().manual_seed(seed)
    global_adapter: Adapter = {}
    for module, (d, k) in shapes.items():
        A = (torch.rand(rank, k, generator=g, dtype=dtype) * 2 - 1) / k**0.5  # (r, k) PEFT-style init
        B = torch.randn(d, rank, generator=g, dtype=dtype) * 0.05  # (d, r) as after a few rounds
        global_adapter[module] = LoraPair(A=A, B=B)
    shared_targets = {m: _low_rank(d, k, target_rank, g, dtype) for m, (d, k) in shapes.items()}

    updates = []
    for u in range(num_clients):
        n = samples * (u % 3 + 1)
        adapter: Adapter = {}
        for module, (d, k) in shapes.items():
            P_s, Q_s = shared_targets[module]
            P_u, Q_u = _low_rank(d, k, target_rank, g, dtype)
            P = torch.cat([P_s, heterogeneity * P_u], dim=1)  # G_u = P @ Q, (d, 2s)
            Q = torch.cat([Q_s, Q_u], dim=0)  # (2s, k)
            scale = torch.rand(k, generator=g, dtype=dtype) * 1.5 + 0.25  # client-specific feature skew
            X = torch.randn(n, k, generator=g, dtype=dtype) * scale  # (n, k)
            A, B = global_adapter[module].A.clone(), global_adapter[module].B.clone()
            for _ in range(steps):
                XA = X @ A.T  # (n, r)
                R = B @ XA.T - P @ (Q @ X.T)  # (d, n): residual of the predictions
                grad_B = R @ XA / n  # (d, r)
                grad_A = (B.T @ R) @ X / n  # (r, k)
                # Step sizes from the curvature of each block keep plain GD stable at any shape.
                lr_B = 0.5 / float(torch.linalg.matrix_norm(XA, ord=2) ** 2 / n + 1e-12)
                lr_A = 0.5 / float(torch.linalg.matrix_norm(B, ord=2) ** 2 * torch.linalg.matrix_norm(X, ord=2) ** 2 / n + 1e-12)
                A, B = A - lr_A * grad_A, B - lr_B * grad_B
            adapter[module] = LoraPair(A=A, B=B)
        updates.append(ClientUpdate(adapter=adapter, num_examples=n, client_id=f"client-{u}"))
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
