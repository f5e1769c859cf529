import dataclasses

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf
import tf_keras

from pneumo_dist import augment
from pneumo_dist.config import AugmentConfig, ConfigError

NONE = AugmentConfig(rotation_deg=0, zoom=0, shift=0, shear_deg=0, brightness=0, contrast=0, gamma=0)


def demo_batch(batch=8, size=32, seed=0) -> tf.Tensor:
    """uint8 (B, H, W, 1) with structure (a bright off-centre square) to move around."""
    rng = np.random.default_rng(seed)
    images = rng.integers(25, 77, (batch, size, size, 1), dtype=np.uint8)
    images[:, 4:14, 6:12] = 230
    return tf.constant(images)


def unit(images: tf.Tensor) -> np.ndarray:
    return images.numpy().astype(np.float32) / 255.0


SEED = tf.constant([1, 2], tf.int64)


def test_normalisation_equals_keras_resnet50_preprocess_input():
    gray = tf.random.stateless_uniform([2, 16, 16, 1], [0, 1], 0, 256, dtype=tf.int32)
    ours = augment.model_inputs(tf.cast(gray, tf.uint8), augment=None, seed=None)
    rgb = tf.cast(tf.repeat(gray, 3, axis=-1), tf.float32)
    keras = tf_keras.applications.resnet50.preprocess_input(rgb)
    np.testing.assert_allclose(ours.numpy(), keras.numpy(), atol=1e-4)


def test_zero_ranges_are_the_identity():
    images = demo_batch()
    np.testing.assert_allclose(augment.augment_batch(images, NONE, SEED).numpy(), unit(images), atol=1e-6)


def test_disabled_augmentation_is_the_identity():
    images = demo_batch()
    disabled = augment.model_inputs(images, AugmentConfig(enabled=False), SEED)
    np.testing.assert_array_equal(disabled.numpy(), augment.model_inputs(images, None, None).numpy())


def test_output_stays_in_range_and_differs_per_image():
    same_image = tf.repeat(demo_batch(batch=1), 16, axis=0)
    strong = AugmentConfig(
        rotation_deg=30, zoom=0.3, shift=0.2, shear_deg=15, brightness=0.3, contrast=0.5, gamma=0.5
    )
    out = augment.augment_batch(same_image, strong, SEED).numpy()
    assert out.min() >= 0.0 and out.max() <= 1.0 and not np.isnan(out).any()
    flat = out.reshape(16, -1)
    assert min(np.abs(flat[i] - flat[j]).mean() for i in range(16) for j in range(i)) > 1e-3


def test_same_seed_same_output_other_step_or_replica_other_output():
    images = demo_batch()
    config = AugmentConfig()
    first = augment.augment_batch(images, config, augment.step_seed(7, tf.constant(3), 0)).numpy()
    again = augment.augment_batch(images, config, augment.step_seed(7, tf.constant(3), 0)).numpy()
    next_step = augment.augment_batch(images, config, augment.step_seed(7, tf.constant(4), 0)).numpy()
    other_replica = augment.augment_batch(images, config, augment.step_seed(7, tf.constant(3), 1)).numpy()
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, next_step) and not np.allclose(first, other_replica)


def test_flip_only_gives_the_image_or_its_mirror_and_is_off_by_default():
    images = demo_batch(batch=32)
    flipped = augment.augment_batch(
        images, NONE.__class__(**{**NONE.__dict__, "horizontal_flip": True}), SEED
    )
    mirror = unit(tf.reverse(images, axis=[2]))
    is_mirror = [np.allclose(f, m, atol=1e-6) for f, m in zip(flipped.numpy(), mirror, strict=True)]
    is_same = [np.allclose(f, i, atol=1e-6) for f, i in zip(flipped.numpy(), unit(images), strict=True)]
    assert all(a or b for a, b in zip(is_mirror, is_same, strict=True))
    assert 4 < sum(is_mirror) < 28
    assert AugmentConfig().horizontal_flip is False


def test_shift_moves_content_the_expected_way():
    # With shift alone, the bright square moves by at most shift * side pixels and keeps its size.
    images = demo_batch(batch=16)
    shifted = augment.augment_batch(images, NONE.__class__(**{**NONE.__dict__, "shift": 0.1}), SEED).numpy()
    for image in shifted:
        rows, cols = np.nonzero(image[..., 0] > 0.6)
        assert abs(rows.mean() - 8.5) <= 3.2 + 0.5 and abs(cols.mean() - 8.5) <= 3.2 + 0.5
        assert 40 <= len(rows) <= 80  # 60 bright pixels, give or take bilinear edges


def test_works_inside_a_compiled_function_under_a_strategy():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    images = demo_batch()

    @tf.function
    def step(batch):
        def replica_fn(x):
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            return augment.model_inputs(x, AugmentConfig(), augment.step_seed(0, tf.constant(1), replica))

        return strategy.run(replica_fn, args=(batch,))

    out = step(images)
    assert out.shape == (8, 32, 32, 3) and out.dtype == tf.float32


@pytest.mark.parametrize(
    "field, value", [("rotation_deg", 200), ("zoom", 1.5), ("shift", -0.1), ("gamma", 3.0), ("erasing", 1.5)]
)
def test_bad_ranges_are_named(field, value):
    with pytest.raises(ConfigError, match=f"augment.{field}="):
        AugmentConfig(**{field: value}).validate()


