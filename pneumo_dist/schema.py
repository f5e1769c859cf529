"""What a pneumo-dist dataset is: class names, splits, TFRecord feature keys and the manifest.

Defined once here; the shard writer, the input pipeline, evaluation and inference import it.
"""

from __future__ import annotations

import json
import re

from pneumo_dist import storage
from pneumo_dist.errors import PneumoDistError

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


class ManifestError(PneumoDistError):
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
    if not isinstance(manifest, dict):
        raise ManifestError(f"{manifest_uri} is not a pneumo-dist manifest (not a JSON object)")
    version = manifest.get("schema_version")
    if version != MANIFEST_SCHEMA_VERSION:
        raise ManifestError(
            f"{manifest_uri} has schema_version {version!r}; this pneumo-dist reads {MANIFEST_SCHEMA_VERSION}"
        )
    _check_names(manifest, manifest_uri)
    return manifest


def _check_names(manifest: dict, manifest_uri: str) -> None:
    """Every name in a manifest that becomes part of a path (shard paths; the fingerprint names the
    staging and cache folders) must stay inside its folder, whoever wrote the bucket."""
    fingerprint = manifest.get("fingerprint")
    if not isinstance(fingerprint, str) or not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
        raise ManifestError(f"{manifest_uri}: fingerprint {fingerprint!r} is not a sha256 hex digest")
    try:
        for split in manifest["splits"]:
            shard_uris(manifest, manifest_uri, split)
    except (KeyError, TypeError, AttributeError) as error:
        raise ManifestError(f"{manifest_uri}: malformed splits/shards ({error!r})") from None


def shard_uris(manifest: dict, manifest_uri: str, split: str) -> list[str]:
    """URIs of a split's shards; shard paths in the manifest are relative to its folder."""
    if split not in manifest["splits"]:
        present = ", ".join(manifest["splits"]) or "none"
        raise ManifestError(f"{manifest_uri_of(manifest_uri)} has no {split!r} split (present: {present})")
    manifest_uri = manifest_uri_of(manifest_uri)
    folder = storage.parent(manifest_uri)
    entries = manifest["splits"][split]["shards"]
    return [storage.child(folder, shard["path"], manifest_uri) for shard in entries]
