"""FLoRA (stacking): merge the exact average into W0 and restart LoRA from scratch.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024, arXiv 2409.05976 (Sec. 3.2): the server stacks the clients'
factors, B_stack = [w_1 B_1 … w_U B_U] (d, U r) and A_stack = [A_1; …; A_U] (U r, k), so
B_stack A_stack = Σ_u w_u B_u A_u = T exactly; every client downloads the stacked factors
(U times FedIT's download), merges W0 ← W0 + s·T and re-initialises its LoRA module.

Here: ``base_delta = T`` and the new global adapter is a fresh PEFT-style init, A ~ U(−1/√k,
1/√k) (PEFT's kaiming-uniform with a = √5) and B = 0, drawn from ``seed`` so runs are
reproducible; its product is zero, so adapter + base_delta reproduces T exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.aggregation.methods.common import target_product
from fedlora.aggregation.registry import register_method
from fedlora.aggregation.types import Adapter, AggregationResult, ClientUpdate, LoraPair, TrainingPolicy


@register_method(
    "flora",
    policy=TrainingPolicy(download_stacked=True),
    summary="stack factors, merge T into W0, re-initialise LoRA (Wang et al. 2024)",
)
def flora(
    global_adapter: Adapter, updates: Sequence[ClientUpdate], weights: Tensor, *, seed: int = 0
) -> AggregationResult:
    generator = torch.Generator().manual_seed(seed)
    adapter: Adapter = {}
    base_delta: dict[str, Tensor] = {}
    for module in sorted(global_adapter):  # sorted: the init must not depend on dict order
        pair = global_adapter[module]
        r, k = pair.A.shape
        bound = 1.0 / k**0.5
        A = (torch.rand(r, k, generator=generator, dtype=pair.A.dtype) * 2 - 1) * bound  # (r, k)
        adapter[module] = LoraPair(A=A, B=torch.zeros_like(pair.B))  # product is exactly 0
        base_delta[module] = target_product(updates, module, weights)  # (d, k)
    return AggregationResult(adapter={m: adapter[m] for m in global_adapter}, base_delta=base_delta)
