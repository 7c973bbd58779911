"""FLoRA-NA: near-accurate aggregation at FedIT's communication cost.

Nguyen et al., "FLoRA-NA: Nearly Accurate Aggregation for Federated Low-Rank Adaptation",
arXiv 2509.26399, Eq. 6. With ΔA_u = A_u − A_g and ΔB_u = B_u − B_g (as in the authors' code):
    Â(p) = A_g + Σ_u w_u p_u ΔA_u,   B̂(q) = B_g + Σ_u w_u q_u ΔB_u,
    (p, q) = argmin Σ_modules ‖B̂(q) Â(p) − Σ_u w_u B_u A_u‖²_F,
starting from p = q = 1, which is exactly FedIT. Clients upload (A_u, B_u) and download (Â, B̂):
the same bytes as FedIT; only the server works harder.

Options:
  solver  "als" (default): Gram-form alternating least squares, exact per half-step, never
          forms a d×k matrix, never worse than FedIT (see flora_na_als).
          "adamw": the authors' reference — AdamW (lr 1e-2, 200 steps) on the dense objective,
          forming the d×k products every step, keeping the best iterate.
  scope   "per-module" (default): one (p, q) per adapted module — more freedom, lower objective.
          "global": one (p, q) for the whole model, as the authors.
  weighting "examples" (default): w_u = n_u/Σn in the target, the objective and the broadcast.
          "uniform": 1/U everywhere. "authors": the authors' mix — target and objective uniform,
          broadcast data-size weighted (inconsistent when clients hold different amounts of data).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from torch import Tensor

from fedlora.aggregation.methods.common import target_product
from fedlora.aggregation.methods.flora_na_als import GramProblem, solve_als
from fedlora.aggregation.options import AtLeast, GreaterThan
from fedlora.aggregation.registry import register_method
from fedlora.aggregation.types import Adapter, AggregationError, AggregationResult, ClientUpdate, LoraPair

SOLVERS = ("als", "adamw")
# What the ALS keeps of each shape group for the broadcast: (module indices, E, F) as _stacked_bases builds them.
Bases = list[tuple[list[int], Tensor, Tensor]]
SCOPES = ("per-module", "global")


@register_method(
    "flora-na",
    summary="server-optimised client coefficients p, q so that B̂Â ≈ Σ w_u B_u A_u (Nguyen et al. 2025)",
    weightings=("examples", "uniform", "authors"),
)
def flora_na(
    global_adapter: Adapter,
    updates: Sequence[ClientUpdate],
    weights: Tensor,
    *,
    weighting: str = "examples",
    solver: Literal["als", "adamw"] = "als",
    scope: Literal["per-module", "global"] = "per-module",
    max_sweeps: Annotated[int, AtLeast(0)] = 100,  # 0: no sweep, p = q = 1 (FedIT)
    tol: Annotated[float, AtLeast(0)] = 1e-10,
    steps: Annotated[int, AtLeast(0)] = 200,  # 0: no step, p = q = 1 (FedIT)
    lr: Annotated[float, GreaterThan(0)] = 1e-2,
) -> AggregationResult:
    if solver not in SOLVERS:
        raise AggregationError(f"flora-na: unknown solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if scope not in SCOPES:
        raise AggregationError(f"flora-na: unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    U = len(updates)
    solve_w = torch.full((U,), 1.0 / U, dtype=torch.float64, device=weights.device) if weighting == "authors" else weights
    modules = list(global_adapter)
    shared = scope == "global"

    start = time.perf_counter()
    if solver == "als":
        p, q, trace, groups = _als(global_adapter, updates, solve_w, modules, shared, max_sweeps, tol)
        seconds = time.perf_counter() - start
        adapter = _broadcast_from_bases(groups, modules, weights, p, q)
    else:
        p, q, trace = _adamw(global_adapter, updates, solve_w, modules, shared, steps, lr)
        seconds = time.perf_counter() - start
        adapter = _broadcast_from_deltas(global_adapter, updates, modules, weights, p, q)
    extras = {
        "p": {m: p[i] for i, m in enumerate(modules)},
        "q": {m: q[i] for i, m in enumerate(modules)},
        "objective_trace": trace,
    }
    metrics = {
        "objective_fedit": trace[0],
        "objective": min(trace),
        "iterations": len(trace) - 1,
        "solver": solver,
        "scope": scope,
        "weighting": weighting,
        "solver_seconds": seconds,
    }
    return AggregationResult(adapter=adapter, metrics=metrics, extras=extras)


def _broadcast_from_deltas(
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


def _broadcast_from_bases(groups: Bases, modules: list[str], weights: Tensor, p: Tensor, q: Tensor) -> Adapter:
    """The same Â, B̂ as :func:`_broadcast_from_deltas`, read off the stacked bases the ALS built.

    Â = Σ_j α_j A_j with α = [1 − Σ_u w_u p_u, w ⊙ p] (likewise B̂ from q): one memory-bound
    batched product per shape group instead of U (d, r) and (r, k) differences per module.
    """
    adapter: Adapter = {}
    for indices, E, F in groups:
        M, Jr, k = E.shape
        J = weights.shape[0] + 1
        r, d = Jr // J, F.shape[1]
        wp, wq = weights * p[indices], weights * q[indices]  # (M, U)
        alpha = torch.cat([1 - wp.sum(1, keepdim=True), wp], dim=1)  # (M, J)
        beta = torch.cat([1 - wq.sum(1, keepdim=True), wq], dim=1)
        A_hat = (alpha[:, None, :] @ E.view(M, J, r * k)).view(M, r, k)
        B_hat = torch.einsum("mj,mdjr->mdr", beta, F.view(M, d, J, r))
        for i, index in enumerate(indices):
            adapter[modules[index]] = LoraPair(A=A_hat[i], B=B_hat[i])
    return {m: adapter[m] for m in modules}


def _stacked_bases(global_adapter: Adapter, updates: Sequence[ClientUpdate], group: list[str]) -> tuple[Tensor, Tensor]:
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


def _als(
    global_adapter: Adapter,
    updates: Sequence[ClientUpdate],
    w: Tensor,
    modules: list[str],
    shared: bool,
    max_sweeps: int,
    tol: float,
) -> tuple[Tensor, Tensor, list[float], Bases]:
    # Batch same-shape modules (all of a transformer's q/v projections, say) into one problem.
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, module in enumerate(modules):
        groups[tuple(global_adapter[module].A.shape) + tuple(global_adapter[module].B.shape)].append(index)
    problems: list[GramProblem] = []
    bases: Bases = []
    for indices in groups.values():
        E, F = _stacked_bases(global_adapter, updates, [modules[i] for i in indices])
        problems.append(GramProblem.from_stacked(E, F, w))
        bases.append((indices, E, F))
    ps, qs, trace = solve_als(problems, shared, max_sweeps, tol)
    p = torch.empty(len(modules), len(updates), dtype=torch.float64, device=w.device)
    q = torch.empty_like(p)
    for indices, pg, qg in zip(groups.values(), ps, qs):
        p[indices], q[indices] = pg, qg
    return p, q, trace, bases


def _adamw(
    global_adapter: Adapter,
    updates: Sequence[ClientUpdate],
    w: Tensor,
    modules: list[str],
    shared: bool,
    steps: int,
    lr: float,
) -> tuple[Tensor, Tensor, list[float]]:
    """The authors' solver: AdamW on the dense objective, best iterate kept (trace[0] is FedIT)."""
    U, M = len(updates), len(modules)
    rows = 1 if shared else M
    p = torch.ones(rows, U, dtype=torch.float64, device=w.device, requires_grad=True)
    q = torch.ones(rows, U, dtype=torch.float64, device=w.device, requires_grad=True)
    optimizer = torch.optim.AdamW([p, q], lr=lr)
    targets = {m: target_product(updates, m, w) for m in modules}  # (d, k) each
    deltas = {}
    for m in modules:
        g = global_adapter[m]
        deltas[m] = (
            torch.stack([u.adapter[m].A - g.A for u in updates]),  # (U, r, k)
            torch.stack([u.adapter[m].B - g.B for u in updates]),  # (U, d, r)
        )

    def loss_and_grad() -> float:
        optimizer.zero_grad()
        total = 0.0
        for index, m in enumerate(modules):
            row = 0 if shared else index
            g, (dA, dB) = global_adapter[m], deltas[m]
            A_hat = g.A + torch.einsum("u,urk->rk", w * p[row], dA)
            B_hat = g.B + torch.einsum("u,udr->dr", w * q[row], dB)
            loss = ((B_hat @ A_hat - targets[m]) ** 2).sum()
            loss.backward()  # one module's graph at a time keeps memory at one (d, k) product
            total += float(loss.detach())
        return total

    trace: list[float] = []
    best = (float("inf"), p.detach().clone(), q.detach().clone())
    for _ in range(steps + 1):
        value = loss_and_grad()
        trace.append(value)
        if value < best[0]:
            best = (value, p.detach().clone(), q.detach().clone())
        if len(trace) <= steps:
            optimizer.step()
    _, p_best, q_best = best
    if shared:
        p_best, q_best = p_best.expand(M, U), q_best.expand(M, U)
    return p_best.clone(), q_best.clone(), trace
