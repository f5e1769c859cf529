"""The serving export: EXPORT/saved_model/, a TensorFlow SavedModel that TF Serving and Vertex AI's
prebuilt TensorFlow containers run without pneumo-dist's code.

Its `serving_default` signature takes a batch of encoded JPEG or PNG files (`image_bytes`, tf.string)
and returns P(PNEUMONIA) (calibrated as PneumoniaDetector's), the label at the export's operating
threshold and the model version. Everything PneumoniaDetector does to an image is in the graph:

  source bytes -> 8-bit gray (images.decode_grayscale) -> stored size (images.resize_square) -> the
  stored format (JPEG at the manifest's quality, or PNG) -> decode.decode_image -> decode.read_pixels
  (border cut, equalisation) -> decode.resize_images

Where the graph differs from Pillow (PneumoniaDetector's way), and why it does not matter:
- Resizing to the stored size is Pillow's Lanczos in the graph (pillow_lanczos), to the bit; libjpeg
  encodes the stored JPEG for both (the files differ in their header only).
- JPEG decoding uses libjpeg's accurate integer IDCT, scaled by 1/2, 1/4 or 1/8 as Pillow's draft
  mode does; an EXIF orientation tag is ignored (Pillow applies it; radiographs rarely carry one).
- RGB and palette images become gray by Pillow's own integer luma (ITU-R 601); 16-bit gray PNGs are
  stretched from their own min..max to 0..255, as images.py does; other 16-bit PNGs keep their high
  byte. A 16-bit gray PNG with alpha is read as 8-bit.
Measured: tests/test_serving.py (per-image and AUC agreement with PneumoniaDetector).

A request whose batch holds an unreadable image fails as a whole (TF Serving answers it with an error
naming the check); send one image per request where inputs are untrusted.
"""

from __future__ import annotations

import math
import os
import tempfile

import tensorflow as tf
import tf_keras

from pneumo_dist import decode, images, storage
from pneumo_dist import export as export_lib

FOLDER = "saved_model"
INPUT_NAME = "image_bytes"  # Vertex AI and TF Serving's REST API decode {"b64": ...} into a "_bytes" input
_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG_SCALES = (1, 2, 4, 8)  # libjpeg's DCT scaling, as Pillow's Image.draft picks it
_PRECISION_BITS = 22  # Pillow's fixed point for 8-bit resampling (32 - 8 - 2)


class ServingModel(tf.Module):
    """The exported Keras model behind the graph version of PneumoniaDetector.prepare."""

    def __init__(self, model: tf_keras.Model, info: export_lib.ExportInfo, version: str, threshold: float):
        super().__init__(name="pneumonia_serving")
        # The weights are tracked (saved); the Keras model is not: tf.saved_model.save would otherwise
        # write Keras' own metadata and trace every layer's call, minutes for ResNet50.
        self.weights = list(model.variables)
        self._forward = lambda pixels: model(pixels, training=False)[:, 0]
        preprocessing = info.preprocessing
        self._image_size = preprocessing.image_size_px
        self._stored_size = preprocessing.stored_size_px
        self._format = preprocessing.image_format
        self._quality = preprocessing.jpeg_quality or images.DEFAULT_JPEG_QUALITY
        self._equalize, self._border_crop = preprocessing.equalize, preprocessing.border_crop
        self._calibration = info.calibration
        self._threshold = float(threshold)
        self._version = version

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_NAME)])
    def serve(self, image_bytes):
        size = decode.read_size(self._stored_size, self._border_crop)
        # One image at a time: a request's memory is one image's decoding and resizing (README), not
        # map_fn's default of 10 in parallel.
        read = tf.map_fn(
            self._read_pixels,
            image_bytes,
            fn_output_signature=tf.TensorSpec([size, size, 1], tf.uint8),
            parallel_iterations=1,
        )
        pixels = decode.resize_images(read, size, self._image_size)
        probability = self._forward(tf.cast(pixels, tf.float32))
        if self._calibration is not None:
            p = tf.clip_by_value(tf.cast(probability, tf.float64), *export_lib.APPLY_RANGE)
            z = self._calibration.slope * (tf.math.log(p) - tf.math.log1p(-p)) + self._calibration.intercept
            probability = tf.cast(tf.sigmoid(z), tf.float32)
        positive = probability >= self._threshold
        return {
            "probability": probability,
            "label": tf.where(positive, tf.constant("PNEUMONIA"), tf.constant("NORMAL")),
            "threshold": tf.fill(tf.shape(probability), self._threshold),
            "model_version": tf.fill(tf.shape(probability), self._version),
        }

    def _read_pixels(self, encoded):
        """One source file -> uint8 (read, read, 1): the pixels of its record, as training read them."""
        gray = _decode_gray(encoded, self._stored_size)
        size = self._stored_size
        resized = tf.cond(
            tf.reduce_all(tf.shape(gray)[:2] == size), lambda: gray, lambda: pillow_lanczos(gray, size)
        )
        resized = tf.ensure_shape(resized, [size, size, 1])
        if self._format != "png":  # (a PNG is lossless: decoding it again gives these pixels)
            resized = decode.decode_image(tf.io.encode_jpeg(resized, quality=self._quality), size)
        return decode.read_pixels(resized, self._equalize, self._border_crop)


