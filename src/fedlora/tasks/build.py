"""Build the run's model: the config's task builds it, fedlora checks it and places it on the device.

Every client and the server build with the same arguments, so the frozen backbone, the initial LoRA
factors and the initial classifier head are identical everywhere (a function of ``seed`` only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedlora.models.checks import check_built, check_model_source
from fedlora.models.optim import set_lora_dropout
from fedlora.models.runtime import attach_runtime, resolve_runtime
from fedlora.tasks.base import task_for
from fedlora.tasks.causal_lm import prompt_room

if TYPE_CHECKING:
    from fedlora.config.run import RunConfig


def build_model(config: RunConfig) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The config's task's model with LoRA, on ``config.device`` (parameters float32 at every precision).

    Uses ``task``, ``model``, ``rank``, ``lora_alpha``, ``target_modules``, ``seed``, ``device`` and
    ``precision``. The model is initialised on the CPU (so it is the same on every device) and then
    moved; the resolved :class:`~fedlora.models.runtime.Runtime` is attached to it, and training and
    evaluation use it unless given another.

    Raises:
        ValueError: unknown task, or a device/precision this machine cannot run.
    """
    runtime = resolve_runtime(config.device, config.precision)  # before minutes of loading
    check_model_source(config.model)  # offline and not cached, or pickled weights only: one line, nothing loaded
    task = task_for(config)
    model, tokenizer = task.build_model(
        config.model, config.rank, config.lora_alpha, list(config.target_modules), config.seed
    )
    check_built(model, config.target_modules, config.max_length or task.default_max_length, config.model or "the default model")
    if getattr(task, "generates", False) and getattr(task, "max_new_tokens", 0) > 0:
        prompt_room(model, task.max_new_tokens)  # a --max-new-tokens the model cannot hold: now, not at round 1's end
    set_lora_dropout(model, getattr(config, "lora_dropout", 0.0))  # after build: every task, custom ones too
    attach_runtime(model, runtime)
    return model, tokenizer
