"""ResNet50 (tf-keras) with a small binary head; freezing, precision, and the exported inference model."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator

import tensorflow as tf
import tf_keras

from pneumo_dist import storage
from pneumo_dist.config import ModelConfig, TrainConfig

# The backbone, and what the rest of the project knows of it: a new backbone changes these and
# config.py's ModelConfig, nothing else.
BACKBONE_NAME = "resnet50"
BATCHNORM_MOMENTUM_FROM_SCRATCH = 0.9
# tf-keras' resnet50.preprocess_input ("caffe" mode): RGB -> BGR, minus the ImageNet channel means,
# no scaling. Our images are gray (R = G = B), so the channel flip changes nothing but the means' order.
# augment.model_inputs and the exported model's front (inference_front) both apply it.
BACKBONE_BGR_MEAN = (103.939, 116.779, 123.68)
# The backbone's stage outputs, deepest first (strides 32, 16, 8, 4): Grad-CAM's candidate maps.
BACKBONE_STAGE_OUTPUTS = ("conv5_block3_out", "conv4_block6_out", "conv3_block4_out", "conv2_block3_out")
# Layer names of the exported model: its front (gray -> the backbone's input) and the classifier's
# output (an ensemble's too).
FRONT_LAYERS = ("gray_to_rgb", "imagenet_caffe")
OUTPUT_LAYER = "pneumonia"
# An ensemble export's model (ensemble.py): member_0 .. member_<k-1>, each ending in its logit, averaged.
MEMBER_PREFIX = "member_"
MEAN_LAYER = "mean_logit"


def resolve_precision(train: TrainConfig) -> str:
    """The Keras dtype policy for `train.precision`; "auto" is bfloat16 on GPU, float32 on CPU."""
    if train.precision == "auto":
        return "mixed_bfloat16" if tf.config.list_physical_devices("GPU") else "float32"
    return {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[train.precision]


def resolve_xla(train: TrainConfig) -> bool:
    if train.xla == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return train.xla == "on"


def build_classifier(model: ModelConfig, image_size_px: int, policy: str = "float32") -> tf_keras.Model:
    """Normalised (H, W, 3) input -> P(PNEUMONIA), float32 whatever the compute precision.

    Call under the strategy's scope. The backbone starts frozen; `set_trainable` unfreezes it.
    """
    tf_keras.mixed_precision.set_global_policy(policy)
    try:
        with _local_weights(model.weights) as weights:
            backbone = tf_keras.applications.ResNet50(
                include_top=False, weights=weights, input_shape=(image_size_px, image_size_px, 3)
            )
        backbone._name = BACKBONE_NAME
        inputs = tf_keras.Input((image_size_px, image_size_px, 3), name="normalized_image")
        # Frozen BatchNorm runs in inference mode even while the layers above it train (see ModelConfig).
        x = backbone(inputs, training=None if model.train_batchnorm else False)
        x = tf_keras.layers.GlobalAveragePooling2D(name="pool")(x)
        # The Dropout layers compute in float32 under mixed precision too: their rate is a float32
        # variable (set_dropout_rate), which tf.nn.dropout refuses beside bfloat16/float16 inputs. The
        # cast of a (batch, 2048) tensor costs nothing next to the backbone.
        x = tf_keras.layers.Dropout(model.dropout, dtype="float32", name="dropout_pool")(x)
        regularizer = tf_keras.regularizers.L2(model.l2) if model.l2 else None
        x = tf_keras.layers.Dense(
            model.dense_units, activation="relu", kernel_regularizer=regularizer, name="dense"
        )(x)
        x = tf_keras.layers.Dropout(model.dropout, dtype="float32", name="dropout_dense")(x)
        # The probability stays float32 under mixed precision: a bfloat16 sigmoid saturates near 0 and 1.
        outputs = tf_keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=OUTPUT_LAYER)(x)
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    classifier = tf_keras.Model(inputs, outputs, name="pneumo_resnet50")
    if model.train_batchnorm:
        # Keras' 0.99 leaves the moving statistics mostly at their initial values for the first few
        # hundred steps, so a model trained from scratch scores near chance in inference mode (seen on
        # the demo data: validation AUC 0.71 at 0.99 vs 0.97 at 0.9 after 80 steps).
        for layer in backbone.layers:
            if isinstance(layer, tf_keras.layers.BatchNormalization):
                layer.momentum = BATCHNORM_MOMENTUM_FROM_SCRATCH
    set_trainable(classifier, 0, model.train_batchnorm)
    return classifier


def set_trainable(classifier: tf_keras.Model, unfreeze: int | str, train_batchnorm: bool = False) -> None:
    """Freeze the backbone but its last `unfreeze` layers ("all": every layer); the head always trains.
    BatchNorm layers stay frozen unless `train_batchnorm`."""
    backbone = classifier.get_layer(BACKBONE_NAME)
    backbone.trainable = True  # a frozen parent would override the per-layer flags below
    count = len(backbone.layers) if unfreeze == "all" else int(unfreeze)
    first_trainable = len(backbone.layers) - count
    for index, layer in enumerate(backbone.layers):
        is_batchnorm = isinstance(layer, tf_keras.layers.BatchNormalization)
        layer.trainable = index >= first_trainable and (train_batchnorm or not is_batchnorm)


def set_dropout_rate(classifier: tf_keras.Model, rate: tf.Variable | float) -> None:
    """Point the head's Dropout layers at `rate`. Keras' Dropout reads its `rate` when called, so a
    variable there is read when the traced step runs; set without Keras' attribute tracking, which
    would make it one of the model's weights. `saveable_rates` puts plain numbers back for saving."""
    for layer in classifier.layers:
        if isinstance(layer, tf_keras.layers.Dropout):
            object.__setattr__(layer, "rate", rate)


