"""The shift benchmark (shift.py): deterministic for a seed, and each shift changes the pixels as named."""

from __future__ import annotations

import numpy as np
import pytest

from pneumo_dist import shift


def chest_like(side: int = 96, count: int = 3) -> np.ndarray:
    """Smooth gray images with structure at every scale: a lung-like blob pair, ribs, speckle."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:side, 0:side] / side
    images = []
    for _ in range(count):
        lungs = np.exp(-(((x - 0.3) / 0.15) ** 2 + ((y - 0.5) / 0.3) ** 2)) + np.exp(
            -(((x - 0.7) / 0.15) ** 2 + ((y - 0.5) / 0.3) ** 2)
        )
        ribs = 0.15 * np.sin(y * 40 + rng.uniform(0, 6))
        image = 60 + 110 * (1 - lungs) + 40 * ribs + rng.normal(0, 4, (side, side))
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return np.stack(images)


def sharpness(images: np.ndarray) -> float:
    """Mean squared difference of neighbouring pixels: high-frequency energy."""
    values = images.astype(np.float64)
    return float(np.mean(np.diff(values, axis=-1) ** 2) + np.mean(np.diff(values, axis=-2) ** 2))


def test_every_shift_is_deterministic_for_a_seed_and_keeps_the_shape():
    images = chest_like()
    for name in shift.SHIFTS:
        first = shift.apply(name, images, seed=3)
        assert first.dtype == np.uint8 and first.shape == images.shape, name
        np.testing.assert_array_equal(first, shift.apply(name, images, seed=3), err_msg=name)
        if name != shift.REFERENCE:
            assert not np.array_equal(first, images), f"{name} changed nothing"
    # The random ones draw from the seed.
    for name in ("noise", "rotate", "crop", "text_marker"):
        assert not np.array_equal(shift.apply(name, images, 3), shift.apply(name, images, 4)), name
    # (N, H, W, 1) as the records are, too.
    np.testing.assert_array_equal(
        shift.apply("blur", images[..., None], 1)[..., 0], shift.apply("blur", images, 1)
    )


def test_each_shift_changes_the_pixels_as_named():
    images = chest_like()
    mean, spread, sharp = images.mean(), images.std(), sharpness(images)

    def get(name):
        return shift.apply(name, images, seed=0)

    assert get("darker").mean() < mean - 10 and get("brighter").mean() > mean + 10
    assert get("low_contrast").std() < 0.7 * spread and get("high_contrast").std() > 1.3 * spread
    assert abs(get("low_contrast").mean() - mean) < 2
    assert sharpness(get("blur")) < 0.5 * sharp and sharpness(get("sharpen")) > 1.5 * sharp
    assert sharpness(get("low_resolution")) < 0.5 * sharp
    noisy = get("noise")
    assert abs(noisy.mean() - mean) < 1 and 8 < np.std(noisy.astype(float) - images) < 14
    jpeg = get("jpeg_q15")
    assert 0 < np.abs(jpeg.astype(float) - images).mean() < 10
    # Positioning: a rotation leaves black corners; a crop magnifies (the lungs' blobs grow).
    assert (get("rotate")[:, :3, :3] == 0).mean() > 0.3
    assert not np.array_equal(get("crop"), images) and get("crop").shape == images.shape
    # A white burnt-in label in one corner; a black frame all round, the image inside it.
    marked = get("text_marker").astype(int) - images
    assert (marked > 50).sum(axis=(1, 2)).min() > 10
    for one in marked:  # a line of text: a band of rows, not the whole image
        rows = np.nonzero((one > 50).any(axis=1))[0]
        assert rows.max() - rows.min() < 0.3 * images.shape[1]
    framed = get("border")
    frame = round(0.07 * images.shape[1])
    assert (framed[:, :frame] == 0).all() and (framed[:, :, -frame:] == 0).all()
    assert framed[:, frame:-frame, frame:-frame].mean() > 0.9 * mean
    narrow = get("narrow_range")
    assert narrow.max() - narrow.min() <= 64 and len(np.unique(narrow)) <= 64


def test_the_summary_is_over_the_shifts_and_names_the_worst():
    labels = np.array([0, 0, 0, 1, 1, 1])
    good = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    alarmed = np.array([0.6, 0.2, 0.7, 0.7, 0.8, 0.9])  # two NORMALs above 0.5
    by_shift = {
        "none": shift.shift_figures(labels, good, 0.5, resamples=100),
        "blur": shift.shift_figures(labels, good, 0.5, resamples=100),
        "darker": shift.shift_figures(labels, alarmed, 0.5, resamples=100),
    }
    summary = shift.summarize(by_shift)
    assert summary["worst_specificity"] == pytest.approx(1 / 3)
    assert summary["worst_specificity_shift"] == "darker"
    assert summary["mean_auc"] == pytest.approx((1.0 + by_shift["darker"]["auc"]["value"]) / 2)
    assert by_shift["darker"]["auc"]["ci95"][0] <= by_shift["darker"]["auc"]["value"]
