"""Metrics of a binary screening model from labels and probabilities (PNEUMONIA = positive class).

Plain numpy in, plain floats out, so that every worker computes the same numbers from the same arrays.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """ROC-AUC, PR-AUC, loss, and accuracy / sensitivity / specificity / precision / F1 at `threshold`."""
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    predicted = probabilities >= threshold
    positive = labels > 0.5
    true_pos = int(np.sum(predicted & positive))
    true_neg = int(np.sum(~predicted & ~positive))
    false_pos = int(np.sum(predicted & ~positive))
    false_neg = int(np.sum(~predicted & positive))
    both_classes = 0 < positive.sum() < len(positive)
    clipped = np.clip(probabilities, 1e-7, 1 - 1e-7)
    precision = _ratio(true_pos, true_pos + false_pos)
    sensitivity = _ratio(true_pos, true_pos + false_neg)
    return {
        "auc": float(roc_auc_score(positive, probabilities)) if both_classes else float("nan"),
        "pr_auc": float(average_precision_score(positive, probabilities)) if both_classes else float("nan"),
        "loss": float(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))),
        "accuracy": _ratio(true_pos + true_neg, len(labels)),
        "sensitivity": sensitivity,
        "specificity": _ratio(true_neg, true_neg + false_pos),
        "precision": precision,
        "f1": _ratio(2 * precision * sensitivity, precision + sensitivity),
        "threshold": float(threshold),
        "count": int(len(labels)),
    }


def threshold_for_sensitivity(labels: np.ndarray, probabilities: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity is at least `target` (so specificity is as high as it can
    be at that sensitivity)."""
    positives = np.sort(np.asarray(probabilities)[np.asarray(labels).reshape(-1) > 0.5])
    if len(positives) == 0:
        return 0.5
    # Predicting positive at p >= t catches the positives with p >= t: keep the top ceil(target * n).
    needed = int(np.ceil(target * len(positives) - 1e-9))
    return float(positives[len(positives) - needed]) if needed > 0 else float(positives[-1]) + 1e-6


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")
