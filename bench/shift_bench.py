"""The shift benchmark for developers: several exports on one split under shift.py's shifts, and which
calibration holds up there.

    python bench/shift_bench.py EXPORT [EXPORT ...] --data MANIFEST_URI [--split val] [--seed 0]
                                [--json OUT.json]

For each export: AUC / sensitivity / specificity / ECE per shift at its own threshold (its calibrated
probabilities), the summary (mean AUC under shift, worst AUC, worst specificity and its shift); then for
each calibration (none, platt, platt_capped) fitted on the unshifted split's scores of the model as it
was trained, the ECE on that split and the mean and worst ECE under shift, and the AUC and ECE of the
members' mean logit when several exports are given. The baseline of each ratio is the first export,
run in the same process. Validation or held-out figures, never test figures: say which in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import pneumo_dist  # noqa: F401 - selects tf-keras before TensorFlow loads
from pneumo_dist import metrics, schema, shift
from pneumo_dist.export import Calibration
from pneumo_dist.predict import PneumoniaDetector

CALIBRATIONS = {"none": None, "platt": None, "platt_capped": 1.0}


def calibration_table(labels: np.ndarray, raw: dict[str, np.ndarray]) -> dict[str, dict]:
    """Each calibration fitted on the reference (unshifted) scores; its ECE there and under the shifts."""
    table = {}
    for name, max_slope in CALIBRATIONS.items():
        fitted = None if name == "none" else metrics.fit_platt(labels, raw[shift.REFERENCE], max_slope)
        calibration = Calibration(*fitted, method=name) if fitted else None
        ece = {
            s: metrics.expected_calibration_error(labels, calibration.apply(p) if calibration else p)
            for s, p in raw.items()
        }
        shifted = [v for s, v in ece.items() if s != shift.REFERENCE]
        table[name] = {
            "slope": fitted[0] if fitted else 1.0,
            "ece_unshifted": ece[shift.REFERENCE],
            "ece_mean_under_shift": float(np.mean(shifted)),
            "ece_worst_under_shift": float(np.max(shifted)),
            "ece_by_shift": ece,
        }
    return table


def print_run(name: str, report: dict, calibrations: dict, seconds: float) -> None:
    print(
        f"\n{name}  ({report['count']} images of {report['split']}, seed {report['seed']}, {seconds:.0f} s)"
    )
    print(f"  {'shift':15s} {'auc':>22s} {'sensitivity':>22s} {'specificity':>22s} {'ece':>7s}")
    for shift_name, figures in report["shifts"].items():
        cells = "".join(
            f" {f['value']:7.4f} [{f['ci95'][0]:.3f},{f['ci95'][1]:.3f}]"
            for f in (figures[m] for m in ("auc", "sensitivity", "specificity"))
        )
        print(f"  {shift_name:15s}{cells} {figures['ece']['value']:7.3f}")
    s = report["summary"]
    print(
        f"  summary: mean auc under shift {s['mean_auc']:.4f}, worst {s['worst_auc']:.4f}; worst specificity "
        f"{s['worst_specificity']:.3f} ({s['worst_specificity_shift']}); mean ece {s['mean_ece']:.3f}"
    )
    print_calibrations(calibrations)


def print_calibrations(calibrations: dict) -> None:
    for method, row in calibrations.items():
        unshifted = f"ece unshifted {row['ece_unshifted']:.3f}"
        shifted = (
            f"under shift mean {row['ece_mean_under_shift']:.3f} worst {row['ece_worst_under_shift']:.3f}"
        )
        print(f"  calibration {method:13s} slope {row['slope']:6.3f}  {unshifted}  {shifted}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="+", metavar="EXPORT")
    parser.add_argument("--data", required=True, help="dataset folder or its manifest.json")
    parser.add_argument("--split", default="val")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    manifest_uri = schema.manifest_uri_of(args.data)
    results, raws = {}, []
    for uri in args.exports:
        started = time.perf_counter()
        detector = PneumoniaDetector.load(uri)
        run = shift.score_shifts(detector, manifest_uri, args.split, args.seed, args.resamples)
        calibrations = calibration_table(run.labels, run.raw)
        print_run(uri, run.report, calibrations, time.perf_counter() - started)
        results[uri] = {"report": run.report, "calibrations": calibrations}
        raws.append(run)
    if len(raws) > 1:
        # The members' mean logit, as an ensemble export of these would score before its calibration.
        labels = raws[0].labels
        mean = {
            s: 1 / (1 + np.exp(-np.mean([metrics.logit(r.raw[s]) for r in raws], axis=0)))
            for s in raws[0].raw
        }
        aucs = {s: metrics.roc_auc(labels, p) for s, p in mean.items()}
        shifted = [a for s, a in aucs.items() if s != shift.REFERENCE]
        first = [metrics.roc_auc(labels, p) for s, p in raws[0].raw.items() if s != shift.REFERENCE]
        calibrations = calibration_table(labels, mean)
        print(
            f"\nmean logit of the {len(raws)}: auc unshifted {aucs[shift.REFERENCE]:.4f}, mean under shift "
            f"{np.mean(shifted):.4f} (first export alone {np.mean(first):.4f}: ratio "
            f"{np.mean(shifted) / np.mean(first):.4f}), worst {min(shifted):.4f}"
        )
        print_calibrations(calibrations)
        results["mean_logit"] = {"auc": aucs, "calibrations": calibrations}
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1, default=float)


if __name__ == "__main__":
    main()