def pillow_lanczos(gray, size: int):
    """uint8 (H, W, 1) -> (size, size, 1) as Pillow's Image.resize(LANCZOS) computes it, to the bit:
    its filter weights (libImaging/Resample.c precompute_coeffs) in 22-bit fixed point, the horizontal
    pass first, each pass rounded and clipped to 8 bits. float64 sums of integers < 2**53 are exact."""
    height, width = tf.shape(gray)[0], tf.shape(gray)[1]
    pixels = tf.cast(gray[..., 0], tf.float64)
    rows = _clip8(tf.matmul(pixels, _pillow_coefficients(width, size), transpose_b=True))
    return tf.cast(_clip8(tf.matmul(_pillow_coefficients(height, size), rows)), tf.uint8)[..., None]


def _pillow_coefficients(in_size, out_size: int):
    """(out_size, in_size) Lanczos-3 weights of Pillow's resize, as 22-bit fixed-point integers."""
    scale = tf.cast(in_size, tf.float64) / out_size
    filter_scale = tf.maximum(scale, 1.0)
    support = 3.0 * filter_scale
    center = (tf.range(out_size, dtype=tf.float64) + 0.5) * scale
    low = tf.maximum(tf.floor(center - support + 0.5), 0.0)[:, None]
    high = tf.minimum(tf.floor(center + support + 0.5), tf.cast(in_size, tf.float64))[:, None]
    x = tf.range(in_size, dtype=tf.float64)[None, :]
    weights = _lanczos((x - center[:, None] + 0.5) * (1.0 / filter_scale))
    weights = tf.where((x >= low) & (x < high), weights, tf.constant(0.0, tf.float64))
    total = tf.reduce_sum(weights, axis=1, keepdims=True)
    weights = tf.math.divide_no_nan(weights, total) * 2.0**_PRECISION_BITS
    return tf.where(weights < 0, tf.math.ceil(weights - 0.5), tf.floor(weights + 0.5))  # C's (int) cast


def _lanczos(x):
    one, zero = tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)

    def sinc(t):
        t = t * math.pi
        return tf.where(t == 0.0, one, tf.sin(t) / tf.where(t == 0.0, one, t))

    return tf.where((x >= -3.0) & (x < 3.0), sinc(x) * sinc(x / 3.0), zero)


def _clip8(sums):
    return tf.clip_by_value(
        tf.floor((sums + 2.0 ** (_PRECISION_BITS - 1)) / 2.0**_PRECISION_BITS), 0.0, 255.0
    )


def _decode_gray(encoded, draft_px: int):
    """images.decode_grayscale in the graph: a JPEG or PNG -> uint8 (H, W, 1)."""
    is_jpeg = tf.strings.substr(encoded, 0, len(_JPEG)) == _JPEG
    is_png = tf.strings.substr(encoded, 0, len(_PNG)) == _PNG
    check = tf.debugging.Assert(is_jpeg | is_png, ["not a JPEG or PNG file"])
    with tf.control_dependencies([check]):
        return tf.cond(is_jpeg, lambda: _decode_jpeg(encoded, draft_px), lambda: _decode_png(encoded))