def test_random_erasing_fills_one_rectangle_of_2_to_40_percent_per_image_at_its_probability():
    images = tf.fill([64, 32, 32, 1], tf.constant(128, tf.uint8))
    erased = augment.augment_batch(images, dataclasses.replace(NONE, erasing=1.0), SEED).numpy()[..., 0]
    changed = erased != 128 / 255
    for mask in changed:
        rows, columns = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        box = mask[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
        # Noise of 0..255 leaves a pixel at 128 now and then (1 in 256): the box is nearly all changed.
        assert (~box).sum() <= 2 + box.size // 50
        assert 0.01 * 32 * 32 <= box.size <= 0.45 * 32 * 32
    half = augment.augment_batch(images, dataclasses.replace(NONE, erasing=0.5), SEED).numpy()
    assert 16 <= (half != 128 / 255).any(axis=(1, 2, 3)).sum() <= 48  # about half of 64 images
    # The other draws do not move: without erasing, the same seed gives the same augmentation.
    strong = AugmentConfig(rotation_deg=30, zoom=0.3, brightness=0.3)
    plain = augment.augment_batch(demo_batch(), strong, SEED).numpy()
    with_erasing = augment.augment_batch(demo_batch(), dataclasses.replace(strong, erasing=1.0), SEED)
    untouched = (with_erasing.numpy() == plain).mean()
    assert 0.5 < untouched < 0.995


def random_rows(batch: int, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    angle, zoom = rng.uniform(-0.4, 0.4, batch), rng.uniform(0.7, 1.3, batch)
    shift = rng.uniform(-4, 4, (2, batch))
    a0, a1 = np.cos(angle) / zoom, -np.sin(angle) / zoom
    b0, b1 = np.sin(angle) / zoom, np.cos(angle) / zoom
    a2 = 16 - 16 * a0 - 16 * a1 + shift[0]
    b2 = 16 - 16 * b0 - 16 * b1 + shift[1]
    return tuple(np.float32(r) for r in (a0, a1, a2, b0, b1, b2))


def test_the_compilable_warp_matches_tensorflows_warp_op():
    # Both round the same bilinear values; float rounding may put a pixel one level apart.
    images = demo_batch(batch=6)
    rows = random_rows(6, seed=3)
    ours = augment._gather_warp(images, rows, 32, 32).numpy().astype(int)
    theirs = augment._transform_warp(images, rows, 32, 32).numpy().astype(int)
    assert np.abs(ours - theirs).max() <= 1 and np.mean(ours != theirs) < 0.01


def test_the_warp_is_gathers_where_xla_compiles_and_tensorflows_op_elsewhere():
    images = demo_batch(batch=2)
    rows = random_rows(2, seed=1)

    def ops(jit_compile: bool) -> set[str]:
        warp = tf.function(lambda x: augment._bilinear_warp(x, rows, 32, 32), jit_compile=jit_compile)
        graph = warp.get_concrete_function(tf.TensorSpec(images.shape, tf.uint8)).graph
        return {op.type for op in graph.get_operations()}

    assert "ImageProjectiveTransformV3" in ops(jit_compile=False)
    compiled = ops(jit_compile=True)
    assert "ImageProjectiveTransformV3" not in compiled and "GatherV2" in compiled


@pytest.mark.parametrize("size", [24, 40])
def test_the_warp_resizes_as_tf_image_resize_does(size):
    # One resampling instead of two: without augmentation the warp is tf.image.resize's bilinear map.
    images = demo_batch(batch=4)
    warped = augment.augment_batch(images, NONE, SEED, size=size).numpy() * 255
    resized = tf.image.resize(tf.cast(images, tf.float32), [size, size]).numpy()
    assert warped.shape == (4, size, size, 1)
    # Inside the border: the warp fills black where resize clamps to the edge pixel.
    np.testing.assert_allclose(warped[:, 1:-1, 1:-1], resized[:, 1:-1, 1:-1], atol=0.51)


@pytest.mark.parametrize("alpha", [0.4, 1.0])
def test_mixup_ratios_are_beta_distributed_and_compile(alpha):
    draw = tf.function(
        lambda seed: augment.symmetric_beta(tf.constant([20000]), alpha, seed), jit_compile=True
    )
    ratios = draw(tf.constant([3, 4], tf.int64)).numpy()
    assert ratios.min() >= 0 and ratios.max() <= 1
    assert scipy.stats.kstest(ratios, "beta", args=(alpha, alpha)).pvalue > 0.01
    assert ratios.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.05)  # Beta(a, a)'s variance
    again = draw(tf.constant([3, 4], tf.int64)).numpy()
    np.testing.assert_array_equal(again, ratios)  # stateless: the same seed, the same draws


def test_mixup_mixes_each_image_with_its_partner_in_the_reversed_batch():
    inputs = tf.random.stateless_uniform([6, 8, 8, 3], [1, 2])
    mixed, lam = augment.mixup(inputs, 0.4, SEED)
    x, lam = inputs.numpy(), lam.numpy()
    assert lam.shape == (6,) and len(set(lam)) == 6
    for i in range(6):
        np.testing.assert_allclose(mixed[i], lam[i] * x[i] + (1 - lam[i]) * x[5 - i], rtol=1e-5, atol=1e-6)
