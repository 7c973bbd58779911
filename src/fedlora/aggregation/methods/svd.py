"""Truncated SVD of the ideal aggregate: the optimal rank-r answer (the yardstick).

Eckart–Young–Mirsky: among all rank-r matrices, the truncated SVD of T = Σ_u w_u B_u A_u
minimises ‖X − T‖_F, so no method that broadcasts a rank-r adapter (FedIT, FLoRA-NA, ...) can
have lower divergence. Used as an aggregation method by e.g. FedRPCA/"LoRA-FAIR"-style
baselines; here it is computed from the factors, T = F E with F = [w_u B_u] (d, U r) and
E = [A_u] (U r, k), by two thin QRs and the SVD of a (U r, U r) core, never forming T.
Split B = U_r √Σ_r (d, r), A = √Σ_r V_rᵀ (r, k); same communication as FedIT.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fedlora.aggregation import lowrank
from fedlora.aggregation.methods.common import factors
from fedlora.aggregation.registry import register_method
from fedlora.aggregation.types import Adapter, AggregationResult, ClientUpdate, LoraPair


@register_method(
    "svd",
    summary="truncated SVD of T = Σ w_u B_u A_u, the Eckart–Young optimum",
    source="yardstick (Eckart & Young, 1936)",
)
def svd(global_adapter: Adapter, updates: Sequence[ClientUpdate], weights: Tensor) -> AggregationResult:
    adapter: Adapter = {}
    for module, pair in global_adapter.items():
        Bs, As = factors(updates, module)
        F, E = lowrank.stack_factors(Bs, As, weights)
        B, A, _ = lowrank.truncated_svd_factors(F, E, pair.rank)
        adapter[module] = LoraPair(A=A, B=B)
    return AggregationResult(adapter=adapter)
