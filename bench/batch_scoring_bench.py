"""Batch scoring on Ray Data (jobs/predict.py --ray): images/s with 1 and with 2 model actors, in one
process on one Ray, and whether the Parquet parts hold one row per image.

    python bench/batch_scoring_bench.py --model outputs/kaggle/export              # shared Kaggle images
    python bench/batch_scoring_bench.py --model EXPORT --images DIR --cpus-per-actor 0.5

On a 2-core machine 2 actors of 1 CPU would leave no CPU to read and prepare images: the default gives
each actor 0.5 CPU (TensorFlow's threads use what the machine has either way).
"""

from __future__ import annotations

import argparse
import io
import platform
import tempfile
import time

from common import SHARED_KAGGLE

import pneumo_dist  # noqa: F401 - selects tf-keras before TensorFlow loads


def main() -> None:
    from pneumo_dist import batch_scoring, ray_setup, storage

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an export folder")
    parser.add_argument("--images", default=str(SHARED_KAGGLE / "train"), help="a folder of images")
    parser.add_argument("--count", type=int, default=1000, help="images scored per arm")
    parser.add_argument("--actors", default="1,2")
    parser.add_argument("--cpus-per-actor", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    paths = batch_scoring.list_images([args.images])[: args.count]
    print(f"{platform.node()}: {len(paths)} images from {args.images}, model {args.model}")
    print(f"Ray: {ray_setup.connect_ray('local')}, {args.cpus_per_actor:g} CPU per actor")
    import pyarrow.parquet as pq

    # Warm-up, not counted: Ray Data's worker processes start and import TensorFlow once.
    batch_scoring.score(
        paths[:64], args.model, tempfile.mkdtemp(), actors=1, cpus_per_actor=args.cpus_per_actor
    )
    rates = {}
    for actors in [int(a) for a in args.actors.split(",")]:
        out = tempfile.mkdtemp(prefix=f"pneumo-batch-bench-{actors}-")
        started = time.perf_counter()
        counts = batch_scoring.score(
            paths,
            args.model,
            out,
            part_size=max(1, len(paths) // 4),
            actors=actors,
            cpus_per_actor=args.cpus_per_actor,
            batch_size=args.batch_size,
        )
        seconds = time.perf_counter() - started
        rows = sum(
            pq.read_table(io.BytesIO(storage.read_bytes(f.uri))).num_rows
            for f in storage.list_files(out)
            if f.uri.endswith(".parquet")
        )
        rates[actors] = len(paths) / seconds
        print(
            f"{actors} actor(s): {seconds:6.1f} s, {rates[actors]:6.1f} images/s (actor start-up included); "
            f"Parquet rows {rows} for {len(paths)} images in; "
            + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()) if k not in ("ray", "skipped_parts"))
        )
    if len(rates) > 1:
        first, *rest = rates
        for actors in rest:
            print(f"{actors} actors / {first}: {rates[actors] / rates[first]:.2f}x")


if __name__ == "__main__":
    main()
