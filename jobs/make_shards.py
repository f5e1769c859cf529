"""Convert chest X-rays once into sharded TFRecords plus a manifest (local folder or gs://).

    python jobs/make_shards.py SRC DST [options]

SRC: a Kaggle-layout folder (ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*; JPEG, PNG or DICOM), the RSNA
Pneumonia Detection Challenge's folder (it holds stage_2_train_labels.csv), a MedMNIST .npz, a CSV of
path,label[,patient_id][,split][,subtype][,sex][,age][,site][,scanner], or `demo` for the built-in
generated data set.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

from tqdm import tqdm

from pneumo_dist import console, demo, pseudonyms, shards
from pneumo_dist.errors import PneumoDistError
from pneumo_dist.images import DEFAULT_MAX_PIXELS

PATIENT_KEY_ENV = "PNEUMO_DIST_PATIENT_KEY"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line (longer than a screen: one add_argument with its help per flag)."""
    parser = argparse.ArgumentParser(
        prog="make_shards.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=console.HelpFormatter,
    )
    parser.add_argument(
        "src", metavar="SRC", help="Kaggle or RSNA folder, .npz, .csv (local or gs://), or 'demo'"
    )
    parser.add_argument("dst", metavar="DST", help="output folder, local or gs://BUCKET/PREFIX")
    defaults = shards.ShardOptions()
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="stored image side in px (256, or an .npz's own size, when not given)",
    )
    parser.add_argument(
        "--format", choices=("jpeg", "png"), default=defaults.image_format, help="stored encoding"
    )
    parser.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality)
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=defaults.val_fraction,
        help="share of train carved out as validation, grouped by patient, stratified by class",
    )
    parser.add_argument(
        "--keep-val",
        action="store_true",
        help="use the source's own val split instead of merging it into train and carving one out",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the split and the shuffle")
    parser.add_argument("--shard-mb", type=float, default=defaults.shard_target_mb, help="target shard size")
    parser.add_argument(
        "--min-shards",
        type=int,
        default=defaults.min_shards,
        help="shards per split at least, so that many workers can read in parallel (a split of fewer "
        "images gets one shard per image)",
    )
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are refused"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad file instead of skipping it, and at images found in two splits",
    )
    parser.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="let a CSV name files outside its own folder (../, absolute paths, other buckets)",
    )
    parser.add_argument(
        "--patient-key-file",
        default=pseudonyms.DEFAULT_KEY_FILE,
        help="the secret key of the keyed hash that records keep of each patient id: created on first use "
        f"(0600; default: %(default)s); ${PATIENT_KEY_ENV}, when set, is the key itself. The same key links "
        "two datasets' patients; the manifest holds only its fingerprint",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already at DST")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    options = shards.ShardOptions(
        stored_size_px=args.size,
        image_format=args.format,
        jpeg_quality=args.jpeg_quality,
        val_fraction=args.val_fraction,
        keep_val=args.keep_val,
        seed=args.seed,
        shard_target_mb=args.shard_mb,
        min_shards=args.min_shards,
        max_pixels=args.max_pixels,
        strict=args.strict,
        allow_outside_paths=args.allow_outside_paths,
    )
    bars: list[tqdm] = []  # made on the first report: its monitor thread would keep make_shards from forking

    def on_progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="img", desc="make_shards", disable=None))
        bars[0].n = done
        bars[0].refresh()

    def close_bar() -> None:
        if bars:
            bars[0].close()

    try:
        options = dataclasses.replace(options, patient_key=patient_key(args.patient_key_file))
        with tempfile.TemporaryDirectory(prefix="pneumo-demo-") as demo_root:
            source = args.src
            if source == "demo":
                demo.write_demo_dataset(demo_root)
                source = demo_root
            result = shards.make_shards(source, args.dst, options, args.overwrite, args.workers, on_progress)
    except PneumoDistError as error:
        close_bar()
        print(f"make_shards: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        close_bar()
        print(
            "make_shards: interrupted; no manifest was written. Re-run the same command to finish.",
            file=sys.stderr,
        )
        return 130
    close_bar()
    print(summarize(result))
    return 0


def patient_key(path: str) -> str:
    """The key from the environment, else from its file (made on first use, and said so)."""
    key = os.environ.get(PATIENT_KEY_ENV)
    if key:
        return key
    key, created = pseudonyms.read_or_create_key(path)
    if created:
        print(
            f"make_shards: created a patient key in {path}: keep it private, and give the same key to "
            "datasets whose patients must be linked (README: patient data)",
            file=sys.stderr,
        )
    return key


def summarize(result: shards.Result) -> str:
    manifest = result.manifest
    if result.unchanged:
        head = f"{result.manifest_uri} is already complete for these inputs and options: nothing to do"
    else:
        head = (
            f"wrote {result.manifest_uri}: {result.shards_written} shards written, "
            f"{result.shards_reused} reused from an interrupted run"
        )
    lines = [head]
    for split, counts in manifest.counts.items():
        per_class = ", ".join(f"{name} {n}" for name, n in counts.items())
        lines.append(
            f"  {split:5s} {sum(counts.values()):6d} images ({per_class}), "
            f"{manifest.patients[split]} patients, {len(manifest.splits[split].shards)} shards"
        )
    lines.append(f"  stored as {manifest.image.stored_size_px} px grayscale {manifest.image.format}")
    if manifest.skipped:
        lines.append(f"  skipped {len(manifest.skipped)} files (listed in the manifest), e.g.:")
        lines += [f"    {s.source}: {s.reason}" for s in manifest.skipped[:5]]
    lines += [f"  note: {note}" for note in manifest.notes]
    duplicates = manifest.duplicates
    if duplicates:
        lines.append(
            f"  warning: {len(duplicates)} images are in more than one split (the same bytes; listed in "
            "the manifest under duplicates; --strict makes this an error), e.g.:"
        )
        lines += [
            "    " + " = ".join(f"{copy.source} ({copy.split})" for copy in group.sources)
            for group in duplicates[:5]
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
