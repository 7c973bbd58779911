"""Classification evaluation batches rows longest first (less padding) but scores them in input order."""

from __future__ import annotations

import os

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedlora.models.runtime import Runtime  # noqa: E402
from fedlora.models.training import evaluate as predict  # noqa: E402
from fedlora.tasks import get_task  # noqa: E402


def test_sorted_evaluation_scores_the_rows_in_input_order(tiny_bert_path: str, monkeypatch) -> None:
    task = get_task("toy")
    model, tokenizer = task.build_model(tiny_bert_path, 4, 8.0, ["query", "value"], seed=0)
    data = task.encode(task.load(None)["test"], tokenizer, 32).select(range(24))
    lengths = [len(ids) for ids in data["input_ids"]]
    assert lengths != sorted(lengths, reverse=True) and len(set(lengths)) > 3, "the rows must be out of length order"
    monkeypatch.setattr(task, "eval_batch_size", 8)  # three batches, each padded to its own longest row
    seen = {}
    monkeypatch.setattr(type(task), "score", lambda self, p, y: seen.update(p=p, y=y) or {"main": 0.0})
    task.evaluate(model, data, tokenizer, Runtime(torch.device("cpu")))
    loader = torch.utils.data.DataLoader(data, batch_size=task.eval_batch_size, collate_fn=task.collate(tokenizer))
    in_order, labels = predict(model, loader, task.num_labels, Runtime(torch.device("cpu")))
    np.testing.assert_array_equal(seen["y"], labels)
    np.testing.assert_allclose(seen["p"], in_order, rtol=1e-5, atol=1e-6)  # other padding: float rounding only
