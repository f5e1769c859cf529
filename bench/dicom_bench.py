"""make_shards on DICOM: images/s per core against decoding the same files with pydicom alone, one loop.

    python bench/dicom_bench.py [--count 1000] [--side 2048] [--syntax uncompressed|rle] [--workers N]

Generates COUNT DICOM radiographs (DX, 12 bits stored in 16, rescale and window, as detectors send) of
SIDE x SIDE pixels once, in the Kaggle layout under the system temp folder (8 MB each uncompressed), then
times, in one process: the bare loop (`pydicom.dcmread(path).pixel_array` per file, nothing else), and
make_shards with 1 worker and with WORKERS (each to a new folder). The goal (issue 17) is make_shards at
>= 0.8 of the bare loop per core. What make_shards does on top: read the header for the PatientID while
listing, map the stored values to 8-bit gray (Modality LUT, window), resize to 256 px (Pillow LANCZOS),
encode JPEG, hash the source bytes (sha256), write the records.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from pneumo_dist import shards

SYNTAXES = {"uncompressed": ExplicitVRLittleEndian, "rle": RLELossless}


def radiograph(side: int, seed: int = 0) -> np.ndarray:
    """12-bit values with a smooth body, noise and the full range used."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    body = 2000 + 1500 * np.sin(6 * xx) * np.cos(5 * yy) + rng.normal(0, 50, (side, side))
    return body.clip(0, 4095).astype(np.uint16)


def template(pixels: np.ndarray, syntax: str) -> Dataset:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID
    dataset.Modality = "DX"
    dataset.PatientSex, dataset.PatientAge = "F", "045Y"
    dataset.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=12)
    dataset.RescaleSlope, dataset.RescaleIntercept = 1.0, -1024.0
    dataset.WindowCenter, dataset.WindowWidth = 1000.0, 3000.0
    if syntax != ExplicitVRLittleEndian:
        dataset.compress(syntax)  # once: every file shares the compressed pixels
    return dataset


def generate(root: Path, count: int, side: int, syntax: str) -> list[Path]:
    """COUNT files, half NORMAL, half PNEUMONIA, each its own patient and UID (so distinct bytes)."""
    done = root.with_name(root.name + ".done")  # beside the source: make_shards lists all of root
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"generating {count} DICOM files of {side} x {side} px in {root} (once)...", flush=True)
        dataset = template(radiograph(side), syntax)
        for index in range(count):
            label = ("NORMAL", "PNEUMONIA")[index % 2]
            folder = root / "train" / label
            folder.mkdir(parents=True, exist_ok=True)
            uid = generate_uid()
            dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID = uid
            dataset.PatientID = f"BENCH-{index:05d}"
            dataset.save_as(folder / f"{uid}.dcm", enforce_file_format=True)
        done.touch()
    return sorted(root.rglob("*.dcm"))


def bare_loop(paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        pydicom.dcmread(path).pixel_array  # noqa: B018 - decoding is the point
    return len(paths) / (time.perf_counter() - start)


def make_shards_rate(root: Path, workers: int) -> float:
    destination = tempfile.mkdtemp(prefix="pneumo-dicom-bench-")
    try:
        start = time.perf_counter()
        result = shards.make_shards(
            str(root), destination, shards.ShardOptions(stored_size_px=256, min_shards=8), workers=workers
        )
        seconds = time.perf_counter() - start
        assert not result.manifest.skipped, result.manifest.skipped[:3]
        return sum(split.records for split in result.manifest.splits.values()) / seconds
    finally:
        shutil.rmtree(destination)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--syntax", choices=sorted(SYNTAXES), default="uncompressed")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    root = Path(tempfile.gettempdir()) / f"pneumo-bench-dicom-{args.syntax}-{args.side}-{args.count}"
    paths = generate(root, args.count, args.side, SYNTAXES[args.syntax])
    size_mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
    print(
        f"{platform.node()}, {os.cpu_count()} CPUs, pydicom {pydicom.__version__}: {len(paths)} files, "
        f"{args.side} x {args.side} px 16-bit, {args.syntax}, {size_mb:.1f} MB each"
    )
    bare_loop(paths[:20])  # warm-up: imports, the page cache
    bare = bare_loop(paths)
    print(f"pydicom alone, 1 process: {bare:.1f} img/s")
    one = make_shards_rate(root, workers=1)
    print(f"make_shards, 1 worker:    {one:.1f} img/s = {one / bare:.2f} of the bare loop (goal >= 0.8)")
    if args.workers > 1:
        many = make_shards_rate(root, workers=args.workers)
        per_core = many / args.workers
        print(
            f"make_shards, {args.workers} workers:   {many:.1f} img/s, {per_core:.1f} per core = "
            f"{per_core / bare:.2f} of the bare loop"
        )


if __name__ == "__main__":
    main()
