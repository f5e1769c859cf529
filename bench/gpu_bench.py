"""The training step on this machine's accelerators: the one command to run on a GPU node.

Per GPU (or, without one, on the CPU at whatever size you ask), at the precision and XLA setting a run
gets by default (bfloat16 and XLA on a GPU): images/s of the training step (train._Run's own loop, not
a copy) for the production step (configs/kaggle.yaml: the last 40 layers train, BatchNorm frozen) and
the full fine-tune (every layer, BatchNorm training), with synthetic input (one batch, repeated) and
with the real input pipeline decoding shards as it reads them (no cache) on the CPUs a Ray worker of
configs/kaggle.yaml gets (--cpus); the share of the step spent waiting for input; the augmentation's
share; the first call (tracing + XLA compilation); an epoch's work besides its steps (validation,
checkpoint); medians of --repeats timed loops. With 2+ GPUs, MirroredStrategy over all of them against
one; with --ray N, the step under Ray Train in N worker processes (MultiWorkerMirroredStrategy, the
split step: the multi-process path). Its last line is one summary to paste into BENCHMARKS.md.

    python bench/gpu_bench.py                                  # 224 px, batches 64,128,256 per GPU
    python bench/gpu_bench.py --shards gs://BUCKET/datasets/kaggle-256   # real shards (else demo shards)
    python bench/gpu_bench.py --ray 8 --batches 256            # 8 worker processes, one GPU each
    python bench/gpu_bench.py --smoke                  # CPU: the same code at 32 px, bfloat16, XLA (CI)
    python bench/gpu_bench.py --loop-ratio --size 64 --batches 16 --xla off   # steps_per_loop 1 vs 50
    python bench/gpu_bench.py --startup --size 64 --batches 16 --xla on  # first step: cold vs warm cache

Expected figures and how they were estimated: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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


# The step a run of configs/kaggle.yaml trains (after its head warm-up), and the upper bound of
# fine-tuning's cost: every layer, BatchNorm's statistics too.
RECIPES = {
    "production": ("model.unfreeze=40", "model.train_batchnorm=false"),
    "full": ("model.unfreeze=all", "model.train_batchnorm=true"),
}


def make_run(
    args,
    strategy,
    per_replica: int,
    augment: bool = True,
    steps_per_loop: int = 0,
    recipe: str = "production",
    overrides: tuple[str, ...] = (),
    config_only: bool = False,
):
    from pneumo_dist import config as config_lib
    from pneumo_dist import train

    config = config_lib.load_config(
        None,
        [
            f"data.manifest_uri={args.shards}",
            f"data.image_size_px={args.size}",
            f"data.batch_per_replica={per_replica}",
            "data.read_mode=" + ("stage" if args.shards.startswith("gs://") else "stream"),
            "data.cache=none",  # every image decoded as it is read, as in a first epoch
            "data.class_balance=none",
            f"data.shuffle_buffer={max(256, 2 * per_replica)}",
            "model.weights=none",  # no download; the same compute as ImageNet weights
            *RECIPES[recipe],
            f"augment.enabled={str(augment).lower()}",
            f"train.xla={args.xla}",
            f"train.precision={args.precision}",
            f"train.steps_per_loop={steps_per_loop or args.steps}",
            f"train.xla_cache_dir={args.xla_cache_dir}",
            f"train.output_uri={tempfile.mkdtemp(dir=args.workdir)}",
            *overrides,
        ],
    )
    if config_only:
        return config
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
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        float(run.bench_loop(iterator, tf.constant(steps)))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / steps, first_call


def epoch_overhead(args, per_replica: int) -> dict:
    """One real run of three short epochs (train.train): the second epoch's wall time besides its steps,
    i.e. what validation (compiled like the step) and the checkpoint cost per epoch (the third one
    exports, the first compiles)."""
    from pneumo_dist import distribute, train

    records, ended = [], []
    config = make_run(
        args,
        None,
        per_replica,
        config_only=True,
        overrides=(
            "train.epochs=3",
            f"train.max_steps_per_epoch={args.steps}",
            "train.early_stopping_patience=0",
        ),
    )

    def on_epoch(record: dict) -> None:
        records.append(record)
        ended.append(time.perf_counter())

    started = time.perf_counter()
    train.train(config, distribute.choose_strategy(local=True), on_epoch=on_epoch, overwrite=True)
    second = ended[1] - ended[0]
    return {
        "epoch_s": second,
        "steps_s": records[1]["seconds"],
        "overhead_s": second - records[1]["seconds"],
        "first_epoch_s": ended[0] - started,
    }


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
    parser.add_argument("--repeats", type=int, default=3, help="timed loops per figure (the median counts)")
    parser.add_argument(
        "--cpus",
        type=int,
        default=8,
        help="threads for tf.data and TensorFlow (configs/kaggle.yaml's worker)",
    )
    parser.add_argument("--ray", type=int, default=0, metavar="N", help="also time N Ray Train workers")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, bfloat16, XLA: the code runs (CI)")
    parser.add_argument("--loop-ratio", action="store_true", help="img/s at steps_per_loop 1 vs --steps")
    parser.add_argument("--startup", action="store_true", help="start-up to first step, cold vs warm cache")
    parser.add_argument("--first-step", type=float, help=argparse.SUPPRESS)  # the parent's start time
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.batches, args.steps, args.repeats = 32, "4", 1, 1
        args.precision, args.xla = "bfloat16", "on"  # the GPU branch, forced
    args.batches = [int(b) for b in args.batches.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", str(args.cpus))  # data.host_threads: a Ray worker's share
    from pneumo_dist import data, distribute, train

    # Before TensorFlow runs: XLA's cache, and thread pools of --cpus threads.
    distribute.configure_process(train.TrainConfig(xla_cache_dir=args.xla_cache_dir), data.host_threads())
    import tensorflow as tf

    # Enough training records for the largest global batch (all GPUs at the largest batch), plus val.
    gpus = len(tf.config.list_physical_devices("GPU"))
    args.shards = args.shards or demo_shards(
        args.size, int(1.25 * max(args.batches) * max(1, gpus, args.ray))
    )
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as args.workdir:
        return measure(args)


def measure(args) -> int:
    if args.startup:
        return measure_startup(args)
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    one = tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if args.first_step:
        return first_step_phases(args, one)
    device = (
        gpus[0].name
        if gpus
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )
    probe = make_run(args, one, args.batches[0])
    print(
        f"TensorFlow {tf.__version__} on {device}; {args.size} px; {probe.policy}, "
        f"XLA {'on' if probe.xla else 'off'}; {args.cpus} input threads; median of {args.repeats}"
    )
    print(f"shards: {args.shards}\n")
    if args.loop_ratio:
        return measure_loop_ratio(args, one)
    results = measure_batches(args, one)
    full_batch = args.batches[-1]
    full, full_first = step_seconds(
        make_run(args, one, full_batch, recipe="full"), args.steps, True, args.repeats
    )
    results.append(
        {
            "recipe": "full",
            "batch_per_gpu": full_batch,
            "synthetic_img_s": full_batch / full,
            "first_call_s": full_first,
        }
    )
    print(
        f"full fine-tune (every layer, BatchNorm training), {full_batch}/GPU: "
        f"{full_batch / full:.1f} img/s synthetic"
    )
    epoch = epoch_overhead(args, args.batches[0])
    results.append({"epoch": epoch, "batch_per_gpu": args.batches[0], "steps_per_epoch": args.steps})
    print(
        f"an epoch of {args.steps} steps at {args.batches[0]}/GPU: {epoch['epoch_s']:.1f} s, of which steps "
        f"{epoch['steps_s']:.1f} s and validation + checkpoint {epoch['overhead_s']:.1f} s"
    )
    if len(gpus) >= 2:
        results.append(measure_mirrored(args, gpus, results))
    if args.ray:
        results.append(measure_ray(args))
    print("\n" + json.dumps(results))
    print(summary_line(device, probe, results))
    return 0


def measure_batches(args, one) -> list[dict]:
    results = []
    print("production step (configs/kaggle.yaml: 40 layers train, BatchNorm frozen)")
    print("batch/GPU  synthetic img/s  real img/s  input wait  augmentation  step ms  first call s")
    for batch in args.batches:
        run = make_run(args, one, batch)
        synthetic, first_call = step_seconds(run, args.steps, synthetic=True, repeats=args.repeats)
        real, _ = step_seconds(run, args.steps, synthetic=False, repeats=args.repeats)
        plain, _ = step_seconds(
            make_run(args, one, batch, augment=False), args.steps, synthetic=True, repeats=args.repeats
        )
        row = {
            "recipe": "production",
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
    print("(first call = tracing + XLA compilation + one step; a warm XLA cache loads the compilation)\n")
    return results


def measure_mirrored(args, gpus, results: list[dict]) -> dict:
    """All local GPUs in one process (MirroredStrategy, the split step) against one."""
    import tensorflow as tf

    batch = args.batches[-1]
    mirrored = tf.distribute.MirroredStrategy([g.name for g in gpus])
    many, first_call = step_seconds(
        make_run(args, mirrored, batch), args.steps, synthetic=True, repeats=args.repeats
    )
    single = next(r for r in results if r.get("recipe") == "production" and r["batch_per_gpu"] == batch)
    total = batch * len(gpus) / many
    efficiency = total / (single["synthetic_img_s"] * len(gpus))
    print(
        f"{len(gpus)} GPUs in one process (MirroredStrategy), {batch}/GPU: {total:.0f} img/s, scaling "
        f"efficiency {efficiency:.1%}, first call {first_call:.1f} s"
    )
    return {
        "gpus": len(gpus),
        "batch_per_gpu": batch,
        "img_s": total,
        "scaling_efficiency": efficiency,
        "first_call_s": first_call,
    }


def ray_worker(settings: dict) -> None:
    """One Ray Train worker of --ray: the production step under MultiWorkerMirroredStrategy, set up as
    a search trial's worker is (tune.train_trial)."""
    from ray import train as ray_train

    from pneumo_dist import data, distribute, ray_setup, train

    args = argparse.Namespace(**{k: v for k, v in settings.items() if k != "collector"})
    args.workdir = tempfile.mkdtemp(prefix="gpu-bench-worker-")
    own_gpus = distribute.own_gpu_indices(os.environ.get("CUDA_VISIBLE_DEVICES"), ray_setup.ray_gpu_ids())
    distribute.configure_process(
        train.TrainConfig(xla_cache_dir=args.xla_cache_dir), data.host_threads(), gpu_indices=own_gpus
    )
    strategy = distribute.choose_strategy()
    batch = args.batches[-1]
    run = make_run(args, strategy, batch)
    synthetic, first_call = step_seconds(run, args.steps, synthetic=True, repeats=args.repeats)
    real, _ = step_seconds(run, args.steps, synthetic=False, repeats=args.repeats)
    row = {"synthetic_s": synthetic, "real_s": real, "first_call_s": first_call, "describe": run.describe()}
    if ray_train.get_context().get_world_rank() == 0:
        import ray

        ray.get(settings["collector"].put.remote(row))


