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
  ridge   0 (default): the plain objective. > 0: the ALS minimises L(p, q) + λ(‖p − 1‖² + ‖q − 1‖²),
          λ = ridge × the mean diagonal of the U×U normal matrices at p = q = 1 (dimensionless; see
          flora_na_als). Every half-step stays an exact minimisation, so the result is still never
          worse than FedIT in L, and ridge → ∞ gives p = q = 1 (FedIT). ALS only.
  max_deviation  ∞ (default): no bound. Otherwise, if the solution has max|p − 1| or max|q − 1|
          above it, the step from FedIT is scaled back along the segment (1, 1) → (p*, q*):
          (p, q) = 1 + t (p* − 1, q* − 1), t on the grid t_max · {0, 0.1, …, 1} with t_max the
          largest t within the bound; the t of lowest L is kept, and t = 0 (FedIT) is on the grid,
          so L stays ≤ FedIT's. Per module in the per-module scope (modules within the bound keep
          their solution), one t for the model in the global scope. ALS only.
  align   "none" (default). "rotation": rotate each client's pair onto the global adapter first
          (orthogonal Procrustes, :func:`fedlora.aggregation.methods.fedrot_lora.align_to_global`);
          products and the target are unchanged, the starting point p = q = 1 becomes the aligned
          FedIT average (FedRot-LoRA), and "never worse" holds against that.

