"""Compare two models on the same images: the paired AUC difference, with a patient-clustered bootstrap.

    python bench/compare_runs.py BASE/report/predictions.csv OTHER/report/predictions.csv [--resamples 2000]

Each argument is evaluate.py's predictions.csv for the same split. Two runs' AUCs each with their own
interval (evaluate.py's) overlap long before a difference is ruled out or in: on the same images the
two models' errors are correlated, so the difference's own interval is much narrower. Resampled by
patient (the Kaggle file names' patient id; a file without one is its own patient), stratified by
class as evaluate.py's intervals are, since one patient's images are not independent.
"""

from __future__ import annotations

import argparse
import csv
import os

import numpy as np

from pneumo_dist import sources
from pneumo_dist.metrics import roc_auc


def read(path: str) -> dict[str, tuple[int, float]]:
    with open(path, newline="") as file:
        return {
            row["source"]: (sources.parse_label(row["label"]), float(row["probability"]))
            for row in csv.DictReader(file)
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base")
    parser.add_argument("other")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base, other = read(args.base), read(args.other)
    if set(base) != set(other):
        raise SystemExit("compare_runs: the two files do not score the same images")
    names = sorted(base)
    labels = np.array([base[n][0] for n in names])
    a, b = (np.array([scores[n][1] for n in names]) for scores in (base, other))
    patients: dict[tuple[int, str], list[int]] = {}
    for index, name in enumerate(names):
        patient = sources.patient_and_subtype(os.path.basename(name))[0] or name
        patients.setdefault((labels[index], patient), []).append(index)
    groups = [[v for (label, _), v in patients.items() if label == c] for c in (0, 1)]
    rng = np.random.default_rng(args.seed)
    differences = np.empty(args.resamples)
    for r in range(args.resamples):
        chosen = np.concatenate(
            [np.concatenate([g[i] for i in rng.integers(0, len(g), len(g))]) for g in groups]
        )
        differences[r] = roc_auc(labels[chosen], b[chosen]) - roc_auc(labels[chosen], a[chosen])
    low, high = np.percentile(differences, [2.5, 97.5])
    auc_a, auc_b = roc_auc(labels, a), roc_auc(labels, b)
    print(
        f"{len(names)} images, {len(patients)} patients: AUC {auc_a:.4f} -> {auc_b:.4f}, difference "
        f"{auc_b - auc_a:+.4f} [{low:+.4f}, {high:+.4f}] (95%, paired, {args.resamples} patient "
        f"resamples); other better in {np.mean(differences > 0):.0%} of them"
    )


if __name__ == "__main__":
    main()
