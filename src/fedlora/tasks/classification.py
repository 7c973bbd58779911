"""Sequence classification (and regression): an encoder, a LoRA adapter and a new head scored on logits.

GLUE and ``toy`` are subclasses: a subclass names its ``text_fields``, ``num_labels`` and
``metric`` and implements :meth:`~fedlora.tasks.base.Task.load` and :meth:`score`; encoding,
padding, the model (``AutoModelForSequenceClassification`` + PEFT ``SEQ_CLS``) and the prediction
loop are shared here. Rows need the ``text_fields`` columns and a ``label`` column (class id, or a
float score when ``num_labels == 1``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.tasks.base import Collate, Task

if TYPE_CHECKING:  # the heavy libraries load when a task is used, not when its name is looked up
    import datasets
    from peft import PeftModel
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from fedlora.models.runtime import Runtime


class SequenceClassificationTask(Task):
    """Text (or text-pair) classification with ``num_labels`` classes; ``num_labels == 1`` is regression.

    Attributes:
        text_fields: the text column(s) fed to the tokenizer, in order (two are encoded as a pair).
        num_labels: classes of the head; 1 = one regression output trained with MSE.
        eval_batch_size: rows per evaluation batch (memory only: results do not depend on it).
    """

    text_fields: tuple[str, ...] = ("sentence",)
    num_labels: int = 2
    eval_batch_size: int = 128

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def family(self) -> str:
        return "encoder regression" if self.is_regression else f"encoder classification ({self.num_labels} classes)"

    @abstractmethod
    def score(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Metrics from logits ``(n, num_labels)`` (``(n,)`` for regression) and labels ``(n,)``,
        including ``"main"`` (the value of ``self.metric``)."""

    def partition_key(self, train: datasets.Dataset) -> np.ndarray:
        """Class ids, or regression scores binned to integers (:func:`fedlora.tasks.partitioning.partition_labels`)."""
        from fedlora.tasks.partitioning import partition_labels

        return partition_labels(train)

    def encode(self, ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> datasets.Dataset:
        """``input_ids``, ``attention_mask`` (, ``token_type_ids``) and ``labels``; truncated, not padded."""
        from fedlora.tasks.glue.tokenization import encode_text

        return encode_text(ds, tokenizer, self.text_fields, max_length, name=self.name, regression=self.is_regression)

    def collate(self, tokenizer: PreTrainedTokenizerBase) -> Collate:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)  # pads each batch to its longest row

    def build_model(
        self, model: str | None, rank: int, lora_alpha: float, target_modules: Sequence[str], seed: int
    ) -> tuple[PeftModel, PreTrainedTokenizerBase]:
        """``model`` (default: the bundled all-MiniLM-L6-v2) + LoRA + a ``num_labels`` head, seeded."""
        from fedlora.models.classifier import default_model_path, load_model

        return load_model(model or default_model_path(), self.num_labels, rank, lora_alpha, list(target_modules) or None,
                          seed=seed)

    def evaluate(
        self, model: nn.Module, data: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, runtime: Runtime,
        samples: list[dict[str, Any]] | None = None,
    ) -> dict[str, float]:
        """Logits over ``data``, then :meth:`score` (``samples``: not used).

        Rows are batched longest first, so each batch pads to nearly its own length (docs/overhead.md: the
        872-row SST-2 dev set took ~11 s in input order and ~6 s sorted, same metrics); predictions are put
        back in input order before scoring.
        """
        from fedlora.models.training import evaluate as predict

        order, loader = self._sorted_loader(data, tokenizer)
        predictions, labels = predict(model, loader, self.num_labels, runtime)
        return self._score_in_order(order, predictions, labels)

    def evaluate_together(
        self, model: nn.Module, datas: Sequence[datasets.Dataset], tokenizer: PreTrainedTokenizerBase,
        runtime: Runtime, states: Sequence[tuple[Any, dict[str, Any]]],
    ) -> list[dict[str, float]]:
        """:meth:`evaluate` for each client's state on its own data, the clients' batches in shared forward passes
        (:func:`fedlora.models.client_batch.predict_together`): the same rows, batches and order as alone."""
        from fedlora.models.client_batch import predict_together

        sorted_loaders = [self._sorted_loader(data, tokenizer) for data in datas]
        outputs = predict_together(model, states, [loader for _, loader in sorted_loaders], runtime)
        results = []
        for (order, _), (logits, labels) in zip(sorted_loaders, outputs):
            predictions = logits.numpy()
            predictions = predictions[:, 0] if self.num_labels == 1 else predictions
            results.append(self._score_in_order(order, predictions, labels.numpy()))
        return results

    def _sorted_loader(self, data: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> tuple[np.ndarray, Any]:
        """(order, loader): the rows longest first, batched (an out-of-memory shows on the first batch)."""
        from torch.utils.data import DataLoader

        lengths = np.fromiter((len(ids) for ids in data["input_ids"]), dtype=np.int64, count=len(data))
        order = np.argsort(-lengths, kind="stable")
        return order, DataLoader(data.select(order), batch_size=self.eval_batch_size, shuffle=False,
                                 collate_fn=self.collate(tokenizer))

    def _score_in_order(self, order: np.ndarray, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))  # row i of the input is row inverse[i] of the sorted batches
        return self.score(predictions[inverse], labels[inverse])


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose argmax over logits ``(n, C)`` equals the label ``(n,)``."""
    if predictions.ndim != 2 or len(predictions) != len(labels) or len(labels) == 0:
        raise ValueError(f"predictions {predictions.shape} do not fit labels {labels.shape}; expected (n, C), n > 0")
    return float(np.mean(predictions.argmax(axis=1) == np.asarray(labels).astype(np.int64)))
