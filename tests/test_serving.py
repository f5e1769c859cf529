"""The serving export (saved_model/): what TF Serving and Vertex AI run, without pneumo-dist's code."""

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from PIL import Image

from pneumo_dist import decode, images, metrics, serving
from pneumo_dist import export as export_lib
from pneumo_dist.predict import PneumoniaDetector

from .conftest import REPO

# Run in a fresh process: tf.saved_model.load and the signature, nothing of pneumo-dist imported.
SERVE = """
import base64, json, sys
import tensorflow as tf
request = json.load(sys.stdin)
signature = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
# TF Serving's REST predict API: {"instances": [{"b64": ...}, ...]} for the one tf.string input; a
# {"b64": ...} value is base64-decoded into the tensor's bytes; the answer is {"predictions": rows}.
batch = tf.constant([base64.b64decode(instance["b64"]) for instance in request["instances"]])
outputs = {name: value.numpy().tolist() for name, value in signature(image_bytes=batch).items()}
rows = [{name: outputs[name][i] for name in outputs} for i in range(len(batch))]
print(json.dumps({"predictions": rows}, default=lambda b: b.decode()))
"""


@pytest.fixture(scope="module")
def export(trained) -> str:
    return str(Path(trained[2]) / "export")


def serve(saved_model: str, files: list[Path]) -> list[dict]:
    request = {"instances": [{"b64": base64.b64encode(f.read_bytes()).decode()} for f in files]}
    result = subprocess.run(
        [sys.executable, "-c", SERVE, saved_model],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        cwd=REPO.parent,  # not the repository: pneumo_dist cannot be imported by accident
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)["predictions"]


def test_the_saved_model_serves_what_the_detector_predicts_in_a_fresh_process(export, learnable_shards):
    detector = PneumoniaDetector.load(export)
    assert detector.info.serving_model == serving.FOLDER and serving.FOLDER in detector.info.files
    source = Path(learnable_shards).parent / "source" / "test"
    files = sorted(source.glob("*/*.jpeg"))
    rows = serve(str(Path(export) / serving.FOLDER), files)
    expected = detector.predict_batch(files)
    served = np.array([row["probability"] for row in rows])
    ours = np.array([p.probability for p in expected])
    np.testing.assert_allclose(served, ours, rtol=0, atol=1e-4)  # the goal was 0.01; pixels are exact
    assert [row["label"] for row in rows] == [p.label for p in expected]
    assert {row["model_version"] for row in rows} == {detector.version}
    assert all(row["threshold"] == pytest.approx(detector.threshold) for row in rows)
    labels = np.array([f.parent.name == "PNEUMONIA" for f in files])
    auc_served, auc_ours = (
        metrics.binary_metrics(labels, served)["auc"],
        metrics.binary_metrics(labels, ours)["auc"],
    )
    assert abs(auc_served - auc_ours) <= 0.002 and len(set(np.round(ours, 4))) > 10


def test_the_saved_model_serves_the_shared_kaggle_images_as_the_detector(export, shared_kaggle_train):
    detector = PneumoniaDetector.load(export)
    files = sorted(shared_kaggle_train.glob("train/*/*.jpeg"))[::97][:40]
    rows = serve(str(Path(export) / serving.FOLDER), files)
    ours = [p.probability for p in detector.predict_batch(files)]
    np.testing.assert_allclose([row["probability"] for row in rows], ours, rtol=0, atol=1e-4)


def gray_model(size: int) -> tf_keras.Model:
    """A stand-in for ResNet50 where only the preparation is under test."""
    pixels = tf_keras.Input((size, size, 1))
    return tf_keras.Model(
        pixels, tf_keras.layers.Dense(1, activation="sigmoid")(tf_keras.layers.Flatten()(pixels))
    )


