"""What travels between ServerApp and ClientApps: float32 ArrayRecords with stable keys.

* ``"arrays"`` (both ways): the LoRA factors under PEFT's own state-dict names
  (:func:`fedlora.peft_bridge.adapter_to_state_dict`, ``base_model.model.<module>.lora_A.weight``)
  plus the classifier head under ``base_model.model.<head key>`` -- the names PEFT writes into
  ``adapter_model.safetensors``, so a received record is a loadable adapter state dict.
* ``"base-delta"`` (down only, FedEx-LoRA / FLoRA): the product-space (d, k) deltas the client
  has not merged yet, keyed ``"<round>/<module>"`` so the client replays them in order, exactly
  as the local engine merged them.
* ``"local-B"`` (``context.state`` only, FedSA-LoRA): the client's private B factors.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord
from torch import Tensor

from fedlora.aggregation import Adapter
from fedlora.peft_bridge import PEFT_PREFIX, adapter_to_state_dict, state_dict_to_adapter


def round_record(tensors: dict[str, Tensor]) -> ArrayRecord:
    return ArrayRecord.from_torch_state_dict({k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()})


def _tensors(record: ArrayRecord) -> dict[str, Tensor]:
    # clone: from_numpy shares the (read-only) message buffer
    return {k: torch.from_numpy(a.numpy()).clone() for k, a in record.items()}


def model_record(adapter: Adapter, head: dict[str, Tensor]) -> ArrayRecord:
    """Adapter + head as one ArrayRecord keyed by PEFT state-dict names."""
    state = adapter_to_state_dict(adapter)
    state.update({f"{PEFT_PREFIX}{k}": v for k, v in head.items()})
    return round_record(state)


def record_to_model(record: ArrayRecord) -> tuple[Adapter, dict[str, Tensor]]:
    """Inverse of :func:`model_record`: ``(adapter, head)``."""
    state = _tensors(record)
    adapter = state_dict_to_adapter(state, strict=False)
    head = {k[len(PEFT_PREFIX):]: v for k, v in state.items() if ".lora_" not in k}
    return adapter, head


def deltas_record(deltas: dict[int, dict[str, Tensor]]) -> ArrayRecord:
    """``{round: {module: (d, k)}}`` → ``"<round>/<module>"`` keys."""
    return round_record({f"{r}/{m}": d for r, per_module in deltas.items() for m, d in per_module.items()})


def record_to_deltas(record: ArrayRecord) -> dict[int, dict[str, Tensor]]:
    """Inverse of :func:`deltas_record`, rounds in ascending order."""
    out: dict[int, dict[str, Tensor]] = {}
    for key, tensor in _tensors(record).items():
        r, _, module = key.partition("/")
        out.setdefault(int(r), {})[module] = tensor
    return dict(sorted(out.items()))


def tensors_record(tensors: dict[str, Tensor]) -> ArrayRecord:
    return round_record(tensors)


def record_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    return _tensors(record)