Metrics besides the objective: p_min, p_max, q_min, q_max, p_dev_max = max|p − 1|, q_dev_max,
norm_A, norm_B (Frobenius norms of the broadcast factors, over all modules in quadrature) and
norm_A_fedit, norm_B_fedit (the same for FedIT's plain average of the uploads, unaligned).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from torch import Tensor

from fedlora.aggregation.methods.common import balanced, target_product
from fedlora.aggregation.methods.fedit import fedit_average
from fedlora.aggregation.methods.fedrot_lora import align_to_global
from fedlora.aggregation.methods.flora_na_als import GramProblem, solve_als
from fedlora.aggregation.methods.flora_na_bases import (Bases, broadcast_from_bases, broadcast_from_deltas,
                                                        stacked_bases, stacked_blocks)
from fedlora.aggregation.methods.flora_na_factors import FactorProblem, solve_als_factors
from fedlora.aggregation.options import AtLeast, GreaterThan
from fedlora.aggregation.registry import register_method
from fedlora.aggregation.types import Adapter, AggregationError, AggregationResult, ClientUpdate

SOLVERS = ("als", "adamw")
SCOPES = ("per-module", "global")
GRAM_BUDGET_BYTES = 512 << 20  # above: the matrix-free ALS (flora_na_factors), e.g. U > ~170 at MiniLM shapes
STEP_BACK_GRID = 11  # t_max · {0, 0.1, …, 1} when max_deviation scales the step back


@register_method(
    "flora-na",
    summary="server-optimised client coefficients p, q so that B̂Â ≈ Σ w_u B_u A_u",
    source="Nguyen et al., 2025, Eq. 6",
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
    ridge: Annotated[float, AtLeast(0)] = 0.0,  # 0: plain objective; → ∞: FedIT
    max_deviation: Annotated[float, AtLeast(0)] = math.inf,  # bound on max|p − 1|, |q − 1|
    align: Literal["none", "rotation"] = "none",
    rebalance: bool = False,  # re-split the broadcast product into balanced factors (same product, same bytes)
) -> AggregationResult:
    if solver not in SOLVERS:
        raise AggregationError(f"flora-na: unknown solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if scope not in SCOPES:
        raise AggregationError(f"flora-na: unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    if solver == "adamw" and (ridge > 0 or max_deviation < math.inf):
        raise AggregationError("flora-na: ridge and max_deviation apply to solver='als' only")
    U = len(updates)
    solve_w = torch.full((U,), 1.0 / U, dtype=torch.float64, device=weights.device) if weighting == "authors" else weights
    modules = list(global_adapter)
    shared = scope == "global"
    plain = updates
    if align == "rotation":
        updates = align_to_global(global_adapter, updates)

    start = time.perf_counter()
    step_back = 1.0
    if solver == "als":
        p, q, trace, penalised, groups, problems = _als(global_adapter, updates, solve_w, modules, shared, max_sweeps, tol, ridge)
        objective = trace[-1]  # = min(trace) without ridge (L never increases); with ridge J never does
        if max_deviation < math.inf:
            p, q, objective, step_back = _step_back(problems, groups, p, q, shared, max_deviation, objective)
        seconds = time.perf_counter() - start
        adapter = broadcast_from_bases(groups, modules, weights, p, q)
    else:
        p, q, trace = _adamw(global_adapter, updates, solve_w, modules, shared, steps, lr)
        penalised, objective = trace, min(trace)
        seconds = time.perf_counter() - start
        adapter = broadcast_from_deltas(global_adapter, updates, modules, weights, p, q)
    extras = {
        "p": {m: p[i] for i, m in enumerate(modules)},
        "q": {m: q[i] for i, m in enumerate(modules)},
        "objective_trace": trace,
    }
    if ridge > 0:
        extras["penalised_trace"] = penalised
    metrics = {
        "objective_fedit": trace[0],
        "objective": objective,
        "iterations": len(trace) - 1,
        "solver": solver,
        "scope": scope,
        "weighting": weighting,
        "solver_seconds": seconds,
        "ridge": ridge,
        "max_deviation": max_deviation if math.isfinite(max_deviation) else None,  # JSON has no inf
        "align": align,
        "step_back_t": step_back,
        **_coefficient_metrics(p, q),
        **_norm_metrics(adapter, "norm_A", "norm_B"),
        **_norm_metrics(fedit_average(plain, weights), "norm_A_fedit", "norm_B_fedit"),
    }
    if rebalance:
        adapter = balanced(adapter)
        metrics |= _norm_metrics(adapter, "norm_A", "norm_B")
    return AggregationResult(adapter=adapter, metrics=metrics, extras=extras)


def _coefficient_metrics(p: Tensor, q: Tensor) -> dict[str, float]:
    """Range of p, q (modules, U) and their largest distance from FedIT's 1, as Python floats."""
    return {
        "p_min": float(p.min()), "p_max": float(p.max()), "q_min": float(q.min()), "q_max": float(q.max()),
        "p_dev_max": float((p - 1).abs().max()), "q_dev_max": float((q - 1).abs().max()),
    }


def _norm_metrics(adapter: Adapter, name_A: str, name_B: str) -> dict[str, float]:
    """Frobenius norms of all A and of all B factors, summed over modules in quadrature."""
    return {
        name_A: float(sum(float((pair.A**2).sum()) for pair in adapter.values())) ** 0.5,
        name_B: float(sum(float((pair.B**2).sum()) for pair in adapter.values())) ** 0.5,
    }


def _step_back(
    problems: Sequence[GramProblem | FactorProblem], groups: Bases, p: Tensor, q: Tensor, shared: bool,
    max_deviation: float, objective: float,
) -> tuple[Tensor, Tensor, float, float]:
    """(p, q) = 1 + t (p* − 1, q* − 1) with max|p − 1|, |q − 1| ≤ ``max_deviation``, t of least L on a grid from 0.

    Returns the new p, q (modules, U), their L and the smallest t used (1.0: the bound did not bind,
    nothing changes). Per module in the per-module scope, where modules within the bound keep their
    solution; one t for the model in the global scope.
    """
    deviation = torch.maximum((p - 1).abs().amax(1), (q - 1).abs().amax(1))  # (modules,)
    if shared:
        deviation = deviation.max().expand_as(deviation)
    if float(deviation.max()) <= max_deviation:
        return p, q, objective, 1.0
    t_max = torch.where(deviation > max_deviation, max_deviation / deviation, torch.ones_like(deviation))  # (modules,)
    grid = torch.linspace(0, 1, STEP_BACK_GRID, dtype=p.dtype, device=p.device)  # (G,)
    ts = t_max[:, None] * grid  # (modules, G)
    losses = torch.empty_like(ts)  # L per module at each grid point
    for (indices, _, _), problem in zip(groups, problems):
        for g in range(STEP_BACK_GRID):
            t = ts[indices, g][:, None]  # (M, 1)
            losses[indices, g] = problem.objective(1 + t * (p[indices] - 1), 1 + t * (q[indices] - 1))
    if shared:
        best = losses.sum(0).argmin().expand(ts.shape[0])  # (modules,): one t for the model
    else:  # modules already within the bound keep their solution (t = 1, the grid's last point)
        best = torch.where(deviation > max_deviation, losses.argmin(1), torch.full_like(losses.argmin(1), STEP_BACK_GRID - 1))
    t = ts.gather(1, best[:, None])  # (modules, 1)
    new_objective = float(losses.gather(1, best[:, None]).sum())
    return 1 + t * (p - 1), 1 + t * (q - 1), new_objective, float(t.min())


def _als(
    global_adapter: Adapter,
    updates: Sequence[ClientUpdate],
    w: Tensor,
    modules: list[str],
    shared: bool,
    max_sweeps: int,
    tol: float,
    ridge: float = 0.0,
) -> tuple[Tensor, Tensor, list[float], list[float], Bases, list[GramProblem] | list[FactorProblem]]:
    # Batch same-shape modules (all of a transformer's q/v projections, say) into one problem.
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, module in enumerate(modules):
        groups[tuple(global_adapter[module].A.shape) + tuple(global_adapter[module].B.shape)].append(index)
    # The Gram route keeps 2·M·(J r)² floats per group; beyond the budget the same ALS runs matrix-free.
    J, itemsize = len(updates) + 1, global_adapter[modules[0]].A.element_size()
    gram_bytes = sum(2 * len(indices) * (J * global_adapter[modules[indices[0]]].A.shape[0]) ** 2 * itemsize
                     for indices in groups.values())
    bases: Bases = []
    problems: list[GramProblem] | list[FactorProblem]
    if gram_bytes <= GRAM_BUDGET_BYTES:
        for indices in groups.values():
            E, F = stacked_bases(global_adapter, updates, [modules[i] for i in indices])
            bases.append((indices, E, F))
        problems = [GramProblem.from_stacked(E, F, w) for _, E, F in bases]
        solution = solve_als(problems, shared, max_sweeps, tol, ridge)
    else:
        for indices in groups.values():
            A, B = stacked_blocks(global_adapter, updates, [modules[i] for i in indices])
            bases.append((indices, A, B))
        problems = [FactorProblem.build(A, B, w) for _, A, B in bases]
        solution = solve_als_factors(problems, shared, max_sweeps, tol, ridge)
    p = torch.empty(len(modules), len(updates), dtype=torch.float64, device=w.device)
    q = torch.empty_like(p)
    for indices, pg, qg in zip(groups.values(), solution.ps, solution.qs):
        p[indices], q[indices] = pg, qg
    return p, q, solution.trace, solution.penalised, bases, problems


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
