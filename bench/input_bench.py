"""Input pipeline and augmentation throughput on the CPU, against Keras baselines in the same run.

1. Our training input (shards -> decode -> 224 px batches -> augmentation + normalisation, as in the
   training step, here on the CPU) vs `ImageDataGenerator.flow_from_directory` with the classic
   augmentation (rotation 20, shifts 0.2, shear 0.2, zoom 0.2, horizontal flip) over the same JPEGs.
2. Our fused augmentation alone (1 channel) vs a stack of tf-keras preprocessing layers doing the same
   transforms on the 3-channel images such a pipeline would have by then.

    python bench/input_bench.py [--images 600] [--batch 32] [--size 224]

Goals (issue 3): pipeline >= 25x ImageDataGenerator; augmentation >= 5x the layer stack.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from common import CACHE, full_size_demo

from pneumo_dist import augment, data, shards
from pneumo_dist.config import AugmentConfig, DataConfig

# The same transforms as ImageDataGenerator's below (its shear_range is in degrees), plus our default
# brightness / contrast / gamma jitter, which the generator does not do: that favours the baseline.
OURS = AugmentConfig(rotation_deg=20, zoom=0.2, shift=0.2, shear_deg=0.2, horizontal_flip=True)


def ensure_shards(root, size: int = 256) -> str:
    destination = str(CACHE / f"shards-{size}")
    shards.make_shards(str(root), destination, shards.ShardOptions(stored_size_px=size))
    return destination


def rate(run, images: int, repeats: int = 2) -> float:
    """Best of `repeats` runs of `run()` (which processes `images` images), in images/s."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return images / best


def our_pipeline(manifest_uri: str, size: int, batch: int, augment_on_cpu: bool):
    """One epoch of training batches; with `augment_on_cpu`, also the step's augmentation + normalisation."""
    import tensorflow as tf

    cfg = DataConfig(
        manifest_uri=manifest_uri,
        image_size_px=size,
        global_batch_size=batch,
        cache="none",
        read_mode="stream",
        class_balance="none",
    )
    dataset = data.open_dataset(cfg)
    steps = data.steps_per_epoch(dataset, batch)
    iterator = iter(data.train_dataset(cfg, dataset))

    @tf.function
    def prepare(images, step):
        if not augment_on_cpu:
            return images
        return augment.model_inputs(images, OURS, augment.step_seed(0, step, 0), size)

    # The shuffle buffer holds a whole epoch of this small set, so the first epoch is read before the
    # first batch comes out: warm up with one epoch, then time several in steady state.
    for step in range(steps):
        prepare(next(iterator)["image"], tf.constant(step))
    epochs = 4

    def run():
        for step in range(epochs * steps):
            prepare(next(iterator)["image"], tf.constant(step)).numpy()

    return run, epochs * steps * batch


def image_data_generator(train_dir: str, size: int, batch: int):
    from tf_keras.preprocessing.image import ImageDataGenerator

    generator = ImageDataGenerator(
        rescale=1 / 255,
        rotation_range=20,
        width_shift_range=0.2,
        height_shift_range=0.2,
        shear_range=0.2,
        zoom_range=0.2,
        horizontal_flip=True,
    )
    flow = generator.flow_from_directory(
        train_dir, target_size=(size, size), batch_size=batch, class_mode="binary", seed=0
    )
    steps = len(flow)

    def run():
        for _ in range(steps):
            next(flow)

    return run, flow.samples


def augmentation_only(size: int, batch: int):
    """(ours, layer stack) runners: a batch as the pipeline delivers it (uint8) -> augmented floats in
    [0, 1], normalisation excluded; the layers get the 3-channel float copy they would work on."""
    import tensorflow as tf
    import tf_keras

    gray = tf.random.stateless_uniform([batch, size, size, 1], [0, 0], 0, 256, dtype=tf.int32)
    gray = tf.cast(gray, tf.uint8)
    rgb = tf.repeat(tf.cast(gray, tf.float32) / 255.0, 3, axis=-1)

    @tf.function
    def ours(step):
        return augment.augment_batch(gray, OURS, augment.step_seed(0, step, 0))

    layers = tf_keras.Sequential(
        [
            tf_keras.layers.RandomRotation(20 / 360, fill_mode="constant"),
            tf_keras.layers.RandomZoom(0.2, fill_mode="constant"),
            tf_keras.layers.RandomTranslation(0.2, 0.2, fill_mode="constant"),
            tf_keras.layers.RandomFlip("horizontal"),
            tf_keras.layers.RandomBrightness(0.1, value_range=(0, 1)),
            tf_keras.layers.RandomContrast(0.15),
        ]
    )

    @tf.function
    def keras_layers():
        return layers(rgb, training=True)

    ours(tf.constant(0))
    keras_layers()
    repeats = 10

    def run_ours():
        for step in range(repeats):
            ours(tf.constant(step)).numpy()

    def run_layers():
        for _ in range(repeats):
            keras_layers().numpy()

    return (run_ours, repeats * batch), (run_layers, repeats * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    paths = full_size_demo(args.images)
    root = paths[0].parents[2]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, CPU only; batch {args.batch}, {args.size} px"
    )
    idg = rate(*image_data_generator(str(root / "train"), args.size, args.batch), repeats=1)
    print(
        f"\n1. input pipeline ({len(paths)} demo JPEGs of 1-3 MP; ours reads them as make_shards stored them)"
    )
    print(f"  {'ImageDataGenerator.flow_from_directory, augmenting':60s} {idg:7.1f} img/s")
    for stored in (256, args.size):
        manifest_uri = ensure_shards(root, stored)
        for on_cpu, what in ((True, "+ augmentation on the CPU"), (False, "host part only")):
            ours = rate(*our_pipeline(manifest_uri, args.size, args.batch, augment_on_cpu=on_cpu))
            label = f"ours, {stored} px shards, {what}"
            print(f"  {label:60s} {ours:7.1f} img/s  {ours / idg:5.1f}x")
    print("  (goal: >= 25x; in training the augmentation runs on the accelerator, not in the host part)")

    (run_ours, n_ours), (run_layers, n_layers) = augmentation_only(args.size, args.batch)
    ours_aug, layers_aug = rate(run_ours, n_ours), rate(run_layers, n_layers)
    print(f"\n2. augmentation alone, {args.size} px, batch {args.batch}, output float in [0, 1]")
    layers_label = "tf-keras layers: rotation, zoom, shift, flip, brightness, contrast; 3 ch"
    print(f"  {layers_label:72s} {layers_aug:7.1f} img/s")
    print(f"  {'ours: one fused warp + brightness, contrast, gamma; 1 channel':72s} {ours_aug:7.1f} img/s")
    print(f"  ratio: {ours_aug / layers_aug:.1f}x (goal >= 5x)")


if __name__ == "__main__":
    main()
