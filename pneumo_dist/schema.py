"""What a pneumo-dist dataset is: class names, splits, TFRecord feature keys and the manifest.

Defined once here; the shard writer, the input pipeline, evaluation and inference import it.
"""

from __future__ import annotations

import json

from pneumo_dist import storage

CLASS_NAMES = ("NORMAL", "PNEUMONIA")  # label 0, label 1
SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1

# tf.train.Example feature keys of one record.
IMAGE_KEY = "image/encoded"  # bytes: JPEG or PNG, 8-bit grayscale, stored_size_px square
IMAGE_FORMAT_KEY = "image/format"  # bytes: b"jpeg" or b"png"
LABEL_KEY = "image/label"  # int64: index into CLASS_NAMES
SUBTYPE_KEY = "image/subtype"  # bytes: b"bacteria", b"virus" or b"" when unknown / NORMAL
PATIENT_KEY = "image/patient_id"  # bytes
SOURCE_KEY = "source/path"  # bytes: path relative to the source root
SOURCE_SHA256_KEY = "source/sha256"  # bytes: hex digest of the source file (or array) bytes
ORIGINAL_HEIGHT_KEY = "source/height"  # int64: pixels before resizing
ORIGINAL_WIDTH_KEY = "source/width"  # int64


class ManifestError(Exception):
    """A manifest is missing, unreadable or of an unknown schema."""


def manifest_uri_of(dataset_uri: str) -> str:
    """Accept a dataset folder or its manifest file and return the manifest's URI."""
    if dataset_uri.endswith(".json"):
        return dataset_uri
    return storage.join(dataset_uri, MANIFEST_NAME)


def load_manifest(uri: str) -> dict:
    manifest_uri = manifest_uri_of(uri)
    try:
        manifest = json.loads(storage.read_bytes(manifest_uri))
    except storage.StorageNotFound:
        raise ManifestError(
            f"no manifest at {manifest_uri}: not a pneumo-dist dataset, or make_shards did not finish "
            "(re-run it to complete the dataset)"
        ) from None
    except json.JSONDecodeError as error:
        raise ManifestError(f"{manifest_uri} is not valid JSON: {error}") from None
    version = manifest.get("schema_version")
    if version != MANIFEST_SCHEMA_VERSION:
        raise ManifestError(
            f"{manifest_uri} has schema_version {version!r}; this pneumo-dist reads {MANIFEST_SCHEMA_VERSION}"
        )
    return manifest


def shard_uris(manifest: dict, manifest_uri: str, split: str) -> list[str]:
    """URIs of a split's shards; shard paths in the manifest are relative to its folder."""
    if split not in manifest["splits"]:
        present = ", ".join(manifest["splits"]) or "none"
        raise ManifestError(f"{manifest_uri_of(manifest_uri)} has no {split!r} split (present: {present})")
    folder = manifest_uri_of(manifest_uri).rsplit("/", 1)[0]
    return [storage.join(folder, shard["path"]) for shard in manifest["splits"][split]["shards"]]