@contextlib.contextmanager
def saveable_rates(classifier: tf_keras.Model) -> Iterator[None]:
    """The Dropout layers' rates as numbers while the model is saved (a layer's config holds its rate)."""
    layers = [layer for layer in classifier.layers if isinstance(layer, tf_keras.layers.Dropout)]
    rates = [layer.rate for layer in layers]
    for layer, rate in zip(layers, rates, strict=True):
        object.__setattr__(layer, "rate", float(rate.numpy()) if isinstance(rate, tf.Variable) else rate)
    try:
        yield
    finally:
        for layer, rate in zip(layers, rates, strict=True):
            object.__setattr__(layer, "rate", rate)


def is_mixed_precision(classifier: tf_keras.Model) -> bool:
    """Whether the backbone computes in bfloat16/float16 (a train.precision other than float32)."""
    return classifier.get_layer(BACKBONE_NAME).compute_dtype != "float32"


def float32_copy(classifier: tf_keras.Model, model: ModelConfig) -> tf_keras.Model:
    """The same classifier computing in float32, with the same weights (under mixed precision the
    variables are float32 already): what is exported, whatever the training precision. Build it outside
    a distribution strategy's scope: it is a plain model."""
    size = classifier.input_shape[1]
    copy = build_classifier(dataclasses.replace(model, weights="none"), size, "float32")
    copy.set_weights(classifier.get_weights())
    return copy


def inference_model(classifier: tf_keras.Model) -> tf_keras.Model:
    """Gray (H, W, 1) pixels in 0..255 -> P(PNEUMONIA): the classifier behind the same normalisation as
    augment.model_inputs, built from stock Keras layers so that the saved model loads without our code."""
    gray, normalized = inference_front(classifier.input_shape[1])
    return tf_keras.Model(gray, classifier(normalized, training=False), name="pneumonia_detector")


def inference_front(size: int) -> tuple:
    """The exported model's input, gray (size, size, 1) pixels in 0..255, and the classifier's input
    made of it (augment.model_inputs' normalisation): one front for a model and for an ensemble."""
    gray = tf_keras.Input((size, size, 1), name="gray_0_255")
    rgb = tf_keras.layers.Concatenate(name=FRONT_LAYERS[0])([gray, gray, gray])
    normalized = tf_keras.layers.Rescaling(1.0, offset=[-m for m in BACKBONE_BGR_MEAN], name=FRONT_LAYERS[1])(
        rgb
    )
    return gray, normalized


def member_names(model: tf_keras.Model) -> list[str]:
    """The member layers of an ensemble's model, in order; [] for a single model."""
    return [layer.name for layer in model.layers if layer.name.startswith(MEMBER_PREFIX)]


def member_probe(model: tf_keras.Model) -> tf_keras.Model | None:
    """An ensemble's model -> one giving [P(PNEUMONIA), member logits (N, k)] in one forward pass, with the
    same layers and weights; None for a single model."""
    names = member_names(model)
    if not names:
        return None
    size = model.input_shape[1]
    gray = tf_keras.Input((size, size, 1))
    rgb = model.get_layer(FRONT_LAYERS[0])([gray, gray, gray])
    normalized = model.get_layer(FRONT_LAYERS[1])(rgb)
    logits = [model.get_layer(name)(normalized, training=False) for name in names]
    probability = model.get_layer(OUTPUT_LAYER)(model.get_layer(MEAN_LAYER)(logits))
    return tf_keras.Model(gray, [probability, tf_keras.layers.Concatenate()(logits)])


@contextlib.contextmanager
def _local_weights(weights: str) -> Iterator[str | None]:
    """Keras' `weights` argument: "imagenet", None, or a local file (a gs:// file is fetched into a
    temporary folder that lasts as long as the context)."""
    if weights == "none":
        yield None
    elif weights == "imagenet" or not storage.is_gcs(weights):
        if weights != "imagenet" and not os.path.exists(weights):
            raise storage.StorageNotFound(f"model.weights: no such file: {weights}")
        yield weights
    else:
        with tempfile.TemporaryDirectory(prefix="pneumo-weights-") as scratch:
            local = os.path.join(scratch, storage.basename(weights))
            storage.download(weights, local)
            yield local
