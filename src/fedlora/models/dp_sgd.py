"""Record-level DP-SGD inside one client: Opacus' per-example gradients, clipping and noise on the LoRA
factors and the head (Abadi et al., CCS 2016; Opacus, Yousefpour et al. 2021).

Each local step draws b of the client's n examples uniformly without replacement (independently each
step, :func:`fedlora.protocol.client.sampled_batches`: the sampler the accountant assumes, not a
shuffled epoch), computes every example's own loss (:meth:`fedlora.tasks.Task.example_losses`),
and lets Opacus' ``GradSampleModule`` produce each example's gradient of the trained parameters. Opacus'
``DPOptimizer`` clips each example's gradient (all trained tensors jointly) to C, sums, adds N(0, (z·C)²),
divides by b, and hands the result to AdamW (its moments and decay are post-processing). The frozen base
model never gets a gradient; only LoRA factors the method trains, and the head, do.

Opacus' hooks are attached for the client's round and removed after it (the local engine's model is
shared by every client); nothing of Opacus stays on the model. The noise comes from torch's global
generator, seeded per (round, client) as the rest of local training: reproducible, and therefore not
what an attacker who knows the seed cannot predict (docs/privacy.md). Accounting:
:class:`fedlora.privacy.accountant.PrivacyBudget` with ``level="record"``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn

from fedlora.aggregation.types import TrainingPolicy
from fedlora.models.optim import LocalOptim
from fedlora.models.runtime import Runtime
from fedlora.models.training import policy_grad_flags

ExampleLosses = Callable[[Tensor, Tensor], Tensor]  # (logits, labels) -> (b,) each row's own loss


def train_local_dp(model: nn.Module, batches: Iterator[dict[str, Any]], steps: int, lr: float, policy: TrainingPolicy,
                   seed: int, optim: LocalOptim, runtime: Runtime, example_losses: ExampleLosses,
                   batch_size: int) -> dict[str, float | int]:
    """``steps`` DP-SGD steps (AdamW on the noised mean gradient); ``{"loss", "steps", "examples"}`` like
    :func:`fedlora.models.training.train_local`. ``batch_size``: b, the fixed batch every step draws."""
    with warnings.catch_warnings():
        # Opacus' backward hook on the first LoRA layer, whose input (frozen embeddings) needs no gradient: torch
        # warns that the hook sees only the output's gradient, which is all Opacus reads.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        return _train(model, batches, steps, lr, policy, seed, optim, runtime, example_losses, batch_size)


def _train(model: nn.Module, batches: Iterator[dict[str, Any]], steps: int, lr: float, policy: TrainingPolicy,
           seed: int, optim: LocalOptim, runtime: Runtime, example_losses: ExampleLosses,
           batch_size: int) -> dict[str, float | int]:
    if optim.dp_sgd_clip <= 0:
        raise ValueError("train_local_dp needs LocalOptim.dp_sgd_clip > 0")
    wanted = policy_grad_flags(model, policy)
    previous = {p: p.requires_grad for p in wanted}
    losses: list[float] = []
    examples = 0
    sampler: GradSampleModule | None = None
    try:
        for p, flag in wanted.items():
            p.requires_grad_(flag)
        params = [p for p in model.parameters() if p.requires_grad]
        torch.manual_seed(seed)  # dropout masks and Opacus' noise
        model.train()  # Opacus records activations in training mode only
        sampler = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer = DPOptimizer(torch.optim.AdamW(params, lr=lr, weight_decay=optim.weight_decay),
                                noise_multiplier=optim.dp_sgd_noise, max_grad_norm=optim.dp_sgd_clip,
                                expected_batch_size=batch_size, loss_reduction="mean")
        for step in range(steps):
            batch = runtime.to_device(next(batches))
            labels = batch["labels"]
            inputs = {k: v for k, v in batch.items() if k != "labels"}  # the loss is ours, per example
            optimizer.zero_grad(set_to_none=True)
            if optim.scheduled:
                for group in optimizer.param_groups:
                    group["lr"] = optim.lr_at(lr, step)
            per_example = example_losses(sampler(**inputs).logits, labels)  # (b,)
            per_example.mean().backward()  # Opacus: each row's gradient, from its own loss only (x b, "mean")
            optimizer.step()  # clip each row to C, sum, + N(0, (zC)^2), / b, AdamW
            losses.append(float(per_example.detach().mean()))
            examples += int(labels.shape[0])
    finally:
        if sampler is not None:
            sampler._close()  # hooks and per-example gradients off the shared model
        for p, flag in previous.items():
            p.requires_grad_(flag)
            p.grad = None
        model.eval()
    return {"loss": sum(losses) / len(losses) if losses else math.nan, "steps": len(losses), "examples": examples}
