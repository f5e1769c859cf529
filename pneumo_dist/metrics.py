"""Metrics of a binary screening model from labels and probabilities (PNEUMONIA = positive class):
point estimates, bootstrap confidence intervals, calibration.

Plain numpy in, plain floats out, so that every worker computes the same numbers from the same arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_curve

# The figures that get a confidence interval. Counts and the loss do not.
INTERVAL_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc", "pr_auc", "ece")
CALIBRATION_BINS = 10


@dataclass(frozen=True)
class Estimate:
    """A figure with its 95% bootstrap interval; NaN (None read back from JSON) where the data cannot
    define it: the AUC of one class, precision with nothing called PNEUMONIA."""

    value: float
    ci95: tuple[float, float]

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.ci95[0]:.3f}, {self.ci95[1]:.3f}]"


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """ROC-AUC, PR-AUC, loss, calibration error, and the confusion counts with accuracy / sensitivity /
    specificity / precision / F1 at `threshold`."""
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    clipped = np.clip(probabilities, 1e-7, 1 - 1e-7)
    loss = float(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped)))
    return (
        _ranking_metrics(labels, probabilities)
        | {"loss": loss}
        | _threshold_metrics(labels, probabilities, threshold)
    )


def _ranking_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """The figures that do not depend on a threshold."""
    positive = labels > 0.5
    auc = pr_auc = float("nan")
    if 0 < positive.sum() < len(positive):
        auc, pr_auc = _areas(positive, probabilities)
    return {"auc": auc, "pr_auc": pr_auc, "ece": expected_calibration_error(labels, probabilities)}


def roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """ROC AUC as roc_auc_score computes it (nan with one class), without its per-call checks."""
    positive = np.asarray(labels).reshape(-1) > 0.5
    if not 0 < positive.sum() < len(positive):
        return float("nan")
    return _areas(positive, np.asarray(probabilities, dtype=np.float64).reshape(-1))[0]


def _areas(positive: np.ndarray, probabilities: np.ndarray) -> tuple[float, float]:
    """(ROC AUC, average precision) as scikit-learn's roc_auc_score and average_precision_score compute
    them (tied scores make one point of each curve), from one sort: a bootstrap computes them thousands
    of times, where scikit-learn's input checks cost ~3 ms a call."""
    order = np.argsort(-probabilities, kind="mergesort")
    ranked = probabilities[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    true_pos = np.cumsum(positive[order])[last_of_each_score].astype(np.float64)
    false_pos = last_of_each_score + 1 - true_pos
    tpr = np.r_[0.0, true_pos / true_pos[-1]]
    fpr = np.r_[0.0, false_pos / false_pos[-1]]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)  # the trapezoids under the ROC curve
    average_precision = float(np.sum(np.diff(tpr) * true_pos / (true_pos + false_pos)))
    return auc, average_precision


def _threshold_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, float]:
    predicted = probabilities >= threshold
    positive = labels > 0.5
    true_pos = int(np.sum(predicted & positive))
    true_neg = int(np.sum(~predicted & ~positive))
    false_pos = int(np.sum(predicted & ~positive))
    false_neg = int(np.sum(~predicted & positive))
    precision = _ratio(true_pos, true_pos + false_pos)
    sensitivity = _ratio(true_pos, true_pos + false_neg)
    return {
        "accuracy": _ratio(true_pos + true_neg, len(labels)),
        "sensitivity": sensitivity,
        "specificity": _ratio(true_neg, true_neg + false_pos),
        "precision": precision,
        "f1": _ratio(2 * precision * sensitivity, precision + sensitivity),
        "threshold": float(threshold),
        "count": int(len(labels)),
        "true_positives": true_pos,
        "false_positives": false_pos,
        "true_negatives": true_neg,
        "false_negatives": false_neg,
    }


