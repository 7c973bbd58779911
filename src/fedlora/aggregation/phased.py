"""Methods whose round needs several client round trips, each answered by a weighted *sum* (FedASK).

A phased method declares, besides its pure function, a :class:`PhasedAggregation`: what a client
uploads in each phase (from its trained adapter and what the server broadcast) and what the server
makes of the weighted sum of those uploads (the next broadcast, or after the last phase the new global
adapter). The server never needs one client's upload, only Σ_u w_u upload_u, which is what secure
aggregation delivers; a client never uploads its factors.

Phase 1's upload is computed by the client right after training and travels with its training reply
(its broadcast is empty: what it needs, such as a sketch's seed, is in the method's options); phases
2..P are extra round trips. The engines run this through :mod:`fedlora.protocol.phases` and name no
method. :func:`run_phases` is the same computation in one process, from the clients' adapters: the
method's registered function, so :func:`fedlora.aggregation.aggregate` (validation, divergence, bytes)
works for it as for any method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedlora.aggregation.types import Adapter, AggregationResult, ClientUpdate

Upload = dict[str, Tensor]  # what one client sends in one phase: name -> tensor
# (phase, the client's trained adapter, the server's broadcast, the method's options) -> the client's upload
ClientPhase = Callable[[int, Adapter, Upload, dict[str, Any]], Upload]
# (phase, the global adapter, Σ_u w_u upload_u, what the server broadcast before it, options) -> next broadcast
ServerPhase = Callable[[int, Adapter, Upload, Upload, dict[str, Any]], Upload]
# (the global adapter, Σ_u w_u of the last phase's uploads, the last broadcast, options) -> the new global
Finish = Callable[[Adapter, Upload, Upload, dict[str, Any]], AggregationResult]
# (phase, the global adapter, options) -> {name: shape}: every client's upload in the phase, or the broadcast before it
Shapes = Callable[[int, Adapter, dict[str, Any]], dict[str, tuple[int, ...]]]


@dataclass(frozen=True)
class PhasedAggregation:
    """A method's round as ``phases`` client round trips of weighted sums (see the module docstring)."""

    phases: int
    upload: ClientPhase
    server: ServerPhase  # after phases 1..P-1
    finish: Finish  # after phase P
    shapes: Shapes  # of a client's upload in each phase
    broadcasts: Shapes  # of what the server sends before phase p >= 2 (bytes, and the client's check)


def weighted_sum(uploads: Sequence[Upload], weights: Tensor) -> Upload:
    """Σ_u w_u upload_u, in float64, name by name (every upload has the same names and shapes)."""
    out = {}
    for name, first in uploads[0].items():
        w = weights.to(device=first.device, dtype=torch.float64)  # (U,)
        out[name] = torch.einsum("u,u...->...", w, torch.stack([u[name].double() for u in uploads]))
    return out


def upload_problem(upload: object, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What is wrong with one client's upload for a phase (None: it is well formed)."""
    if not isinstance(upload, dict):
        return f"a phase upload must be a dict {{name: tensor}}, not a {type(upload).__name__}"
    if set(upload) != set(shapes):
        return (f"phase upload names differ from the expected ones: missing {sorted(set(shapes) - set(upload))}, "
                f"unknown {sorted(set(upload) - set(shapes), key=repr)}")
    for name, shape in shapes.items():
        tensor = upload[name]
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            return f"phase upload {name!r} is not a floating-point tensor"
        if tuple(tensor.shape) != shape:
            return f"phase upload {name!r} has shape {tuple(tensor.shape)}, expected {shape}"
        if not bool(torch.isfinite(tensor).all()):
            return f"phase upload {name!r} is not finite"
    return None


def run_phases(phased: PhasedAggregation, global_adapter: Adapter, updates: Sequence[ClientUpdate],
               weights: Tensor, options: dict[str, Any]) -> AggregationResult:
    """Every phase in one process: each client's upload from its adapter, summed, then the server's step."""
    broadcast: Upload = {}
    for phase in range(1, phased.phases + 1):
        total = weighted_sum([phased.upload(phase, u.adapter, broadcast, options) for u in updates], weights)
        if phase == phased.phases:
            return phased.finish(global_adapter, total, broadcast, options)
        broadcast = phased.server(phase, global_adapter, total, broadcast, options)
    raise AssertionError("a phased method has at least one phase")
