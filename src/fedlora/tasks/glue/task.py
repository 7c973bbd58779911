"""GLUE as tasks: one :class:`GlueTask` per :class:`~fedlora.tasks.glue.TaskSpec` (sst2, mrpc, ..., stsb).

Everything is delegated to :mod:`fedlora.tasks.glue`, exactly as the engine did before tasks existed:
:func:`~fedlora.tasks.glue.load_glue` (local GLUE files or the hub), the encoding of
:func:`~fedlora.tasks.glue.tokenize` (through the shared :func:`~fedlora.tasks.glue.encode_text`), label
partitioning and :func:`~fedlora.tasks.glue.compute_metrics`. Same rows, same partitions, same metrics,
bit for bit.
"""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from fedlora.tasks.glue.specs import TASKS, TaskSpec
from fedlora.tasks.base import register_task
from fedlora.tasks.classification import SequenceClassificationTask

if TYPE_CHECKING:
    import datasets


SUMMARIES = {  # what each task asks, for `fedlora tasks`
    "sst2": "sentiment of a movie-review sentence (negative / positive)",
    "mrpc": "are two news sentences paraphrases of each other?",
    "rte": "does the first text entail the second?",
    "cola": "is the sentence grammatically acceptable?",
    "qnli": "does the sentence answer the question?",
    "qqp": "are two Quora questions duplicates?",
    "mnli": "premise and hypothesis: entailment, neutral or contradiction",
    "stsb": "semantic similarity of two sentences, a score in [0, 5]",
}


class GlueTask(SequenceClassificationTask):
    """A GLUE task; ``spec`` holds its static facts (text fields, labels, metric, dev split)."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.text_fields = spec.text_fields
        self.num_labels = spec.num_labels
        self.metric = spec.metric
        self.summary = SUMMARIES.get(spec.name, "")
        self.data = (f"nyu-mll/glue `{spec.name}` from the hub, or `--data-dir` a GLUE folder (the original "
                     f"files); train / the labelled {spec.eval_split} split as test")

    def load(self, data_dir: str | Path | None) -> datasets.DatasetDict:
        """Train split and labelled dev split (as ``test``); see :func:`fedlora.tasks.glue.load_glue`."""
        from fedlora.tasks.glue.loading import load_glue  # datasets loads when data does, not at name lookup

        return load_glue(self.spec, data_dir)

    def data_files(self, data_dir: str | Path | None) -> list[Path]:
        """The task folder's train (when present) and dev files, as :func:`fedlora.tasks.glue.load_glue` finds them."""
        from fedlora.tasks.glue.files import find_layout
        from fedlora.tasks.glue.loading import resolve_data_dir

        root = resolve_data_dir(data_dir)
        if root is None:
            return []
        folder, layout = find_layout(self.spec, root)
        return [folder / name for name in (layout.train, layout.test) if name is not None]

    def score(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Accuracy (+ F1 for MRPC/QQP, MCC for CoLA), Pearson/Spearman for STS-B; see compute_metrics."""
        from fedlora.tasks.glue.metrics import compute_metrics

        return compute_metrics(self.spec, predictions, labels)

    def __repr__(self) -> str:
        return f"GlueTask({self.spec.name!r})"


for _spec in TASKS.values():
    register_task(_spec.name, spec=_spec)(GlueTask)