def measure_ray(args) -> dict:
    """--ray N: the production step in N Ray Train worker processes (one GPU each where there are GPUs),
    against one process's figure measured above."""
    import ray
    from ray import cloudpickle
    from ray import train as ray_train
    from ray.train.tensorflow import TensorflowTrainer

    from pneumo_dist import ray_setup

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not find this script
    ray_setup.connect_ray(None)
    gpus = ray.cluster_resources().get("GPU", 0) >= args.ray

    @ray.remote(num_cpus=0)
    class Collector:  # rank 0's figures, wherever in the cluster it runs
        def __init__(self):
            self.row = None

        def put(self, row: dict) -> None:
            self.row = row

        def get(self) -> dict | None:
            return self.row

    collector = Collector.remote()
    settings = {k: v for k, v in vars(args).items() if k != "workdir"} | {"collector": collector}
    TensorflowTrainer(
        ray_worker,
        train_loop_config=settings,
        tensorflow_config=ray_setup.gpu_sharing_tensorflow_config(),
        scaling_config=ray_train.ScalingConfig(
            num_workers=args.ray, use_gpu=gpus, resources_per_worker={"CPU": 1, "GPU": 1 if gpus else 0}
        ),
        run_config=ray_train.RunConfig(name="gpu-bench", storage_path=tempfile.mkdtemp(dir=args.workdir)),
    ).fit()
    metrics = ray.get(collector.get.remote())
    batch = args.batches[-1]
    row = {
        "ray_workers": args.ray,
        "batch_per_gpu": batch,
        "img_s": batch * args.ray / metrics["synthetic_s"],
        "real_img_s": batch * args.ray / metrics["real_s"],
        "first_call_s": metrics["first_call_s"],
        "describe": metrics["describe"],
    }
    print(
        f"{args.ray} Ray Train workers, {batch} each: {row['img_s']:.0f} img/s synthetic, "
        f"{row['real_img_s']:.0f} real, first call {row['first_call_s']:.1f} s\n  {metrics['describe']}"
    )
    return row


