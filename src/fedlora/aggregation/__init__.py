"""Server-side aggregation of federated LoRA adapters (pure tensor functions; no Flower, no PEFT)."""

from fedlora.aggregation.types import (
    Adapter,
    AggregationError,
    AggregationResult,
    ClientUpdate,
    LoraPair,
    TrainingPolicy,
)

__all__ = [
    "Adapter",
    "AggregationError",
    "AggregationResult",
    "ClientUpdate",
    "LoraPair",
    "TrainingPolicy",
]
