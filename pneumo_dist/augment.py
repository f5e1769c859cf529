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
from pneumo_dist.model import BACKBONE_BGR_MEAN


def model_inputs(
    images: tf.Tensor, augment: AugmentConfig | None, seed: tf.Tensor | None, size: int | None = None
) -> tf.Tensor:
    """uint8 (B, H, W, 1) -> float32 (B, size, size, 3) ResNet50 input; augmented when `augment` is
    given. `size` (default: the input's) is reached by the augmentation's own warp, or else by
    decode.resize_images: one resampling either way."""
    if augment is not None and augment.enabled:
        images, tables = _augment(images, augment, seed, size)
    else:
        if size is not None and size != images.shape[1]:
            from pneumo_dist.decode import resize_images

            images = resize_images(images, images.shape[1], size)
        tables = _identity_tables()
    return _look_up(images, imagenet_normalize(tables[..., tf.newaxis]))


def imagenet_normalize(unit: tf.Tensor) -> tf.Tensor:
    """float (..., 1) in [0, 1] -> (..., 3) as resnet50.preprocess_input makes it from gray RGB."""
    return unit * 255.0 - tf.constant(BACKBONE_BGR_MEAN, unit.dtype)


def augment_batch(
    images: tf.Tensor, config: AugmentConfig, seed: tf.Tensor, size: int | None = None
) -> tf.Tensor:
    """uint8 (B, H, W, 1) -> float32 (B, size, size, 1) in [0, 1], augmented, not normalised (for tests
    and for looking at what the model sees)."""
    warped, tables = _augment(images, config, seed, size)
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


def _augment(
    images: tf.Tensor, config: AugmentConfig, seed: tf.Tensor, size: int | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """-> (warped uint8 images (B, size, size, 1), per-image photometric tables (B, 256) in [0, 1]).

    One fused projective warp per image: the resize to `size`, rotation, zoom, shift, shear and the
    optional flip in a single resampling, not five. Pixels warped in from outside the image are black,
    like an X-ray's background.
    """
    batch = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]  # static: the records' stored size
    out_height, out_width = (size, size) if size else (height, width)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=9)

    def uniform(index: int, low: float, high: float) -> tf.Tensor:
        return tf.random.stateless_uniform([batch], seeds[index], low, high)

    angle = uniform(0, -1.0, 1.0) * (config.rotation_deg * math.pi / 180)
    shear = uniform(1, -1.0, 1.0) * (config.shear_deg * math.pi / 180)
    zoom = uniform(2, 1.0 - config.zoom, 1.0 + config.zoom)
    shift_x = uniform(3, -config.shift, config.shift) * width
    shift_y = uniform(4, -config.shift, config.shift) * height
    flip = tf.ones([batch])
    if config.horizontal_flip:
        flip = tf.where(uniform(5, 0.0, 1.0) < 0.5, -1.0, 1.0)

    # Output pixel p maps to input pixel A (p - c_out) + c_in - shift, with A = R(angle) Shear(shear)
    # diag(flip, 1) * scale / zoom, c the centres and scale = input side / output side: the inverse map
    # the warp op wants. Without augmentation it is tf.image.resize's bilinear, half-pixel-centre map.
    scale_x, scale_y = width / out_width, height / out_height
    in_x, in_y = (width - 1) / 2, (height - 1) / 2
    out_x, out_y = (out_width - 1) / 2, (out_height - 1) / 2
    a0 = tf.cos(angle) * flip * scale_x / zoom
    a1 = -tf.sin(angle + shear) * scale_y / zoom
    b0 = tf.sin(angle) * flip * scale_x / zoom
    b1 = tf.cos(angle + shear) * scale_y / zoom
    a2 = in_x - a0 * out_x - a1 * out_y - shift_x
    b2 = in_y - b0 * out_x - b1 * out_y - shift_y
    warped = _bilinear_warp(images, (a0, a1, a2, b0, b1, b2), out_height, out_width)

    def per_image(values: tf.Tensor) -> tf.Tensor:
        return tf.reshape(values, [-1, 1])

    brightness = per_image(uniform(6, -config.brightness, config.brightness))
    contrast = per_image(uniform(7, 1.0 - config.contrast, 1.0 + config.contrast))
    log_gamma = math.log1p(config.gamma)
    gamma = per_image(tf.exp(uniform(8, -log_gamma, log_gamma)))
    mean = per_image(tf.reduce_mean(tf.cast(warped, tf.float32), axis=[1, 2, 3]) / 255.0)
    levels = _identity_tables()
    tables = tf.pow(tf.clip_by_value((levels - mean) * contrast + mean + brightness, 0.0, 1.0), gamma)
    if config.erasing:
        # Its own seed, derived: the other draws stay what they are without erasing.
        warped = _erase(warped, config.erasing, tf.random.experimental.stateless_fold_in(seeds[0], 1))
    return warped, tables


