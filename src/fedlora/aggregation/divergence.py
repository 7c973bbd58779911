"""Aggregation divergence of any result and the Eckart–Young bound it can never beat.

divergence = ‖B̂Â + Δ − T‖_F / ‖T‖_F with T = Σ_u w_u B_u A_u (the ideal average of the
client products) and Δ the product-space ``base_delta`` merged into W0 (zero for most methods).
Over the model, numerator and denominator are summed over modules before the square root.
The bound is the same ratio for the truncated SVD of T, the optimal rank-r answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
) -> DivergenceReport:
    """Divergence of ``adapter`` (+ ``base_delta``) from T and the Eckart–Young bound, per module and overall."""
    base_delta = base_delta or {}
    w = [float(x) for x in weights]
    err_sq: dict[str, float] = {}
    tail_sq: dict[str, float] = {}
    target_sq: dict[str, float] = {}
    for module, pair in adapter.items():
        dtype = pair.A.dtype
        Bs = [u.adapter[module].B.to(dtype) for u in updates]
        As = [u.adapter[module].A.to(dtype) for u in updates]
        F_T, E_T = lowrank.stack_factors(Bs, As, w)  # T = F_T @ E_T
        S = lowrank.singular_values(F_T, E_T)
        target_sq[module] = float((S**2).sum())
        tail_sq[module] = lowrank.tail_energy(S, pair.rank)
        if module in base_delta:
            # (d, k) terms are dense anyway for methods that ship a residual.
            residual = pair.B @ pair.A + base_delta[module].to(dtype) - F_T @ E_T  # (d, k)
            err_sq[module] = float(torch.linalg.matrix_norm(residual)) ** 2
        else:
            F = torch.cat([pair.B, -F_T], dim=1)  # (d, (U+1) r)
            E = torch.cat([pair.A, E_T], dim=0)  # ((U+1) r, k)
            err_sq[module] = lowrank.product_norm(F, E) ** 2

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
