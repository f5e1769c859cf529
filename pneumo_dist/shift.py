"""The shift benchmark: a split's images under a fixed, seeded set of acquisition-like changes, scored by
an export, with AUC, sensitivity, specificity and ECE per change (95% intervals) and two summary
figures: the mean AUC under shift and the worst specificity.

Validation flatters (RESULTS.md): the official test images come from other machines and settings than
the training pool, and same-pool held-out patients cannot show it. These changes imitate what differs
between sites: exposure and the display curve, contrast, the detector's sharpness and noise, lossy
re-encoding, a lower resolution, positioning, burnt-in markers and frames, a narrower gray range. Each
is applied to a record's stored pixels (as make_shards stored them), which then take the export's own
path to the model (border crop, equalisation, resize): what a PneumoniaDetector would see of such an
image. Pixel sizes scale with the stored side, so 28 px and 256 px records get the same change.

Deterministic: image i under shift k draws from numpy's Generator seeded with (seed, k, i).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from pneumo_dist import metrics as metrics_lib

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]  # uint8 (H, W) -> uint8 (H, W)
REFERENCE = "none"


def _scale(image: np.ndarray, pixels_at_224: float) -> float:
    """A length given for a 224 px image, at this image's side."""
    return pixels_at_224 * image.shape[0] / 224.0


def _gamma(power: float) -> Shift:
    table = np.round(255.0 * (np.arange(256) / 255.0) ** power).astype(np.uint8)
    return lambda image, rng: table[image]


def _contrast(factor: float) -> Shift:
    def change(image: np.ndarray, rng) -> np.ndarray:
        mean = image.mean()
        return _to_uint8((image.astype(np.float64) - mean) * factor + mean)

    return change


def _blur(image: np.ndarray, rng) -> np.ndarray:
    radius = max(0.5, _scale(image, 2.0))
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def _sharpen(image: np.ndarray, rng) -> np.ndarray:
    radius = max(1.0, _scale(image, 3.0))
    return np.asarray(Image.fromarray(image).filter(ImageFilter.UnsharpMask(radius, 150, 0)))


def _noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(image + rng.normal(0.0, 12.0, image.shape))


def _jpeg(image: np.ndarray, rng) -> np.ndarray:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=15)
    return np.asarray(Image.open(io.BytesIO(out.getvalue())).convert("L"))