def _check_pixels(height, width):
    """images.decode_grayscale's limits: pixels, and the longest side (which bounds pillow_lanczos's
    weights to out x MAX_SIDE_PX)."""
    pixels = tf.cast(height, tf.int64) * tf.cast(width, tf.int64)
    longest = tf.maximum(height, width)
    return tf.debugging.Assert(
        (pixels <= images.DEFAULT_MAX_PIXELS) & (longest <= images.MAX_SIDE_PX),
        [
            "image refused: more pixels than",
            images.DEFAULT_MAX_PIXELS,
            "or a side longer than",
            images.MAX_SIDE_PX,
            height,
            width,
        ],
    )


def _decode_jpeg(encoded, draft_px: int):
    shape = tf.io.extract_jpeg_shape(encoded)
    height, width = shape[0], shape[1]
    # Pillow's draft: the largest of 8, 4, 2, 1 that keeps both sides at least draft_px.
    scale = tf.minimum(width // draft_px, height // draft_px)
    index = tf.reduce_sum(tf.cast(scale >= tf.constant(_JPEG_SCALES[1:], tf.int32), tf.int32))

    def decode(ratio):
        return lambda: tf.io.decode_jpeg(encoded, channels=1, ratio=ratio, dct_method="INTEGER_ACCURATE")

    with tf.control_dependencies([_check_pixels(height, width)]):
        gray = tf.switch_case(index, [decode(ratio) for ratio in _JPEG_SCALES])
    return tf.ensure_shape(gray, [None, None, 1])


def _decode_png(encoded):
    header = tf.io.decode_raw(tf.strings.substr(encoded, 16, 10), tf.uint8)  # IHDR: width, height, ...
    big_endian = tf.cast(header[:8], tf.int64)
    width = big_endian[0] * 2**24 + big_endian[1] * 2**16 + big_endian[2] * 2**8 + big_endian[3]
    height = big_endian[4] * 2**24 + big_endian[5] * 2**16 + big_endian[6] * 2**8 + big_endian[7]
    bit_depth, color_type = header[8], header[9]
    sixteen_bit_gray = (bit_depth == 16) & (color_type == 0)

    def stretched():  # images._stretch_to_uint8: the image's own min..max onto 0..255
        pixels = tf.cast(tf.io.decode_png(encoded, channels=1, dtype=tf.uint16), tf.float32)
        low, high = tf.reduce_min(pixels), tf.reduce_max(pixels)
        scale = tf.where(high > low, 255.0 / tf.maximum(high - low, 1.0), 0.0)
        return tf.cast(tf.round((pixels - low) * scale), tf.uint8)

    def luma():  # Pillow's RGB -> L: (R 19595 + G 38470 + B 7471 + 0x8000) >> 16
        rgb = tf.cast(tf.io.decode_png(encoded, channels=3, dtype=tf.uint8), tf.int32)
        weighted = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
        return tf.cast(tf.bitwise.right_shift(weighted, 16), tf.uint8)[..., None]

    with tf.control_dependencies([_check_pixels(height, width)]):
        return tf.ensure_shape(tf.cond(sixteen_bit_gray, stretched, luma), [None, None, 1])


def save(model: tf_keras.Model, info: export_lib.ExportInfo, version: str, threshold: float, uri: str):
    """Write the SavedModel to `uri` (a folder, local or gs://): built in a local scratch folder and
    copied there. The caller records it in export.json only after this returns."""
    module = ServingModel(model, info, version, threshold)
    signatures = {"serving_default": module.serve.get_concrete_function()}
    if not storage.is_gcs(uri):
        if os.path.exists(uri):
            storage.delete_tree(uri)
        tf.saved_model.save(module, uri, signatures=signatures)
        return
    with tempfile.TemporaryDirectory(prefix="pneumo-serving-") as scratch:
        local = os.path.join(scratch, FOLDER)
        tf.saved_model.save(module, local, signatures=signatures)
        storage.publish(local, uri)
