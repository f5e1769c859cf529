"""Memory and latency of an ensemble export's SavedModel against one model's, each in a fresh process.

    python bench/ensemble_bench.py [--members 1,3,5] [--size 224] [--batch 1,32]

Builds K ResNet50 members (random weights: the cost does not depend on their values) as ensemble.py
combines them, writes each SavedModel as the export does (serving.save: JPEG bytes in), then for each K
starts a fresh Python that loads only the SavedModel with TensorFlow and reports its load time, the
resident memory it added, and the median latency of its serving signature per batch. The baseline of
every ratio is K=1, run by this same command.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

import pneumo_dist  # noqa: F401 - selects tf-keras before TensorFlow loads

MEASURE = """
import io, json, os, statistics, sys, time
import psutil
import tensorflow as tf
process = psutil.Process()
before = process.memory_info().rss
started = time.perf_counter()
signature = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
loaded = time.perf_counter() - started
image = open(sys.argv[2], "rb").read()
result = {"load_s": loaded}
for batch in json.loads(sys.argv[3]):
    images = tf.constant([image] * batch)
    signature(image_bytes=images)  # the first call traces nothing (a SavedModel) but warms up
    times = []
    for _ in range(7):
        started = time.perf_counter()
        signature(image_bytes=images)["probability"].numpy()
        times.append(time.perf_counter() - started)
    result[f"batch_{batch}_ms"] = 1000 * statistics.median(times)
result["rss_added_mb"] = (process.memory_info().rss - before) / 2**20
print(json.dumps(result))
"""


def build(members: int, size: int, folder: str) -> tuple[str, float]:
    """The SavedModel of a K-member ensemble (K=1: one model, as train.py exports it), its size in MB."""
    from pneumo_dist import ensemble, export, serving
    from pneumo_dist import model as model_lib
    from pneumo_dist.config import ModelConfig

    config = ModelConfig(weights="none")
    detectors = [model_lib.inference_model(model_lib.build_classifier(config, size)) for _ in range(members)]
    model = detectors[0] if members == 1 else ensemble.ensemble_model(detectors)
    info = export.ExportInfo(
        files=[],
        model=export.MODEL_FILE,
        threshold=0.5,
        target_sensitivity=None,
        preprocessing=export.Preprocessing(size, 256, "jpeg", 95),
        created_utc="",
    )
    path = os.path.join(folder, f"k{members}")
    serving.save(model, info, "bench", 0.5, path)
    megabytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20
    return path, megabytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", default="1,3,5")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", default="1,32")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    print(f"{platform.node()}: {os.cpu_count()} CPUs, {args.size} px, batches {batches}")
    with tempfile.TemporaryDirectory(prefix="pneumo-ensemble-bench-") as folder:
        image = os.path.join(folder, "x.jpeg")
        gray = np.random.default_rng(0).integers(0, 256, (1024, 1024), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(gray).save(buffer, format="JPEG", quality=90)
        with open(image, "wb") as file:
            file.write(buffer.getvalue())
        rows = {}
        for members in [int(k) for k in args.members.split(",")]:
            path, megabytes = build(members, args.size, folder)
            run = subprocess.run(
                [sys.executable, "-c", MEASURE, path, image, json.dumps(batches)],
                capture_output=True,
                text=True,
                check=True,
            )
            rows[members] = json.loads(run.stdout.strip().splitlines()[-1]) | {"saved_mb": megabytes}
            base = rows[min(rows)]
            figures = "  ".join(
                f"batch {b}: {rows[members][f'batch_{b}_ms']:.0f} ms "
                f"(x{rows[members][f'batch_{b}_ms'] / base[f'batch_{b}_ms']:.2f})"
                for b in batches
            )
            print(
                f"K={members}: SavedModel {megabytes:.0f} MB, load {rows[members]['load_s']:.1f} s, "
                f"+{rows[members]['rss_added_mb']:.0f} MB resident "
                f"(x{rows[members]['rss_added_mb'] / base['rss_added_mb']:.2f}); {figures}",
                flush=True,
            )


if __name__ == "__main__":
    main()
