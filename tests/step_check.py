"""A few steps of train._Run's own training step on one fixed global batch, under whatever strategy the
process has: the multi-replica tests compare the weights it ends with across strategies and processes.

    python tests/step_check.py one SHARDS OUT          one process, one replica (the reference)
    python tests/step_check.py mirrored SHARDS OUT     one process, MirroredStrategy over 2 CPU devices
    python tests/step_check.py ray SHARDS OUT          2 Ray Train worker processes (MultiWorkerMirrored)

Each writes OUT/weights.npz (the trainable weights, every replica's) and OUT/info.json (the start-up
line, the step kind, the compiled part's traces, the packs TensorFlow logged).
"""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
GLOBAL_BATCH = 8
SIZE_PX = 32
# Deterministic on purpose: no augmentation (its seeds differ per replica), no dropout, BatchNorm
# frozen (inference mode: no batch statistics, which are per replica). What is left is the sum of the
# replicas' gradients, which must equal one replica's gradient of the whole batch.
OVERRIDES = [
    f"data.image_size_px={SIZE_PX}",
    f"data.global_batch_size={GLOBAL_BATCH}",
    "data.read_mode=stream",
    "model.weights=none",
    "model.unfreeze=all",
    "model.train_batchnorm=false",
    "model.dense_units=16",
    "model.dropout=0.0",
    "augment.enabled=false",
    "train.xla=on",
    "train.optimizer=sgd",  # linear in the gradients: Adam would magnify rounding in near-zero ones
    "train.learning_rate=0.01",
    "train.warmup_epochs=0",
    # Small packs, so that ResNet50's gradients make several of them even at this size.
    "train.all_reduce_pack_mb=4",
]


def fixed_batches():
    """(STEPS, GLOBAL_BATCH, SIZE_PX, SIZE_PX, 1) uint8 images and their labels, the same everywhere."""
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(STEPS, GLOBAL_BATCH, SIZE_PX, SIZE_PX, 1), dtype=np.uint8)
    labels = np.tile(np.array([0.0, 1.0], np.float32), (STEPS, GLOBAL_BATCH // 2))
    return images, labels


def run_steps(strategy, shards: str, out: str) -> tuple[list, dict]:
    """-> (each trainable variable's value on every local replica, what info.json holds)."""
    import logging

    import numpy as np
    import tensorflow as tf

    from pneumo_dist import config as config_lib
    from pneumo_dist import train

    config = config_lib.load_config(
        None, [*OVERRIDES, f"data.manifest_uri={shards}", f"train.output_uri={out}/run"]
    )
    run = train._Run(config, strategy, os.path.join(out, "scratch"))
    images, labels = fixed_batches()
    replicas = strategy.num_replicas_in_sync
    per_replica = GLOBAL_BATCH // replicas

    def pipeline(context: tf.distribute.InputContext) -> tf.data.Dataset:
        # This pipeline's replicas' slices of each step's global batch, one replica after another.
        local = replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local * per_replica
        part = slice(first, first + local * per_replica)
        shape = (STEPS * local, per_replica)
        return tf.data.Dataset.from_tensor_slices(
            {
                "image": images[:, part].reshape(shape + images.shape[2:]),
                "label": labels[:, part].reshape(shape),
            }
        )

    run.train_batches = strategy.distribute_datasets_from_function(pipeline)
    logged = _packs_logged()
    logging.getLogger("tensorflow").addHandler(logged)
    logging.getLogger("tensorflow").setLevel(logging.INFO)
    initial = [w.numpy() for w in run.classifier.trainable_variables]
    loop = run._make_train_loop()
    loss = float(loop(iter(run.train_batches), tf.constant(STEPS)))
    values = [
        [v.numpy() for v in strategy.experimental_local_results(w)]
        for w in run.classifier.trainable_variables
    ]
    info = {
        "describe": run.describe(),
        "step_kind": run.step_kind,
        "traces": run.forward_backward.experimental_get_tracing_count(),
        "packs": logged.packs,
        "loss": loss,
        "moved": max(float(np.abs(v[0] - w).max()) for v, w in zip(values, initial, strict=True)),
    }
    return values, info


def _packs_logged():
    """A logging handler that keeps, from TensorFlow's own log line of each collective all-reduce it
    builds, how many packs it made."""
    import logging
    import re

    class Collect(logging.Handler):
        packs: list[int] = []

        def emit(self, record: logging.LogRecord) -> None:
            found = re.search(r"Collective all_reduce tensors: .*num_packs = (\d+)", record.getMessage())
            if found:
                self.packs.append(int(found.group(1)))

    return Collect()


def save(values: list, info: dict, out: str) -> None:
    import numpy as np

    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, "weights.npz"), *[np.stack(replicas) for replicas in values])
    with open(os.path.join(out, "info.json"), "w") as file:
        json.dump(info, file)


def ray_worker(loop_config: dict) -> None:
    sys.path.insert(0, REPO)
    from ray import train as ray_train

    from pneumo_dist import distribute

    rank = ray_train.get_context().get_world_rank()
    strategy = distribute.choose_strategy()
    out = os.path.join(loop_config["out"], f"rank-{rank}")
    values, info = run_steps(strategy, loop_config["shards"], out)
    save(values, info, out)


def main(mode: str, shards: str, out: str) -> None:
    sys.path.insert(0, REPO)
    import pneumo_dist  # noqa: F401 - selects tf-keras before TensorFlow loads

    if mode == "ray":
        import ray
        from ray import train as ray_train
        from ray.train.tensorflow import TensorflowTrainer

        ray.init(address="local", num_cpus=2, log_to_driver=False)
        TensorflowTrainer(
            ray_worker,
            train_loop_config={"shards": shards, "out": out},
            scaling_config=ray_train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=ray_train.RunConfig(name="step-check", storage_path=os.path.join(out, "ray")),
        ).fit()
        return
    from pneumo_dist import config as config_lib
    from pneumo_dist import distribute

    # XLA's persistent cache, private to this run: one file per distinct program compiled.
    cache = os.path.join(out, "xla-cache")
    distribute.configure_process(config_lib.TrainConfig(xla_cache_dir=cache))
    import tensorflow as tf

    if mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:
        strategy = tf.distribute.get_strategy()
    values, info = run_steps(strategy, shards, out)
    info["xla_programs"] = sorted(os.listdir(cache))
    save(values, info, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