# Random erasing's ranges, Zhong et al. (AAAI 2020): area 2-40% of the image, aspect 0.3-3.3.
ERASE_AREA = (0.02, 0.4)
ERASE_ASPECT = (0.3, 1 / 0.3)


def _erase(images: tf.Tensor, probability: float, seed: tf.Tensor) -> tf.Tensor:
    """uint8 (B, H, W, 1): each image, with `probability`, gets one rectangle of random gray levels
    (a side longer than the image's is cut to it)."""
    batch, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
    seeds = tf.random.experimental.stateless_split(seed, num=6)

    def uniform(index: int, low: float, high: float) -> tf.Tensor:
        return tf.reshape(tf.random.stateless_uniform([batch], seeds[index], low, high), [-1, 1, 1])

    area = uniform(0, *ERASE_AREA) * (height * width)
    aspect = tf.exp(uniform(1, math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])))
    rect_height = tf.minimum(tf.sqrt(area * aspect), float(height))
    rect_width = tf.minimum(tf.sqrt(area / aspect), float(width))
    top = uniform(2, 0.0, 1.0) * (height - rect_height)
    left = uniform(3, 0.0, 1.0) * (width - rect_width)
    ys = tf.reshape(tf.range(height, dtype=tf.float32), [1, -1, 1])
    xs = tf.reshape(tf.range(width, dtype=tf.float32), [1, 1, -1])
    inside = (ys >= top) & (ys < top + rect_height) & (xs >= left) & (xs < left + rect_width)
    inside &= uniform(4, 0.0, 1.0) < probability
    noise = tf.random.stateless_uniform([batch, height, width], seeds[5], 0, 256, dtype=tf.int32)
    return tf.where(inside[..., tf.newaxis], tf.cast(noise, tf.uint8)[..., tf.newaxis], images)


