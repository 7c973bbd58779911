"""The one place that converts between a PEFT LoRA model and fedlora's ``{module: LoraPair}``.

Naming: a module is named as in the *plain* (un-wrapped) model, e.g.
``"bert.encoder.layer.0.attention.self.query"`` -- PEFT's ``"base_model.model."`` prefix and the
adapter name (``"default"``) are dropped so names are stable across PEFT versions and wrappers.
Wire/safetensors keys (:func:`adapter_to_state_dict`) are PEFT's own state-dict names,
``"base_model.model.<module>.lora_A.weight"``, identical to ``peft.get_peft_model_state_dict``.

Head: under ``task_type=SEQ_CLS`` PEFT wraps the classifier in a ``ModulesToSaveWrapper``; the
trainable copy ``classifier.modules_to_save.default`` is what :func:`get_head` reads (keys like
``"classifier.weight"``) and what PEFT saves with the adapter.

Devices and dtypes: everything that leaves the model (:func:`get_adapter`, :func:`get_head`,
:func:`merged_base_weights`) is a CPU float32 copy, whatever device the model is on and whatever
autocast precision it trains in; everything that enters it (:func:`set_adapter`, :func:`set_head`,
:func:`restore_base_weights`) is copied onto the parameter's own device and dtype. Frozen-weight
merges are computed in float32.

Merged base weights: :func:`merge_base_delta` changes frozen weights, which a PEFT adapter file
cannot carry; :mod:`fedlora.runs.adapter_files` saves them beside the adapter and loads them back.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import Tensor, nn

from fedlora.aggregation.types import Adapter, LoraPair

PEFT_PREFIX = "base_model.model."
BASE_WEIGHTS_FILE = "base_weights.safetensors"
META_FILE = "fedlora_base.json"
# Which modules' frozen weights a model has had changed, kept beside the model rather than set on it:
# {model: {module name}}; weak, so a model that is dropped takes its entry with it.
_MERGED: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


def active_adapter_name(model: nn.Module) -> str:
    """The single active PEFT adapter's name (``"default"`` unless the caller renamed it)."""
    name = getattr(model, "active_adapter", "default")
    if isinstance(name, (list, tuple)):
        if len(name) != 1:
            raise ValueError(f"expected exactly one active adapter, got {list(name)}")
        name = name[0]
    return str(name)


