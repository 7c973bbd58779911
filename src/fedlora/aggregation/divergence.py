"""Aggregation divergence of any result and the Eckart–Young bound it can never beat.

divergence = ‖B̂Â + Δ − T‖_F / ‖T‖_F with T = Σ_u w_u B_u A_u (the ideal average of the
client products) and Δ the product-space ``base_delta`` merged into W0 (zero for most methods).
Over the model, numerator and denominator are summed over modules before the square root.
The bound is the same ratio for the truncated SVD of T, the optimal rank-r answer.

Each group of same-shape modules is measured in the cheapest exact space, chosen by cost
(:func:`choose_route`), with n = U·r stacked client directions and T = F E, F (d, n), E (n, k):
  "gram":  the n×n Grams FᵀF and E Eᵀ (lowrank.singular_values_from_grams): ~(d + k)·n² + eigh of n×n;
           cheap while n < min(d, k), cubic in U beyond.
  "dense": T itself, accumulated client block by client block (T += F_b E_b, memory one (d, k)
           per module plus one block): ~n·d·k, then its singular values from the smaller of the
           d×d / k×k Grams T Tᵀ, TᵀT (an eigh of min(d, k)²): linear in U.
Both give the same numbers to float64 round-off (tests/unit/aggregation/test_aggregation_divergence_routes.py).

Everything is computed on the adapter's device; only the scalars come back to the host. On the
``meta`` device (no values) every number of the report is NaN.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fedlora.aggregation import lowrank
from fedlora.aggregation.types import Adapter, ClientUpdate


@dataclass(frozen=True)
class DivergenceReport:
    divergence: float  # over the model
    eckart_young_bound: float  # over the model
    per_module: dict[str, float]
    per_module_bound: dict[str, float]
    target_norm: float  # ‖T‖_F over the model


def divergence_report(
    adapter: Adapter,
    updates: Sequence[ClientUpdate],
    weights: Tensor,
    base_delta: dict[str, Tensor] | None = None,
    route: Route = "auto",
) -> DivergenceReport:
    """Divergence of ``adapter`` (+ ``base_delta``) from T and the Eckart–Young bound, per module and overall.

    ``route``: "auto" (the cheaper exact space per group, :func:`choose_route`), or "gram" / "dense" to force one.
    """
    if route not in ROUTES:
        raise ValueError(f"unknown divergence route {route!r}; use one of {', '.join(ROUTES)}")
    base_delta = base_delta or {}
    if next(iter(adapter.values())).A.is_meta:
        return _unmeasurable(adapter)
    device = next(iter(adapter.values())).A.device
    w = weights.to(device=device, dtype=torch.float64)
    err_sq: dict[str, float] = {}
    tail_sq: dict[str, float] = {}
    target_sq: dict[str, float] = {}
    groups: dict[tuple[tuple[int, ...], tuple[int, ...], torch.dtype], list[str]] = defaultdict(list)  # same-shape modules are handled as one batch
    for module, pair in adapter.items():
        groups[(tuple(pair.A.shape), tuple(pair.B.shape), pair.A.dtype)].append(module)
    for (A_shape, B_shape, dtype), modules in groups.items():
        (r, k), d = A_shape, B_shape[0]
        chosen = choose_route(len(updates), r, d, k) if route == "auto" else route
        if chosen == "dense":
            parts = _dense_group(adapter, updates, w.to(dtype), modules, base_delta)
            for module, (t_sq, tail, err) in zip(modules, parts):
                target_sq[module], tail_sq[module], err_sq[module] = t_sq, tail, err
            continue
        F, E = _stacked_target(adapter, updates, w.to(dtype), modules)  # T_m = F_m @ E_m
        G_F, G_E = F.mT @ F, E @ E.mT  # (M, U r, U r): FᵀF and E Eᵀ of T = F E
        S = lowrank.singular_values_from_grams(G_F, G_E)  # (M, U r)
        A_hat = _stack([adapter[m].A for m in modules], dtype)  # (M, r, k)
        B_hat = _stack([adapter[m].B for m in modules], dtype)  # (M, d, r)
        # ‖B̂Â − T‖² = ‖B̂Â‖² − 2⟨B̂Â, T⟩ + ‖T‖², each a sum over small Grams (= product_norm's
        # ⟨FᵀF, E Eᵀ⟩ for F = [B̂, −F_T], E = [Â; E_T], without recomputing the target's blocks).
        own = ((B_hat.mT @ B_hat) * (A_hat @ A_hat.mT)).sum((1, 2))
        cross = ((F.mT @ B_hat) * (E @ A_hat.mT)).sum((1, 2))
        whole = (G_F * G_E).sum((1, 2))
        low_rank_err = (own - 2 * cross + whole).clamp_min(0)
        for i, module in enumerate(modules):
            pair = adapter[module]
            target_sq[module] = float((S[i] ** 2).sum())
            tail_sq[module] = lowrank.tail_energy(S[i], pair.rank)
            if module in base_delta:
                # (d, k) terms are dense anyway for methods that ship a residual.
                T = F[i] @ E[i]  # (d, k)
                residual = pair.B @ pair.A + base_delta[module].to(dtype) - T
                err_sq[module] = float(torch.linalg.matrix_norm(residual)) ** 2
            else:
                err_sq[module] = float(low_rank_err[i])

    def ratio(num: float, den: float) -> float:
        # T = 0 (nothing moved): any exact answer has zero divergence; report the raw error then.
        return math.sqrt(num / den) if den > 0 else math.sqrt(num)

    total_target = sum(target_sq.values())
    return DivergenceReport(
        divergence=ratio(sum(err_sq.values()), total_target),
        eckart_young_bound=ratio(sum(tail_sq.values()), total_target),
        per_module={m: ratio(err_sq[m], target_sq[m]) for m in adapter},
        per_module_bound={m: ratio(tail_sq[m], target_sq[m]) for m in adapter},
        target_norm=math.sqrt(total_target),
    )


Route = Literal["auto", "gram", "dense"]
ROUTES = ("auto", "gram", "dense")
CLIENT_BLOCK = 64  # clients per accumulation step of the dense route: bounds the stacked factors' memory


def choose_route(num_clients: int, rank: int, d: int, k: int) -> Literal["gram", "dense"]:
    """The cheaper exact route for one module of shape (d, k) with ``num_clients`` rank-``rank`` clients.

    Flop estimates (the constant is LAPACK's rough multiplier, eigh/SVD of n×n ≈ 10·n³):
    gram = (d + k)·n² + 3·10·n³ for the two eighs and the core's SVD, dense = n·d·k (T) +
    min(d, k)²·max(d, k) (its Gram) + 10·min(d, k)³ (eigvalsh), n = U·r. At MiniLM's 384×384,
    r = 8 the switch is near U ≈ 20.
    """
    n = num_clients * rank
    gram = (d + k) * n * n + 30 * n**3
    dense = n * d * k + min(d, k) ** 2 * max(d, k) + 10 * min(d, k) ** 3
    return "gram" if gram <= dense else "dense"


def _dense_group(
    adapter: Adapter, updates: Sequence[ClientUpdate], w: Tensor, modules: list[str], base_delta: dict[str, Tensor]
) -> list[tuple[float, float, float]]:
    """(‖T‖², Σ_{i>r} σ_i², ‖B̂Â + Δ − T‖²) per module, from T formed densely.

    T (M, d, k) is accumulated ``CLIENT_BLOCK`` clients at a time, so memory stays at the M (d, k)
    targets plus one block of stacked factors, whatever U.
    """
    U = len(updates)
    T: Tensor | None = None
    for start in range(0, U, CLIENT_BLOCK):
        block = updates[start : start + CLIENT_BLOCK]
        F, E = _stacked_target(adapter, block, w[start : start + CLIENT_BLOCK], modules)  # (M, d, b r), (M, b r, k)
        T = F @ E if T is None else T.baddbmm_(F, E)  # (M, d, k)
    assert T is not None  # U ≥ 1: aggregate() never measures an empty round
    dtype = T.dtype
    # σ² as the eigenvalues of the smaller Gram T Tᵀ (d×d) or TᵀT (k×k): ~10× faster than svdvals(T)
    # on CPU, and only Σσ² sums are reported, which it gets to ~eps·‖T‖² absolute, as the Gram route does.
    G = T @ T.mT if T.shape[1] <= T.shape[2] else T.mT @ T  # (M, min(d, k), min(d, k))
    S = torch.linalg.eigvalsh(G).flip(-1).clamp_min(0).sqrt()  # (M, min(d, k)), descending
    A_hat = _stack([adapter[m].A for m in modules], dtype)  # (M, r, k)
    B_hat = _stack([adapter[m].B for m in modules], dtype)  # (M, d, r)
    residual = torch.baddbmm(T, B_hat, A_hat, beta=-1)  # (M, d, k): B̂Â − T
    out = []
    for i, module in enumerate(modules):
        if module in base_delta:
            residual[i] += base_delta[module].to(dtype)
        out.append((float((S[i] ** 2).sum()), lowrank.tail_energy(S[i], adapter[module].rank),
                    float(torch.linalg.matrix_norm(residual[i])) ** 2))
    return out


def unmeasured_report(adapter: Adapter) -> DivergenceReport:
    """The report of a round whose divergence was not measured (``--divergence off`` / every N): NaN throughout."""
    return _unmeasurable(adapter)


def _unmeasurable(adapter: Adapter) -> DivergenceReport:
    nan = float("nan")
    return DivergenceReport(
        divergence=nan,
        eckart_young_bound=nan,
        per_module=dict.fromkeys(adapter, nan),
        per_module_bound=dict.fromkeys(adapter, nan),
        target_norm=nan,
    )


def _stacked_target(
    adapter: Adapter, updates: Sequence[ClientUpdate], w: Tensor, modules: list[str]
) -> tuple[Tensor, Tensor]:
    """F (M, d, U r) = [w_1 B_1, …, w_U B_U] and E (M, U r, k) = [A_1; …; A_U], so T_m = F_m E_m.

    Copied block by block into preallocated buffers (``torch.cat`` of many tensors is slow on
    small multi-threaded CPUs), each factor in its own memory layout (copying Bᵀ is 2x slower).
    """
    first = adapter[modules[0]]
    (r, k), d, U = first.A.shape, first.B.shape[0], len(updates)
    F = torch.empty(len(modules), d, U * r, dtype=first.A.dtype, device=first.A.device)
    E = torch.empty(len(modules), U * r, k, dtype=first.A.dtype, device=first.A.device)
    for i, module in enumerate(modules):
        for u, update in enumerate(updates):
            F[i, :, u * r : (u + 1) * r].copy_(update.adapter[module].B)
            E[i, u * r : (u + 1) * r].copy_(update.adapter[module].A)
    F.view(len(modules), d, U, r).mul_(w[None, None, :, None])
    return F, E


def _stack(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    out = torch.empty(len(tensors), *tensors[0].shape, dtype=dtype, device=tensors[0].device)
    for i, t in enumerate(tensors):
        out[i].copy_(t)
    return out