def _low_resolution(image: np.ndarray, rng) -> np.ndarray:
    side = image.shape[0]
    small = Image.fromarray(image).resize((max(4, side // 4),) * 2, Image.BILINEAR)
    return np.asarray(small.resize((side, side), Image.BILINEAR))


def _rotate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    degrees = rng.uniform(4.0, 8.0) * rng.choice([-1.0, 1.0])
    return np.asarray(Image.fromarray(image).rotate(degrees, Image.BILINEAR, fillcolor=0))


def _crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    side = image.shape[0]
    keep = int(round(side * rng.uniform(0.82, 0.9)))
    top, left = rng.integers(0, side - keep + 1, size=2)
    box = (int(left), int(top), int(left) + keep, int(top) + keep)
    return np.asarray(Image.fromarray(image).crop(box).resize((side, side), Image.BILINEAR))


def _text_marker(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A burnt-in laterality letter and a label, white, in a corner chosen at random."""
    side = image.shape[0]
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(6, round(side / 10)))
    text = "R PORTABLE" if rng.random() < 0.5 else "L AP SUPINE"
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    margin = max(1, side // 40)
    x = margin if rng.random() < 0.5 else max(margin, side - (right - left) - margin)
    y = margin if rng.random() < 0.5 else max(margin, side - (bottom - top) - margin)
    draw.text((x - left, y - top), text, fill=255, font=font)
    return np.asarray(canvas)


def _border(image: np.ndarray, rng) -> np.ndarray:
    """The image shrunk into a black frame of 7% of the side (a collimated or padded acquisition)."""
    side = image.shape[0]
    frame = max(1, round(0.07 * side))
    inner = Image.fromarray(image).resize((side - 2 * frame,) * 2, Image.BILINEAR)
    framed = np.zeros_like(image)
    framed[frame : side - frame, frame : side - frame] = np.asarray(inner)
    return framed


def _narrow_range(image: np.ndarray, rng) -> np.ndarray:
    """A quarter of the gray range, offset: a 14-bit detector's values read as if they were 16-bit
    (or a window left wide), quantised to 64 levels."""
    return (image // 4 + 24).astype(np.uint8)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


SHIFTS: dict[str, Shift] = {
    REFERENCE: lambda image, rng: image,
    "darker": _gamma(1.6),
    "brighter": _gamma(0.6),
    "low_contrast": _contrast(0.6),
    "high_contrast": _contrast(1.5),
    "blur": _blur,
    "sharpen": _sharpen,
    "noise": _noise,
    "jpeg_q15": _jpeg,
    "low_resolution": _low_resolution,
    "rotate": _rotate,
    "crop": _crop,
    "text_marker": _text_marker,
    "border": _border,
    "narrow_range": _narrow_range,
}


def apply(name: str, images: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, 1) stored images -> the same under shift `name`, deterministically."""
    index = list(SHIFTS).index(name)
    squeeze = images.ndim == 4
    planes = images[..., 0] if squeeze else images
    shifted = np.stack(
        [SHIFTS[name](plane, np.random.default_rng([seed, index, i])) for i, plane in enumerate(planes)]
    )
    return shifted[..., None] if squeeze else shifted


def shift_figures(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float, resamples: int = 1000, seed: int = 0
) -> dict:
    """AUC, sensitivity and specificity at `threshold`, ECE: each {"value", "ci95"}."""
    point = metrics_lib.binary_metrics(labels, probabilities, threshold)
    interval = metrics_lib.bootstrap_intervals(labels, probabilities, [threshold], resamples, seed=seed)[0]
    return {m: {"value": point[m], "ci95": interval[m]} for m in ("auc", "sensitivity", "specificity", "ece")}


def summarize(by_shift: dict[str, dict]) -> dict:
    """The two summary figures over the shifts other than the reference: the mean AUC, and the worst
    specificity (the weak side under shift, RESULTS.md) with its shift; the mean and worst ECE too."""
    shifted = {name: f for name, f in by_shift.items() if name != REFERENCE} or by_shift
    worst_spec = min(shifted, key=lambda name: shifted[name]["specificity"]["value"])
    worst_ece = max(shifted, key=lambda name: shifted[name]["ece"]["value"])
    return {
        "mean_auc": float(np.mean([f["auc"]["value"] for f in shifted.values()])),
        "worst_auc": min(f["auc"]["value"] for f in shifted.values()),
        "worst_specificity": shifted[worst_spec]["specificity"]["value"],
        "worst_specificity_shift": worst_spec,
        "mean_ece": float(np.mean([f["ece"]["value"] for f in shifted.values()])),
        "worst_ece": shifted[worst_ece]["ece"]["value"],
        "worst_ece_shift": worst_ece,
    }


@dataclass(frozen=True)
class ShiftRun:
    report: dict  # seed, split, count, shifts: name -> shift_figures, summary: summarize
    labels: np.ndarray
    raw: dict[str, np.ndarray]  # shift -> the model's P(PNEUMONIA) before the export's calibration


def stored_split(manifest_uri: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every record of `split` as stored: uint8 (N, S, S, 1) pixels and int labels, in order."""
    import tensorflow as tf

    from pneumo_dist import data, decode, schema

    manifest = schema.Manifest.read(manifest_uri)
    dataset = data.Dataset(manifest, manifest_uri)
    stored_px = manifest.image.stored_size_px
    pixels, labels = [], []
    for serialized in tf.data.TFRecordDataset(dataset.shards(split)):
        record = decode.decode_example(serialized)
        pixels.append(decode.decode_image(record["encoded"], stored_px).numpy())
        labels.append(int(record["label"]))
    return np.stack(pixels), np.asarray(labels, np.int64)


def score_shifts(
    detector,
    manifest_uri: str,
    split: str,
    seed: int = 0,
    resamples: int = 1000,
    names: list[str] | None = None,
    on_shift: Callable[[str], None] | None = None,
    batch_size: int = 64,
) -> ShiftRun:
    """Score `split` of the dataset at `manifest_uri` under each shift (all of SHIFTS unless `names`) with
    a PneumoniaDetector; figures at its threshold, on its calibrated probabilities."""
    import tensorflow as tf

    from pneumo_dist import decode

    names = names or list(SHIFTS)
    unknown = sorted(set(names) - set(SHIFTS))
    if unknown:
        raise ValueError(f"unknown shifts {unknown}; known: {', '.join(SHIFTS)}")
    stored, labels = stored_split(manifest_uri, split)
    step = detector.info.preprocessing
    read_px = decode.read_size(stored.shape[1], step.border_crop)
    by_shift, raw = {}, {}
    for name in names:
        if on_shift:
            on_shift(name)
        shifted = apply(name, stored, seed)
        read = [decode.read_pixels(tf.constant(image), step.equalize, step.border_crop) for image in shifted]
        pixels = decode.resize_images(tf.stack(read), read_px, step.image_size_px).numpy()
        raw[name] = np.concatenate(
            [
                detector.probabilities(pixels[start : start + batch_size], calibrated=False)
                for start in range(0, len(pixels), batch_size)
            ]
        )
        calibrated = detector.calibration.apply(raw[name]) if detector.calibration else raw[name]
        by_shift[name] = shift_figures(labels, calibrated, detector.threshold, resamples, seed)
    report = {"seed": seed, "split": split, "count": len(labels), "shifts": by_shift}
    if len(by_shift) > 1 and REFERENCE in by_shift:
        report["summary"] = summarize(by_shift)
    return ShiftRun(report, labels, raw)
