"""The task interface and its registry: everything the engine needs to know about a data set and a model.

The engine (federation, client round, server, both engines) only ever calls these methods, in
this order: :meth:`Task.load` → :meth:`Task.partition_key` (the Dirichlet split) →
:meth:`Task.encode` per split → :meth:`Task.build_model` → batches from :meth:`Task.collate`, whose
dicts go straight into ``model(**batch)`` and must yield ``.loss`` → :meth:`Task.evaluate`. It never
looks at labels, logits or argmax itself, so a classification task, a regression task and a
generative one (causal LM with a prompt-masked loss, scored by generating) fit alike.

Adding a task is one file with one decorated class::

    @register_task("my-task")
    class MyTask(SequenceClassificationTask):   # or Task, implementing every abstract method
        metric = "accuracy"
        def load(self, data_dir): ...
        def score(self, predictions, labels): ...

This module imports neither datasets nor transformers, so the config can look names up cheaply;
the built-in tasks (GLUE, ``toy``) are imported on the first lookup, like aggregation methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    import datasets
    from peft import PeftModel
    from torch import Tensor, nn
    from transformers import PreTrainedTokenizerBase

    from fedlora.config.run import RunConfig
    from fedlora.models.runtime import Runtime

Collate = Callable[[list[dict[str, Any]]], dict[str, "Tensor"]]
TaskT = TypeVar("TaskT", bound="type[Task]")

_REGISTRY: dict[str, Task] = {}


class Task(ABC):
    """One federated learning problem: its data, how it is split and encoded, its model and its score.

    Attributes:
        name: the registered name (set by :func:`register_task`), lower-case letters and digits.
        metric: key of the headline metric in :meth:`evaluate`'s result (which repeats it as "main").

    Instances must be cheap to create (they are created at registration) and stateless between
    calls: the same arguments give the same result, whatever was called before.
    """

    name: str = ""
    metric: str = ""
    default_max_length: int = 64  # tokens per example when the run says --max-length auto
    # What `fedlora tasks` and docs/tasks.md say about the task (fedlora.cli.catalog): one line each.
    summary: str = ""  # what is learned; "" shows the class docstring's first line
    data: str = ""  # where the data comes from (hub id, files under --data-dir) and its train/test splits
    # Model-loading options of RunConfig that only some task families implement (the config refuses
    # them for the others by asking the task, not by testing its class).
    model_options: frozenset[str] = frozenset()

    @property
    def family(self) -> str:
        """The kind of model and problem ("encoder classification", "decoder LLM", ...); the shared base
        classes say theirs, so a task written on one of them needs nothing here."""
        return ""

    def configure(self, config: RunConfig) -> Task:
        """This task with the run's task-specific settings applied (a configured copy; the registered
        instance is never changed). Default: the task has none and returns itself.

        Generative tasks take e.g. ``max_new_tokens`` and the instruct task its column names here, so
        that the interface's other methods keep their short signatures.
        """
        return self

    def preflight(self) -> None:
        """Checks that need this machine rather than the config (e.g. the code sandbox), run before any model or
        data is loaded; raise with one line saying what is wrong. Nothing to check by default."""
        return None

    def loss_weight(self, batch: dict[str, Any]) -> int:
        """How much ``batch`` counts in a step's mean loss: its rows (a causal LM: its supervised tokens).

        Gradient accumulation weights each micro-batch's loss by this share, so that k micro-batches
        give the update of one batch up to float rounding.
        """
        for key in ("labels", "input_ids"):
            value = batch.get(key)
            if value is not None and hasattr(value, "shape"):
                return int(value.shape[0])
        raise KeyError(f"batch has neither 'labels' nor 'input_ids' tensors (keys: {sorted(batch)})")

    def evaluate_together(
        self, model: PeftModel, datas: Sequence[datasets.Dataset], tokenizer: PreTrainedTokenizerBase,
        runtime: Runtime, states: Sequence[tuple[Any, dict[str, Tensor]]],
    ) -> list[dict[str, float]] | None:
        """:meth:`evaluate` of several clients' (adapter, head) ``states``, each on its own ``datas[k]``, in shared
        forward passes (client batching); None when the task cannot (the caller then evaluates one by one)."""
        return None

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The mean training loss of some rows from the model's logits, exactly as the model's own ``.loss``
        computes it (client batching scores each client's rows with this). Default: sequence classification,
        as transformers does: mean squared error for one output (regression), else cross-entropy.
        """
        import torch

        logits = logits.float()  # (b, C)
        if logits.shape[-1] == 1:
            return torch.nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).reshape(-1))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    def example_losses(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Each row's own loss (b,), from nothing but that row: what record-level DP-SGD clips per example
        (:mod:`fedlora.models.dp_sgd`). Default: sequence classification, as :meth:`loss` but unreduced."""
        import torch

        logits = logits.float()  # (b, C)
        if logits.shape[-1] == 1:
            return torch.nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).reshape(-1),
                                                reduction="none")
        return torch.nn.functional.cross_entropy(logits, labels.reshape(-1), reduction="none")

    @abstractmethod
    def load(self, data_dir: str | Path | None) -> datasets.DatasetDict:
        """The raw data as ``DatasetDict(train=..., test=...)``; ``test`` is the global test set.

        ``data_dir`` is the user's ``--data-dir`` (a task with built-in data ignores it).
        """

    def data_files(self, data_dir: str | Path | None) -> list[Path]:
        """The files :meth:`load` reads from ``data_dir``, in a fixed order (their content is the run's data:
        a resume on other content is refused, and the Flower data cache is keyed by it). [] when the data
        is built in or comes from the hub. Default, for tasks that do not say: every file under the data
        folder (``data_dir``, else ``$FEDLORA_DATA_DIR``), sorted, less hidden ones (``.git``, ``.cache``:
        not data, and they change); override it to name only the files read.
        """
        from fedlora.tasks.glue.loading import resolve_data_dir

        root = resolve_data_dir(data_dir)
        if root is None or not root.exists():
            return []
        if root.is_file():
            return [root]
        return sorted(p for p in root.rglob("*")
                      if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))

    def partition_key(self, train: datasets.Dataset) -> np.ndarray | None:
        """(n,) int64 key per training row whose mix the Dirichlet split skews (labels, topics...).

        None: the task has no such key, and only IID splits (``--alpha iid``) are possible.
        """
        return None

    @abstractmethod
    def encode(
        self, ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int
    ) -> datasets.Dataset:
        """Model-ready rows (torch format, unpadded, at most ``max_length`` tokens) for :meth:`collate`."""

    @abstractmethod
    def collate(self, tokenizer: PreTrainedTokenizerBase) -> Collate:
        """Rows of :meth:`encode`'s output → one padded batch ``{name: (b, ...) tensor}`` whose
        ``model(**batch)`` returns a ``.loss`` (the local training objective)."""

    @abstractmethod
    def build_model(
        self, model: str | None, rank: int, lora_alpha: float, target_modules: Sequence[str], seed: int
    ) -> tuple[PeftModel, PreTrainedTokenizerBase]:
        """The frozen backbone (``model``: hub id or path; None: the task's default) with a LoRA adapter
        and any trainable head, on the CPU in float32, in eval mode. A function of ``seed`` only:
        every client and the server build the identical model."""

    @abstractmethod
    def evaluate(
        self, model: nn.Module, data: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, runtime: Runtime,
        samples: list[dict[str, Any]] | None = None,
    ) -> dict[str, float]:
        """Score ``model`` on encoded ``data``: ``{metric: value, ..., "main": value of self.metric}``.

        ``main`` is higher-is-better (the engine reports its best round). Runs on ``runtime.device``
        under ``runtime.autocast()``; leaves the model in its mode. A generative task appends one dict
        per scored example to ``samples`` when given one (prompt, reference, generation, correct): the
        engine writes them to the run directory so a user can read what the model says.
        """

    def partition_table(self, parts: Sequence[datasets.Dataset]) -> str:
        """One line per client: its size and, with a partition key, the count of each key value."""
        keys = [k for k in (self.partition_key(p) for p in parts) if k is not None]
        return partition_table(keys if len(keys) == len(parts) else None, [len(p) for p in parts])


def partition_table(keys: Sequence[np.ndarray] | None, sizes: Sequence[int]) -> str:
    """One line per client: its size and, with its partition keys (``keys[u]``), the count of each key value."""
    if keys is None:
        return format_table(["client", "n"], [[str(i), str(n)] for i, n in enumerate(sizes)])
    width = max((int(k.max()) + 1 for k in keys if len(k)), default=0)
    rows = [[str(i), str(len(k)), *map(str, np.bincount(k, minlength=width))] for i, k in enumerate(keys)]
    return format_table(["client", "n", *map(str, range(width))], rows)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Right-aligned fixed-width columns, one line per row, header first."""
    widths = [max(len(row[j]) for row in [header, *rows]) for j in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows])


def normalise_name(name: str) -> str:
    """Fold the spellings people use ("SST-2", "sts_b", "glue/cola") onto the canonical key."""
    key = name.strip().lower()
    key = key.removeprefix("glue/").removeprefix("nyu-mll/glue/")
    return "".join(ch for ch in key if ch.isalnum())


def register_task(name: str, **init: Any) -> Callable[[TaskT], TaskT]:
    """Class decorator: register ``cls(**init)`` under ``name``.

    One class may be registered several times with different ``init`` (GLUE: one spec per task).

    Raises:
        ValueError: ``name`` is not canonical (lower-case letters and digits) or is taken.
        TypeError: the class is not a :class:`Task`.
    """
    if not name or normalise_name(name) != name:
        raise ValueError(f"task name {name!r} must be lower-case letters and digits, e.g. {normalise_name(name)!r}")

    def wrap(cls: TaskT) -> TaskT:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"@register_task({name!r}) decorates a Task subclass, not {cls!r}")
        if name in _REGISTRY:
            raise ValueError(f"task {name!r} is registered twice ({type(_REGISTRY[name]).__name__} and {cls.__name__})")
        task = cls(**init)
        task.name = name
        if not task.metric:
            raise ValueError(f"task {name!r} ({cls.__name__}) names no main metric; set its `metric`")
        _REGISTRY[name] = task
        return cls

    return wrap


def get_task(name: str | Task) -> Task:
    """The registered task called ``name`` (case, dashes and a "glue/" prefix are ignored); a Task is returned as is.

    Raises:
        ValueError: unknown task; the message lists the available ones.
    """
    if isinstance(name, Task):
        return name
    _load_builtin_tasks()
    task = _REGISTRY.get(normalise_name(str(name)))
    if task is None:
        raise ValueError(
            f"Unknown task {name!r}. Available tasks: {', '.join(available_tasks())} "
            "(case and dashes are ignored, so 'SST-2' means 'sst2')."
        )
    return task


def available_tasks() -> list[str]:
    """Names of every registered task, sorted."""
    _load_builtin_tasks()
    return sorted(_REGISTRY)


def task_for(config: RunConfig) -> Task:
    """The run's task, configured with its task-specific settings (:meth:`Task.configure`)."""
    return get_task(config.task).configure(config)


def _load_builtin_tasks() -> None:
    # Importing the modules registers the built-in tasks (each decorator runs once).
    import fedlora.tasks.glue.task  # noqa: F401
    import fedlora.tasks.instruct  # noqa: F401
    import fedlora.tasks.llm  # noqa: F401
    import fedlora.tasks.toy  # noqa: F401
