"""Device and precision: resolution errors, bf16 autocast on the CPU, CPU float32 across the bridge."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedlora.aggregation import LoraPair, TrainingPolicy  # noqa: E402
from fedlora.protocol.client import train_client  # noqa: E402
from fedlora.tasks.build import build_model  # noqa: E402
from fedlora.models.lora_state import (  # noqa: E402
    get_adapter, get_head, lora_layers, lora_scaling, merge_base_delta, merged_base_weights, set_adapter,
)
from fedlora.models.runtime import Runtime, attach_runtime, resolve_runtime, runtime_of  # noqa: E402
from fedlora.tasks import get_task  # noqa: E402

CPU = torch.device("cpu")


@dataclass(frozen=True)
class ModelConfig:
    """The fields build_model reads (RunConfig has them too)."""

    task: str = "toy"
    model: str | None = None
    rank: int = 4
    lora_alpha: float = 8.0
    target_modules: tuple[str, ...] = ("query", "value")
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    max_length: int | None = None  # None: the task's default (checked against the model's positions)
    lora_dropout: float = 0.0


# --- resolution ----------------------------------------------------------------------------------


def test_auto_picks_cuda_exactly_when_it_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_runtime("auto", "bf16") == Runtime(CPU, "bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_runtime("auto").device == torch.device("cuda")


def test_unavailable_or_unknown_devices_are_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"cuda requested but torch.cuda.is_available\(\) is False"):
        resolve_runtime("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"only 1 CUDA device"):
        resolve_runtime("cuda:1")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"mps requested"):
        resolve_runtime("mps")
    for bad in ("tpu", "cpu:0", "cuda:x", ""):
        with pytest.raises(ValueError, match="unknown; use auto, cpu, cuda, cuda:N or mps"):
            resolve_runtime(bad)


def test_precisions_the_device_cannot_run_are_refused() -> None:
    with pytest.raises(ValueError, match="fp16 needs a CUDA device.*use bf16"):
        resolve_runtime("cpu", "fp16")
    with pytest.raises(ValueError, match="precision 'fp8' is unknown"):
        resolve_runtime("cpu", "fp8")
    assert resolve_runtime(" CPU ", "bf16") == Runtime(CPU, "bf16")


def test_autocast_is_off_for_fp32_and_bf16_on_cpu_otherwise() -> None:
    x = torch.randn(4, 8)
    with Runtime(CPU, "fp32").autocast():
        assert not torch.is_autocast_enabled("cpu") and (x @ x.T).dtype == torch.float32
    with Runtime(CPU, "bf16").autocast():
        assert torch.is_autocast_enabled("cpu") and (x @ x.T).dtype == torch.bfloat16
    assert Runtime(CPU, "bf16").grad_scaler() is None  # loss scaling is for fp16 only


# --- training and the bridge under bf16 -----------------------------------------------------------


@pytest.fixture(scope="module")
def toy_batches():
    from transformers import AutoTokenizer

    from fedlora.models.classifier import default_model_path

    task = get_task("toy")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    train = task.encode(task.load(None)["train"], tokenizer, 24)
    return task, tokenizer, train


def train_two_steps(model, task, tokenizer, train, runtime=None):
    return train_client(
        model, client_id="c", train=train, local_test=None, task=task, tokenizer=tokenizer,
        global_adapter=get_adapter(model), global_head=get_head(model), policy=TrainingPolicy(),
        steps=2, batch_size=8, lr=5e-3, seed=3, runtime=runtime,
    )


def test_bf16_training_on_cpu_runs_and_everything_leaving_the_model_is_cpu_float32(toy_batches) -> None:
    task, tokenizer, train = toy_batches
    fp32_model, _ = build_model(ModelConfig())
    bf16_model, _ = build_model(ModelConfig(precision="bf16"))
    assert runtime_of(bf16_model) == Runtime(CPU, "bf16") and runtime_of(fp32_model) == Runtime(CPU, "fp32")
    fp32, bf16 = train_two_steps(fp32_model, task, tokenizer, train), train_two_steps(bf16_model, task, tokenizer, train)
    assert torch.isfinite(torch.tensor(bf16.loss)) and abs(bf16.loss - fp32.loss) < 0.05
    tensors = [t for p in bf16.update.adapter.values() for t in (p.A, p.B)] + list(bf16.head.values())
    assert all(t.device == CPU and t.dtype == torch.float32 for t in tensors)
    assert all(p.dtype == torch.float32 for p in bf16_model.parameters())  # autocast, not a bf16 model
    # bf16 really ran: the same seed and data give other factors than fp32, yet close ones (Adam's
    # sign-like first steps flip where a gradient is near zero, so compare whole matrices).
    module = next(iter(fp32.update.adapter))
    b16, b32 = bf16.update.adapter[module].B, fp32.update.adapter[module].B  # (d, r)
    print("relative B difference bf16 vs fp32:", float((b16 - b32).norm() / b32.norm()))
    assert not torch.equal(b16, b32) and (b16 - b32).norm() < 0.25 * b32.norm()


def test_fp32_runtime_given_or_attached_trains_bit_identically_to_no_runtime(toy_batches) -> None:
    task, tokenizer, train = toy_batches
    plain, _ = task.build_model(None, 4, 8.0, ["query", "value"], seed=0)  # no runtime attached
    built, _ = build_model(ModelConfig())
    a = train_two_steps(plain, task, tokenizer, train)
    b = train_two_steps(built, task, tokenizer, train, runtime=Runtime(CPU, "fp32"))
    assert a.loss == b.loss
    for m, pair in a.update.adapter.items():
        assert torch.equal(pair.A, b.update.adapter[m].A) and torch.equal(pair.B, b.update.adapter[m].B)


def test_merges_stay_float32_under_bf16_and_set_adapter_casts_into_the_model() -> None:
    model, _ = build_model(ModelConfig(precision="bf16", target_modules=("query",)))
    module = next(iter(lora_layers(model)))
    weight = lora_layers(model)[module].get_base_layer().weight  # (d, k)
    before = weight.detach().clone()
    # 1e-5-sized entries vanish when added to O(0.1) weights in bf16 (8 mantissa bits), not in float32.
    delta = torch.full(tuple(weight.shape), 1e-5, dtype=torch.float64)  # (d, k)
    merge_base_delta(model, {module: delta})
    expected = before + lora_scaling(model, module) * delta.to(torch.float32)
    assert weight.dtype == torch.float32 and torch.equal(weight.detach(), expected)
    assert not torch.equal(weight.detach(), before)
    saved = merged_base_weights(model)[module]
    assert saved.dtype == torch.float32 and saved.device == CPU and torch.equal(saved, expected)
    # Adapters enter in any dtype and are stored in the parameter's own (float32).
    adapter = {m: LoraPair(A=p.A.double() + 1, B=p.B.double()) for m, p in get_adapter(model).items()}
    set_adapter(model, adapter)
    out = get_adapter(model)[module]
    assert out.A.dtype == torch.float32 and torch.equal(out.A, adapter[module].A.float())


def test_runtime_of_an_unattached_model_is_fp32_on_its_device() -> None:
    layer = torch.nn.Linear(2, 2)
    assert runtime_of(layer) == Runtime(CPU, "fp32")
    attach_runtime(layer, Runtime(CPU, "bf16"))
    assert runtime_of(layer) == Runtime(CPU, "bf16")