def summary_line(device: str, probe, results: list[dict]) -> str:
    """The one line to paste: the production step at the largest batch, the full fine-tune, the epoch's
    overhead and whatever multi-GPU figures were measured."""
    production = [r for r in results if r.get("recipe") == "production"][-1]
    full = next(r for r in results if r.get("recipe") == "full")
    epoch = next(r["epoch"] for r in results if "epoch" in r)
    parts = [
        f"gpu_bench {time.strftime('%Y-%m-%d')}: {device}, {probe.policy}, "
        f"XLA {'on' if probe.xla else 'off'}",
        f"production step {production['batch_per_gpu']}/GPU {production['synthetic_img_s']:.0f} img/s "
        f"(real input {production['real_img_s']:.0f}, compile {production['first_call_s']:.0f} s)",
        f"full fine-tune {full['synthetic_img_s']:.0f} img/s",
        f"epoch overhead {epoch['overhead_s']:.1f} s",
    ]
    parts += [
        f"{r['gpus']} GPUs {r['img_s']:.0f} img/s ({r['scaling_efficiency']:.0%})"
        for r in results
        if "gpus" in r
    ]
    parts += [f"{r['ray_workers']} Ray workers {r['img_s']:.0f} img/s" for r in results if "ray_workers" in r]
    return "; ".join(parts)


def measure_startup(args) -> int:
    with tempfile.TemporaryDirectory(prefix="gpu-bench-xla-cache-") as cache:
        (cold, cold_phases), (warm, warm_phases) = (
            startup_seconds(args, cache),
            startup_seconds(args, cache),
        )
    print(
        f"start-up to the first step: cold XLA cache {cold:.1f} s, warm {warm:.1f} s, ratio {warm / cold:.2f}"
    )
    for name, phases in (("cold", cold_phases), ("warm", warm_phases)):
        print(f"  {name}: " + ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in phases.items()))
    return 0


def first_step_phases(args, one) -> int:
    import tensorflow as tf

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


def measure_loop_ratio(args, one) -> int:
    batch = args.batches[0]
    per_step = [
        step_seconds(make_run(args, one, batch, steps_per_loop=n), n, synthetic=False, repeats=args.repeats)[
            0
        ]
        for n in (1, args.steps)
    ]
    rates = [batch / s for s in per_step]
    print(
        f"steps_per_loop 1: {rates[0]:.1f} img/s; {args.steps}: {rates[1]:.1f} img/s; "
        f"ratio {rates[1] / rates[0]:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
