"""Client weights w_u used for the target T = Σ_u w_u B_u A_u and for every average."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.aggregation.types import AggregationError, ClientUpdate

WEIGHTINGS = ("examples", "uniform", "authors")


def client_weights(updates: Sequence[ClientUpdate], weighting: str = "examples") -> Tensor:
    """Return w (U,) in float64, summing to one.

    ``examples``: w_u = n_u / Σ n (FedAvg). ``uniform``: w_u = 1 / U. ``authors`` is FLoRA-NA's
    mix (uniform objective, data-size-weighted broadcast): its *broadcast* weights are the
    example weights, which is what this returns; flora-na derives its uniform solve weights itself.
    """
    if weighting not in WEIGHTINGS:
        raise AggregationError(f"unknown weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")
    if weighting == "uniform":
        return torch.full((len(updates),), 1.0 / len(updates), dtype=torch.float64)
    counts = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    return counts / counts.sum()
