"""What building ResNet50's training step costs with tf-keras' Adam and with optimizer.FusedAdam (one
ResourceApplyAdam per variable), in one process, alternating: tracing the step (Python) and its first
call (graph optimisation, kernel set-up, the first steps). Every trial, restarted worker and resumed
run pays both.

    python bench/step_build_bench.py                 # 32 px, batch 16, 2 rounds
    python bench/step_build_bench.py --size 224 --rounds 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import pneumo_dist  # noqa: F401 - selects tf-keras before TensorFlow loads

# isort: split
import tensorflow as tf
import tf_keras

from pneumo_dist import config as config_lib
from pneumo_dist import optimizer as optimizer_lib
from pneumo_dist import shards, train
from pneumo_dist.demo import DemoSpec, write_demo_dataset

FUSED, PLAIN = "FusedAdam", "tf-keras Adam"


def build_once(config: config_lib.RunConfig, optimizer: str, scratch: str) -> dict[str, float]:
    optimizer_lib.FusedAdam = ORIGINAL_FUSED if optimizer == FUSED else tf_keras.optimizers.Adam
    run = train._Run(config, tf.distribute.get_strategy(), scratch)
    loop = run._make_train_loop()
    iterator = iter(run.train_batches)
    steps = tf.constant(run.steps_per_epoch, tf.int32)
    started = time.perf_counter()
    loop.get_concrete_function(iterator, steps)
    traced = time.perf_counter()
    float(loop(iterator, steps))
    first = time.perf_counter()
    float(loop(iterator, steps))
    return {
        "trace_s": traced - started,
        "first_call_s": first - traced,
        "later_call_s": time.perf_counter() - first,
    }


ORIGINAL_FUSED = optimizer_lib.FusedAdam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=32, help="image size, px")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="steps per call")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="pneumo-step-build-")
    spec = DemoSpec(images_per_class=(("train", 40),), min_side_px=args.size, max_side_px=args.size + 8)
    write_demo_dataset(f"{root}/source", spec)
    options = shards.ShardOptions(stored_size_px=args.size, min_shards=2, val_fraction=0.2)
    shards.make_shards(f"{root}/source", f"{root}/shards", options, workers=1)
    config = config_lib.load_config(
        None,
        [
            f"data.manifest_uri={root}/shards",
            f"data.image_size_px={args.size}",
            f"data.global_batch_size={args.batch}",
            "model.weights=none",
            "model.unfreeze=all",
            f"train.max_steps_per_epoch={args.steps}",
            f"train.output_uri={root}/out",
            "train.optimizer=adam",
            "train.xla=off",
        ],
    )
    print(
        f"{platform.node()}: {platform.processor() or platform.machine()}, TF {tf.__version__}, "
        f"{args.size} px, batch {args.batch}, {args.steps} steps a call, no XLA"
    )
    results = {FUSED: [], PLAIN: []}
    for round_ in range(args.rounds):
        for optimizer in (PLAIN, FUSED) if round_ % 2 == 0 else (FUSED, PLAIN):
            figures = build_once(config, optimizer, f"{root}/scratch")
            results[optimizer].append(figures)
            print(
                f"round {round_ + 1} {optimizer:14s} "
                + "  ".join(f"{k} {v:6.2f}" for k, v in figures.items()),
                flush=True,
            )
    medians = {
        name: {k: statistics.median(f[k] for f in runs) for k in runs[0]} for name, runs in results.items()
    }
    for key in medians[FUSED]:
        ratio = medians[FUSED][key] / medians[PLAIN][key]
        plain, fused = medians[PLAIN][key], medians[FUSED][key]
        print(f"{key:13s} {PLAIN} {plain:6.2f} s   {FUSED} {fused:6.2f} s   ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
