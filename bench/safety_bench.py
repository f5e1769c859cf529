"""What the safety checks cost: decode memory of a large 16-bit PNG and of decompression bombs, and
verifying shards on first use.

    python bench/safety_bench.py [--side 7000] [--data DATASET]

1. Peak memory (ru_maxrss growth, each in a fresh process) of converting one 16-bit side x side PNG to a
   256 px stored image: the float64 stretch pneumo-dist used before (baseline) against images.py now.
2. Peak memory of each bomb (a DICOM whose compressed frame is larger than its header says, an RLE
   DICOM of 7000 x 7000 x 3 samples x 32 bits, a 1 x 999,999 px PNG through the serving resize), each in
   a fresh process, decoded with nothing checking first (as before 2026-12-02) and now.
3. data.verify_shards on a dataset's splits (default: shards made from ../shared/data/chest_xray_224 at
   224 px, else from the demo), cold (sha256 of every shard) and warm (cached for the process), against
   the baseline of reading the same records once with tf.data.TFRecordDataset.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time

from common import SHARED_KAGGLE

DECODE = """
import io, resource, sys, time
import numpy as np
from PIL import Image
from pneumo_dist import images
side, how = int(sys.argv[1]), sys.argv[2]
pixels = np.zeros((side, side), np.uint16)
pixels[100:200, 100 : side // 2] = 4000
out = io.BytesIO()
Image.fromarray(pixels).save(out, format="PNG")
data = out.getvalue()
del pixels, out
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if how == "float64":  # the stretch as images.py did it before: three full-size float64 arrays
    image = Image.open(io.BytesIO(data))
    image.load()
    values = np.asarray(image, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) * (255.0 / (high - low))
    gray = Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    images.encode(images.resize_square(gray, 256), "jpeg")
else:
    images.to_stored_image(data, 256)
seconds = time.perf_counter() - start
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(f"{len(data)} {grown:.0f} {seconds:.3f}")
"""


def decode_memory(side: int) -> None:
    results = {}
    for how in ("float64", "now"):
        run = subprocess.run(
            [sys.executable, "-c", DECODE, str(side), how], capture_output=True, text=True, check=True
        )
        size, grown, seconds = run.stdout.split()
        results[how] = (float(grown), float(seconds))
        what = f"{side}x{side} 16-bit PNG of {int(size) / 1e3:.0f} kB"
        print(f"  {how:8s} {what}: peak RSS +{grown} MB, {seconds} s")
    (base_mb, base_s), (now_mb, now_s) = results["float64"], results["now"]
    print(f"  memory: {now_mb / base_mb:.2f}x the baseline; time: {now_s / base_s:.2f}x")


BOMB = """
import io, resource, sys, time
sys.path.insert(0, sys.argv[3])
which, how = sys.argv[1], sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if which == "needle":  # a 1 x 999,999 px PNG through the serving signature's resize
    import numpy as np
    import tensorflow as tf
    from PIL import Image
    from pneumo_dist import serving
    out = io.BytesIO()
    Image.new("L", (999_999, 1)).save(out, format="PNG")
    data = out.getvalue()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        if how == "unchecked":  # the resize as it ran before: the Lanczos weights of the whole side
            serving.pillow_lanczos(tf.io.decode_png(data, channels=1), 256)
        else:
            serving.ServingModel.__new__(serving.ServingModel)  # (its check is the graph's decode)
            serving._decode_gray(tf.constant(data), 256)
        outcome = "decoded"
    except Exception as error:
        outcome = "refused: " + " ".join(str(error).split())[:70]
else:  # a hostile DICOM (tests/dicom_fuzz.py makes it)
    import pydicom
    from tests import dicom_fuzz
    from pneumo_dist import images
    data = dicom_fuzz.cases()[which]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        if how == "unchecked":  # what the decoder allocates when nothing looks first
            pydicom.dcmread(io.BytesIO(data)).pixel_array
        else:
            images.decode_grayscale(data)
        outcome = "decoded"
    except Exception as error:
        outcome = "refused: " + " ".join(str(error).split())[:70]
seconds = time.perf_counter() - start
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(f"{len(data)}|{grown:.0f}|{seconds:.2f}|{outcome}")
"""
BOMBS = ("jpeg frame larger than its header", "rle 7000 x 7000 x 3 x 32 bit", "needle")


def bomb_memory() -> None:
    """Each bomb in a fresh process: peak RSS growth with nothing checking first (the decoder or resize
    as it ran before 2026-12-02) and now."""
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    for which in BOMBS:
        for how in ("unchecked", "now"):
            run = subprocess.run(
                [sys.executable, "-c", BOMB, which, how, repo], capture_output=True, text=True, cwd=repo
            )
            if run.returncode:
                print(f"  {which}, {how}: the process failed (rc {run.returncode}): {run.stderr[-200:]}")
                continue
            size, grown, seconds, outcome = run.stdout.strip().splitlines()[-1].split("|", 3)
            name = "1 x 999,999 px PNG, serving resize" if which == "needle" else f"DICOM, {which}"
            print(f"  {name} ({int(size) / 1e3:.0f} kB), {how}: peak RSS +{grown} MB, {seconds} s, {outcome}")


def verify_cost(dataset: str) -> None:
    import tensorflow as tf

    from pneumo_dist import data, schema

    manifest_uri = schema.manifest_uri_of(dataset)
    manifest = schema.Manifest.read(manifest_uri)
    uris = [u for split in manifest.splits for u in manifest.shard_uris(manifest_uri, split)]
    entries = manifest.all_shards()
    total_mb = sum(shard.bytes for shard in entries) / 1e6
    start = time.perf_counter()
    records = sum(1 for _ in tf.data.TFRecordDataset(uris))
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    data.verify_shards(uris, entries, manifest_uri)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    data.verify_shards(uris, entries, manifest_uri)
    warm_s = time.perf_counter() - start
    print(f"  {len(uris)} shards, {records} records, {total_mb:.1f} MB (page cache warm)")
    print(f"  baseline, one tf.data pass over the records: {read_s:.3f} s")
    rate = f"{total_mb / cold_s:.0f} MB/s"
    print(f"  verify, first use: {cold_s:.3f} s ({cold_s / read_s:.2f}x the pass, {rate})")
    print(f"  verify, again in the same process: {warm_s * 1e3:.1f} ms ({warm_s / read_s:.3f}x the pass)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=7000)
    parser.add_argument("--data", help="a dataset folder (default: made here from the shared Kaggle set)")
    args = parser.parse_args()
    print(f"{platform.machine()} {platform.processor() or ''}, Python {platform.python_version()}")
    print("decode memory:")
    decode_memory(args.side)
    print("bombs:")
    bomb_memory()
    print("shard verification:")
    with tempfile.TemporaryDirectory(prefix="pneumo-safety-bench-") as scratch:
        dataset = args.data
        if dataset is None:
            from pneumo_dist import demo, shards

            source = str(SHARED_KAGGLE)
            if not (SHARED_KAGGLE / "train").is_dir():
                source = f"{scratch}/demo"
                demo.write_demo_dataset(source)
            dataset = f"{scratch}/shards"
            shards.make_shards(source, dataset, shards.ShardOptions(stored_size_px=224))
        verify_cost(dataset)


if __name__ == "__main__":
    main()
