"""Where and in what precision the model computes: ``--device`` and ``--precision``.

A :class:`Runtime` is a device plus a precision. Parameters always stay float32 (trainable LoRA
factors and head, and the frozen weights that FedEx-LoRA/FLoRA merge into); ``bf16``/``fp16`` run
the forward and backward passes under :func:`torch.autocast`, so only activations and matmul
inputs are rounded. ``fp16`` adds loss scaling (``torch.amp.GradScaler``) and needs CUDA: CPU
float16 autocast is slow and unscaled float16 gradients underflow; on a CPU use ``bf16``.

Adapters cross the model/server bridge as CPU float32 (:mod:`fedlora.models.lora_state`), so the server,
the checkpoint and the wire never see a device tensor or a half-precision one.

Reproducibility. CPU fp32: bit-identical for the same seed, torch version and thread count (the
thread count changes summation order). CPU bf16: the same, autocast is deterministic. CUDA: the same
seed on the same GPU model, driver, CUDA and torch versions repeats a run when cuBLAS is made
deterministic (``CUBLAS_WORKSPACE_CONFIG=:4096:8`` and ``torch.use_deterministic_algorithms(True)``;
fedlora sets neither, they cost speed); without them cuBLAS may pick split-K kernels whose
reduction order varies, so results can differ in the last bits from run to run. Never
bit-identical: CPU vs GPU, different GPU models, fp32 vs bf16/fp16. Client sampling, partitions,
batch order and LoRA/head initialisation are drawn on the CPU, so they are identical on every device.

Imports only torch, so :mod:`fedlora.config.run` can validate with :func:`resolve_runtime` cheaply.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_HELP = "use auto, cpu, cuda, cuda:N or mps"
# The Runtime each model was built for (see attach_runtime), beside the model rather than set on it: a PEFT model
# carries no attribute of ours, and a model that is garbage-collected leaves no entry behind.
_RUNTIMES: weakref.WeakKeyDictionary[nn.Module, Runtime] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Runtime:
    """A validated (device, precision) pair; build it with :func:`resolve_runtime`."""

    device: torch.device
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
        if self.precision == "fp16" and self.device.type != "cuda":
            raise ValueError(
                f"precision fp16 needs a CUDA device (loss scaling), got {self.device}; use bf16 on "
                f"{self.device.type.upper()} instead"
            )
        if self.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"precision bf16: {torch.cuda.get_device_name(self.device)} does not support "
                             "bfloat16; use fp16 or fp32")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for plain float32."""
        return PRECISIONS[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for bf16/fp16; a no-op for fp32 (so fp32 runs the exact same ops as without it)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for fp16 (float16 gradients underflow without one); None otherwise."""
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch with every tensor moved to the device (non-tensors unchanged)."""
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def resolve_runtime(device: str = "auto", precision: str = "fp32") -> Runtime:
    """Parse ``--device``/``--precision`` and check that this machine has the device.

    ``"auto"`` is CUDA (the current device) when ``torch.cuda.is_available()``, else the CPU; MPS is
    never picked automatically (its kernel coverage is still partial).

    Raises:
        ValueError: unknown spelling, an unavailable device (naming the check that failed), or a
            precision the device cannot run (fp16 off CUDA, bf16 on a GPU without it).
    """
    text = str(device).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    kind, sep, index = text.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (sep and not (kind == "cuda" and index.isdigit())):
        raise ValueError(f"device {device!r} is unknown; {DEVICE_HELP}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: cuda requested but torch.cuda.is_available() is False "
                             f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
        if sep and int(index) >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: mps requested but torch.backends.mps.is_available() is False")
    return Runtime(torch.device(text), precision)


def attach_runtime(model: nn.Module, runtime: Runtime) -> nn.Module:
    """Move ``model`` to ``runtime.device`` (parameters keep their float32 dtype) and remember ``runtime``.

    Training and evaluation fall back to the attached runtime when they are not given one, so an
    engine that forgets to pass it still computes in the configured precision.
    """
    model.to(runtime.device)
    _RUNTIMES[model] = runtime
    return model


def runtime_of(model: nn.Module) -> Runtime:
    """The runtime attached by :func:`attach_runtime`, else fp32 on the device of the model's parameters."""
    attached = _RUNTIMES.get(model)
    if attached is not None:
        return attached
    return Runtime(next(model.parameters()).device, "fp32")
