"""GLUE: the eight tasks (:mod:`.task`), their specs (:mod:`.specs`), offline file readers (:mod:`.files`),
loading from a local folder or the hub (:mod:`.loading`), metrics (:mod:`.metrics`) and tokenisation
(:mod:`.tokenization`). Client partitioning is shared by every task (:mod:`fedlora.tasks.partitioning`).
Names below load on first use, so that looking a task name up stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use (PEP 562): the config looks task names up through fedlora.tasks, which
# imports fedlora.tasks.glue.specs; that must not pull in datasets, transformers and scikit-learn.
_HOME = {
    "DATA_DIR_ENV": "glue.loading", "load_glue": "glue.loading", "compute_metrics": "glue.metrics",
    "label_histogram": "partitioning", "partition": "partitioning", "split_local": "partitioning", "TASKS": "glue.specs",
    "TaskSpec": "glue.specs", "get_spec": "glue.specs", "encode_text": "glue.tokenization",
    "tokenize": "glue.tokenization",
}


def __getattr__(name: str) -> Any:
    if name == "get_task":
        from fedlora.tasks.base import get_task

        return get_task
    if name not in _HOME:
        raise AttributeError(f"module 'fedlora.tasks.glue' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedlora.tasks.{_HOME[name]}"), name)


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
    "partition",
    "split_local",
    "tokenize",
]
