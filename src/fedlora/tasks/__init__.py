"""Tasks: what is learned, from which data, with which model, scored how (:class:`Task`).

The registry (:func:`get_task`, :func:`available_tasks`, :func:`register_task`) works like the
aggregation methods' one. Built in: the eight GLUE tasks (:mod:`.glue`), ``toy``, a tiny
generated task for tests and demos (:mod:`.toy`), and the decoder-LLM tasks ``gsm8k``, ``mbpp``,
``humaneval``, ``mathcode`` and ``instruct`` (:mod:`.llm`). Shared machinery: :mod:`.classification`
(encoder + head, scored on logits) and :mod:`.causal_lm` (prompt-masked loss, scored by generating). Importing this package is cheap; the built-ins load on first lookup.
"""

from fedlora.tasks.base import Collate, Task, available_tasks, get_task, register_task, task_for

__all__ = ["Collate", "Task", "available_tasks", "get_task", "register_task", "task_for"]