def export_info(
    stored_size_px: int, image_format: str, equalize: str = "none", border_crop: float = 0.0
) -> export_lib.ExportInfo:
    """An export's info for a 32 px model whose records were stored (and are read) as given."""
    preprocessing = export_lib.Preprocessing(
        image_size_px=32,
        stored_size_px=stored_size_px,
        image_format=image_format,
        jpeg_quality=95,
        equalize=equalize,
        border_crop=border_crop,
    )
    return export_lib.ExportInfo(
        files=[],
        model="model.keras",
        threshold=0.5,
        target_sensitivity=None,
        preprocessing=preprocessing,
        created_utc="",
    )


def encoded(image: Image.Image, image_format: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=image_format, **options)
    return out.getvalue()


def sources() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    gradient = np.add.outer(np.arange(300), np.arange(220)) % 256
    gray = Image.fromarray((gradient ^ rng.integers(0, 40, gradient.shape)).astype(np.uint8))
    rgb = Image.merge("RGB", [gray, gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gray.rotate(7)])
    sixteen = Image.fromarray((np.asarray(gray).astype(np.uint16) * 9 + 300).astype(np.uint16))
    return {
        "gray jpeg": encoded(gray, "JPEG", quality=90),
        "rgb jpeg": encoded(rgb, "JPEG"),
        "large jpeg (decoded at 1/8)": encoded(rgb.resize((2400, 1900)), "JPEG"),
        "small jpeg (enlarged)": encoded(gray.resize((40, 50)), "JPEG"),
        "gray png": encoded(gray, "PNG"),
        "rgb png": encoded(rgb, "PNG"),
        "rgba png": encoded(rgb.convert("RGBA"), "PNG"),
        "palette png": encoded(rgb.convert("P"), "PNG"),
        "16-bit gray png": encoded(sixteen, "PNG"),
        "stored size png": encoded(gray.resize((64, 64)), "PNG"),
    }


@pytest.mark.parametrize("image_format", ["jpeg", "png"])
@pytest.mark.parametrize("equalize, border_crop", [("none", 0.0), ("histogram", 0.1)])
def test_the_graph_prepares_every_image_kind_to_the_pixels_of_its_record(image_format, equalize, border_crop):
    info = export_info(64, image_format, equalize, border_crop)
    module = serving.ServingModel(gray_model(32), info, "v", 0.5)
    for name, content in sources().items():
        stored, _ = images.to_stored_image(content, 64, image_format, 95)
        record = {"encoded": stored, "label": 0}
        expected = decode.parse_record(record, 64, False, equalize, border_crop)["image"].numpy()
        assert expected.shape == (64 - 2 * round(64 * border_crop),) * 2 + (1,)
        np.testing.assert_array_equal(
            module._read_pixels(tf.constant(content)).numpy(), expected, err_msg=name
        )


def test_a_file_that_is_not_an_image_fails_the_request_naming_why(tmp_path):
    serving.save(gray_model(32), export_info(32, "jpeg"), "v", 0.5, str(tmp_path / "saved_model"))
    signature = tf.saved_model.load(str(tmp_path / "saved_model")).signatures["serving_default"]
    good = sources()["gray jpeg"]
    assert signature(image_bytes=tf.constant([good]))["label"].shape == (1,)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG or PNG"):
        signature(image_bytes=tf.constant([good, b"%PDF-1.4 not an x-ray"]))


def test_an_image_with_a_side_too_long_is_refused_by_the_signature_and_the_detector_alike():
    """A 2 KB PNG of 1 x 999,999 px (within max_pixels) took the signature to 2.9 GiB and 8 s before
    2026-12-02: Lanczos weights of 256 x 999,999 float64 per pass."""
    needle = encoded(Image.new("L", (999_999, 1)), "PNG")
    assert len(needle) < 4096
    module = serving.ServingModel(gray_model(32), export_info(64, "png"), "v", 0.5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="a side longer than"):
        module._read_pixels(tf.constant(needle))
    with pytest.raises(images.BadImage, match="999999x1 px: a side longer than 16,384 px"):
        images.decode_grayscale(needle)
    # The longest side accepted still serves.
    edge = encoded(Image.new("L", (images.MAX_SIDE_PX, 2)), "PNG")
    assert module._read_pixels(tf.constant(edge)).shape == (64, 64, 1)
