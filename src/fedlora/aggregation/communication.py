"""Bytes on the wire per round, float32, from each method's training policy.

Per client and module (A is (r, k), B is (d, r)):
  up    = r·k if A is shared + d·r if B is shared
  down  = the same factors back, plus d·k for a dense residual (FedEx-LoRA), or every
          client's factors, U·(r·k + d·r), for stacking (FLoRA).
Totals are summed over the round's clients: the server's ingress and egress.
"""

from __future__ import annotations

from fedlora.aggregation.types import Adapter, TrainingPolicy

FLOAT32_BYTES = 4


def round_bytes(policy: TrainingPolicy, global_adapter: Adapter, num_clients: int) -> tuple[int, int]:
    """(bytes_up, bytes_down) for one round with ``num_clients`` participants."""
    up = down = 0
    for pair in global_adapter.values():
        r, k = pair.A.shape
        d = pair.B.shape[0]
        shared = (r * k if policy.upload_A else 0) + (d * r if policy.upload_B else 0)
        up += shared
        if policy.download_stacked:
            down += num_clients * (r * k + d * r)
        else:
            down += shared + (d * k if policy.download_residual else 0)
    return up * num_clients * FLOAT32_BYTES, down * num_clients * FLOAT32_BYTES
