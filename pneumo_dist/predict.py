"""PneumoniaDetector: an exported model plus exactly the preprocessing it was trained with.

    detector = PneumoniaDetector.load("gs://bucket/runs/kaggle/export")
    detector.predict("patient1.jpeg")  # -> Prediction(label="PNEUMONIA", probability=0.97, ...)

An image goes the way a training record went: images.to_stored_image (as make_shards stored it), then
decode.decode_image, decode.read_pixels and decode.resize_images (as the input pipeline read it);
the exported model holds the normalisation. The evaluator scores shards through the same
`probabilities`, so both give one number.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras
from PIL import Image

from pneumo_dist import decode, images, schema, storage
from pneumo_dist import export as export_lib
from pneumo_dist import model as model_lib
from pneumo_dist.augment import augment_batch
from pneumo_dist.config import AugmentConfig

MODEL_SUFFIX = ".keras"  # the only model format loaded: the HDF5 and SavedModel loaders can run code
# Modules a saved model's layers may come from: Keras' own. tf-keras would import any module a config
# names (safe_mode only stops Lambda layers), so a model naming another one is refused before loading.
_KERAS_MODULES = ("keras", "tf_keras", "builtins")
# Test-time augmentation: small geometric changes a radiograph plausibly has (positioning), no
# photometric ones and no flip (laterality matters, see AugmentConfig.horizontal_flip). Named by what it
# keeps: every other augmentation is off, those added later included.
TTA_KEEPS = {"rotation_deg": 5.0, "zoom": 0.05, "shift": 0.03}


def tta_augment(config_class: type = AugmentConfig) -> AugmentConfig:
    """The augmentation of TTA views: TTA_KEEPS, and every other field of `config_class` off (False
    or 0) whatever its default."""
    off = {
        field.name: field.name == "enabled" if isinstance(field.default, bool) else type(field.default)(0)
        for field in dataclasses.fields(config_class)
    }
    return config_class(**(off | TTA_KEEPS))


TTA_AUGMENT = tta_augment()


# The model URI does not hold a usable pneumo-dist export; the message says what is wrong.
DetectorError = export_lib.ExportError


@dataclass(frozen=True)
class Prediction:
    label: str | None  # one of schema.CLASS_NAMES; None for an input that could not be read
    probability: float | None  # P(PNEUMONIA); None for an input that could not be read
    threshold: float  # PNEUMONIA when probability >= threshold
    model_version: str
    source: str  # the path, or a description of an in-memory input
    error: str | None = None  # why the input could not be read (predict_batch with bad_inputs="report")


# What a caller may hand to predict: a path or gs:// URI, encoded bytes, a PIL image or a uint8 array.
ImageInput = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray


class PneumoniaDetector:
    def __init__(
        self,
        model: tf_keras.Model,
        info: export_lib.ExportInfo,
        uri: str,
        version: str,
        threshold: float,
        policy: str | None = None,
        operating_points: dict[str, float] | None = None,
    ):
        self.model = model
        self.info = info
        self.uri = uri
        self.version = version
        self.threshold = threshold
        # The threshold policy that chose `threshold` on the validation split; None: given by the caller.
        self.policy = policy
        self.threshold_source = "given" if policy is None else "validation"
        # Every policy's threshold chosen on validation (evaluate.py reports the figures at each).
        self.operating_points = dict(info.operating_points if operating_points is None else operating_points)
        # Applied to every probability returned (None: the probabilities as the model gives them).
        self.calibration = info.calibration
        preprocessing = info.preprocessing
        self.image_size_px = preprocessing.image_size_px
        self.stored_size_px = preprocessing.stored_size_px
        self.image_format = preprocessing.image_format
        self.jpeg_quality = preprocessing.jpeg_quality or images.DEFAULT_JPEG_QUALITY
        self._forward = tf.function(lambda x: self.model(x, training=False)[:, 0], reduce_retracing=True)
        self._probe = None  # an ensemble's members' scores (probabilities_and_members), built when asked

    @classmethod
    def load(
        cls,
        uri: str,
        threshold: float | None = None,
        policy: str | None = None,
        prevalence: float | None = None,
    ) -> PneumoniaDetector:
        """Load an export folder (local or gs://; also its export.json or model.keras path). The
        threshold is the export's operating threshold, unless given here, or another policy's chosen on
        the validation split (`policy`: sensitivity, youden, or prevalence with the deployment's
        `prevalence` of PNEUMONIA, which needs an export with calibrated probabilities)."""
        folder = export_lib.folder_of(uri)
        info = export_lib.read(folder)
        threshold, policy = operating_point(info, threshold, policy, prevalence)
        points = dict(info.operating_points)
        if prevalence is not None:
            points["prevalence"] = threshold  # for this deployment's prevalence, not the export's
        model_uri = info.model_uri(folder)
        if not info.model.endswith(MODEL_SUFFIX):
            raise DetectorError(
                f"{storage.join(folder, export_lib.INFO_NAME)} names the model {info.model!r}: only "
                f"{MODEL_SUFFIX} models are loaded (other Keras formats can run code when loaded)"
            )
        with tempfile.TemporaryDirectory(prefix="pneumo-model-") as scratch:
            local = model_uri
            if storage.is_gcs(model_uri):
                local = os.path.join(scratch, "model" + MODEL_SUFFIX)
                try:
                    storage.download(model_uri, local)
                except storage.StorageNotFound:
                    raise DetectorError(f"{model_uri} is missing: the export is incomplete") from None
            elif not os.path.isfile(local):
                raise DetectorError(f"{model_uri} is missing: the export is incomplete")
            version = export_lib.model_version(local)
            _refuse_unsafe_model(local, model_uri)
            try:
                model = tf_keras.models.load_model(local, compile=False, safe_mode=True)
            except Exception as error:  # Keras raises many types for a damaged archive
                raise DetectorError(f"{model_uri} could not be loaded as a Keras model: {error}") from None
        return cls(model, info, folder, version, threshold, policy, points)

    # --- preprocessing -----------------------------------------------------------------------------

    def prepare(self, image: ImageInput) -> np.ndarray:
        """One input -> uint8 (image_size_px, image_size_px, 1), the pixels a training record of it
        would have had. Raises images.BadImage naming the input."""
        name = describe(image)
        try:
            stored = self._stored_bytes(image)
        except images.BadImage as error:
            raise images.BadImage(f"{name}: {error}") from None
        return stored_to_pixels(stored, self.info.preprocessing)

    def _stored_bytes(self, image: ImageInput) -> bytes:
        stored = (self.stored_size_px, self.image_format, self.jpeg_quality)
        if isinstance(image, (str, os.PathLike)):
            return images.to_stored_image(images.read_file(os.fspath(image)), *stored)[0]
        if isinstance(image, (bytes, bytearray, memoryview)):
            return images.to_stored_image(bytes(image), *stored)[0]
        if isinstance(image, Image.Image):
            return images.pil_to_stored_image(image, *stored)
        if isinstance(image, np.ndarray):
            return images.array_to_stored_image(image, *stored)
        raise images.BadImage(
            f"cannot read a {type(image).__name__}: give a path, bytes, a PIL image or a uint8 array"
        )

    # --- scoring ------------------------------------------------------------------------------------

    def probabilities(
        self, pixels: np.ndarray | tf.Tensor, tta_views: int = 1, calibrated: bool = True
    ) -> np.ndarray:
        """uint8 (N, S, S, 1) prepared pixels -> P(PNEUMONIA) per image. With tta_views > 1, the mean
        over the image and tta_views - 1 fixed random TTA_AUGMENT variants of it. `calibrated`: through
        the export's calibration (False: as the model gives them, for comparing calibrations)."""
        check_tta_views(tta_views)
        pixels = tf.convert_to_tensor(pixels, tf.uint8)
        total = self._forward(tf.cast(pixels, tf.float32))
        for view in range(1, tta_views):
            seed = tf.constant([view, 0], tf.int64)  # the same variants on every call: reproducible
            total += self._forward(augment_batch(pixels, TTA_AUGMENT, seed) * 255.0)
        probabilities = (total / tta_views).numpy().astype(np.float64)
        return self.calibration.apply(probabilities) if self.calibration and calibrated else probabilities

    def probabilities_and_members(
        self, pixels: np.ndarray | tf.Tensor
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """probabilities(pixels), and for an ensemble export each member's own P(PNEUMONIA) (N, k) from
        the same forward pass, uncalibrated (a member's calibration was fitted for it alone); None for
        one model."""
        if not self.info.members:
            return self.probabilities(pixels), None
        if self._probe is None:
            probe = model_lib.member_probe(self.model)
            self._probe = tf.function(lambda x: probe(x, training=False), reduce_retracing=True)
        probability, logits = self._probe(tf.cast(tf.convert_to_tensor(pixels, tf.uint8), tf.float32))
        probabilities = probability.numpy()[:, 0].astype(np.float64)
        if self.calibration:
            probabilities = self.calibration.apply(probabilities)
        return probabilities, tf.sigmoid(logits).numpy().astype(np.float64)

    def predict(self, image: ImageInput, tta_views: int = 1) -> Prediction:
        return self.predict_batch([image], tta_views=tta_views)[0]

    def predict_batch(
        self,
        inputs: Iterable[ImageInput],
        batch_size: int = 32,
        tta_views: int = 1,
        bad_inputs: str = "raise",
    ) -> list[Prediction]:
        """Many inputs, scored batch_size at a time, one Prediction each, in order. A bad input raises
        images.BadImage; with bad_inputs="report" it gets a Prediction with `error` set (no label or
        probability) and the others are scored."""
        if bad_inputs not in ("raise", "report"):
            raise ValueError(f'bad_inputs must be "raise" or "report", got {bad_inputs!r}')
        check_tta_views(tta_views)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        predictions: list[Prediction] = []
        for chunk in _chunks(list(inputs), batch_size):
            prepared, errors = [], {}
            for index, image in enumerate(chunk):
                try:
                    prepared.append(self.prepare(image))
                except images.BadImage as error:
                    if bad_inputs == "raise":
                        raise
                    errors[index] = str(error)
            scores = iter(self.probabilities(np.stack(prepared), tta_views) if prepared else [])
            for index, image in enumerate(chunk):
                if index in errors:
                    source = describe(image)
                    predictions.append(
                        Prediction(None, None, self.threshold, self.version, source, errors[index])
                    )
                else:
                    predictions.append(self.prediction(float(next(scores)), describe(image)))
        return predictions

    def prediction(self, probability: float, source: str) -> Prediction:
        label = schema.CLASS_NAMES[1] if probability >= self.threshold else schema.CLASS_NAMES[0]
        return Prediction(label, probability, self.threshold, self.version, source)


def stored_to_pixels(stored: bytes, preprocessing: export_lib.Preprocessing) -> np.ndarray:
    """A stored-format image -> uint8 (image_size_px, image_size_px, 1), as the input pipeline reads it."""
    pixels = decode.decode_image(tf.constant(stored), preprocessing.stored_size_px)
    pixels = decode.read_pixels(pixels, preprocessing.equalize, preprocessing.border_crop)
    read_px = decode.read_size(preprocessing.stored_size_px, preprocessing.border_crop)
    return decode.resize_images(pixels, read_px, preprocessing.image_size_px).numpy()


def operating_point(
    info: export_lib.ExportInfo, threshold: float | None, policy: str | None, prevalence: float | None
) -> tuple[float, str | None]:
    """(threshold, the policy that chose it, None when given) for PneumoniaDetector.load."""
    if threshold is not None:
        if policy is not None or prevalence is not None:
            raise DetectorError("give a threshold, or a policy (and prevalence), not both")
        if not 0.0 <= float(threshold) <= 1.0:
            raise DetectorError(f"threshold must be in 0..1, got {threshold}")
        return float(threshold), None
    if prevalence is not None:
        if policy not in (None, "prevalence"):
            raise DetectorError(f"a prevalence chooses the prevalence policy's threshold, not {policy}'s")
        return info.threshold_for_prevalence(float(prevalence)), "prevalence"
    if policy is None:
        return info.threshold, info.threshold_policy
    if policy not in info.operating_points:
        hint = "; give the deployment's prevalence" if policy == "prevalence" else ""
        have = ", ".join(sorted(info.operating_points)) or "none: exported by an older pneumo-dist"
        raise DetectorError(f"the export has no {policy} threshold (it has {have}){hint}")
    return info.operating_points[policy], policy


def check_tta_views(tta_views: int) -> None:
    """The image itself counts as one view: 0 views would divide by zero (probability inf)."""
    if isinstance(tta_views, bool) or not isinstance(tta_views, int) or tta_views < 1:
        raise ValueError(f"tta_views must be an integer >= 1 (1: the image alone), got {tta_views!r}")


def describe(image: ImageInput) -> str:
    """How a Prediction and an error name an input."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, np.ndarray):
        return f"<array {image.dtype} {image.shape}>"
    if isinstance(image, Image.Image):
        return f"<PIL image {image.mode} {image.size[0]}x{image.size[1]}>"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<{len(image)} bytes>"
    return f"<{type(image).__name__}>"


def _refuse_unsafe_model(local: str, model_uri: str) -> None:
    """Read the .keras archive's config.json and refuse Lambda layers and objects from modules other
    than Keras' own, before Keras deserializes anything."""
    try:
        with zipfile.ZipFile(local) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DetectorError(f"{model_uri} could not be loaded as a Keras model: {error}") from None
    pending = [config]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            module = item.get("module")
            if isinstance(module, str) and module.split(".")[0] not in _KERAS_MODULES:
                raise DetectorError(
                    f"{model_uri} refers to code outside Keras ({module}.{item.get('class_name')}); "
                    "refusing to load it"
                )
            if item.get("class_name") == "Lambda":
                raise DetectorError(f"{model_uri} holds a Lambda layer (Python code); refusing to load it")
            pending.extend(item.values())


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
