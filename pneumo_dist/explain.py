"""Grad-CAM (Selvaraju et al., 2017) on an exported model: where in the image the evidence for a class is.

The class score is the pre-sigmoid logit (the sigmoid's flat ends would leave confident images with no
gradient). The map comes from the deepest ResNet50 stage that still has at least 7 x 7 cells: the last
block at 224 px, as in the paper; at the small sizes of debug runs the last block is 1 x 1 (32 px) or
2 x 2 (64 px), which would locate nothing, so an earlier stage is used there.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras

from pneumo_dist.errors import PneumoDistError
from pneumo_dist.model import BACKBONE_NAME, BACKBONE_STAGE_OUTPUTS, FRONT_LAYERS, OUTPUT_LAYER

MIN_MAP_CELLS = 7


class NotExplainable(PneumoDistError):
    """The model is not laid out as pneumo-dist exports it, so Grad-CAM cannot find its layers."""


def grad_cam(model: tf_keras.Model, pixels: np.ndarray, class_index: int) -> np.ndarray:
    """uint8 (N, S, S, 1) prepared pixels -> float32 (N, S, S) maps in [0, 1], 1 at each image's
    strongest evidence for `class_index` (0 NORMAL, 1 PNEUMONIA); all zero where there is none. For an
    ensemble (ensemble.py), the sum of its members' maps of their mean logit."""
    members = _layers(model)  # refuses a model laid out otherwise, before using its layers
    gray = tf.cast(tf.convert_to_tensor(pixels), tf.float32)
    rgb = model.get_layer(FRONT_LAYERS[0])([gray, gray, gray])
    normalized = model.get_layer(FRONT_LAYERS[1])(rgb)
    maps = 0.0
    for backbone, head, output in members:
        stage = map_layer(backbone)
        probe = tf_keras.Model(backbone.inputs, [stage.output, backbone.output])
        with tf.GradientTape() as tape:
            features, x = probe(normalized, training=False)
            for layer in head:
                x = layer(x, training=False)
            logit = tf.matmul(tf.cast(x, tf.float32), output.kernel)[:, 0] + output.bias[0]
            score = (logit if class_index == 1 else -logit) / len(members)
        gradients = tf.cast(tape.gradient(score, features), tf.float32)
        features = tf.cast(features, tf.float32)
        weights = tf.reduce_mean(gradients, axis=[1, 2], keepdims=True)  # one weight per channel
        member_map = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1, keepdims=True))
        maps += tf.image.resize(member_map, tf.shape(gray)[1:3], method="bilinear")[..., 0]
    peak = tf.reduce_max(maps, axis=[1, 2], keepdims=True)
    return tf.math.divide_no_nan(maps, peak).numpy().astype(np.float32)


def map_layer(backbone: tf_keras.Model) -> tf_keras.layers.Layer:
    """The deepest stage output with at least MIN_MAP_CELLS x MIN_MAP_CELLS cells (else the shallowest)."""
    for name in BACKBONE_STAGE_OUTPUTS:
        layer = backbone.get_layer(name)
        if layer.output.shape[1] >= MIN_MAP_CELLS:
            return layer
    return layer


def _layers(model: tf_keras.Model) -> list[tuple]:
    """-> (backbone, head layers between backbone and output, output Dense layer) of each classifier
    in the model: one, or an ensemble's members."""
    try:
        for name in FRONT_LAYERS:
            model.get_layer(name)
        classifiers = [layer for layer in model.layers if isinstance(layer, tf_keras.Model)]
        found = [(c, c.get_layer(BACKBONE_NAME), c.get_layer(OUTPUT_LAYER)) for c in classifiers]
        if not found:
            raise ValueError("no classifier")
    except ValueError:
        raise NotExplainable(
            f"model {model.name!r} is not a pneumo-dist export (expected layers {FRONT_LAYERS}, a "
            f"classifier with {BACKBONE_NAME!r} and {OUTPUT_LAYER!r})"
        ) from None
    members = []
    for classifier, backbone, output in found:
        layers = classifier.layers
        members.append((backbone, layers[layers.index(backbone) + 1 : layers.index(output)], output))
    return members
