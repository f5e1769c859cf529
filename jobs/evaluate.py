"""Evaluate an exported model on one split of a pneumo-dist dataset and write the report.

    python jobs/evaluate.py MODEL_URI --data MANIFEST_URI [--split test] [--out DIR] [--tta N] [--shift]

MODEL_URI: a run's export/ folder or a tune run's best/ folder, local or gs://. The report (report.html,
metrics.json, predictions.csv, PNG plots) goes to --out, default MODEL_URI/../eval-SPLIT.
"""

from __future__ import annotations

import argparse
import sys

import pneumo_dist  # noqa: F401 - selects tf-keras before TensorFlow loads
from pneumo_dist import console, export
from pneumo_dist.errors import PneumoDistError
from pneumo_dist.evaluation_summary import Evaluation


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=console.HelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL_URI", help="export folder (local or gs://)")
    parser.add_argument("--data", required=True, help="dataset folder or its manifest.json (local or gs://)")
    parser.add_argument("--split", default="test", help="split to score: test, val or train")
    parser.add_argument("--out", help="report folder (local or gs://); default: next to the export")
    export.add_operating_point_arguments(parser)
    parser.add_argument("--tta", type=int, default=1, metavar="VIEWS", help="test-time augmentation views")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals")
    parser.add_argument("--gradcam", type=int, default=3, help="Grad-CAM examples per case (0: none)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--drift",
        metavar="SCORES",
        help="predict.py's CSV or --ray's Parquet folder: compare its probabilities with the split's "
        "(population stability index; use --split val)",
    )
    parser.add_argument(
        "--shift",
        type=int,
        nargs="?",
        const=0,
        metavar="SEED",
        help="add the shift benchmark (robustness: the split under seeded acquisition-like changes; "
        "about 15x the scoring time) with this seed, 0 when none is given",
    )
    console.add_verbose_argument(parser)
    args = parser.parse_args(argv)
    for name, low in (("tta", 1), ("bootstrap", 100), ("gradcam", 0), ("batch_size", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except PneumoDistError as error:
        print(f"evaluate: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # report.html is written last: a folder without it holds no report.
        print("\nevaluate: interrupted; no report written", file=sys.stderr)
        return console.INTERRUPTED


def figures_text(summary: Evaluation) -> str:
    """The evaluation's figures as the job prints them."""
    import numpy as np

    from pneumo_dist import evaluate

    lines = [f"{summary.data.split} split, {summary.data.count} images ({summary.data.positives} PNEUMONIA)"]
    for point in (summary.at_half, summary.at_threshold):
        lines.append(f"threshold {point.threshold:.4f}: {evaluate.headline(point, '  ')}")
    for name, point in summary.policies.items():
        lines.append(f"  {name} policy, threshold {point.threshold:.4f}: {evaluate.headline(point, '  ')}")
    for attribute, groups in summary.subgroups.items():
        for value, group in groups.items():
            figures = "  ".join(
                f"{m} {group.metrics[m]}"
                for m in evaluate.SUBGROUP_METRICS
                if np.isfinite(group.metrics[m].value)
            )
            lines.append(f"  {attribute}={value}: {group.count} images  {figures}")
    for index, row in enumerate(summary.members):
        lines.append(
            f"  ensemble member {index} alone: auc {row.auc}  ece {row.ece.value:.3f}  ({row.member.source})"
        )
    if summary.robustness:
        r = summary.robustness["summary"]
        lines.append(
            f"robustness: mean auc under shift {r['mean_auc']:.3f} (worst {r['worst_auc']:.3f}); "
            f"lowest specificity {r['worst_specificity']:.3f} ({r['worst_specificity_shift']}); "
            f"mean ece {r['mean_ece']:.3f}"
        )
    if summary.drift:
        d = summary.drift
        lines.append(
            f"drift: {d['actual_count']} scored images against the {summary.data.split} split's "
            f"{d['expected_count']}: PSI {d['psi']:.3f}, {d['verdict']}"
        )
    lines.append(f"ECE {summary.calibration.ece:.4f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pneumo_dist import schema, storage

    # A wrong --data, --split or model folder is said before TensorFlow loads, let alone the model.
    manifest_uri = schema.manifest_uri_of(args.data)
    schema.Manifest.read(manifest_uri).shard_uris(manifest_uri, args.split)
    export.read(export.folder_of(args.model))
    console.load_tensorflow(args.verbose)
    from tqdm import tqdm

    from pneumo_dist import evaluate, predict

    drift = (args.drift, evaluate.read_scores(args.drift)) if args.drift else None
    print(f"evaluate: loading the model {args.model}", flush=True)
    detector = predict.PneumoniaDetector.load(
        args.model, threshold=args.threshold, policy=args.policy, prevalence=args.prevalence
    )
    out = args.out or storage.join(storage.parent(detector.uri), f"eval-{args.split}")
    with tqdm(desc=f"scoring {args.split}", unit="img", disable=None) as bar:

        def on_batch(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        summary = evaluate.run_evaluation(
            detector,
            args.data,
            args.split,
            out,
            tta_views=args.tta,
            resamples=args.bootstrap,
            gradcam_per_case=args.gradcam,
            batch_size=args.batch_size,
            on_batch=on_batch,
            drift_scores=drift,
            shift_seed=args.shift,
        )
    print(figures_text(summary), flush=True)
    print(f"report: {storage.join(out, 'report.html')}")
    print(f"next: python jobs/predict.py IMAGES_OR_FOLDER --model {detector.uri} --out predictions.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
