"""Bytes on the wire per round, float32, from each method's training policy.

Per client and module (A is (r, k), B is (d, r), r the client's rank):
  up    = r·k if A is uploaded + d·r if B is uploaded
  down  = the same factors back (both factors when the policy downloads the full adapter: FedSVD,
          RoLoRA), plus d·k for a dense residual (FedEx-LoRA), or every client's factors,
          Σ_v (r_v·k + d·r_v), for stacking (FLoRA).
Pass the round's policy (``policy.for_round(t)``) for methods whose uploads alternate. With mixed
ranks each client's bytes count at its own rank. Totals are summed over the round's clients: the
server's ingress and egress. A phased method (FedASK) adds its phases' uploads and broadcasts
(:func:`phase_bytes`) to the factors it downloads.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.aggregation.phased import PhasedAggregation
from fedlora.aggregation.types import Adapter, TrainingPolicy

FLOAT32_BYTES = 4


def round_bytes(policy: TrainingPolicy, global_adapter: Adapter, num_clients: int,
                ranks: Sequence[int] | None = None) -> tuple[int, int]:
    """(bytes_up, bytes_down) for one round with ``num_clients`` participants.

    ``ranks``: each participant's LoRA rank (mixed ranks); None means every client has the server's rank.
    """
    up = down = 0
    for pair in global_adapter.values():
        r_server, k = pair.A.shape
        d = pair.B.shape[0]
        client_ranks = list(ranks) if ranks is not None else [r_server] * num_clients
        stacked = sum(r * k + d * r for r in client_ranks)
        for r in client_ranks:
            shared = (r * k if policy.upload_A else 0) + (d * r if policy.upload_B else 0)
            up += shared
            if policy.download_stacked:
                down += stacked
            elif policy.download_full_adapter:
                down += r * k + d * r + (d * k if policy.download_residual else 0)
            else:
                down += shared + (d * k if policy.download_residual else 0)
    return up * FLOAT32_BYTES, down * FLOAT32_BYTES


def phase_bytes(phased: PhasedAggregation, global_adapter: Adapter, num_clients: int,
                options: dict) -> tuple[int, int]:
    """(bytes_up, bytes_down) of a phased method's round trips: every phase's upload, every later phase's broadcast."""
    up = down = 0
    for phase in range(1, phased.phases + 1):
        up += sum(_numel(shape) for shape in phased.shapes(phase, global_adapter, options).values())
        if phase > 1:
            down += sum(_numel(shape) for shape in phased.broadcasts(phase, global_adapter, options).values())
    return up * num_clients * FLOAT32_BYTES, down * num_clients * FLOAT32_BYTES


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for n in shape:
        out *= int(n)
    return out
