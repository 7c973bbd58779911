"""Server-side aggregation of federated LoRA adapters: pure tensor functions, no Flower, no PEFT.

    from fedlora.aggregation import aggregate, available_methods
    result = aggregate("flora-na", global_adapter, updates)   # solver="als", scope="per-module"
    result.adapter, result.base_delta, result.metrics["divergence"]
"""

from fedlora.aggregation.api import aggregate
from fedlora.aggregation.divergence import DivergenceReport, divergence_report
from fedlora.aggregation.registry import MethodSpec, available_methods, get_method, register_method
from fedlora.aggregation.types import (
    Adapter,
    AggregationError,
    AggregationResult,
    ClientUpdate,
    LoraPair,
    TrainingPolicy,
)
from fedlora.aggregation.weights import client_weights

__all__ = [
    "Adapter",
    "AggregationError",
    "AggregationResult",
    "ClientUpdate",
    "DivergenceReport",
    "LoraPair",
    "MethodSpec",
    "TrainingPolicy",
    "aggregate",
    "available_methods",
    "client_weights",
    "divergence_report",
    "get_method",
    "register_method",
]
