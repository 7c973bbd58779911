"""FLoRA (stacking): merge the exact average into W0 and restart LoRA from scratch.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024, arXiv 2409.05976 (Sec. 3.2): the server stacks the clients'
factors, B_stack = [w_1 B_1 … w_U B_U] (d, U r) and A_stack = [A_1; …; A_U] (U r, k), so
B_stack A_stack = Σ_u w_u B_u A_u = T exactly; every client downloads the stacked factors
(U times FedIT's download), merges W0 ← W0 + s·T and re-initialises its LoRA module.

Here: ``base_delta = T``, ``extras["stacked"]`` its factorisation (what clients download:
B_stack, A_stack per module, with the weights folded into B_stack) and the new global adapter a
fresh PEFT-style init (:func:`reinitialised`), A ~ U(−1/√k, 1/√k) (PEFT's kaiming-uniform with
a = √5) and B = 0, drawn from ``seed`` so runs are reproducible and a client can draw the same init
without downloading it; its product is zero, so adapter + base_delta reproduces T exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.aggregation.methods.common import stacked_factors
from fedlora.aggregation.registry import register_method
from fedlora.aggregation.types import Adapter, AggregationResult, ClientUpdate, LoraPair, TrainingPolicy


@register_method(
    "flora",
    # Mixed ranks: the stacked download would carry every client's zero-padded blocks; not implemented.
    policy=TrainingPolicy(download_stacked=True, server_seed=True, mixed_ranks=False),
    summary="stack factors, merge T into W0, re-initialise LoRA",
    source="Wang et al., NeurIPS 2024",
    rebuild=lambda like, seed: reinitialised(like, seed),  # clients draw the re-init from the server's seed
)
def flora(
    global_adapter: Adapter, updates: Sequence[ClientUpdate], weights: Tensor, *, seed: int = 0
) -> AggregationResult:
    base_delta: dict[str, Tensor] = {}
    stacked: dict[str, LoraPair] = {}
    for module in global_adapter:
        B_stack, A_stack = stacked_factors(updates, module, weights)  # (d, U r), (U r, k)
        stacked[module] = LoraPair(A=A_stack, B=B_stack)
        base_delta[module] = B_stack @ A_stack  # (d, k): T = Σ_u w_u B_u A_u, as target_product computes it
    return AggregationResult(adapter=reinitialised(global_adapter, seed), base_delta=base_delta,
                             extras={"stacked": stacked})


def reinitialised(like: Adapter, seed: int) -> Adapter:
    """A fresh LoRA init with ``like``'s shapes, dtype and device: A ~ U(−1/√k, 1/√k), B = 0, from ``seed``.

    Modules are drawn in sorted order, so the init does not depend on dict order; a Flower client
    calls this with the seed the server names to rebuild the global adapter instead of downloading it
    (pass the same dtype as the server: float32 and float64 draws differ).

    A is always drawn on the CPU, from a CPU generator, and then moved to ``like``'s device: random
    streams differ between devices (a CUDA generator gives other numbers for the same seed), and
    the client that re-draws this init on its CPU must get exactly the server's values wherever
    the server aggregates.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    adapter: Adapter = {}
    for module in sorted(like):
        pair = like[module]
        r, k = pair.A.shape
        bound = 1.0 / k**0.5
        A = (torch.rand(r, k, generator=generator, dtype=pair.A.dtype, device="cpu") * 2 - 1) * bound  # (r, k)
        A = A.to(pair.A.device)  # after the draw and its arithmetic: bit-identical on every device
        adapter[module] = LoraPair(A=A, B=torch.zeros_like(pair.B))  # product is exactly 0
    return {m: adapter[m] for m in like}
