"""The typed config of a run (frozen dataclasses), validated before any data is read.

Sections are passed explicitly to the code that needs them: `DataConfig` to data.py, `AugmentConfig`
to augment.py.
"""

from __future__ import annotations

from dataclasses import dataclass


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


def _check(condition: bool, section: str, key: str, value, why: str) -> None:
    if not condition:
        raise ConfigError(f"{section}.{key}={value!r}: {why}")


@dataclass(frozen=True)
class AugmentConfig:
    """On-device augmentation of the grayscale batch; ranges are symmetric (+-) around identity."""

    enabled: bool = True
    rotation_deg: float = 10.0
    zoom: float = 0.1  # scale factor drawn from [1 - zoom, 1 + zoom]
    shift: float = 0.08  # fraction of the image side, in x and y
    shear_deg: float = 5.0
    # Off by default: the heart sits on the patient's left, so a flipped chest is an anatomy the model
    # never meets at test time (situs inversus is rare) and it can learn from the cardiac silhouette.
    horizontal_flip: bool = False
    brightness: float = 0.1  # added, in units of the full 0..1 range
    contrast: float = 0.15  # factor drawn from [1 - contrast, 1 + contrast], around each image's mean
    gamma: float = 0.15  # exponent drawn log-uniformly from [1 / (1 + gamma), 1 + gamma]

    def validate(self) -> None:
        for name, limit in (("rotation_deg", 180), ("shear_deg", 45)):
            value = getattr(self, name)
            _check(0 <= value <= limit, "augment", name, value, f"must be in [0, {limit}]")
        for name in ("zoom", "shift", "brightness", "contrast"):
            value = getattr(self, name)
            _check(0 <= value < 1, "augment", name, value, "must be in [0, 1)")
        _check(0 <= self.gamma <= 2, "augment", "gamma", self.gamma, "must be in [0, 2]")


CACHE_MODES = ("none", "memory", "disk")
READ_MODES = ("stage", "stream")
CLASS_BALANCE_MODES = ("weights", "sample", "none")


@dataclass(frozen=True)
class DataConfig:
    manifest_uri: str = "data/demo-shards"  # a dataset folder or its manifest.json, local or gs://
    image_size_px: int = 224  # model input side; records are resized to it on the host
    global_batch_size: int = 64  # across all replicas; each replica gets global / replicas
    # Pneumonia is about 2.9x NORMAL in Kaggle train. "weights": the loss weighs each class by the
    # manifest's balanced class weights; "sample": tf.data draws both classes equally often; "none".
    class_balance: str = "weights"
    shuffle_buffer: int = 2048  # records; the whole Kaggle train split is 4.4k
    cache: str = "memory"  # decoded images: "memory", "disk" (under cache_dir) or "none"
    cache_dir: str = ""  # for cache="disk"; default: under stage_dir
    # "stage": copy the shards once per node to stage_dir (verified, shared by every trial on the node);
    # "stream": read them where they are (gs:// through TensorFlow's own GCS filesystem).
    read_mode: str = "stage"
    stage_dir: str = ""  # default: <system temp>/pneumo-dist-stage
    deterministic: bool = False  # training read order; evaluation is always deterministic
    seed: int = 0

    def validate(self) -> None:
        _check(bool(self.manifest_uri), "data", "manifest_uri", self.manifest_uri, "must not be empty")
        _check(
            16 <= self.image_size_px <= 1024, "data", "image_size_px", self.image_size_px, "must be 16..1024"
        )
        _check(
            self.global_batch_size >= 1, "data", "global_batch_size", self.global_batch_size, "must be >= 1"
        )
        _check(self.shuffle_buffer >= 1, "data", "shuffle_buffer", self.shuffle_buffer, "must be >= 1")
        for name, allowed in (
            ("class_balance", CLASS_BALANCE_MODES),
            ("cache", CACHE_MODES),
            ("read_mode", READ_MODES),
        ):
            value = getattr(self, name)
            _check(value in allowed, "data", name, value, f"must be one of {', '.join(allowed)}")
