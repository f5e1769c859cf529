from pathlib import Path

import numpy as np
import pytest
import tf_keras

from pneumo_dist import explain
from pneumo_dist.predict import PneumoniaDetector


@pytest.fixture(scope="module")
def detector(trained) -> PneumoniaDetector:
    return PneumoniaDetector.load(str(Path(trained[2]) / "export"))


@pytest.fixture(scope="module")
def pixels(detector, learnable_shards) -> np.ndarray:
    folder = Path(learnable_shards).parent / "source" / "test"
    paths = sorted((folder / "PNEUMONIA").iterdir())[:3] + sorted((folder / "NORMAL").iterdir())[:3]
    return np.stack([detector.prepare(p) for p in paths])


def test_maps_have_the_images_size_and_are_normalised(detector, pixels):
    maps = explain.grad_cam(detector.model, pixels, class_index=1)
    assert maps.shape == pixels.shape[:3] and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    peaks = maps.reshape(len(maps), -1).max(axis=1)
    assert np.all((peaks == 0.0) | np.isclose(peaks, 1.0))  # 1 at the strongest evidence, or no evidence
    assert np.any(np.isclose(peaks, 1.0))


def test_maps_differ_between_the_classes_and_locate_something(detector, pixels):
    pneumonia = explain.grad_cam(detector.model, pixels, class_index=1)
    normal = explain.grad_cam(detector.model, pixels, class_index=0)
    assert np.abs(pneumonia - normal).mean() > 0.05
    # Not a constant map: at 32 px the map comes from an 8 x 8 stage, not the 1 x 1 last block.
    assert all(m.std() > 0.01 for m in (*pneumonia, *normal) if m.max() > 0)


def test_the_map_layer_keeps_at_least_seven_cells(detector):
    backbone = detector.model.layers[-1].get_layer("resnet50")
    assert explain.map_layer(backbone).name == "conv2_block3_out"  # 8 x 8 at 32 px
    full = tf_keras.applications.ResNet50(include_top=False, weights=None, input_shape=(224, 224, 3))
    assert explain.map_layer(full).name == "conv5_block3_out"  # 7 x 7, as in the Grad-CAM paper


def test_a_model_not_exported_by_us_is_refused():
    inputs = tf_keras.Input((32, 32, 1))
    other = tf_keras.Model(inputs, tf_keras.layers.Dense(1)(tf_keras.layers.Flatten()(inputs)))
    with pytest.raises(explain.NotExplainable, match="not a pneumo-dist export"):
        explain.grad_cam(other, np.zeros((1, 32, 32, 1), np.uint8), class_index=1)
