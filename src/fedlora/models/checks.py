"""Checks on the ``--model`` a run names, made before (or right after) loading it, with one-line errors.

Each one replaces a failure that used to come late or as a long traceback:

* a hub id while offline (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``) that is not in the local
  cache: said at once, naming the cache, instead of a 40-line error from the hub client;
* a local folder holding only pickled weights (``pytorch_model.bin``): refused before transformers
  is asked (it would refuse too, as a traceback); pickle can run code, safetensors cannot;
* ``--max-length`` above the model's position embeddings: an index error mid-training otherwise;
* a ``--target-modules`` name that matches no layer: PEFT adapts the names that do match and
  silently ignores the rest, so ``query nonexistent`` would train ``query`` only;
* a ``--rank`` above an adapted layer's min(d, k): PEFT builds rank-1000 factors on 384-wide layers
  without a word, an adapter larger than the layer it adapts whose extra components add nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "model.ckpt.index", "flax_model.msgpack")


def offline() -> bool:
    """Whether the user asked the Hugging Face libraries not to use the network."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENV)


def check_model_source(model: str | None) -> None:
    """Refuse a ``--model`` that cannot load safely and offline, before any weights are read.

    None (the task's bundled default) is always fine.
    """
    if model is None:
        return
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not any(folder.glob("*.safetensors")) and any((folder / name).exists() for name in PICKLED):
            found = ", ".join(name for name in PICKLED if (folder / name).exists())
            raise ValueError(f"--model {model}: the folder holds only pickled weights ({found}), which fedlora "
                             "does not load (unpickling can run arbitrary code); convert them to model.safetensors "
                             "on a machine where you trust the file, or use a safetensors checkpoint")
        return
    if _cached(model):
        return
    if offline():
        env = next(name for name in OFFLINE_ENV if os.environ.get(name))
        why = f"{env} is set, so the hub is not asked"
    elif (host := _unresolvable_hub()) is not None:  # no network: fail now, not after a minute of retries
        why = f"the hub ({host}) cannot be reached from here (no network?)"
    else:
        return  # online: the hub itself says whether the repository exists
    raise FileNotFoundError(f"--model {model}: not a local folder, and not in the Hugging Face cache ({_cache_dir()}); "
                            f"{why}. Download it on a connected machine (huggingface-cli download ...) or pass a "
                            "local model folder")


def _unresolvable_hub() -> str | None:
    """The hub's host name if it does not resolve (a DNS lookup only; nothing is sent to the hub), else None."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return host
    return None


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id at all
        return False
    return isinstance(found, str)


def max_positions(model: nn.Module) -> int | None:
    """The longest input the model's position embeddings allow (None: not limited, or unknown)."""
    config: Any = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_max_length(model: nn.Module, max_length: int, model_name: str) -> None:
    """``max_length`` (tokens per example) must fit the model's position embeddings."""
    limit = max_positions(model)
    if limit is not None and max_length > limit:
        raise ValueError(f"--max-length {max_length} is more than {model_name} accepts ({limit} positions); "
                         f"use --max-length {limit} or less")


def check_target_modules(model: nn.Module, requested: tuple[str, ...] | list[str], model_name: str) -> None:
    """Every requested LoRA target names at least one Linear layer of ``model`` (PEFT's suffix match)."""
    linear = [name.removesuffix(".base_layer") for name, module in model.named_modules()  # PEFT wraps targets
              if _is_linear(module) and "lora_" not in name]
    missing = [t for t in requested if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        available = sorted({n.rsplit(".", 1)[-1] for n in linear if "modules_to_save" not in n and "original_module" not in n})
        raise ValueError(f"--target-modules: no Linear layer named {', '.join(map(repr, missing))} in {model_name}; "
                         f"its Linear layers are: {' '.join(available)}")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")


def check_rank(model: nn.Module, model_name: str) -> None:
    """Every LoRA layer's rank is at most min(d, k) of the layer it adapts (read from PEFT's layers: the
    shapes are known only once the model is built, and this runs before any training)."""
    for name, module in model.named_modules():
        ranks, d, k = getattr(module, "r", None), getattr(module, "out_features", None), getattr(module, "in_features", None)
        if not isinstance(ranks, dict) or not isinstance(d, int) or not isinstance(k, int):
            continue  # not a PEFT LoRA layer
        for rank in ranks.values():
            if rank > min(d, k):
                raise ValueError(f"--rank {rank} is more than {model_name}'s layer {name} allows (d={d}, k={k}: "
                                 f"a LoRA rank is at most min(d, k) = {min(d, k)}); use --rank {min(d, k)} or less")


def check_built(model: nn.Module, target_modules: tuple[str, ...], max_length: int, model_name: str) -> None:
    """The checks that need the loaded model: LoRA targets that exist, ranks the layers allow, a max length
    that fits."""
    check_target_modules(model, target_modules, model_name)
    check_rank(model, model_name)
    check_max_length(model, max_length, model_name)
