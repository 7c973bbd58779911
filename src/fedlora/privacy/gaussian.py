"""DP-FedAvg's server step over tensors: clip each client's update to C, sum, add N(0, σ²), divide by m.

McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018 (DP-FedAvg, the fixed-denominator estimator): with Δ_u the update of client u (every
tensor it uploads minus what it was sent, flattened into one vector),

    Δ̃_u = Δ_u · min(1, C / ‖Δ_u‖₂)                       (clip: ‖Δ̃_u‖₂ <= C)
    Δ̄   = (Σ_{u ∈ sampled} Δ̃_u + N(0, σ² I)) / m,   σ = z·C

m is the number of clients *planned* for the round (public), not the number that reported: a client
that fails or is rejected contributes 0, which is within the sensitivity bound; dividing by the count
that did report would leak it. Weights are uniform (each client one vote): example-weighted
averages would let a client's data size change the sensitivity.

Pure tensors, no engine: the caller (:mod:`fedlora.protocol.private`) says what an update is. Maths
in float64 (like the rest of the server), noise drawn from a seeded generator so a run is
reproducible given its seed; see docs/privacy.md for what a seeded generator means for an attacker.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Delta = dict[str, Tensor]  # one client's update: name -> tensor (factor deltas and head deltas together)


def joint_norm(delta: Delta) -> float:
    """‖Δ‖₂ over every tensor of one update, as if flattened into one vector."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))


def clip_update(delta: Delta, clip: float) -> tuple[Delta, float]:
    """``delta`` scaled to norm at most ``clip`` (unchanged inside the ball), and its norm before clipping."""
    norm = joint_norm(delta)
    scale = 1.0 if norm <= clip else clip / norm
    return {name: t.double() * scale for name, t in delta.items()}, norm


def noisy_mean(deltas: list[Delta], *, clip: float, noise_std: float, denominator: int,
               generator: torch.Generator, like: Delta) -> tuple[Delta, list[float]]:
    """(Σ_u clip(Δ_u) + N(0, noise_std² I)) / denominator, and each client's norm before clipping.

    ``like``: the names and shapes every update must have (the round's reference; callers validate the
    clients against it first); the noise is drawn in its order of names, so a permutation of the
    clients changes nothing. Noise is drawn even with no client, so an empty round still releases only
    noise (what the accountant assumes).
    """
    if denominator < 1:
        raise ValueError(f"denominator must be >= 1 (the clients planned for the round), got {denominator}")
    if clip <= 0 or not math.isfinite(clip):
        raise ValueError(f"the clip bound C must be a finite number > 0, got {clip}")
    total = {name: torch.zeros(t.shape, dtype=torch.float64, device=t.device) for name, t in like.items()}
    norms = []
    for delta in deltas:
        clipped, norm = clip_update(delta, clip)
        norms.append(norm)
        for name, t in clipped.items():
            total[name] += t
    return noised_mean(total, noise_std=noise_std, denominator=denominator, generator=generator), norms


def noised_mean(total: Delta, *, noise_std: float, denominator: int, generator: torch.Generator) -> Delta:
    """(Σ + N(0, noise_std² I)) / denominator for a sum of clipped updates (secure aggregation hands the server
    only this sum); the draws follow the names in sorted order, so the noise does not depend on the clients."""
    out = {}
    for name in sorted(total):
        t = total[name].double()
        noise = torch.randn(t.shape, dtype=torch.float64, generator=generator, device="cpu").to(t.device)
        out[name] = (t + noise_std * noise) / denominator
    return out
