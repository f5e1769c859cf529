"""Classify chest X-rays with an exported model and write one CSV row per image.

    python jobs/predict.py IMAGES_OR_DIR... --model URI [--out predictions.csv] [--threshold T]
    python jobs/predict.py gs://BUCKET/ARCHIVE/ --model URI --out gs://BUCKET/scores/ --ray

Folders are searched recursively for .jpeg/.jpg/.png. A bad image gets its error in the CSV's `error`
column (and on stderr) instead of stopping the run; the exit code is then 1. With --ray the images are
scored on Ray Data (the cluster this runs on, else an in-process Ray) into Parquet parts in the --out
folder (batch_scoring.py); the same command finishes a run that died.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import sys

import pneumo_dist  # noqa: F401 - selects tf-keras before TensorFlow loads
from pneumo_dist import console, export
from pneumo_dist.errors import PneumoDistError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "inputs", nargs="+", metavar="IMAGES_OR_DIR", help="image files (local or gs://) or local folders"
    )
    parser.add_argument("--model", required=True, help="export folder (local or gs://)")
    parser.add_argument(
        "--out", default="predictions.csv", help="CSV to write (local or gs://; default: in this folder)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an --out CSV that exists")
    export.add_operating_point_arguments(parser)
    parser.add_argument("--tta", type=int, default=1, metavar="VIEWS", help="test-time augmentation views")
    parser.add_argument("--batch-size", type=int, default=32)
    ray = parser.add_argument_group("batch scoring on Ray Data (--ray)")
    ray.add_argument("--ray", action="store_true", help="score on Ray Data into Parquet parts in --out")
    ray.add_argument(
        "--address",
        help="Ray address; default: the cluster this runs on, else in-process; 'local': a private Ray",
    )
    ray.add_argument("--actors", type=int, help="model actors (default: one per GPU, else CPUs - 1)")
    ray.add_argument("--cpus-per-actor", type=float, default=1.0)
    ray.add_argument("--gpus-per-actor", type=float, help="default: 1 on a cluster with GPUs, else 0")
    ray.add_argument("--part-size", type=int, default=10_000, help="images per Parquet part")
    console.add_verbose_argument(parser)
    args = parser.parse_args(argv)
    for name in ("tta", "batch_size", "part_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.actors is not None and args.actors < 1:
        parser.error("--actors must be >= 1")
    if args.cpus_per_actor <= 0 or (args.gpus_per_actor is not None and args.gpus_per_actor < 0):
        parser.error("--cpus-per-actor must be > 0 and --gpus-per-actor >= 0")
    if args.ray and args.out == "predictions.csv":
        parser.error("--ray writes a folder of Parquet parts: give it with --out (local or gs://)")
    return args


def image_paths(inputs: list[str]) -> list[str]:
    """Files as given (in order), folders expanded to their images (sorted)."""
    from pneumo_dist.images import is_image_file

    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = [
                path
                for folder, _, names in os.walk(item)
                for path in (os.path.join(folder, name) for name in names)
                if is_image_file(path)
            ]
            paths += sorted(found)
        else:
            paths.append(item)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except PneumoDistError as error:  # bad images are reported per row instead (bad_inputs="report")
        print(f"predict: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The CSV is written once, at the end; --ray's finished parts are kept and skipped on a rerun.
        kept = "finished parts are kept: rerun the same command to go on" if args.ray else "nothing written"
        print(f"\npredict: interrupted; {kept}", file=sys.stderr)
        return console.INTERRUPTED


def run(args: argparse.Namespace) -> int:
    export.read(export.folder_of(args.model))  # a wrong folder is said before TensorFlow loads
    if args.ray:
        return run_on_ray(args)
    paths = image_paths(args.inputs)
    if not paths:
        print("predict: error: no .jpeg/.jpg/.png images in " + ", ".join(args.inputs), file=sys.stderr)
        return 2
    import io

    from tqdm import tqdm

    from pneumo_dist import storage

    if not args.overwrite and storage.exists(args.out):  # before the model loads: nothing is lost
        print(
            f"predict: error: {args.out} exists: give --overwrite to replace it, or another --out",
            file=sys.stderr,
        )
        return 2
    console.load_tensorflow(args.verbose)
    from pneumo_dist import predict

    print(f"predict: loading the model {args.model}", flush=True)
    detector = predict.PneumoniaDetector.load(
        args.model, threshold=args.threshold, policy=args.policy, prevalence=args.prevalence
    )
    rows = []
    for start in tqdm(range(0, len(paths), args.batch_size), unit="batch", disable=None):
        batch = paths[start : start + args.batch_size]
        for result in detector.predict_batch(batch, len(batch), args.tta, bad_inputs="report"):
            if result.error:
                print(f"predict: {result.error}", file=sys.stderr)
            probability = "" if result.probability is None else f"{result.probability:.6f}"
            row = [result.source, result.label or "", probability, result.threshold, result.model_version]
            rows.append([*row, result.error or ""])
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["path", "label", "probability", "threshold", "model_version", "error"])
    writer.writerows(rows)
    storage.write_bytes(args.out, out.getvalue().encode())
    counts = collections.Counter(row[1] or "error" for row in rows)
    print(
        f"{len(paths)} images: "
        + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        + f" -> {args.out}"
    )
    print(
        "next: compare these scores with validation's: python jobs/evaluate.py "
        f"{detector.uri} --data DATASET --split val --drift {args.out}"
    )
    return 1 if counts["error"] else 0


def run_on_ray(args: argparse.Namespace) -> int:
    # The import only: this driver scores nothing, and its TensorFlow runtime stays unstarted before Ray
    # starts its processes (as before the console was quietened; one segfault was seen with it started).
    console.load_tensorflow(args.verbose, find_devices=False)
    from pneumo_dist import batch_scoring

    paths = batch_scoring.list_images(args.inputs)
    if not paths:
        print("predict: error: no .jpeg/.jpg/.png images in " + ", ".join(args.inputs), file=sys.stderr)
        return 2
    from tqdm import tqdm

    print(f"predict: {len(paths)} images; starting Ray and its model actors", flush=True)
    bar = tqdm(total=len(paths), desc="scoring", unit="img", disable=None)
    counts = batch_scoring.score(
        paths,
        args.model,
        args.out,
        batch_scoring.OperatingPoint(args.threshold, args.policy, args.prevalence),
        part_size=args.part_size,
        address=args.address,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        batch_size=args.batch_size,
        tta_views=args.tta,
        verbose=args.verbose,
        on_scored=bar.update,
    )
    bar.close()
    skipped, where = counts.pop("skipped_parts"), counts.pop("ray")
    print(
        f"{len(paths)} images on Ray ({where}): "
        + (", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing left to score")
        + f" -> {args.out}"
        + (f" ({skipped} finished parts skipped)" if skipped else "")
    )
    return 1 if counts.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
