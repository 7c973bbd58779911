"""Record-level DP-SGD (Opacus) inside a client: what it computes, and what it leaves behind.

Properties: with a clip no example reaches and no noise, DP-SGD takes exactly the steps of plain
training on the same batches (Opacus' per-example gradients sum to the batch gradient); clipping and noise
change the steps; the model carries no Opacus hook or per-example gradient afterwards (the local engine shares
it between clients); frozen factors stay bit-identical; each row's loss depends on that row only (a causal LM's
token-weighted batch mean would not); the sampler draws fixed-size batches independently each step.
"""

from __future__ import annotations

import datasets
import pytest
import torch

from fedlora.aggregation import TrainingPolicy
from fedlora.models.dp_sgd import train_local_dp
from fedlora.models.lora_state import get_adapter, get_head, set_adapter, set_head
from fedlora.models.optim import LocalOptim
from fedlora.models.runtime import runtime_of
from fedlora.models.training import train_local
from fedlora.protocol.client import sampled_batches
from fedlora.tasks.causal_lm import CausalLMTask


@pytest.fixture(scope="module")
def tiny(tiny_bert_path, tmp_path_factory):
    """The tiny BERT without dropout: Opacus' noise draws from the generator that dropout masks come from."""
    from pathlib import Path

    from transformers import BertModel

    from fedlora.config.run import RunConfig
    from fedlora.tasks.build import build_model

    out = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    BertModel.from_pretrained(tiny_bert_path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save_pretrained(out)
    for name in Path(tiny_bert_path).iterdir():  # the tokenizer's files
        if not (out / name.name).exists():
            (out / name.name).write_bytes(name.read_bytes())
    model, tokenizer = build_model(RunConfig(task="toy", model=str(out)))
    return model, tokenizer


def _batches(tokenizer, steps=3, b=4, seed=0):
    data = datasets.Dataset.from_dict({"text": [f"row {i} " + "word " * (i % 5) for i in range(20)],
                                       "label": [i % 2 for i in range(20)]})

    def collate(rows):
        out = tokenizer([r["text"] for r in rows], return_tensors="pt", padding=True)
        return dict(out) | {"labels": torch.tensor([r["label"] for r in rows])}

    return list(sampled_batches(data, steps, b, seed, collate))


def _ce(logits, labels):
    return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")


FULL = TrainingPolicy()


def _train(model, batches, optim, policy=FULL):
    start, head = get_adapter(model), get_head(model)
    runtime = runtime_of(model)
    if optim.dp_sgd:
        train_local_dp(model, iter(batches), len(batches), 1e-2, policy, 5, optim, runtime, _ce, 4)
    else:
        train_local(model, iter(batches), len(batches), 1e-2, policy, 5, optim=optim, runtime=runtime)
    after = get_adapter(model), get_head(model)
    set_adapter(model, start)
    set_head(model, head)
    return after


def test_no_clipping_and_no_noise_is_plain_training(tiny):
    model, tokenizer = tiny
    batches = _batches(tokenizer)
    plain, plain_head = _train(model, batches, LocalOptim())
    # no noise at all: AdamW turns any noise on a zero-gradient coordinate (A while B = 0) into a full lr step
    dp, dp_head = _train(model, batches, LocalOptim(dp_sgd_clip=1e6, dp_sgd_noise=0.0))
    for m in plain:
        assert torch.allclose(plain[m].A, dp[m].A, atol=2e-6) and torch.allclose(plain[m].B, dp[m].B, atol=2e-6)
    for k in plain_head:
        assert torch.allclose(plain_head[k], dp_head[k], atol=2e-6)


def test_clipping_and_noise_change_the_steps_and_leave_nothing_on_the_model(tiny):
    model, tokenizer = tiny
    batches = _batches(tokenizer)
    plain, _ = _train(model, batches, LocalOptim())
    clipped, _ = _train(model, batches, LocalOptim(dp_sgd_clip=1e-4, dp_sgd_noise=0.0))
    noised, _ = _train(model, batches, LocalOptim(dp_sgd_clip=1e6, dp_sgd_noise=1.0))
    m = next(iter(plain))
    assert not torch.allclose(plain[m].B, clipped[m].B, atol=1e-6)
    assert not torch.allclose(plain[m].B, noised[m].B, atol=1e-6)
    again, _ = _train(model, batches, LocalOptim(dp_sgd_clip=1e6, dp_sgd_noise=1.0))
    assert torch.equal(noised[m].B, again[m].B)  # the noise is seeded with the client's round
    hooks = sum(len(mod._forward_hooks) + len(mod._backward_hooks) + len(mod._forward_pre_hooks) for mod in model.modules())
    assert hooks == 0
    assert not any(hasattr(p, "grad_sample") or p.grad is not None for p in model.parameters())
    assert not model.training


def test_a_frozen_factor_stays_bit_identical(tiny):
    model, tokenizer = tiny
    start = get_adapter(model)
    after, _ = _train(model, _batches(tokenizer), LocalOptim(dp_sgd_clip=0.5, dp_sgd_noise=1.0),
                      policy=TrainingPolicy(train_A=False, upload_A=False))
    assert all(torch.equal(after[m].A, start[m].A) for m in start)
    assert any(not torch.equal(after[m].B, start[m].B) for m in start)


def test_a_causal_lm_rows_loss_is_its_own() -> None:
    task = CausalLMTask.example_losses  # reads nothing of the task: called unbound
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.tensor([[-100, -100, 4, 5, 6, -100], [-100, 1, 2, -100, -100, -100], [-100] * 6])
    losses = task(None, logits, labels)
    assert losses[2] == 0  # no supervised token: no loss, no gradient
    changed = labels.clone()
    changed[1, 2:5] = torch.tensor([7, 8, 9])  # another row's length and tokens change
    assert torch.equal(task(None, logits, changed)[0], losses[0])
    alone = torch.nn.functional.cross_entropy(logits[0, 1:5], labels[0, 2:6], ignore_index=-100)
    assert losses[0] == pytest.approx(float(alone), rel=1e-6)


def test_dp_sgd_batches_are_fixed_size_independent_draws() -> None:
    data = datasets.Dataset.from_dict({"x": list(range(10))})
    batches = list(sampled_batches(data, 50, 4, 1, lambda rows: {"x": torch.tensor([r["x"] for r in rows])}))
    assert all(len(b["x"]) == 4 and len(set(b["x"].tolist())) == 4 for b in batches)
    seen = [set(b["x"].tolist()) for b in batches]
    assert any(len(a & b) for a, b in zip(seen, seen[1:]))  # not an epoch's disjoint slices
    with pytest.raises(ValueError, match="lower --batch-size"):
        next(sampled_batches(data, 1, 11, 1, lambda rows: rows))
