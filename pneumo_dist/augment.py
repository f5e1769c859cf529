"""On-device augmentation of grayscale batches, and the one normalisation every model input gets.

The input pipeline delivers uint8 (B, H, W, 1) batches; inside the training step `model_inputs` turns
them into what ResNet50 expects, augmenting first when training. Training, evaluation and inference all
call `model_inputs`, so they cannot drift apart.
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
    unit = tf.cast(images, tf.float32) / 255.0
    if augment is not None and augment.enabled:
        unit = augment_batch(unit, augment, seed)
    return imagenet_normalize(unit)


def imagenet_normalize(unit: tf.Tensor) -> tf.Tensor:
    """float (B, H, W, 1) in [0, 1] -> (B, H, W, 3) as resnet50.preprocess_input makes it."""
    return tf.repeat(unit * 255.0, 3, axis=-1) - tf.constant(IMAGENET_BGR_MEAN, unit.dtype)


def step_seed(base_seed: int, step: tf.Tensor, replica_id: tf.Tensor | int) -> tf.Tensor:
    """A stateless seed that differs per step and per replica and is the same on every rerun."""
    seed = tf.stack([tf.constant(base_seed, tf.int64), tf.cast(step, tf.int64)])
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(replica_id, tf.int64))


def augment_batch(images: tf.Tensor, config: AugmentConfig, seed: tf.Tensor) -> tf.Tensor:
    """float32 (B, H, W, 1) in [0, 1] -> the same shape and range, each image transformed differently.

    One fused projective warp per image (rotation, zoom, shift, shear, optional flip: one resampling,
    not four), then brightness, contrast and gamma. Pixels warped in from outside the image are black,
    like the background of an X-ray.
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
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.stack([height, width]),
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )

    def per_image(values: tf.Tensor) -> tf.Tensor:
        return tf.reshape(values, [-1, 1, 1, 1])

    brightness = per_image(uniform(6, -config.brightness, config.brightness))
    contrast = per_image(uniform(7, 1.0 - config.contrast, 1.0 + config.contrast))
    log_gamma = math.log1p(config.gamma)
    gamma = per_image(tf.exp(uniform(8, -log_gamma, log_gamma)))
    mean = tf.reduce_mean(warped, axis=[1, 2, 3], keepdims=True)
    adjusted = (warped - mean) * contrast + mean + brightness
    return tf.pow(tf.clip_by_value(adjusted, 0.0, 1.0), gamma)