def mixup(inputs: tf.Tensor, alpha: float, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Model inputs (B, ...) -> (mixed inputs, lam (B,)): image i becomes lam_i * image i + (1 - lam_i)
    * image B-1-i (the batch reversed, timm's pairing; the batch is shuffled), lam_i ~ Beta(alpha,
    alpha). The caller mixes the losses of i and B-1-i by the same lam."""
    lam = symmetric_beta(tf.shape(inputs)[:1], alpha, tf.random.experimental.stateless_fold_in(seed, 2))
    shape = tf.concat([tf.shape(lam), tf.ones([tf.rank(inputs) - 1], tf.int32)], axis=0)
    mix = tf.cast(tf.reshape(lam, shape), inputs.dtype)
    return mix * inputs + (1.0 - mix) * tf.reverse(inputs, axis=[0]), lam


# Candidates per draw of symmetric_beta: Johnk's acceptance rate is Gamma(a + 1)^2 / Gamma(2a + 1),
# 0.5 at a = 1 and higher below, so all 32 fail with probability <= 2^-32.
_BETA_CANDIDATES = 32


def symmetric_beta(shape: tf.Tensor, alpha: float, seed: tf.Tensor) -> tf.Tensor:
    """Beta(alpha, alpha) draws for 0 < alpha <= 1, by Johnk's method (Johnk 1964; Devroye 1986, IX.3):
    X = U^(1/a), Y = V^(1/a), accepted when X + Y <= 1, giving X / (X + Y); in logs, so that small
    alphas cannot underflow. TensorFlow's gamma sampler, the usual way, has no XLA kernel; this is
    uniforms, logs and a selection, which XLA compiles into the step."""
    candidates = tf.concat([tf.reshape(shape, [-1]), [_BETA_CANDIDATES]], axis=0)
    u, v = tf.unstack(tf.random.stateless_uniform(tf.concat([[2], candidates], 0), seed, 1e-12, 1.0))
    log_x, log_y = tf.math.log(u) / alpha, tf.math.log(v) / alpha
    accepted = tf.reduce_logsumexp(tf.stack([log_x, log_y]), axis=0) <= 0.0
    first = tf.argmax(tf.cast(accepted, tf.int32), axis=-1)  # the first accepted candidate
    draws = tf.gather(tf.sigmoid(log_x - log_y), first, batch_dims=len(accepted.shape) - 1)
    return tf.where(tf.reduce_any(accepted, axis=-1), draws, 0.5)


def _bilinear_warp(images: tf.Tensor, rows: tuple, out_height: int, out_width: int) -> tf.Tensor:
    """uint8 (B, H, W, 1) -> uint8 (B, out_height, out_width, 1): output pixel (x, y) takes the bilinear
    value at input (a0 x + a1 y + a2, b0 x + b1 y + b2), black outside the image; `rows` holds those six
    (B,) coefficients. Inside an XLA-compiled function, gathers (_gather_warp); elsewhere TensorFlow's
    own warp op, about 2x faster on a CPU (bench/input_bench.py), which XLA cannot compile."""
    if _compiled_by_xla():
        return _gather_warp(images, rows, out_height, out_width)
    return _transform_warp(images, rows, out_height, out_width)


def _compiled_by_xla() -> bool:
    """Whether the function being traced is compiled by XLA: the check tf.distribute itself makes
    (MirroredStrategy._use_merge_call), from TensorFlow's own module."""
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _transform_warp(images: tf.Tensor, rows: tuple, out_height: int, out_width: int) -> tf.Tensor:
    """_bilinear_warp by tf.raw_ops.ImageProjectiveTransformV3 (on floats, then rounded as ours is)."""
    zeros = tf.zeros_like(rows[0])
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32),
        transforms=tf.stack([*rows, zeros, zeros], axis=1),
        output_shape=[out_height, out_width],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return tf.cast(tf.round(warped), tf.uint8)


def _gather_warp(images: tf.Tensor, rows: tuple, out_height: int, out_width: int) -> tf.Tensor:
    """_bilinear_warp with gathers, which XLA compiles into the training step: TensorFlow 2.21's XLA has
    no kernel for ImageProjectiveTransformV3 ("No registered 'ImageProjectiveTransformV3' OpKernel for
    XLA_CPU_JIT")."""
    height, width = images.shape[1], images.shape[2]
    a0, a1, a2, b0, b1, b2 = (tf.reshape(r, [-1, 1, 1]) for r in rows)
    ys, xs = tf.meshgrid(
        tf.range(out_height, dtype=tf.float32), tf.range(out_width, dtype=tf.float32), indexing="ij"
    )
    in_x = a0 * xs + a1 * ys + a2  # (B, out_height, out_width)
    in_y = b0 * xs + b1 * ys + b2
    x0, y0 = tf.floor(in_x), tf.floor(in_y)
    wx, wy = in_x - x0, in_y - y0
    x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
    flat = tf.reshape(tf.cast(images, tf.float32), [-1, height * width])

    def pixels(y: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
        inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
        index = tf.clip_by_value(y, 0, height - 1) * width + tf.clip_by_value(x, 0, width - 1)
        values = tf.gather(flat, tf.reshape(index, [-1, out_height * out_width]), batch_dims=1)
        return tf.where(inside, tf.reshape(values, tf.shape(index)), 0.0)

    top = (1 - wx) * pixels(y0, x0) + wx * pixels(y0, x0 + 1)
    bottom = (1 - wx) * pixels(y0 + 1, x0) + wx * pixels(y0 + 1, x0 + 1)
    warped = (1 - wy) * top + wy * bottom
    return tf.cast(tf.round(warped), tf.uint8)[..., tf.newaxis]
