"""GLUE data for federated LoRA: specs, loading, client partitioning, metrics, tokenisation.

Modules: :mod:`.tasks` (TaskSpec, TASKS, get_spec), :mod:`.glue_files` (offline GLUE file readers),
:mod:`.loading` (load_glue: local directory or hub), :mod:`.partitioning` (IID/Dirichlet clients, local
splits, histograms), :mod:`.metrics` (compute_metrics), :mod:`.tokenization` (tokenize, encode_text,
make_loader). The engine works on task objects (:mod:`fedlora.tasks`), of which GLUE is one
implementation built on these modules; ``get_task`` here is that registry's lookup (it returns a
:class:`fedlora.tasks.Task`, whose GLUE ones carry their :class:`TaskSpec` as ``.spec``).
"""

from fedlora.data.loading import DATA_DIR_ENV, load_glue
from fedlora.data.metrics import compute_metrics
from fedlora.data.partitioning import label_histogram, partition, split_local
from fedlora.data.tasks import TASKS, TaskSpec, get_spec
from fedlora.data.tokenization import encode_text, make_loader, tokenize
from fedlora.tasks.base import get_task

__all__ = [
    "DATA_DIR_ENV",
    "TASKS",
    "TaskSpec",
    "compute_metrics",
    "encode_text",
    "get_spec",
    "get_task",
    "label_histogram",
    "load_glue",
    "make_loader",
    "partition",
    "split_local",
    "tokenize",
]
