"""A run's final model on disk: the PEFT adapter plus what a PEFT adapter file cannot carry.

:func:`fedlora.models.lora_state.merge_base_delta` changes frozen weights (FLoRA, FedEx-LoRA, the
optimal rank-r residual). :func:`save_adapter` therefore also writes the modified weights verbatim
(``base_weights.safetensors``; verbatim rather than a delta so reloading is bit-exact) plus
``fedlora_base.json`` (the base reference, task type, and for a classifier its head size);
:func:`load_model_with_adapter` rebuilds the identical model from them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from fedlora.models.lora_state import (BASE_WEIGHTS_FILE, META_FILE, active_adapter_name, lora_layers,
                                       mark_merged, merged_modules)


def save_adapter(model: PeftModel, path: str | Path, *, given_model: str | None = None) -> None:
    """Save the PEFT adapter (safetensors) plus any merged frozen weights; see module docstring.

    ``adapter_config.json`` names the base portably (:func:`fedlora.runs.model_card.portable_reference`:
    the bundled model's hub id, or ``given_model``, the user's ``--model`` as given), not the
    folder it was loaded from on this machine; ``fedlora_base.json`` also records that folder and how.
    """
    from fedlora.runs.model_card import portable_reference

    path = Path(path)
    peft_config = model.peft_config[active_adapter_name(model)]
    loaded_from = str(peft_config.base_model_name_or_path)
    reference, loaded_as = portable_reference(loaded_from, given_model)
    peft_config.base_model_name_or_path = reference
    try:
        model.save_pretrained(str(path), safe_serialization=True, save_embedding_layers=False)
    finally:
        peft_config.base_model_name_or_path = loaded_from  # the live model keeps where it came from
    merged = sorted(merged_modules(model))
    layers = lora_layers(model)
    base: dict[str, Any] = {m: layers[m].get_base_layer() for m in merged}  # PEFT types these as plain Modules
    base_weights = {f"{m}.weight": base[m].weight.detach().cpu().contiguous() for m in merged}
    if base_weights:
        save_file(base_weights, str(path / BASE_WEIGHTS_FILE))
    elif (path / BASE_WEIGHTS_FILE).exists():  # stale file from an earlier save into the same dir
        (path / BASE_WEIGHTS_FILE).unlink()
    task_type = str(getattr(peft_config.task_type, "value", peft_config.task_type))  # SEQ_CLS or CAUSAL_LM
    meta = base_meta(task_type, model.get_base_model().config, reference, loaded_from, loaded_as, merged)
    (path / META_FILE).write_text(json.dumps(meta, indent=2))


def base_meta(task_type: str, config: Any, reference: str, loaded_from: str, loaded_as: str,
              merged: list[str]) -> dict[str, Any]:
    """What ``fedlora_base.json`` records. A classifier's head size and loss (``num_labels``, ``problem_type``)
    only where there is a head: a causal LM has neither (transformers' config still says num_labels=2)."""
    meta: dict[str, Any] = {"base_model": reference, "base_model_loaded_from": loaded_from,
                            "base_model_loaded_as": loaded_as, "task_type": task_type}
    if task_type != "CAUSAL_LM":
        meta |= {"num_labels": int(config.num_labels), "problem_type": config.problem_type}
    return meta | {"merged_modules": merged}


def _load_base_causal_lm(model: str) -> tuple[Any, PreTrainedTokenizerBase]:
    """The plain causal LM (float32) and its tokenizer, for an adapter saved from an LLM task."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.models.classifier import resolve_model

    name, local_only = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(name, local_files_only=local_only, dtype=torch.float32), tokenizer


def load_model_with_adapter(
    path: str | Path, model: str | None = None, is_trainable: bool = False
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Rebuild a model saved by :func:`save_adapter` with identical predictions.

    Loads the base model (``model`` overrides the reference recorded at save time; a bundled
    model's hub id resolves to its installed copy, offline), overwrites merged frozen weights from
    ``base_weights.safetensors``, then attaches the adapter and head with ``PeftModel.from_pretrained``.
    Returned in eval mode.
    """
    from fedlora.models.classifier import load_base_model
    from fedlora.runs.model_card import base_model_path  # a bundled model's hub id -> its installed copy

    path = Path(path)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(
            f"{path / META_FILE} not found; was {path} written by fedlora.runs.adapter_files.save_adapter?")
    meta = json.loads((path / META_FILE).read_text())
    base_ref = model or base_model_path(path)
    if meta.get("task_type") == "CAUSAL_LM":
        base, tokenizer = _load_base_causal_lm(base_ref)
    else:
        base, tokenizer = load_base_model(base_ref, meta["num_labels"], meta["problem_type"])
    if meta["merged_modules"]:
        with torch.no_grad():
            for key, tensor in load_file(str(path / BASE_WEIGHTS_FILE)).items():
                param = base.get_parameter(key)  # raises AttributeError naming the key if absent
                if param.shape != tensor.shape:
                    raise ValueError(f"{key}: saved {tuple(tensor.shape)} vs base model {tuple(param.shape)}")
                param.copy_(tensor)
    peft_model = PeftModel.from_pretrained(base, str(path), is_trainable=is_trainable)
    mark_merged(peft_model, meta["merged_modules"])
    peft_model.eval()
    return peft_model, tokenizer
