"""Local training and evaluation of a PEFT LoRA classification model.

Thread count is the caller's business (``torch.set_num_threads``); nothing here changes it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedlora.aggregation.types import TrainingPolicy
from fedlora.peft_bridge import active_adapter_name, head_parameters, lora_layers


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _batch_size(batch: dict[str, Any]) -> int:
    for key in ("labels", "input_ids"):
        if isinstance(batch.get(key), Tensor):
            return int(batch[key].shape[0])
    raise KeyError(f"batch has neither 'labels' nor 'input_ids' tensors (keys: {sorted(batch)})")


def _policy_grad_flags(model: nn.Module, policy: TrainingPolicy) -> dict[nn.Parameter, bool]:
    """Wanted ``requires_grad`` for every LoRA factor and head parameter under ``policy``."""
    adapter = active_adapter_name(model)
    wanted: dict[nn.Parameter, bool] = {}
    for layer in lora_layers(model).values():
        wanted[layer.lora_A[adapter].weight] = policy.train_A
        wanted[layer.lora_B[adapter].weight] = policy.train_B
    for p in head_parameters(model).values():
        wanted[p] = True  # the head is always trained (it is FedAvg-ed, never frozen)
    return wanted


def train_local(
    model: nn.Module,
    batches: Iterator[dict[str, Any]],
    steps: int,
    lr: float,
    policy: TrainingPolicy,
    seed: int,
    weight_decay: float = 0.0,
) -> dict[str, float | int]:
    """Train ``steps`` batches with a fresh AdamW; return ``{"loss", "steps", "examples"}``.

    ``lora_A`` is frozen when ``policy.train_A`` is False and ``lora_B`` when ``policy.train_B``
    is False; frozen tensors are left out of the optimizer so they stay bit-identical (AdamW's
    weight decay would otherwise still move them). ``requires_grad`` flags are restored after.
    Each batch is a dict of model inputs including ``labels``. Deterministic given ``seed``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    wanted = _policy_grad_flags(model, policy)
    previous = {p: p.requires_grad for p in wanted}
    device = next(model.parameters()).device
    losses: list[float] = []
    examples = 0
    try:
        for p, flag in wanted.items():
            p.requires_grad_(flag)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: policy freezes both A and B and the model has no head")
        # Fresh optimizer each call: in federated rounds the factors are overwritten by the
        # server between calls, so stale Adam moments would refer to different parameters.
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        torch.manual_seed(seed)  # fixes LoRA/attention dropout masks
        model.train()
        for step in range(steps):
            try:
                batch = next(batches)
            except StopIteration:
                raise ValueError(
                    f"batch iterator ran out after {step} of {steps} steps; pass a cycling iterator"
                ) from None
            batch = _to_device(batch, device)
            loss = model(**batch).loss
            if loss is None:
                raise ValueError("model returned no loss; the batch must contain 'labels'")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            examples += _batch_size(batch)
    finally:
        for p, flag in previous.items():
            p.requires_grad_(flag)
        model.eval()
    mean_loss = sum(losses) / len(losses) if losses else math.nan
    return {"loss": mean_loss, "steps": len(losses), "examples": examples}


def evaluate(
    model: nn.Module, loader: Iterable[dict[str, Any]], num_labels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over ``loader``.

    Returns ``(predictions, labels)``: predictions are (n, num_labels) float32 logits for
    classification and (n,) for regression (``num_labels == 1``); labels are (n,).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    with torch.inference_mode():
        for batch in loader:
            batch = dict(batch)
            y = batch.pop("labels", batch.pop("label", None))
            if y is None:
                raise KeyError(f"evaluation batch needs 'labels' (keys: {sorted(batch)})")
            logits = model(**_to_device(batch, device)).logits  # (b, num_labels)
            if logits.shape[-1] != num_labels:
                raise ValueError(f"model outputs {logits.shape[-1]} logits but num_labels={num_labels}")
            preds.append(logits.float().cpu().numpy())
            labels.append(torch.as_tensor(y).cpu().numpy())
    model.train(was_training)
    if not preds:
        shape = (0,) if num_labels == 1 else (0, num_labels)
        return np.zeros(shape, dtype=np.float32), np.zeros((0,))
    out = np.concatenate(preds)
    return (out[:, 0] if num_labels == 1 else out), np.concatenate(labels)
