"""make_shards throughput on full-size (1-3 MP) demo X-rays, against two baselines run on the same files:

1. a naive single-process loop: PIL decode -> grayscale -> resize -> JPEG -> tf.train.Example ->
   tf.io.TFRecordWriter (what one writes without thinking about it);
2. the bare per-core limit: our decode-resize-encode function in a loop, writing nothing.

    python bench/make_shards_bench.py [--images 600] [--workers N] [--size 256]

Goals (issue 2): >= 1.7x the naive loop on 2 cores; per-core rate >= 90% of the bare loop. When
../shared/data/chest_xray_224 is present, the same comparison also runs on those 5,216 real images.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from pathlib import Path

from common import SHARED_KAGGLE, full_size_demo
from PIL import Image

from pneumo_dist import images, shards


def naive_loop(paths: list[Path], size: int, out_path: str) -> float:
    import tensorflow as tf

    start = time.perf_counter()
    with tf.io.TFRecordWriter(out_path) as writer:
        for path in paths:
            image = Image.open(path).convert("L").resize((size, size), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=95)
            example = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buffer.getvalue()])),
                        "label": tf.train.Feature(
                            int64_list=tf.train.Int64List(value=[int("PNEU" in str(path))])
                        ),
                    }
                )
            )
            writer.write(example.SerializeToString())
    return time.perf_counter() - start


def bare_loop(paths: list[Path], size: int) -> float:
    start = time.perf_counter()
    for path in paths:
        images.to_stored_image(path.read_bytes(), size)
    return time.perf_counter() - start


def ours(root: Path, size: int, workers: int, destination: str) -> float:
    options = shards.ShardOptions(stored_size_px=size)
    start = time.perf_counter()
    shards.make_shards(str(root), destination, options, overwrite=True, workers=workers)
    return time.perf_counter() - start


def measure(root: Path, paths: list[Path], size: int, workers: int) -> dict:
    for path in paths:  # warm the page cache for every contender alike
        path.read_bytes()
    with tempfile.TemporaryDirectory() as scratch:
        return {
            "bare": bare_loop(paths, size),
            "ours": ours(root, size, workers, os.path.join(scratch, "ours")),
        }


def report(name: str, paths: list[Path], size: int, workers: int, seconds: dict) -> None:
    megapixels = sum(Image.open(p).width * Image.open(p).height for p in paths) / len(paths) / 1e6
    n = len(paths)
    rate = {key: n / value for key, value in seconds.items()}
    print(f"\n{name}: {n} images, mean {megapixels:.2f} MP, stored at {size} px JPEG q95")
    rows = [
        ("naive", "naive single-process PIL + TFRecordWriter loop"),
        ("bare", "bare decode-resize-encode loop, 1 core"),
        ("ours", f"make_shards, {workers} workers, end to end"),
    ]
    for key, label in rows:
        print(f"  {label:48s} {rate[key]:7.1f} img/s ({seconds[key]:.2f} s)")
    print(
        f"  ratio make_shards / naive loop:   {rate['ours'] / rate['naive']:5.2f}x  (goal >= 1.7x on 2 cores)"
    )
    print(
        f"  per-core make_shards / bare loop: {rate['ours'] / workers / rate['bare']:5.2f}   (goal >= 0.90)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--kaggle", type=Path, default=SHARED_KAGGLE, help="a real Kaggle folder, if present")
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")
    paths = full_size_demo(args.images)
    runs = [("full-size demo X-rays", paths[0].parents[2], paths)]
    if (args.kaggle / "train").is_dir():
        runs.append((f"real Kaggle train ({args.kaggle})", args.kaggle, sorted(args.kaggle.rglob("*.jpeg"))))
    # make_shards first, as the job runs it: TensorFlow (which the naive loop needs) is not loaded yet.
    seconds = [measure(root, run_paths, args.size, args.workers) for _, root, run_paths in runs]
    with tempfile.TemporaryDirectory() as scratch:
        for (_, _, run_paths), timing in zip(runs, seconds, strict=True):
            timing["naive"] = naive_loop(run_paths, args.size, os.path.join(scratch, "naive.tfrecord"))
    for (name, _, run_paths), timing in zip(runs, seconds, strict=True):
        report(name, run_paths, args.size, args.workers, timing)


if __name__ == "__main__":
    main()
