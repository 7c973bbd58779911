"""A new aggregation method in one file: coordinate-wise median of the clients' factors.

Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018:
    Â = median_u A_u,   B̂ = median_u B_u   (element-wise).
A single client sending garbage moves no coordinate past the honest clients' range. Like FedIT it
aggregates the factors separately, so B̂Â is not the average product; weights are ignored.

Use it like a built-in one once this module is imported:
    python -c "import examples.custom_method" ...  or in your script:
    import examples.custom_method  # registers "median"
    fedlora.engines.local.run(RunConfig(method="median", ...))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from torch import Tensor

from fedlora.aggregation import Adapter, AggregationResult, ClientUpdate, LoraPair, TrainingPolicy, register_method
from fedlora.aggregation.options import AtLeast


@register_method(
    "median",
    policy=TrainingPolicy(),  # clients train and upload A and B, like FedIT
    summary="coordinate-wise median of A and of B (Yin et al. 2018)",
)
def median(
    global_adapter: Adapter, updates: Sequence[ClientUpdate], weights: Tensor, *, min_clients_for_median: Annotated[int, AtLeast(1)] = 3
) -> AggregationResult:
    out: Adapter = {}
    for module in global_adapter:
        As = torch.stack([u.adapter[module].A for u in updates])  # (U, r, k)
        Bs = torch.stack([u.adapter[module].B for u in updates])  # (U, d, r)
        if len(updates) < min_clients_for_median:  # too few for a median to mean anything: plain average
            out[module] = LoraPair(A=torch.einsum("u,urk->rk", weights, As), B=torch.einsum("u,udr->dr", weights, Bs))
        else:
            out[module] = LoraPair(A=As.median(dim=0).values, B=Bs.median(dim=0).values)
    return AggregationResult(adapter=out)
