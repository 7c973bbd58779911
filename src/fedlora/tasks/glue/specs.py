"""GLUE task specs: which text columns, how many labels and which metric each GLUE task uses.

These are the static facts the GLUE readers, tokeniser and metrics need. The engine-facing task
objects (load, partition, encode, evaluate, build the model) live in :mod:`fedlora.tasks`; its
GLUE implementation (:mod:`fedlora.tasks.glue.task`) wraps one :class:`TaskSpec` per task.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.tasks.base import normalise_name


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one GLUE task, in the Hugging Face ``nyu-mll/glue`` conventions.

    Attributes:
        name: canonical lower-case name, also the hub config name ("sst2", "stsb", ...).
        text_fields: the text column(s) fed to the tokenizer, in order (pairs are encoded together).
        num_labels: number of classes; 1 means regression (STS-B).
        metric: key of the task's headline metric in :func:`fedlora.tasks.glue.compute_metrics`' result.
        eval_split: hub split used as the global test set (GLUE test labels are hidden).
        label_names: class names in label-id order, as on the hub (empty for regression).
    """

    name: str
    text_fields: tuple[str, ...]
    num_labels: int
    metric: str
    eval_split: str
    label_names: tuple[str, ...] = ()

    @property
    def is_regression(self) -> bool:
        """True for tasks whose label is a float score (STS-B)."""
        return self.num_labels == 1


# Headline metrics follow the LoRA paper (Hu et al., 2021): MCC for CoLA, Pearson for STS-B,
# accuracy for the rest. F1 is still reported for MRPC/QQP as a secondary metric.
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("sst2", ("sentence",), 2, "accuracy", "validation", ("negative", "positive")),
        TaskSpec(
            "mrpc", ("sentence1", "sentence2"), 2, "accuracy", "validation",
            ("not_equivalent", "equivalent"),
        ),
        TaskSpec(
            "rte", ("sentence1", "sentence2"), 2, "accuracy", "validation",
            ("entailment", "not_entailment"),
        ),
        TaskSpec(
            "cola", ("sentence",), 2, "matthews_correlation", "validation",
            ("unacceptable", "acceptable"),
        ),
        TaskSpec(
            "qnli", ("question", "sentence"), 2, "accuracy", "validation",
            ("entailment", "not_entailment"),
        ),
        TaskSpec(
            "qqp", ("question1", "question2"), 2, "accuracy", "validation",
            ("not_duplicate", "duplicate"),
        ),
        TaskSpec(
            "mnli", ("premise", "hypothesis"), 3, "accuracy", "validation_matched",
            ("entailment", "neutral", "contradiction"),
        ),
        TaskSpec("stsb", ("sentence1", "sentence2"), 1, "pearson", "validation"),
    )
}


def get_spec(name: str | TaskSpec | object) -> TaskSpec:
    """Return the :class:`TaskSpec` for a GLUE task name (case-insensitive; "SST-2", "sst-2", "sst2").

    Also accepts a spec (returned as is) or an object carrying one as ``.spec`` (the GLUE
    :class:`fedlora.tasks.glue.task.GlueTask`), so the GLUE helpers take whatever the caller holds.

    Raises:
        ValueError: unknown task; the message lists the valid names.
    """
    if isinstance(name, TaskSpec):
        return name
    if isinstance(getattr(name, "spec", None), TaskSpec):
        return name.spec  # type: ignore[attr-defined]
    spec = TASKS.get(normalise_name(str(name)))
    if spec is None:
        valid = ", ".join(sorted(TASKS))
        raise ValueError(
            f"Unknown GLUE task {name!r}. Valid tasks: {valid} "
            "(case and dashes are ignored, so 'SST-2' means 'sst2')."
        )
    return spec
