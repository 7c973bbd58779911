"""fedlora.models.classifier / fedlora.models.lora_state / fedlora.models.training: round trips, merge maths, saving, training.

Maths tests use a tiny hand-built module with a NON-SQUARE LoRA target (Linear(7, 5), so a
transposed (k, d) delta cannot be silently accepted) and lora_alpha != r (so a dropped scaling
factor changes the result). Real-model tests use the bundled all-MiniLM-L6-v2, offline.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/peft import: never touch the hub

import itertools
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification

from fedlora.models import lora_state as pb
from fedlora.runs import adapter_files
from fedlora.aggregation.types import Adapter, LoraPair, TrainingPolicy
from fedlora.models.classifier import default_model_path, load_model
from fedlora.models.training import evaluate, train_local

TARGETS = ["query", "value", "intermediate.dense"]  # intermediate.dense is 384 -> 1536: non-square
SENTENCES = [
    "a wonderful, moving film", "dull and far too long", "I loved every minute of it",
    "the worst script this year", "sharp, funny and warm", "a tedious mess",
    "beautifully shot and acted", "nothing works here",
]


# ---------------------------------------------------------------- helpers
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(7, 5)  # LoRA target: W (d, k) = (5, 7)
        self.out = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.proj(x)))


def tiny_peft(r: int = 2, alpha: float = 6.0) -> PeftModel:
    torch.manual_seed(0)
    return get_peft_model(Tiny(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"]))


def random_adapter(model: nn.Module, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return {
        name: LoraPair(torch.randn(p.A.shape, generator=g) * 0.1, torch.randn(p.B.shape, generator=g) * 0.1)
        for name, p in pb.get_adapter(model).items()
    }


@pytest.fixture(scope="module")
def model_path() -> str:
    return default_model_path()


def minilm(model_path: str, seed: int = 0, **kw: object) -> tuple[PeftModel, object]:
    args = dict(num_labels=2, rank=4, lora_alpha=8.0, target_modules=TARGETS, seed=seed)
    args.update(kw)
    return load_model(model_path, **args)  # type: ignore[arg-type]


def batch_of(tokenizer: object) -> dict[str, Tensor]:
    enc = tokenizer(SENTENCES, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    return {**enc, "labels": torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])}


def logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    with torch.inference_mode():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


# ---------------------------------------------------------------- adapter / head round trips
def test_get_set_adapter_round_trip_and_clones() -> None:
    model = tiny_peft()
    wanted = random_adapter(model, 1)
    pb.set_adapter(model, wanted)
    got = pb.get_adapter(model)
    assert list(got) == ["proj"]
    assert got["proj"].A.shape == (2, 7) and got["proj"].B.shape == (5, 2)  # (r, k), (d, r)
    assert torch.equal(got["proj"].A, wanted["proj"].A) and torch.equal(got["proj"].B, wanted["proj"].B)
    got["proj"].A.add_(1.0)  # a clone: the model must not see this
    assert torch.equal(pb.get_adapter(model)["proj"].A, wanted["proj"].A)


def test_set_adapter_errors_name_module_and_shapes() -> None:
    model = tiny_peft()
    pair = pb.get_adapter(model)["proj"]
    with pytest.raises(KeyError, match="unknown.*nope"):
        pb.set_adapter(model, {"proj": pair, "nope": pair})
    with pytest.raises(KeyError, match="missing.*proj"):
        pb.set_adapter(model, {})
    with pytest.raises(ValueError, match=r"proj.*\(7, 2\).*\(2, 7\)"):
        pb.set_adapter(model, {"proj": LoraPair(pair.A.T.contiguous(), pair.B)})


def test_state_dict_round_trip_matches_peft_keys(model_path: str) -> None:
    model, _ = minilm(model_path)
    adapter = random_adapter(model, 2)
    pb.set_adapter(model, adapter)
    state = pb.adapter_to_state_dict(adapter)
    peft_state = get_peft_model_state_dict(model)
    lora_keys = {k for k in peft_state if ".lora_" in k}
    assert set(state) == lora_keys and len(state) == 2 * 6 * len(TARGETS)
    assert "base_model.model.bert.encoder.layer.0.intermediate.dense.lora_A.weight" in state
    for k, v in state.items():
        assert v.dtype == torch.float32 and torch.equal(v, peft_state[k])
    back = pb.state_dict_to_adapter(state)
    assert list(back) == list(adapter)
    assert all(torch.equal(back[m].A, adapter[m].A) and torch.equal(back[m].B, adapter[m].B) for m in adapter)
    with pytest.raises(KeyError, match="classifier"):
        pb.state_dict_to_adapter(peft_state)  # head keys are not LoRA keys
    assert set(pb.state_dict_to_adapter(peft_state, strict=False)) == set(adapter)


def test_head_get_set(model_path: str) -> None:
    model, tok = minilm(model_path)
    head = pb.get_head(model)
    assert {k: tuple(v.shape) for k, v in head.items()} == {"classifier.weight": (2, 384), "classifier.bias": (2,)}
    assert all(p.requires_grad for p in pb.head_parameters(model).values())
    batch = batch_of(tok)
    before = logits(model, batch)
    pb.set_head(model, {k: torch.zeros_like(v) for k, v in head.items()})
    assert torch.count_nonzero(logits(model, batch)) == 0  # the live (modules_to_save) copy was written
    pb.set_head(model, head)
    assert torch.equal(logits(model, batch), before)
    with pytest.raises(ValueError, match="classifier.weight"):
        pb.set_head(model, {**head, "classifier.weight": torch.zeros(384, 2)})


def test_load_model_is_a_function_of_seed(model_path: str) -> None:
    a, _ = minilm(model_path, seed=3)
    b, _ = minilm(model_path, seed=3)
    c, _ = minilm(model_path, seed=4)
    A, B, C = pb.get_adapter(a), pb.get_adapter(b), pb.get_adapter(c)
    assert all(torch.equal(A[m].A, B[m].A) for m in A)
    assert not all(torch.equal(A[m].A, C[m].A) for m in A)
    assert all(torch.equal(v, pb.get_head(b)[k]) for k, v in pb.get_head(a).items())


def test_load_model_missing_path_is_clear() -> None:
    with pytest.raises(FileNotFoundError, match="/no/such/model.*does not exist"):
        load_model("/no/such/model", 2, 4, 8.0, ["query"], 0)


def test_load_model_regression(model_path: str) -> None:
    model, tok = minilm(model_path, num_labels=1)
    assert model.get_base_model().config.problem_type == "regression"
    preds, labels = evaluate(model, [batch_of(tok)], num_labels=1)
    assert preds.shape == (8,) and labels.shape == (8,)


# ---------------------------------------------------------------- merge maths
def test_lora_scaling_is_alpha_over_r() -> None:
    assert pb.lora_scaling(tiny_peft(r=2, alpha=6.0), "proj") == 3.0


def test_merge_applies_scaling_exactly() -> None:
    model = tiny_peft(r=2, alpha=6.0)
    w0 = model.base_model.model.proj.base_layer.weight.detach().clone()  # (5, 7)
    delta = torch.randn(5, 7)  # (d, k)
    pb.merge_base_delta(model, {"proj": delta})
    w1 = model.base_model.model.proj.base_layer.weight.detach()
    torch.testing.assert_close(w1 - w0, 3.0 * delta)  # would fail with s dropped (1.0) or inverted


def test_merge_equivalence_tiny_non_square() -> None:
    model = tiny_peft(r=2, alpha=6.0)
    x = torch.randn(11, 7)
    old, new = random_adapter(model, 3), random_adapter(model, 4)
    assert torch.count_nonzero(old["proj"].B) > 0
    pb.set_adapter(model, old)
    with torch.no_grad():
        y_old = model(x)
    delta = {"proj": old["proj"].product() - new["proj"].product()}  # (5, 7) product space
    pb.set_adapter(model, new)
    pb.merge_base_delta(model, delta)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_old, atol=1e-5, rtol=1e-5)


def test_merge_equivalence_minilm_non_square(model_path: str) -> None:
    model, tok = minilm(model_path)
    batch = batch_of(tok)
    old, new = random_adapter(model, 5), random_adapter(model, 6)
    pb.set_adapter(model, old)
    y_old = logits(model, batch)
    delta = {m: old[m].product() - new[m].product() for m in old}  # includes (1536, 384) modules
    assert delta["bert.encoder.layer.0.intermediate.dense"].shape == (1536, 384)
    pb.set_adapter(model, new)
    assert not torch.allclose(logits(model, batch), y_old, atol=1e-3)  # the swap alone changes outputs
    pb.merge_base_delta(model, delta)
    torch.testing.assert_close(logits(model, batch), y_old, atol=1e-5, rtol=1e-5)


def test_merge_refuses_transposed_or_unknown_and_changes_nothing() -> None:
    model = tiny_peft()
    w0 = model.base_model.model.proj.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"proj.*\(7, 5\).*\(5, 7\)"):
        pb.merge_base_delta(model, {"proj": torch.ones(7, 5)})
    with pytest.raises(KeyError, match="out"):
        pb.merge_base_delta(model, {"out": torch.ones(3, 5)})
    assert torch.equal(model.base_model.model.proj.base_layer.weight, w0)


# ---------------------------------------------------------------- saving
def test_save_reload_identical_logits(model_path: str, tmp_path: Path) -> None:
    model, tok = minilm(model_path)
    pb.set_adapter(model, random_adapter(model, 7))
    pb.set_head(model, {k: v + 0.3 for k, v in pb.get_head(model).items()})
    batch = batch_of(tok)
    adapter_files.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and not (tmp_path / pb.BASE_WEIGHTS_FILE).exists()
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2, local_files_only=True)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    assert torch.equal(logits(reloaded, batch), logits(model, batch))
    again, _ = adapter_files.load_model_with_adapter(tmp_path)
    assert torch.equal(logits(again, batch), logits(model, batch))


def test_save_reload_after_merge(model_path: str, tmp_path: Path) -> None:
    model, tok = minilm(model_path)
    batch = batch_of(tok)
    old, new = random_adapter(model, 8), random_adapter(model, 9)
    pb.set_adapter(model, new)
    pb.merge_base_delta(model, {m: old[m].product() - new[m].product() for m in old})
    adapter_files.save_adapter(model, tmp_path)
    assert (tmp_path / pb.BASE_WEIGHTS_FILE).is_file()
    reloaded, _ = adapter_files.load_model_with_adapter(tmp_path)
    assert torch.equal(logits(reloaded, batch), logits(model, batch))
    # A plain PEFT reload lacks the merged weights, which is why base_weights.safetensors exists.
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2, local_files_only=True)
    plain = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    assert not torch.allclose(logits(plain, batch), logits(model, batch), atol=1e-4)


# ---------------------------------------------------------------- training
def _train(model: nn.Module, tok: object, policy: TrainingPolicy, steps: int = 3, seed: int = 0) -> dict:
    return train_local(model, itertools.repeat(batch_of(tok)), steps, 1e-2, policy, seed)


def test_train_policy_freezes_A(model_path: str) -> None:
    model, tok = minilm(model_path)
    before, head = pb.get_adapter(model), pb.get_head(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    out = _train(model, tok, TrainingPolicy(train_A=False))
    assert out["steps"] == 3 and out["examples"] == 24
    after = pb.get_adapter(model)
    assert all(torch.equal(after[m].A, before[m].A) for m in before)
    assert all(not torch.equal(after[m].B, before[m].B) for m in before)
    assert not torch.equal(pb.get_head(model)["classifier.weight"], head["classifier.weight"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # restored
    assert not model.training


def test_train_policy_freezes_B(model_path: str) -> None:
    model, tok = minilm(model_path)
    pb.set_adapter(model, random_adapter(model, 10))  # B = 0 would give A a zero gradient
    before = pb.get_adapter(model)
    _train(model, tok, TrainingPolicy(train_B=False))
    after = pb.get_adapter(model)
    assert all(torch.equal(after[m].B, before[m].B) for m in before)
    assert all(not torch.equal(after[m].A, before[m].A) for m in before)


def test_train_same_seed_is_deterministic(model_path: str) -> None:
    results = []
    for _ in range(2):
        model, tok = minilm(model_path, lora_dropout=0.1)  # dropout: the seed must matter
        out = _train(model, tok, TrainingPolicy(), seed=11)
        results.append((out["loss"], pb.get_adapter(model), pb.get_head(model)))
    (l1, a1, h1), (l2, a2, h2) = results
    assert l1 == l2
    assert all(torch.equal(a1[m].A, a2[m].A) and torch.equal(a1[m].B, a2[m].B) for m in a1)
    assert all(torch.equal(h1[k], h2[k]) for k in h1)


def test_train_loss_decreases(model_path: str) -> None:
    model, tok = minilm(model_path)
    batch = batch_of(tok)

    def loss() -> float:
        with torch.inference_mode():
            return float(model(**batch).loss)

    first = loss()
    out = train_local(model, itertools.repeat(batch), 20, 3e-3, TrainingPolicy(), seed=0)
    assert out["steps"] == 20 and out["examples"] == 160 and out["loss"] < first
    assert loss() < 0.25 * first
    preds, labels = evaluate(model, [batch], num_labels=2)
    assert preds.shape == (8, 2) and labels.shape == (8,)
    assert (preds.argmax(1) == labels).mean() == 1.0


def test_everything_leaving_the_model_is_a_cpu_float32_copy_whatever_its_dtype() -> None:
    model = tiny_peft().to(torch.float64)  # stands in for any non-float32 model or device
    adapter, head = pb.get_adapter(model), pb.get_head(model)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for p in adapter.values() for t in (p.A, p.B))
    assert all(t.dtype == torch.float32 for t in head.values())
    new = random_adapter(model, seed=4)  # float32 in, stored as the parameter's float64
    pb.set_adapter(model, new)
    layer = pb.lora_layers(model)["proj"]
    assert layer.lora_A["default"].weight.dtype == torch.float64
    assert torch.equal(pb.get_adapter(model)["proj"].A, new["proj"].A)
    pb.merge_base_delta(model, {"proj": torch.ones(5, 7)})
    assert pb.merged_base_weights(model)["proj"].dtype == torch.float32