def bootstrap_intervals(
    labels: np.ndarray,
    probabilities: np.ndarray,
    thresholds: Sequence[float],
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[dict[str, tuple[float, float]]]:
    """Percentile bootstrap intervals of INTERVAL_METRICS at each threshold (one dict per threshold).

    Class-stratified: each resample draws the positives from the positives and the negatives from the
    negatives, so every resample has both classes (an AUC always exists) and the split's prevalence,
    which the test set fixes by design, stays as it is.
    """
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    positives, negatives = np.flatnonzero(labels > 0.5), np.flatnonzero(labels <= 0.5)
    rng = np.random.default_rng(seed)
    samples = [{name: np.empty(resamples) for name in INTERVAL_METRICS} for _ in thresholds]
    for index in range(resamples):
        chosen = np.concatenate(
            [rng.choice(positives, len(positives)), rng.choice(negatives, len(negatives))]
        ).astype(np.int64)
        resampled_labels, resampled_probabilities = labels[chosen], probabilities[chosen]
        ranking = _ranking_metrics(resampled_labels, resampled_probabilities)  # the same at every threshold
        for threshold, sample in zip(thresholds, samples, strict=True):
            metrics = ranking | _threshold_metrics(resampled_labels, resampled_probabilities, threshold)
            for name in INTERVAL_METRICS:
                sample[name][index] = metrics[name]
    tail = (1.0 - confidence) / 2.0
    return [{name: _percentiles(values, tail) for name, values in sample.items()} for sample in samples]


def reliability_bins(
    labels: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS
) -> list[dict[str, float]]:
    """Equal-width bins of P(PNEUMONIA): how many predictions fell in each, their mean probability and
    the fraction that were PNEUMONIA. A calibrated model has mean_probability ~ positive_fraction."""
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    which = np.minimum((probabilities * bins).astype(np.int64), bins - 1)  # p = 1.0 goes in the last bin
    rows = []
    for index in range(bins):
        members = which == index
        count = int(members.sum())
        rows.append(
            {
                "low": index / bins,
                "high": (index + 1) / bins,
                "count": count,
                "mean_probability": float(probabilities[members].mean()) if count else float("nan"),
                "positive_fraction": float(labels[members].mean()) if count else float("nan"),
            }
        )
    return rows


def expected_calibration_error(
    labels: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS
) -> float:
    """Sum over the reliability bins of (share of predictions) x |mean probability - positive fraction|."""
    rows = reliability_bins(labels, probabilities, bins)
    total = sum(row["count"] for row in rows)
    return (
        float(
            sum(
                row["count"] / total * abs(row["mean_probability"] - row["positive_fraction"])
                for row in rows
                if row["count"]
            )
        )
        if total
        else float("nan")
    )


def threshold_for_sensitivity(labels: np.ndarray, probabilities: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity is at least `target` (so specificity is as high as it can
    be at that sensitivity)."""
    positives = np.sort(np.asarray(probabilities)[np.asarray(labels).reshape(-1) > 0.5])
    if len(positives) == 0:
        return 0.5
    # Predicting positive at p >= t catches the positives with p >= t: keep the top ceil(target * n).
    needed = int(np.ceil(target * len(positives) - 1e-9))
    return float(positives[len(positives) - needed]) if needed > 0 else float(positives[-1]) + 1e-6


def threshold_youden(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The threshold of the ROC point farthest above the chance line: the largest Youden's J =
    sensitivity + specificity - 1 (Youden 1950). It weighs a missed pneumonia and a false alarm as one
    each, whatever the prevalence; of equally good thresholds, the highest."""
    positive = np.asarray(labels).reshape(-1) > 0.5
    if not 0 < positive.sum() < len(positive):
        return 0.5
    false_positive_rate, true_positive_rate, thresholds = roc_curve(positive, probabilities)
    best = int(np.argmax(true_positive_rate - false_positive_rate))
    return float(min(thresholds[best], 1.0))  # roc_curve's first threshold is inf: nothing positive


def fit_platt(
    labels: np.ndarray, probabilities: np.ndarray, max_slope: float | None = None
) -> tuple[float, float] | None:
    """Logistic calibration of P(PNEUMONIA) on a held-out split (Platt 1999): calibrated =
    sigmoid(slope * logit(p) + intercept), fitted by maximum likelihood with Platt's smoothed targets
    (which keep the fit finite when the split is perfectly separated). The intercept takes out the prior
    that class weights put into the training loss, the slope over- or under-confidence; for a slope > 0
    the ranking (AUC) is unchanged. -> (slope, intercept), or None when it cannot be fitted (one class,
    or a slope <= 0: a model that ranks backwards is not corrected by calibration).

    `max_slope`: a fitted slope above it is set to it and the intercept fitted again. At 1, calibration
    may move the probabilities and soften them but never make them more extreme than the model's own: on
    a validation split the model nearly separates, Platt's slope sharpens probabilities that a shifted
    test set then finds overconfident (RESULTS.md, "Calibration under shift")."""
    positive = np.asarray(labels).reshape(-1) > 0.5
    n_positive, n_negative = int(positive.sum()), int((~positive).sum())
    if not n_positive or not n_negative:
        return None
    target = np.where(positive, (n_positive + 1.0) / (n_positive + 2.0), 1.0 / (n_negative + 2.0))
    features = np.stack([logit(probabilities), np.ones(len(target))], axis=1)

    def loss(weights: np.ndarray) -> float:
        z = features @ weights
        return float(np.sum(np.logaddexp(0.0, z) - target * z))

    weights = np.array([1.0, 0.0])
    for _ in range(100):  # Newton's method with step halving: a convex problem in two unknowns
        q = _sigmoid(features @ weights)
        gradient = features.T @ (q - target)
        hessian = features.T @ (features * (q * (1.0 - q))[:, None]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        current, scale = loss(weights), 1.0
        while loss(weights - scale * step) > current and scale > 1e-6:
            scale /= 2.0
        weights = weights - scale * step
        if np.max(np.abs(scale * step)) < 1e-9:
            break
    slope, intercept = (float(w) for w in weights)
    if not (slope > 0 and np.isfinite(weights).all()):
        return None
    if max_slope is not None and slope > max_slope:
        slope, intercept = max_slope, _fit_intercept(max_slope * features[:, 0], target)
    return slope, intercept


def _fit_intercept(z: np.ndarray, target: np.ndarray) -> float:
    """The b maximising the likelihood of `target` under sigmoid(z + b): Newton's method in one convex
    unknown, its steps bounded."""
    b = 0.0
    for _ in range(200):
        q = _sigmoid(z + b)
        step = float(np.clip(np.sum(q - target) / (np.sum(q * (1.0 - q)) + 1e-9), -4.0, 4.0))
        b -= step
        if abs(step) < 1e-10:
            break
    return b


# The population stability index's usual reading (Siddiqi, "Credit Risk Scorecards", 2006): below 0.1 the
# distribution has not moved, 0.1-0.25 it has somewhat, above 0.25 it has shifted enough to act on.
PSI_SHIFTS = ((0.1, "stable"), (0.25, "some shift"), (float("inf"), "significant shift"))


def population_stability(expected: np.ndarray, actual: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """The population stability index of `actual` probabilities against `expected` ones: sum over bins
    of (a - e) ln(a / e), a and e the shares of each in the bin, the bins cut at the deciles of
    `expected` (each holds a tenth of it); an empty bin counts as a share of 1e-4, as usual."""
    expected = np.asarray(expected, dtype=np.float64).reshape(-1)
    actual = np.asarray(actual, dtype=np.float64).reshape(-1)
    edges = np.unique(np.quantile(expected, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    shares = [
        np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1) / len(values)
        for values in (expected, actual)
    ]
    e, a = (np.maximum(share, 1e-4) for share in shares)
    psi = float(np.sum((a - e) * np.log(a / e)))
    return {
        "psi": psi,
        "verdict": next(name for limit, name in PSI_SHIFTS if psi < limit),
        "bin_upper_edges": [*map(float, edges), 1.0],
        "expected_shares": shares[0].tolist(),
        "actual_shares": shares[1].tolist(),
        "expected_count": len(expected),
        "actual_count": len(actual),
    }


def logit(probabilities: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), p clipped to float32's reach (a saturated sigmoid gives exactly 0 or 1)."""
    clipped = np.clip(np.asarray(probabilities, dtype=np.float64).reshape(-1), 1e-7, 1.0 - 1e-7)
    return np.log(clipped) - np.log1p(-clipped)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _percentiles(values: np.ndarray, tail: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]  # precision is undefined where a resample predicts no positive
    if not len(finite):
        return (float("nan"), float("nan"))
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return (float(low), float(high))


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")
