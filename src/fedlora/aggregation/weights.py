"""Client weights w_u used for the target T = Σ_u w_u B_u A_u and for every average."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.aggregation.types import AggregationError, ClientUpdate

WEIGHTINGS = ("examples", "uniform", "authors")


def client_weights(
    updates: Sequence[ClientUpdate], weighting: str = "examples", *, device: torch.device | str | None = None
) -> Tensor:
    """Return w (U,) in float64, summing to one, on ``device``.

    ``examples``: w_u = n_u / Σ n (FedAvg). ``uniform``: w_u = 1 / U. ``authors`` is FLoRA-NA's
    mix (uniform objective, data-size-weighted broadcast): its *broadcast* weights are the
    example weights, which is what this returns; flora-na derives its uniform solve weights itself.
    ``device`` defaults to the device of the first update's tensors (the CPU if it has none),
    so the weights can multiply the factors they weight.
    """
    if weighting not in WEIGHTINGS:
        raise AggregationError(f"unknown weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")
    if device is None:
        device = _updates_device(updates)
    if weighting == "uniform":
        return torch.full((len(updates),), 1.0 / len(updates), dtype=torch.float64, device=device)
    counts = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64, device=device)
    return counts / counts.sum()


def _updates_device(updates: Sequence[ClientUpdate]) -> torch.device:
    for update in updates[:1]:
        for pair in update.adapter.values():
            return pair.A.device
    return torch.device("cpu")
