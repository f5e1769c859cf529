"""A record's way in, shared by training, evaluation, PneumoniaDetector and the serving graph: a
serialized tf.train.Example -> its features (`decode_example`, the inverse of tfrecord.py's encoder)
-> uint8 pixels as training reads them (`decode_image`, then `read_pixels`: border cut, equalisation)
-> the model's input size (`resize_images`); `parse_record` makes of the features what the model's
input needs. Split as TF Model Garden splits it (its Decoder and Parser). Inference imports this
module, not the training input pipeline (data.py).
"""

from __future__ import annotations

import tensorflow as tf

from pneumo_dist import schema

# What evaluation reports figures by, besides the source path: each record's (b"" when unknown, or in
# records written before the key existed).
_ATTRIBUTE_KEYS = {
    "subtype": schema.SUBTYPE_KEY,
    "sex": schema.SEX_KEY,
    "age_band": schema.AGE_BAND_KEY,
    "site": schema.SITE_KEY,
    "scanner": schema.SCANNER_KEY,
}
RECORD_ATTRIBUTES = tuple(_ATTRIBUTE_KEYS)
_FEATURES = {
    schema.IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
    schema.LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
    schema.SOURCE_KEY: tf.io.FixedLenFeature([], tf.string),
    **{key: tf.io.FixedLenFeature([], tf.string, default_value=b"") for key in _ATTRIBUTE_KEYS.values()},
}


def decode_example(serialized: tf.Tensor) -> dict:
    """Serialized tf.train.Example -> its encoded image, label, source path and RECORD_ATTRIBUTES."""
    example = tf.io.parse_single_example(serialized, _FEATURES)
    return {
        "encoded": example[schema.IMAGE_KEY],
        "label": example[schema.LABEL_KEY],
        "source": example[schema.SOURCE_KEY],
        **{name: example[key] for name, key in _ATTRIBUTE_KEYS.items()},
    }


def decode_image(encoded: tf.Tensor, stored_px: int) -> tf.Tensor:
    """Encoded stored image -> uint8 (stored_px, stored_px, 1)."""
    image = tf.io.decode_image(encoded, channels=1, expand_animations=False)
    return tf.ensure_shape(image, [stored_px, stored_px, 1])


def read_size(stored_px: int, border_crop: float) -> int:
    """The side of a record's pixels as read: the stored side less `border_crop` of it at each edge."""
    return stored_px - 2 * _border_cut(stored_px, border_crop)


def _border_cut(side: int, border_crop: float) -> int:
    return round(border_crop * side)


def read_pixels(image: tf.Tensor, equalize: str, border_crop: float) -> tf.Tensor:
    """Stored pixels, uint8 (S, S, 1) -> the pixels training reads, (read_size, read_size, 1): the
    border cut (DataConfig.border_crop), then standardize_intensity. Every path to the model goes
    through here: the input pipelines, PneumoniaDetector and the SavedModel."""
    cut = _border_cut(image.shape[0], border_crop)
    if cut:
        image = image[cut:-cut, cut:-cut]
    return standardize_intensity(image, equalize)


def standardize_intensity(image: tf.Tensor, equalize: str) -> tf.Tensor:
    """uint8 (H, W, 1) -> uint8 (H, W, 1) as DataConfig.equalize says: unchanged ("none"), or
    histogram-equalised ("histogram"): gray level v becomes round(255 (cdf(v) - c0) / (n - c0)), with
    cdf(v) the number of pixels at or below v, c0 the count of the darkest level present and n all
    pixels (the mapping of OpenCV's equalizeHist, in integers). The result depends only on the order
    of the levels, so two exposures or contrast curves of one image that keep that order (a gamma, a
    window) give the same pixels. An image of one gray level is left as it is."""
    if equalize == "none":
        return image
    if equalize != "histogram":
        raise ValueError(f"unknown intensity standardisation {equalize!r}")
    levels = tf.reshape(tf.cast(image, tf.int32), [-1])
    counts = tf.math.bincount(levels, minlength=256, maxlength=256, dtype=tf.int64)
    cdf = tf.cumsum(counts)
    darkest = tf.gather(counts, tf.reduce_min(levels))
    span = cdf[-1] - darkest
    # Rounded half up, in integers; levels below the darkest (absent) come out negative and unused.
    table = (2 * 255 * (cdf - darkest) + span) // tf.maximum(2 * span, 1)
    table = tf.where(span > 0, table, tf.range(256, dtype=tf.int64))
    equalized = tf.gather(tf.cast(tf.clip_by_value(table, 0, 255), tf.uint8), levels)
    return tf.reshape(equalized, tf.shape(image))


def resize_images(images: tf.Tensor, stored_px: int, image_size_px: int) -> tf.Tensor:
    """uint8 (..., stored_px, stored_px, 1) -> uint8 (..., image_size_px, image_size_px, 1)."""
    if stored_px == image_size_px:
        return images
    antialias = needs_antialias(stored_px, image_size_px)
    resized = tf.image.resize(images, [image_size_px, image_size_px], antialias=antialias)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)


def needs_antialias(stored_px: int, image_size_px: int) -> bool:
    """Antialiasing matters only when shrinking a lot, and it costs 2-3x: 256 -> 224 px does without."""
    return stored_px > 1.5 * image_size_px


def parse_record(
    record: dict, stored_px: int, keep_source: bool, equalize: str = "none", border_crop: float = 0.0
) -> dict:
    """decode_example's features -> uint8 (read_size, read_size, 1) image (read_pixels'), float32
    label (and source and RECORD_ATTRIBUTES, for evaluation's per-image rows and subgroups)."""
    element = {
        "image": read_pixels(decode_image(record["encoded"], stored_px), equalize, border_crop),
        "label": tf.cast(record["label"], tf.float32),
    }
    if keep_source:
        element["source"] = record["source"]
        element.update((name, record[name]) for name in RECORD_ATTRIBUTES)
    return element
