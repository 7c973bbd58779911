"""Classifier heads from clients, screened like LoRA factors before they are averaged.

A head is a dict {name: tensor} that travels next to the adapter (the task's classifier layer).
A client's head is rejected, with a reason, unless it has exactly the global head's keys and
shapes, dense float16/bfloat16/float32/float64 tensors and finite values, and its distance from
the global head ‖head − global‖_F is at most ``norm_bound`` × the round's reference norm (the
median over the round's heads; with one head or a zero median, the global head's own norm, at
least 1: :func:`fedlora.aggregation.robust.reference_norm`). Accepted heads are clipped to
``clip`` × the round's median, exactly like the factors (:mod:`fedlora.aggregation.robust`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fedlora.aggregation.robust import clip_scale, clipped, delta_norm, own_norm, reference_norm
from fedlora.aggregation.validation import tensor_problem

Head = dict[str, Tensor]


def head_problem(head: object, global_head: Head) -> str | None:
    """What is wrong with one client's head compared with the global one (None: it is well formed)."""
    if not isinstance(head, dict):
        return f"classifier head is a {type(head).__name__}, not a dict {{name: tensor}}"
    if set(head) != set(global_head):
        missing = sorted(set(global_head) - set(head), key=repr)
        extra = sorted(set(head) - set(global_head), key=repr)
        return f"classifier head keys differ from the global head's: missing {missing}, unknown {extra}"
    for key in sorted(global_head, key=repr):
        tensor, ref = head[key], global_head[key]
        problem = tensor_problem(f"classifier head {key!r}", tensor, ndim=None)
        if problem:
            return problem
        if tensor.shape != ref.shape:
            return (f"classifier head {key!r} has shape {tuple(tensor.shape)} but the global head's is "
                    f"{tuple(ref.shape)}; clients must train the server's task")
        if tensor.device != ref.device:
            return f"classifier head {key!r} is on device {tensor.device} but the global head on {ref.device}"
    return None


def head_norm(head: Head, global_head: Head) -> float:
    """‖head − global‖_F over every key (float64)."""
    return delta_norm([(head[k], global_head[k]) for k in global_head])


def screen_heads(
    names: Sequence[str], heads: Sequence[Head], global_head: Head, norm_bound: float | None
) -> tuple[list[tuple[str, str]], list[float], float, bool]:
    """(problems, norms, reference, from_round) for well-formed ``heads``: those above the norm bound.

    ``problems`` is ``(client, reason)`` per rejected head; ``norms`` is each head's distance from
    the global head, ``reference`` the round's reference norm (see the module docstring).
    """
    if any(t.is_meta for t in global_head.values()):  # no values to measure
        return [], [], float("nan"), False
    norms = [head_norm(h, global_head) for h in heads]
    reference, from_round = reference_norm(norms, own_norm(list(global_head.values())))
    if norm_bound is None:
        return [], norms, reference, from_round
    what = "the round's median" if from_round else "the fallback reference (the global head's own norm, at least 1)"
    problems = [(name, f"classifier head update norm {n:.4g} is more than {norm_bound:g}x {what} {reference:.4g}")
                for name, n in zip(names, norms) if not n <= norm_bound * reference]
    return problems, norms, reference, from_round


def clip_head(head: Head, global_head: Head, norm: float, bound: float) -> Head:
    """``head`` pulled back to ``bound`` from the global head when it is further (float64 tensors)."""
    scale = clip_scale(norm, bound)
    return {k: clipped(head[k].double(), global_head[k].double(), scale) for k in global_head}
