"""Local training of a PEFT LoRA model, and the logits loop that classification tasks score.

Training is task-agnostic: a batch is whatever the task's collate made, and ``model(**batch).loss``
is the objective. Both loops run on ``runtime.device`` under ``runtime.autocast()`` (fp16 with a
loss scaler); parameters stay float32 (:mod:`fedlora.models.runtime`). Thread count is the caller's
business (``torch.set_num_threads``); nothing here changes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from fedlora.aggregation.types import TrainingPolicy
from fedlora.models.optim import LocalOptim
from fedlora.models.lora_state import active_adapter_name, head_parameters, lora_layers
from fedlora.models.runtime import Runtime, runtime_of


def _batch_size(batch: dict[str, Any]) -> int:
    for key in ("labels", "input_ids"):
        if isinstance(batch.get(key), Tensor):
            return int(batch[key].shape[0])
    raise KeyError(f"batch has neither 'labels' nor 'input_ids' tensors (keys: {sorted(batch)})")


def split_batch(batch: dict[str, Any], pieces: int) -> list[dict[str, Any]]:
    """``batch`` cut into ``pieces`` micro-batches along the rows, each trimmed of the padding columns
    that only the rows of other pieces needed (right padding; left-padded batches are left as they are)."""
    if pieces == 1:
        return [batch]
    rows = _batch_size(batch)
    if pieces > rows:
        raise ValueError(f"cannot split a batch of {rows} rows into {pieces} micro-batches; lower --grad-accum")
    parts = {k: v.tensor_split(pieces) for k, v in batch.items() if isinstance(v, Tensor)}  # each tensor split once
    cut = [{k: parts[k][i] if k in parts else v for k, v in batch.items()} for i in range(pieces)]
    for piece in cut:
        mask = piece.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            used = int(torch.nonzero(mask.any(0)).max()) + 1 if mask.any() else mask.shape[1]
            length = mask.shape[1]
            for k, v in piece.items():
                if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[1] == length:
                    piece[k] = v[:, :used]
    return cut


def policy_grad_flags(model: nn.Module, policy: TrainingPolicy) -> dict[Tensor, bool]:
    """Wanted ``requires_grad`` for every LoRA factor and head parameter under ``policy``."""
    adapter = active_adapter_name(model)
    wanted: dict[Tensor, bool] = {}  # the LoRA factors' and the head's weight Parameters
    for layer in lora_layers(model).values():
        wanted[cast(Tensor, layer.lora_A[adapter].weight)] = policy.train_A
        wanted[cast(Tensor, layer.lora_B[adapter].weight)] = policy.train_B
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
    optim: LocalOptim | None = None,
    runtime: Runtime | None = None,
    micro_batches: int = 1,
    loss_weight: Callable[[dict[str, Any]], int] | None = None,
) -> dict[str, float | int]:
    """Train ``steps`` batches with a fresh AdamW; return ``{"loss", "steps", "examples"}``.

    Gradient accumulation: with ``micro_batches`` k > 1 each batch is processed as k pieces
    (:func:`split_batch`) whose losses are weighted by ``loss_weight(piece) / Σ loss_weight`` (default:
    rows; a causal LM: supervised tokens, :meth:`fedlora.tasks.Task.loss_weight`) before one optimizer
    step, so the update equals the whole batch's up to float rounding, with 1/k of the activations.

    ``optim``: weight decay, gradient clipping and the lr of each step (:class:`fedlora.models.optim.LocalOptim`;
    default: plain AdamW, no decay, no clipping, ``lr`` throughout). Clipping bounds the global L2 norm
    of all trained parameters' gradients (after fp16 unscaling), as transformers' ``max_grad_norm``.

    ``runtime``: device and precision (default: :func:`fedlora.models.runtime.runtime_of` the model);
    batches are moved to the device, forward and loss run under its autocast.

    ``lora_A`` is frozen when ``policy.train_A`` is False and ``lora_B`` when ``policy.train_B``
    is False; frozen tensors are left out of the optimizer so they stay bit-identical (AdamW's
    weight decay would otherwise still move them). ``requires_grad`` flags are restored after.
    Each batch is a dict of model inputs whose forward returns a loss. Deterministic given ``seed``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    wanted = policy_grad_flags(model, policy)
    previous = {p: p.requires_grad for p in wanted}
    runtime = runtime or runtime_of(model)
    optim = optim or LocalOptim()
    scaler = runtime.grad_scaler()
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
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=optim.weight_decay)
        torch.manual_seed(seed)  # fixes LoRA/attention dropout masks
        model.train()
        for step in range(steps):
            try:
                batch = next(batches)
            except StopIteration:
                raise ValueError(
                    f"batch iterator ran out after {step} of {steps} steps; pass a cycling iterator"
                ) from None
            batch = runtime.to_device(batch)
            pieces = split_batch(batch, micro_batches)
            weights = [float(loss_weight(p)) if loss_weight else float(_batch_size(p)) for p in pieces]
            optimizer.zero_grad(set_to_none=True)
            if optim.scheduled:
                for group in optimizer.param_groups:
                    group["lr"] = optim.lr_at(lr, step)
            step_loss = 0.0
            for piece, weight in zip(pieces, weights):
                share = weight / sum(weights) if len(pieces) > 1 else 1.0  # x * 1.0 == x: no accumulation, same bits
                with runtime.autocast():
                    loss = model(**piece).loss
                if loss is None:
                    raise ValueError("model returned no loss; the batch must contain 'labels'")
                if scaler is None:
                    (loss * share).backward()
                else:  # fp16: scale the loss so small gradients survive
                    scaler.scale(loss * share).backward()
                step_loss += float(loss.detach()) * share
            if optim.max_grad_norm > 0:
                if scaler is not None:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
                torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
            if scaler is None:
                optimizer.step()
            else:  # skips the step if the fp16 gradients overflowed
                scaler.step(optimizer)
                scaler.update()
            losses.append(step_loss)
            examples += _batch_size(batch)
    finally:
        for p, flag in previous.items():
            p.requires_grad_(flag)
        model.eval()
    mean_loss = sum(losses) / len(losses) if losses else math.nan
    return {"loss": mean_loss, "steps": len(losses), "examples": examples}


def evaluate(
    model: nn.Module, loader: Iterable[dict[str, Any]], num_labels: int, runtime: Runtime | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over ``loader`` (a classification model: its output has ``.logits``).

    Returns ``(predictions, labels)``: predictions are (n, num_labels) float32 logits for
    classification and (n,) for regression (``num_labels == 1``); labels are (n,). ``runtime``
    defaults to :func:`fedlora.models.runtime.runtime_of` the model.
    """
    runtime = runtime or runtime_of(model)
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
            with runtime.autocast():
                logits = model(**runtime.to_device(batch)).logits  # (b, num_labels)
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
