"""On-device augmentation of grayscale batches, and the one normalisation every model input gets.

The input pipeline delivers uint8 (B, H, W, 1) batches; inside the training step `model_inputs` turns
them into what ResNet50 expects, augmenting first when training. Training, evaluation and inference all
call `model_inputs`, so they cannot drift apart.

Every pixel step after the geometric warp (brightness, contrast, gamma, ImageNet normalisation, the
gray -> 3 channel copy) is a function of the pixel's 8-bit value, so it is applied as one 256-entry
lookup table per image: one pass over the pixels instead of one per operation.
"""

from __future__ import annotations

import math

import tensorflow as tf

from pneumo_dist.config import AugmentConfig

# tf-keras' resnet50.preprocess_input ("caffe" mode): RGB -> BGR, minus the ImageNet channel means,
# no scaling. Our images are gray (R = G = B), so the channel flip changes nothing but the means' order.
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)


def model_inputs(images: tf.Tensor, augment: AugmentConfig | None, seed: tf.Tensor | None) -> tf.Tensor:
    """uint8 (B, H, W, 1) -> float32 (B, H, W, 3) ResNet50 input; augmented when `augment` is given."""
    if augment is not None and augment.enabled:
        images, tables = _augment(images, augment, seed)
    else:
        tables = _identity_tables()
    return _look_up(images, imagenet_normalize(tables[..., tf.newaxis]))


def imagenet_normalize(unit: tf.Tensor) -> tf.Tensor:
    """float (..., 1) in [0, 1] -> (..., 3) as resnet50.preprocess_input makes it from gray RGB."""
    return unit * 255.0 - tf.constant(IMAGENET_BGR_MEAN, unit.dtype)


def augment_batch(images: tf.Tensor, config: AugmentConfig, seed: tf.Tensor) -> tf.Tensor:
    """uint8 (B, H, W, 1) -> float32 (B, H, W, 1) in [0, 1], augmented, not normalised (for tests and
    for looking at what the model sees)."""
    warped, tables = _augment(images, config, seed)
    return _look_up(warped, tables[..., tf.newaxis])


def step_seed(base_seed: int, step: tf.Tensor, replica_id: tf.Tensor | int) -> tf.Tensor:
    """A stateless seed that differs per step and per replica and is the same on every rerun."""
    seed = tf.stack([tf.constant(base_seed, tf.int64), tf.cast(step, tf.int64)])
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(replica_id, tf.int64))


def _identity_tables() -> tf.Tensor:
    return tf.range(256, dtype=tf.float32)[tf.newaxis, :] / 255.0  # (1, 256)


def _look_up(images: tf.Tensor, tables: tf.Tensor) -> tf.Tensor:
    """uint8 (B, H, W, 1) through tables (B or 1, 256, C) -> float32 (B, H, W, C)."""
    shape = tf.shape(images)
    pixels = tf.reshape(tf.cast(images, tf.int32), [shape[0], -1])
    shared = tables.shape[0] == 1  # one table for the whole batch (no augmentation), else one per image
    values = tf.gather(tables[0], pixels) if shared else tf.gather(tables, pixels, batch_dims=1)
    return tf.reshape(values, tf.concat([shape[:3], tf.shape(tables)[-1:]], axis=0))


def _augment(images: tf.Tensor, config: AugmentConfig, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """-> (warped uint8 images, per-image photometric tables (B, 256) in [0, 1]).

    One fused projective warp per image: rotation, zoom, shift, shear and the optional flip in a single
    resampling, not four. Pixels warped in from outside the image are black, like an X-ray's background.
    """
    batch = tf.shape(images)[0]
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=9)

    def uniform(index: int, low: float, high: float) -> tf.Tensor:
        return tf.random.stateless_uniform([batch], seeds[index], low, high)

    angle = uniform(0, -1.0, 1.0) * (config.rotation_deg * math.pi / 180)
    shear = uniform(1, -1.0, 1.0) * (config.shear_deg * math.pi / 180)
    zoom = uniform(2, 1.0 - config.zoom, 1.0 + config.zoom)
    shift_x = uniform(3, -config.shift, config.shift) * tf.cast(width, tf.float32)
    shift_y = uniform(4, -config.shift, config.shift) * tf.cast(height, tf.float32)
    flip = tf.ones([batch])
    if config.horizontal_flip:
        flip = tf.where(uniform(5, 0.0, 1.0) < 0.5, -1.0, 1.0)

    # Output pixel p maps to input pixel A (p - c) + c - shift, with A = R(angle) Shear(shear)
    # diag(flip, 1) / zoom and c the image centre: the inverse map the warp op wants.
    center_x = (tf.cast(width, tf.float32) - 1.0) / 2.0
    center_y = (tf.cast(height, tf.float32) - 1.0) / 2.0
    a0 = tf.cos(angle) * flip / zoom
    a1 = -tf.sin(angle + shear) / zoom
    b0 = tf.sin(angle) * flip / zoom
    b1 = tf.cos(angle + shear) / zoom
    a2 = center_x - a0 * center_x - a1 * center_y - shift_x
    b2 = center_y - b0 * center_x - b1 * center_y - shift_y
    zeros = tf.zeros([batch])
    # On uint8, the warp's bilinear values are truncated to whole levels (at most 1/255 darker).
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1),
        output_shape=tf.stack([height, width]),
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )

    def per_image(values: tf.Tensor) -> tf.Tensor:
        return tf.reshape(values, [-1, 1])

    brightness = per_image(uniform(6, -config.brightness, config.brightness))
    contrast = per_image(uniform(7, 1.0 - config.contrast, 1.0 + config.contrast))
    log_gamma = math.log1p(config.gamma)
    gamma = per_image(tf.exp(uniform(8, -log_gamma, log_gamma)))
    mean = per_image(tf.reduce_mean(tf.cast(warped, tf.float32), axis=[1, 2, 3]) / 255.0)
    levels = _identity_tables()
    tables = tf.pow(tf.clip_by_value((levels - mean) * contrast + mean + brightness, 0.0, 1.0), gamma)
    return warped, tables
