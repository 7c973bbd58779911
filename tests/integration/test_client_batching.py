"""`fedlora run --client-batch K` (issue 23 §1) ends where `--client-batch 1` ends, round by round, for every kind
of method: plain (fedit), exact aggregation (flora-na), a private factor (fedsa-lora), a frozen factor (ffa-lora),
alternating factors (rolora), FLoRA's stacking and server re-init, mixed client ranks, and the training knobs.

The model is the tiny BERT with dropout off (with dropout, batched clients draw other masks: a stated
difference). Tolerance: losses 1e-4 relative, adapters 1e-4 absolute after two rounds (AdamW turns float
rounding in near-zero gradient elements into tiny step differences; see tests/unit/models/test_client_batch.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fedlora.protocol.client as client_module
from fedlora.config.run import RunConfig
from fedlora.engines.local import client_groups, run

TINY = dict(task="toy", rounds=2, clients=3, alpha=None, local_steps=2, batch_size=4, lr=5e-3, max_length=32,
            eval_local_every=1, max_eval_examples=32, max_local_eval_examples=8, seed=0)
CASES = {
    "fedit": {},
    "flora-na": {},
    "fedsa-lora": {},
    "ffa-lora": {},
    "rolora": {},
    "flora": {},
    "fedit ranks+knobs": dict(client_ranks=(2, 4, 4), weight_decay=0.1, max_grad_norm=0.5, lr_schedule="cosine",
                              warmup_steps=1, grad_accum=2),
}


@pytest.fixture(scope="module")
def tiny_bert_no_dropout(tiny_bert_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import BertModel

    model = BertModel.from_pretrained(tiny_bert_path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    out = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    model.save_pretrained(out)
    for name in Path(tiny_bert_path).iterdir():  # the tokenizer's files
        if not (out / name.name).exists():
            (out / name.name).write_bytes(name.read_bytes())
    return str(out)


def _run(tmp_path: Path, model: str, method: str, client_batch: int, **changes) -> tuple[list[dict], dict]:
    out = tmp_path / f"k{client_batch}"
    history = run(RunConfig(method=method, model=model, out=str(out), client_batch=client_batch,
                            **(TINY | changes)), progress=False)
    return history, load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_clients_trained_together_end_where_clients_trained_one_by_one(tmp_path, tiny_bert_no_dropout, case,
                                                                       monkeypatch):
    method = case.split()[0]
    groups: list[int] = []
    real = client_module.train_together
    monkeypatch.setattr(client_module, "train_together", lambda model, jobs, *a, **k: (
        groups.append(len(jobs)), real(model, jobs, *a, **k))[1])
    alone, alone_adapter = _run(tmp_path, tiny_bert_no_dropout, method, 1, **CASES[case])
    assert groups == []
    together, together_adapter = _run(tmp_path, tiny_bert_no_dropout, method, 3, **CASES[case])
    assert groups == [3] * TINY["rounds"]  # every round's 3 clients in one group
    assert len(alone) == len(together) == TINY["rounds"]
    for a, t in zip(alone, together):
        assert t["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert t["global"] == pytest.approx(a["global"], rel=1e-4, abs=1e-6)
        assert t["local_metric"] == a["local_metric"]  # accuracy on each client's local test split
    assert alone_adapter.keys() == together_adapter.keys()
    for key in alone_adapter:
        torch.testing.assert_close(together_adapter[key], alone_adapter[key], rtol=1e-4, atol=1e-4)
    config = json.loads((tmp_path / "k3" / "config.json").read_text())
    assert config["client_batch"] == 3  # the run records how it was trained


def test_groups_follow_the_plan_and_auto_stacks_small_steps_only_on_cpu() -> None:
    cpu_model = torch.nn.Linear(2, 2)
    assert client_groups([4, 0, 2, 1, 3], 2, cpu_model) == [[4, 0], [2, 1], [3]]
    assert client_groups([4, 0, 2], 1, cpu_model) == [[4], [0], [2]]
    assert client_groups([4, 0, 2], 8, cpu_model) == [[4, 0, 2]]
    assert client_groups([4, 0, 2], None, cpu_model, 32 * 128) == [[4], [0], [2]]  # a big step: one at a time
    assert client_groups([4, 0, 2, 1], None, cpu_model, 2 * 1024) == [[4, 0], [2, 1]]
    assert client_groups([4, 0, 2], None, cpu_model, 4 * 32) == [[4, 0, 2]]
