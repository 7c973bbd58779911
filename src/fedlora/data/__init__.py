"""GLUE data for federated LoRA: specs, loading, client partitioning, metrics, tokenisation.

Modules: :mod:`.tasks` (TaskSpec, TASKS, get_spec), :mod:`.glue_files` (offline GLUE file readers),
:mod:`.loading` (load_glue: local directory or hub), :mod:`.partitioning` (IID/Dirichlet clients, local
splits, histograms), :mod:`.metrics` (compute_metrics), :mod:`.tokenization` (tokenize, encode_text,
make_loader). The engine works on task objects (:mod:`fedlora.tasks`), of which GLUE is one
implementation built on these modules; ``get_task`` here is that registry's lookup (it returns a
:class:`fedlora.tasks.Task`, whose GLUE ones carry their :class:`TaskSpec` as ``.spec``).
"""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use (PEP 562): the config looks task names up through fedlora.tasks, which
# imports fedlora.data.tasks; that must not pull in datasets, transformers and scikit-learn.
_HOME = {
    "DATA_DIR_ENV": "loading", "load_glue": "loading", "compute_metrics": "metrics", "label_histogram": "partitioning",
    "partition": "partitioning", "split_local": "partitioning", "TASKS": "tasks", "TaskSpec": "tasks",
    "get_spec": "tasks", "encode_text": "tokenization", "make_loader": "tokenization", "tokenize": "tokenization",
}


def __getattr__(name: str) -> Any:
    if name == "get_task":
        from fedlora.tasks.base import get_task

        return get_task
    if name not in _HOME:
        raise AttributeError(f"module 'fedlora.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedlora.data.{_HOME[name]}"), name)


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
