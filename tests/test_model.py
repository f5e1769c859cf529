import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from pneumo_dist import augment
from pneumo_dist import model as model_lib
from pneumo_dist.config import ModelConfig

SIZE = 32


@pytest.fixture(scope="module")
def classifier():
    return model_lib.build_classifier(ModelConfig(weights="none"), SIZE)


def backbone_layers(classifier):
    return classifier.get_layer(model_lib.BACKBONE_NAME).layers


def is_batchnorm(layer):
    return isinstance(layer, tf_keras.layers.BatchNormalization)


@pytest.mark.parametrize("unfreeze", [0, 10, 40, "all"])
def test_unfreeze_trains_exactly_the_last_layers_and_never_batchnorm(classifier, unfreeze):
    model_lib.set_trainable(classifier, unfreeze)
    layers = backbone_layers(classifier)
    count = len(layers) if unfreeze == "all" else unfreeze
    for index, layer in enumerate(layers):
        expected = index >= len(layers) - count and not is_batchnorm(layer)
        assert layer.trainable == expected, (index, layer.name)
    expected_backbone = sum(len(layer.trainable_weights) for layer in layers if layer.trainable)
    head = 4  # dense kernel + bias, output kernel + bias
    assert len(classifier.trainable_variables) == expected_backbone + head


def test_frozen_batchnorm_runs_in_inference_mode_when_training(classifier):
    model_lib.set_trainable(classifier, "all")
    images = tf.random.uniform([4, SIZE, SIZE, 3], -100, 100)
    bn = next(layer for layer in backbone_layers(classifier) if is_batchnorm(layer))
    before = [w.numpy().copy() for w in bn.weights]
    classifier(images, training=True)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, bn.weights, strict=True))


def test_train_batchnorm_trains_them_with_a_faster_momentum():
    scratch = model_lib.build_classifier(ModelConfig(weights="none", train_batchnorm=True), SIZE)
    model_lib.set_trainable(scratch, "all", train_batchnorm=True)
    batchnorms = [layer for layer in backbone_layers(scratch) if is_batchnorm(layer)]
    assert all(layer.trainable and layer.momentum == 0.9 for layer in batchnorms)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_computes_low_but_outputs_float32(policy):
    mixed = model_lib.build_classifier(ModelConfig(weights="none"), SIZE, policy)
    assert mixed.get_layer("dense").compute_dtype in ("bfloat16", "float16")
    assert mixed(tf.zeros([2, SIZE, SIZE, 3])).dtype == tf.float32
    assert tf_keras.mixed_precision.global_policy().name == "float32"  # not left behind for others


def test_inference_model_matches_classifier_on_model_inputs_and_reloads_without_our_code(
    classifier, tmp_path
):
    gray = tf.cast(tf.random.stateless_uniform([3, SIZE, SIZE, 1], [0, 1], 0, 256, tf.int32), tf.uint8)
    expected = classifier(augment.model_inputs(gray, None, None), training=False).numpy()
    detector = model_lib.inference_model(classifier)
    np.testing.assert_allclose(detector(tf.cast(gray, tf.float32)).numpy(), expected, rtol=1e-5, atol=1e-6)
    detector.save(tmp_path / "model.keras")
    reloaded = tf_keras.models.load_model(tmp_path / "model.keras")  # no custom_objects
    np.testing.assert_allclose(reloaded(tf.cast(gray, tf.float32)).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_weights_from_a_file_and_from_gcs(classifier, tmp_path, bucket, system_temp):
    from pneumo_dist import storage

    backbone = classifier.get_layer(model_lib.BACKBONE_NAME)
    backbone.save_weights(tmp_path / "notop.h5")
    storage.upload(str(tmp_path / "notop.h5"), storage.join(bucket, "weights", "notop.h5"))
    for weights in (str(tmp_path / "notop.h5"), storage.join(bucket, "weights", "notop.h5")):
        loaded = model_lib.build_classifier(ModelConfig(weights=weights), SIZE).get_layer(
            model_lib.BACKBONE_NAME
        )
        for a, b in zip(backbone.weights, loaded.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not list(system_temp.iterdir())  # the fetched gs:// weights were not left behind
    with pytest.raises(storage.StorageNotFound, match="no such file"):
        model_lib.build_classifier(ModelConfig(weights=str(tmp_path / "missing.h5")), SIZE)
