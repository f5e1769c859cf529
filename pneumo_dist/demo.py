"""The built-in demo data: procedural X-ray-like images in the Kaggle layout and naming.

A thorax with two dark lung fields, spine, heart shadow and ribs; PNEUMONIA adds bright opacities inside
the lungs (bacteria: one dense lobar patch; virus: diffuse haze on both sides). Sizes vary, some images
are RGB, and patients have one to three images each, so make_shards meets the same situations as on the
real data while a small CNN can learn the label in a few epochs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class DemoSpec:
    images_per_class: tuple[tuple[str, int], ...] = (("train", 120), ("val", 8), ("test", 40))
    min_side_px: int = 96
    max_side_px: int = 192
    rgb_fraction: float = 0.2
    seed: int = 0


def write_demo_dataset(root: str, spec: DemoSpec = DemoSpec()) -> list[str]:
    """Write ROOT/{split}/{NORMAL,PNEUMONIA}/*.jpeg; returns the paths written, deterministically."""
    rng = np.random.default_rng(spec.seed)
    written = []
    patient_number = {"NORMAL": 100, "PNEUMONIA": 1}
    for split, count in spec.images_per_class:
        for class_name in ("NORMAL", "PNEUMONIA"):
            folder = os.path.join(root, split, class_name)
            os.makedirs(folder, exist_ok=True)
            made = 0
            while made < count:
                patient = patient_number[class_name]
                patient_number[class_name] += 1
                subtype = "bacteria" if rng.random() < 0.65 else "virus"
                for view in range(min(int(rng.integers(1, 4)), count - made)):
                    if class_name == "NORMAL":
                        name = f"IM-{patient:04d}-{view + 1:04d}.jpeg"
                    else:
                        name = f"person{patient}_{subtype}_{made + 1}.jpeg"
                    height = int(rng.integers(spec.min_side_px, spec.max_side_px + 1))
                    width = int(height * rng.uniform(1.0, 1.4))
                    pixels = render_xray(height, width, class_name == "PNEUMONIA", subtype, rng)
                    image = Image.fromarray(pixels)
                    if rng.random() < spec.rgb_fraction:
                        image = image.convert("RGB")
                    path = os.path.join(folder, name)
                    image.save(path, quality=90)
                    written.append(path)
                    made += 1
    return written


def render_xray(
    height: int, width: int, pneumonia: bool, subtype: str, rng: np.random.Generator
) -> np.ndarray:
    """One uint8 (height, width) chest-X-ray-like image."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y /= height
    x /= width
    cx = 0.5 + rng.normal(0, 0.02)

    def ellipse(center_x, center_y, radius_x, radius_y):
        return ((x - center_x) / radius_x) ** 2 + ((y - center_y) / radius_y) ** 2 <= 1.0

    def blob(center_x, center_y, radius):
        return np.exp(-(((x - center_x) ** 2 + (y - center_y) ** 2) / (2 * radius**2)))

    image = np.full((height, width), 15.0, np.float32)
    image[ellipse(cx, 0.55, 0.42, 0.55)] = 150.0  # soft tissue of the thorax
    lung_y, lung_rx, lung_ry = 0.5 + rng.normal(0, 0.02), 0.13 + rng.normal(0, 0.01), 0.3
    lungs = ellipse(cx - 0.17, lung_y, lung_rx, lung_ry) | ellipse(cx + 0.17, lung_y, lung_rx, lung_ry)
    image[lungs] = 55.0
    ribs = 12.0 * (np.sin(y * 55 + 8 * (x - cx) ** 2 * 10) > 0.7)
    image += np.where(lungs, ribs, 0)
    image += 110.0 * ellipse(cx, 0.55, 0.03, 0.5)  # spine
    image += 70.0 * blob(cx + 0.07, 0.66, 0.08) * (y > 0.45)  # heart shadow, on the patient's left
    if pneumonia:
        side = rng.choice([-1, 1])
        if subtype == "bacteria":
            opacity = 100.0 * blob(cx + side * 0.17, lung_y + rng.uniform(-0.1, 0.2), rng.uniform(0.06, 0.1))
        else:
            opacity = 55.0 * (blob(cx - 0.17, lung_y, 0.13) + blob(cx + 0.17, lung_y, 0.13))
        image += np.where(lungs, opacity, 0)
    image *= rng.uniform(0.85, 1.15)  # exposure
    image += rng.normal(0, 6.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)
