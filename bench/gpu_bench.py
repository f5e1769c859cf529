"""The training step on this machine's accelerators: the one command to run on a GPU node.

Per GPU (or, without one, on the CPU at whatever size you ask): images/s of the whole training step
(augmentation, forward, backward, all-reduce, update: train._Run's own loop, not a copy) with
synthetic input (one batch, repeated) and with the real input pipeline over shards; the share of the
step spent waiting for input; the augmentation's share; step time per batch size; XLA compile time;
with 2+ GPUs, the scaling efficiency of MirroredStrategy over all of them against one.

    python bench/gpu_bench.py                                  # 224 px, batches 64,128,256 per GPU
    python bench/gpu_bench.py --shards gs://BUCKET/datasets/kaggle-256   # real shards (else demo shards)
    python bench/gpu_bench.py --smoke                  # CPU: the same code at 32 px (CI runs it)
    python bench/gpu_bench.py --loop-ratio --size 64 --batches 16 --xla off   # steps_per_loop 1 vs 50
    python bench/gpu_bench.py --startup --size 64 --batches 16 --xla on  # first step: cold vs warm cache

Expected figures and how they were estimated: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CACHE

import pneumo_dist  # noqa: F401 - selects tf-keras before TensorFlow loads

HERE = Path(__file__).resolve().parent


def demo_shards(size: int, records: int) -> str:
    """Demo shards stored at `size` with at least `records` training records (generated once): the
    real input pipeline's work per image."""
    from pneumo_dist import demo, shards

    per_class = max(256, records // 2 + 1)
    destination = CACHE / f"gpu-bench-shards-{size}-{per_class}"
    if not (destination / "manifest.json").exists():
        source = CACHE / f"gpu-bench-source-{size}-{per_class}"
        spec = demo.DemoSpec(
            images_per_class=(("train", per_class),),
            min_side_px=size + size // 8,
            max_side_px=size + size // 4,
        )
        demo.write_demo_dataset(str(source), spec)
        options = shards.ShardOptions(stored_size_px=size, min_shards=8, val_fraction=0.1)
        shards.make_shards(str(source), str(destination), options, workers=2)
    return str(destination)


def make_run(args, strategy, per_replica: int, augment: bool = True, steps_per_loop: int = 0):
    from pneumo_dist import config as config_lib
    from pneumo_dist import train

    config = config_lib.load_config(
        None,
        [
            f"data.manifest_uri={args.shards}",
            f"data.image_size_px={args.size}",
            f"data.batch_per_replica={per_replica}",
            "data.read_mode=" + ("stage" if args.shards.startswith("gs://") else "stream"),
            "data.cache=memory",
            "data.class_balance=none",
            f"data.shuffle_buffer={max(256, 2 * per_replica)}",
            "model.weights=none",  # no download; the same compute as ImageNet weights
            "model.unfreeze=all",  # the whole backward pass: the upper bound of fine-tuning's cost
            "model.train_batchnorm=true",
            f"augment.enabled={str(augment).lower()}",
            f"train.xla={args.xla}",
            f"train.precision={args.precision}",
            f"train.steps_per_loop={steps_per_loop or args.steps}",
            f"train.xla_cache_dir={args.xla_cache_dir}",
            f"train.output_uri={tempfile.mkdtemp(dir=args.workdir)}",
        ],
    )
    return train._Run(config, strategy, tempfile.mkdtemp(dir=args.workdir))


def step_seconds(run, steps: int, synthetic: bool, repeats: int = 2) -> tuple[float, float]:
    """(seconds per step at steady state, seconds of the run's first call: tracing + XLA compilation +
    one step). `synthetic`: one batch of the real pipeline, cached and repeated: no decoding, no
    shuffling, only the copy to the device, as in NVIDIA's synthetic-data benchmarks."""
    import tensorflow as tf

    from pneumo_dist import data

    if not hasattr(run, "bench_loop"):  # one trace per run: both inputs have the same element spec
        run.bench_loop = run._make_train_loop()
    if synthetic:
        batches = run.strategy.distribute_datasets_from_function(
            lambda context: data.train_dataset(run.data_cfg, run.dataset, context).take(1).cache().repeat()
        )
    else:
        batches = run.train_batches
    iterator = iter(batches)
    start = time.perf_counter()
    float(run.bench_loop(iterator, tf.constant(1)))
    first_call = time.perf_counter() - start
    if not repeats:
        return float("nan"), first_call
    float(run.bench_loop(iterator, tf.constant(steps)))  # warm-up: autotuning, caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        float(run.bench_loop(iterator, tf.constant(steps)))
        best = min(best, time.perf_counter() - start)
    return best / steps, first_call


def startup_seconds(args, cache: str) -> tuple[float, dict]:
    """Seconds from starting a Python process to the end of its first training step, and its phases."""
    command = [sys.executable, str(HERE / "gpu_bench.py"), "--shards", args.shards]
    command += ["--size", str(args.size), "--batches", str(args.batches[0]), "--xla", args.xla]
    command += ["--xla-cache-dir", cache, "--first-step", str(time.time())]
    start = time.perf_counter()
    child = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return time.perf_counter() - start, json.loads(child.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="model input side, px")
    parser.add_argument("--batches", default="64,128,256", help="per-GPU batch sizes to time")
    parser.add_argument("--steps", type=int, default=50, help="steps per timed loop (= steps_per_loop)")
    parser.add_argument("--shards", help="a dataset (local or gs://) for the real-input figures")
    parser.add_argument("--xla", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--xla-cache-dir", default="", help="XLA's persistent cache; '' = none")
    parser.add_argument("--repeats", type=int, default=2, help="timed loops per figure (the best counts)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code runs (CI)")
    parser.add_argument("--loop-ratio", action="store_true", help="img/s at steps_per_loop 1 vs --steps")
    parser.add_argument("--startup", action="store_true", help="start-up to first step, cold vs warm cache")
    parser.add_argument("--first-step", type=float, help=argparse.SUPPRESS)  # the parent's start time
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.batches, args.steps, args.repeats = 32, "4", 1, 1
    args.batches = [int(b) for b in args.batches.split(",")]
    from pneumo_dist import distribute, train

    distribute.configure_process(train.TrainConfig(xla_cache_dir=args.xla_cache_dir))  # before TF runs
    import tensorflow as tf

    # Enough training records for the largest global batch (all GPUs at the largest batch), plus val.
    gpus = len(tf.config.list_physical_devices("GPU"))
    args.shards = args.shards or demo_shards(args.size, int(1.25 * max(args.batches) * max(1, gpus)))
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as args.workdir:
        return measure(args)


def measure(args) -> int:
    if args.startup:
        with tempfile.TemporaryDirectory(prefix="gpu-bench-xla-cache-") as cache:
            (cold, cold_phases), (warm, warm_phases) = (
                startup_seconds(args, cache),
                startup_seconds(args, cache),
            )
        print(
            f"start-up to the first step: cold XLA cache {cold:.1f} s, warm {warm:.1f} s, "
            f"ratio {warm / cold:.2f}"
        )
        for name, phases in (("cold", cold_phases), ("warm", warm_phases)):
            print(f"  {name}: " + ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in phases.items()))
        return 0

    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    one = tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if args.first_step:
        phases = {"process start, imports": time.time() - args.first_step}
        start = time.perf_counter()
        run = make_run(args, one, args.batches[0], steps_per_loop=1)
        phases["data + model"] = time.perf_counter() - start
        start = time.perf_counter()
        run.bench_loop = run._make_train_loop()
        run.bench_loop.get_concrete_function(iter(run.train_batches), tf.TensorSpec([], tf.int32))
        phases["tracing"] = time.perf_counter() - start
        phases["first call (XLA, one step)"] = step_seconds(run, 1, synthetic=False, repeats=0)[1]
        print(json.dumps(phases))
        return 0

    device = (
        gpus[0].name
        if gpus
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )
    print(
        f"TensorFlow {tf.__version__} on {device}; {args.size} px; XLA {args.xla}; precision {args.precision}"
    )
    print(f"shards: {args.shards}\n")

    if args.loop_ratio:
        batch = args.batches[0]
        per_step = [
            step_seconds(make_run(args, one, batch, steps_per_loop=n), n, synthetic=False)[0]
            for n in (1, args.steps)
        ]
        rates = [batch / s for s in per_step]
        print(
            f"steps_per_loop 1: {rates[0]:.1f} img/s; {args.steps}: {rates[1]:.1f} img/s; "
            f"ratio {rates[1] / rates[0]:.2f}"
        )
        return 0

    results = []
    print("batch/GPU  synthetic img/s  real img/s  input wait  augmentation  step ms  first call s")
    for batch in args.batches:
        run = make_run(args, one, batch)
        synthetic, first_call = step_seconds(run, args.steps, synthetic=True, repeats=args.repeats)
        real, _ = step_seconds(run, args.steps, synthetic=False, repeats=args.repeats)
        plain, _ = step_seconds(
            make_run(args, one, batch, augment=False), args.steps, synthetic=True, repeats=args.repeats
        )
        row = {
            "batch_per_gpu": batch,
            "synthetic_img_s": batch / synthetic,
            "real_img_s": batch / real,
            "input_wait_share": max(0.0, (real - synthetic) / real),
            "augmentation_share": max(0.0, (synthetic - plain) / synthetic),
            "step_ms": synthetic * 1000,
            "first_call_s": first_call,
        }
        results.append(row)
        print(
            f"{batch:9d}  {batch / synthetic:15.1f}  {batch / real:10.1f}  {row['input_wait_share']:10.1%}"
            f"  {row['augmentation_share']:12.1%}  {synthetic * 1000:7.1f}  {first_call:12.1f}"
        )
    print("\n(first call = tracing + XLA compilation + one step; a warm XLA cache loads the compilation)")
    if len(gpus) >= 2:
        batch = args.batches[-1]
        mirrored = tf.distribute.MirroredStrategy([g.name for g in gpus])
        many, _ = step_seconds(make_run(args, mirrored, batch), args.steps, synthetic=True)
        single = next(r for r in results if r["batch_per_gpu"] == batch)["synthetic_img_s"]
        total = batch * len(gpus) / many
        efficiency = total / (single * len(gpus))
        print(
            f"\n{len(gpus)} GPUs (MirroredStrategy, NCCL), {batch}/GPU: {total:.0f} img/s, "
            f"scaling efficiency {efficiency:.1%}"
        )
        results.append(
            {"gpus": len(gpus), "batch_per_gpu": batch, "img_s": total, "scaling_efficiency": efficiency}
        )
    print("\n" + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
