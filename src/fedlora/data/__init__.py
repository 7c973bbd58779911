"""GLUE data for federated LoRA: task registry, loading, client partitioning, metrics, tokenisation.

Modules: :mod:`.tasks` (TaskSpec, TASKS, get_task), :mod:`.glue_files` (offline GLUE file readers),
:mod:`.loading` (load_glue: local directory or hub), :mod:`.partitioning` (IID/Dirichlet clients, local
splits, histograms), :mod:`.metrics` (compute_metrics), :mod:`.tokenization` (tokenize, make_loader).
"""

from fedlora.data.loading import DATA_DIR_ENV, load_glue
from fedlora.data.metrics import compute_metrics
from fedlora.data.partitioning import label_histogram, partition, split_local
from fedlora.data.tasks import TASKS, TaskSpec, get_task
from fedlora.data.tokenization import make_loader, tokenize

__all__ = [
    "DATA_DIR_ENV",
    "TASKS",
    "TaskSpec",
    "compute_metrics",
    "get_task",
    "label_histogram",
    "load_glue",
    "make_loader",
    "partition",
    "split_local",
    "tokenize",
]
