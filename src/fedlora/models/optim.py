"""How a client's local steps move its adapter: AdamW weight decay, gradient clipping, the lr schedule,
and LoRA dropout.

The knobs users know from PEFT/transformers' ``Trainer``, as one value that both engines build the
same way from a :class:`~fedlora.config.run.RunConfig` (:meth:`LocalOptim.for_round`), so a Flower
client and a simulated one take identical steps.

The learning-rate schedule spans the whole run, not one client's round: the run's optimizer-step
clock is ``(round - 1) * local_steps + local_step`` out of ``rounds * local_steps``. Why: a schedule
that restarted every round would repeat its warm-up and decay to ~0 at the end of every round (a
saw-tooth that wastes the last steps of each round), while what a user means by "cosine with 500
warm-up steps" is what transformers' ``get_scheduler(num_training_steps=...)`` does over all of
training. The clock is the server's (round number), not a client's own count: every client sampled
in round t sees the same lr at the same local step, a resumed run continues the same curve, and
clients that sit out a round (``--fraction`` < 1) do not fall behind it. The formulas are
transformers' (constant_with_warmup, linear, cosine with half a cycle); a test checks them against
``transformers.get_scheduler``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedlora.config.run import LR_SCHEDULES

if TYPE_CHECKING:
    from torch import nn

    from fedlora.config.run import RunConfig



def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """The multiplier of the base learning rate at run step ``step`` (0-based) of ``total``.

    Linear warm-up from 0 over the first ``warmup`` steps, then ``constant`` (1), ``linear`` decay to
    0 at ``total``, or ``cosine`` decay to 0 at ``total`` (transformers' schedules, same formulas).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; use one of {', '.join(LR_SCHEDULES)}")
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class LocalOptim:
    """One client's optimizer settings for one round (the defaults are plain AdamW at a constant lr).

    ``weight_decay``: AdamW's decoupled decay on the trained LoRA factors and head (0: none).
    ``max_grad_norm``: clip the global L2 norm of the gradients to this before each step (0: off);
    with fp16 the loss scaler's factor is removed first, so the bound is on the true gradient.
    ``schedule``, ``warmup_steps``, ``total_steps``: the run's lr schedule (:func:`lr_factor`);
    ``first_step``: the run's step count when this round's local training starts.
    ``dp_sgd_clip``, ``dp_sgd_noise``: record-level DP-SGD (:mod:`fedlora.models.dp_sgd`): every example's
    gradient clipped to this L2 norm, Gaussian noise of std ``dp_sgd_noise`` x the clip on their sum (0: off).
    """

    weight_decay: float = 0.0
    max_grad_norm: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    first_step: int = 0
    dp_sgd_clip: float = 0.0
    dp_sgd_noise: float = 0.0

    @classmethod
    def for_round(cls, config: RunConfig, round_: int, dp_sgd_noise: float = 0.0) -> LocalOptim:
        """The settings a client trains round ``round_`` (1-based) of ``config``'s run with; ``dp_sgd_noise``:
        the record-level noise multiplier the server planned (calibrated from the clients' sizes)."""
        return cls(weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, schedule=config.lr_schedule,
                   warmup_steps=config.warmup_steps, total_steps=config.rounds * config.local_steps,
                   first_step=max(0, round_ - 1) * config.local_steps, dp_sgd_clip=config.dp_sgd_clip,
                   dp_sgd_noise=dp_sgd_noise)

    @property
    def dp_sgd(self) -> bool:
        """Whether local training is record-level DP-SGD."""
        return self.dp_sgd_clip > 0

    @property
    def scheduled(self) -> bool:
        """Whether the lr changes at all (False: the base lr is used as is, bit for bit)."""
        return self.schedule != "constant" or self.warmup_steps > 0

    def lr_at(self, lr: float, local_step: int) -> float:
        """The learning rate of local step ``local_step`` (0-based) this round."""
        if not self.scheduled:
            return lr
        return lr * lr_factor(self.schedule, self.first_step + local_step, self.total_steps, self.warmup_steps)


def set_lora_dropout(model: nn.Module, p: float) -> None:
    """Dropout with probability ``p`` on every LoRA layer's input, as ``LoraConfig(lora_dropout=p)`` builds it.

    Applied after the model is built so that every task's ``build_model`` (custom ones included) gets
    it without a new parameter; the adapter config PEFT saves records ``p`` too. ``p == 0`` leaves
    PEFT's ``nn.Identity`` in place (no dropout masks drawn: today's training, bit for bit).
    """
    if p == 0:
        return
    from torch import nn

    from fedlora.models.lora_state import active_adapter_name, lora_layers

    adapter = active_adapter_name(model)
    for layer in lora_layers(model).values():
        layer.lora_dropout[adapter] = nn.Dropout(p=p)
    peft_config = getattr(model, "peft_config", {})
    if adapter in peft_config:
        peft_config[adapter].lora_dropout = p
