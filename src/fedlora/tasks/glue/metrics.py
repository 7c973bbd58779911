"""GLUE metrics computed locally with scikit-learn/scipy (``evaluate.load`` would need the network)."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from fedlora.tasks.glue.specs import TaskSpec, get_spec


def compute_metrics(task: str | TaskSpec, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Score predictions on a GLUE task.

    Args:
        task: task name or spec.
        predictions: logits ``(n, num_labels)`` (or already-argmaxed class ids ``(n,)``) for
            classification; scores ``(n,)`` or ``(n, 1)`` for STS-B.
        labels: ``(n,)`` class ids or float scores.

    Returns:
        ``accuracy`` for every classification task, plus ``f1`` (positive class 1) for MRPC/QQP and
        ``matthews_correlation`` for CoLA; ``pearson`` and ``spearman`` for STS-B. ``main`` repeats
        the task's headline metric. A correlation with constant predictions or labels is undefined;
        it is reported as 0.0 (no linear association), like scikit-learn's MCC convention.
    """
    spec = get_spec(task)
    preds = np.asarray(predictions)
    y = np.asarray(labels).reshape(-1)
    if spec.is_regression:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        _check_shape(preds.ndim == 1 and len(preds) == len(y), preds, y, "(n,) or (n, 1)")
        out = {"pearson": _corr(stats.pearsonr, preds, y), "spearman": _corr(stats.spearmanr, preds, y)}
    else:
        if preds.ndim == 2:
            _check_shape(preds.shape[1] == spec.num_labels, preds, y, f"(n, {spec.num_labels})")
            preds = preds.argmax(axis=1)
        _check_shape(preds.ndim == 1 and len(preds) == len(y), preds, y, f"(n, {spec.num_labels}) or (n,)")
        y = y.astype(np.int64)
        out = {"accuracy": float(accuracy_score(y, preds))}
        if spec.name in ("mrpc", "qqp"):
            out["f1"] = float(f1_score(y, preds, pos_label=1, zero_division=0.0))
        if spec.name == "cola":
            out["matthews_correlation"] = float(matthews_corrcoef(y, preds))
    out["main"] = out[spec.metric]
    return out


def _check_shape(ok: bool, preds: np.ndarray, labels: np.ndarray, expected: str) -> None:
    """Raise a ValueError naming both shapes (mismatches otherwise surface as cryptic sklearn errors)."""
    if not ok or len(labels) == 0:
        raise ValueError(
            f"predictions shape {preds.shape} does not fit labels shape {labels.shape}; expected "
            f"predictions of shape {expected} with n = len(labels) > 0."
        )


def _corr(fn, preds: np.ndarray, labels: np.ndarray) -> float:
    """Pearson/Spearman as a float; 0.0 where undefined (constant input or fewer than 2 points)."""
    if len(preds) < 2 or np.ptp(preds) == 0 or np.ptp(labels) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(preds.astype(np.float64), labels.astype(np.float64))[0])
    return 0.0 if np.isnan(value) else value