def _strip(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Stable module name -> PEFT LoRA Linear layer, in model order."""
    adapter = active_adapter_name(model)
    layers: dict[str, LoraLinear] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if not isinstance(module, LoraLinear):
            raise TypeError(
                f"LoRA module {_strip(name)!r} is a {type(module).__name__}; fedlora supports only "
                "Linear (and Conv1D) targets -- remove it from target_modules"
            )
        layers[_strip(name)] = module
    if not layers:
        raise ValueError(f"model has no LoRA Linear layers for adapter {adapter!r}; wrap it with peft first")
    return layers


def _check_modules(what: str, given: set[str], expected: set[str]) -> None:
    unknown, missing = sorted(given - expected), sorted(expected - given)
    if unknown or missing:
        raise KeyError(
            f"{what} does not match the model's LoRA modules: unknown {unknown[:5]}"
            f"{'...' if len(unknown) > 5 else ''}, missing {missing[:5]}{'...' if len(missing) > 5 else ''}. "
            "Module names are plain-model names such as 'bert.encoder.layer.0.attention.self.query'."
        )


def _export(t: Tensor) -> Tensor:
    """A CPU float32 copy (never a view of a live parameter)."""
    return t.detach().to(device="cpu", dtype=torch.float32, copy=True)


def get_adapter(model: nn.Module) -> Adapter:
    """The model's LoRA factors as ``{module: LoraPair(A (r, k), B (d, r))}``, CPU float32 clones."""
    adapter = active_adapter_name(model)
    return {
        name: LoraPair(
            A=_export(layer.lora_A[adapter].weight),  # (r, k)
            B=_export(layer.lora_B[adapter].weight),  # (d, r)
        )
        for name, layer in lora_layers(model).items()
    }


def set_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Copy ``adapter`` into the model in place (onto its device and dtype); every LoRA module must be
    given, with equal shapes."""
    name_ = active_adapter_name(model)
    layers = lora_layers(model)
    _check_modules("adapter", set(adapter), set(layers))
    for name, layer in layers.items():  # validate everything before writing anything
        pair = adapter[name]
        A, B = layer.lora_A[name_].weight, layer.lora_B[name_].weight  # (r, k), (d, r)
        if tuple(pair.A.shape) != tuple(A.shape) or tuple(pair.B.shape) != tuple(B.shape):
            raise ValueError(
                f"adapter[{name!r}] has A {tuple(pair.A.shape)}, B {tuple(pair.B.shape)} but the model "
                f"expects A {tuple(A.shape)} (r, k), B {tuple(B.shape)} (d, r); check rank and that "
                "A/B are not swapped or transposed"
            )
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A[name_].weight.copy_(adapter[name].A)
            layer.lora_B[name_].weight.copy_(adapter[name].B)


def head_wrappers(model: nn.Module) -> dict[str, ModulesToSaveWrapper]:
    """Stable module name -> PEFT ``ModulesToSaveWrapper`` of each trainable head module, in model order."""
    adapter = active_adapter_name(model)
    return {_strip(name): module for name, module in model.named_modules()
            if isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save}


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Live head parameters (the trainable ``modules_to_save`` copies), keyed like :func:`get_head`."""
    adapter = active_adapter_name(model)
    return {f"{name}.{pname}": p for name, wrapper in head_wrappers(model).items()
            for pname, p in wrapper.modules_to_save[adapter].named_parameters()}


def get_head(model: nn.Module) -> dict[str, Tensor]:
    """Trainable non-LoRA parameters (the classifier head), e.g. ``{"classifier.weight": (C, h)}``, CPU float32."""
    return {k: _export(p) for k, p in head_parameters(model).items()}


def set_head(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy a :func:`get_head` dict into the model in place (same keys, same shapes; onto its device and dtype)."""
    params = head_parameters(model)
    if set(state) != set(params):
        raise KeyError(f"head keys {sorted(state)} do not match the model's head {sorted(params)}")
    for k, p in params.items():
        if tuple(state[k].shape) != tuple(p.shape):
            raise ValueError(f"head[{k!r}] has shape {tuple(state[k].shape)}, model expects {tuple(p.shape)}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])


def lora_scaling(model: nn.Module, module: str) -> float:
    """``s`` for ``module`` exactly as PEFT applies it (``lora_alpha / r``; ``/ sqrt(r)`` with rsLoRA)."""
    layers = lora_layers(model)
    if module not in layers:
        raise KeyError(f"no LoRA module {module!r}; known: {list(layers)[:5]}...")
    return float(layers[module].scaling[active_adapter_name(model)])


def merge_base_delta(model: nn.Module, base_delta: dict[str, Tensor]) -> None:
    """``W0 += s · delta`` for each module's frozen weight; ``delta`` is product-space, (d, k) = (out, in).

    The sum is formed in float32 (on the weight's device) and then stored in the weight's dtype,
    which fedlora keeps float32 at every precision: merged deltas are never rounded to bf16/fp16.
    """
    layers = lora_layers(model)
    unknown = sorted(set(base_delta) - set(layers))
    if unknown:
        raise KeyError(f"base_delta names modules without LoRA: {unknown[:5]}; known: {list(layers)[:3]}...")
    for name, delta in base_delta.items():  # validate all first so a bad entry changes nothing
        expected = (layers[name].out_features, layers[name].in_features)  # (d, k)
        if tuple(delta.shape) != expected:
            raise ValueError(
                f"base_delta[{name!r}] has shape {tuple(delta.shape)} but the frozen weight is "
                f"(d, k) = {expected} (out, in); pass the product B @ A, not its transpose"
            )
    merged = _MERGED.setdefault(model, set())
    with torch.no_grad():
        for name, delta in base_delta.items():
            layer = layers[name]
            weight = layer.get_base_layer().weight
            update = lora_scaling(model, name) * delta.detach().to(torch.float32)  # (d, k)
            if layer.fan_in_fan_out:  # GPT-2 Conv1D stores W as (in, out)
                update = update.T
            merged_w = weight.to(torch.float32)  # weight itself when it is float32 (always, in fedlora)
            merged_w.add_(update.to(weight.device))
            if merged_w is not weight:
                weight.copy_(merged_w)
            merged.add(name)


def merged_base_weights(model: nn.Module) -> dict[str, Tensor]:
    """The frozen weights changed by :func:`merge_base_delta` so far, ``{module: W0 (d, k)}``, CPU float32 copies."""
    layers = lora_layers(model)
    return {m: _export(layers[m].get_base_layer().weight) for m in sorted(merged_modules(model))}


def restore_base_weights(model: nn.Module, weights: dict[str, Tensor]) -> None:
    """Put back frozen weights saved by :func:`merged_base_weights` (checkpoint resume), onto the model's device."""
    layers = lora_layers(model)
    _check_modules("base weights", set(weights), set(weights) & set(layers))
    with torch.no_grad():
        for name, tensor in weights.items():
            weight = layers[name].get_base_layer().weight
            if weight.shape != tensor.shape:
                raise ValueError(f"base weight {name!r}: saved {tuple(tensor.shape)} vs model {tuple(weight.shape)}")
            weight.copy_(tensor)
    mark_merged(model, weights)


def merged_modules(model: nn.Module) -> frozenset[str]:
    """The modules whose frozen weight differs from the base model's (merged into, or restored)."""
    return frozenset(_MERGED.get(model, ()))


def mark_merged(model: nn.Module, modules: Iterable[str]) -> None:
    """Record that ``modules``' frozen weights were changed (a reloaded adapter's ``base_weights``)."""
    _MERGED.setdefault(model, set()).update(modules)


def adapter_to_state_dict(adapter: Adapter) -> dict[str, Tensor]:
    """``{"base_model.model.<module>.lora_A.weight": A (r, k), ...lora_B.weight: B (d, r)}``, float32."""
    state: dict[str, Tensor] = {}
    for name, pair in adapter.items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = pair.A.detach().to(torch.float32, copy=True).contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = pair.B.detach().to(torch.float32, copy=True).contiguous()
    return state


def state_dict_to_adapter(state: dict[str, Tensor], strict: bool = True) -> Adapter:
    """Inverse of :func:`adapter_to_state_dict`; ``strict=False`` skips non-LoRA keys (e.g. the head)."""
    factors: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY_RE.match(key)
        if match is None:
            if strict:
                raise KeyError(f"{key!r} is not a LoRA key '<prefix><module>.lora_A|B.weight'; use strict=False to skip")
            continue
        factors.setdefault(match["module"], {})[match["factor"]] = tensor
    adapter: Adapter = {}
    for name, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise KeyError(f"module {name!r} has only lora_{''.join(pair)} in the state dict; both A and B are needed")
        A = torch.as_tensor(pair["A"]).to(torch.float32)  # (r, k)
        B = torch.as_tensor(pair["B"]).to(torch.float32)  # (d, r)
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"module {name!r}: A {tuple(A.shape)} and B {tuple(B.shape)} are not (r, k) and (d, r)")
        adapter[name] = LoraPair(A=A, B=B)
    return adapter
