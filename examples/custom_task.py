"""A new task in one file: your own labelled sentences, federated like a GLUE task.

Here the data is a JSON-lines file with "text" and "label" fields (``train.jsonl``, ``test.jsonl`` in
``--data-dir``); the encoder, LoRA, padding, the prediction loop, the Dirichlet split over labels and
the engines all come from :class:`fedlora.tasks.classification.SequenceClassificationTask`. A task with
another model family or another objective implements :class:`fedlora.tasks.Task` directly (load,
encode, collate, build_model, evaluate).

    import examples.custom_task  # registers "reviews"
    fedlora.engines.local.run(RunConfig(task="reviews", data_dir="my_reviews/", ...))
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np

from fedlora.tasks import register_task
from fedlora.tasks.classification import SequenceClassificationTask, accuracy


@register_task("reviews")
class Reviews(SequenceClassificationTask):
    """Two-class sentiment of short reviews; metric: accuracy."""

    text_fields = ("text",)
    num_labels = 2
    metric = "accuracy"

    def load(self, data_dir: str | Path | None) -> datasets.DatasetDict:
        if data_dir is None:
            raise FileNotFoundError("task 'reviews' reads train.jsonl and test.jsonl from --data-dir")
        features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
        return datasets.DatasetDict({
            split: datasets.Dataset.from_json(str(Path(data_dir) / f"{split}.jsonl"), features=features)
            for split in ("train", "test")
        })

    def score(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        value = accuracy(predictions, labels)  # predictions: logits (n, 2)
        return {"accuracy": value, "main": value}
