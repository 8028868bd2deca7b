"""The classification figures the field reports, from counts: top-1, top-5, mean-class accuracy and loss, a
per-class table and the most confused pairs. Training's validation and `uniformer evaluate` both report these."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# How many (true, predicted) pairs a report lists, most confused first.
CONFUSED_PAIRS = 50


@dataclass
class Scores:
    metrics: dict  # loss, accuracy (top-1), top5_accuracy, mean_class_accuracy
    confusion: np.ndarray  # [true, predicted] counts


def scores_from_counts(confusion: np.ndarray, top5_correct: int, loss_sum: float) -> Scores:
    """The field's figures from a confusion matrix: top-1, top-5, the mean of per-class recalls over the classes
    present (Kinetics' "mean class accuracy"), and the mean loss."""
    total = int(confusion.sum())
    if total == 0:
        nan = float("nan")
        return Scores({"loss": nan, "accuracy": nan, "top5_accuracy": nan, "mean_class_accuracy": nan}, confusion)
    per_class = confusion.sum(axis=1)
    present = per_class > 0
    recalls = np.diag(confusion)[present] / per_class[present]
    return Scores(
        {
            "loss": loss_sum / total,
            "accuracy": float(np.trace(confusion)) / total,
            "top5_accuracy": top5_correct / total,
            "mean_class_accuracy": float(recalls.mean()),
        },
        confusion,
    )


def per_class_report(confusion: np.ndarray, class_names: list[str]) -> dict:
    """Per-class support, recall and precision, and the most confused (true, predicted) pairs, from `[true, pred]`
    counts: what a confusion matrix of hundreds of classes is read for."""
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    hits = np.diag(confusion)
    classes = [
        {
            "class": name,
            "support": int(support[i]),
            "recall": float(hits[i] / support[i]) if support[i] else None,
            "precision": float(hits[i] / predicted[i]) if predicted[i] else None,
        }
        for i, name in enumerate(class_names)
    ]
    off_diagonal = confusion.copy()
    np.fill_diagonal(off_diagonal, 0)
    flat = np.argsort(off_diagonal, axis=None, kind="stable")[::-1][:CONFUSED_PAIRS]
    pairs = [
        {"true": class_names[t], "predicted": class_names[p], "count": int(off_diagonal[t, p])}
        for t, p in zip(*np.unravel_index(flat, confusion.shape))
        if off_diagonal[t, p] > 0
    ]
    return {"classes": classes, "most_confused": pairs}
