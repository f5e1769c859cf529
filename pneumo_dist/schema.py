"""What a pneumo-dist dataset is: class names, splits, TFRecord feature keys and the manifest.

Defined once here; the shard writer, the input pipeline, evaluation and inference import it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

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
SUBTYPE_KEY = "image/subtype"  # bytes: b"bacteria", b"virus", RSNA's class, or b"" when unknown / NORMAL
PATIENT_KEY = "image/patient_id"  # bytes: a salted hash of the patient id (shards.pseudonym)
SEX_KEY = "patient/sex"  # bytes: b"M", b"F", b"O" or b"" unknown
AGE_BAND_KEY = "patient/age_band"  # bytes: b"40-49", ..., b"90+" or b"" unknown
SITE_KEY = "source/site"  # bytes: a CSV's site column, or b""
SCANNER_KEY = "source/scanner"  # bytes: a CSV's scanner column, or b""
BOXES_KEY = "image/boxes"  # float list: x, y, width, height of each opacity in source pixels (RSNA)
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


@dataclass(frozen=True)
class Shard:
    path: str  # relative to the manifest's folder
    records: int
    bytes: int
    sha256: str  # hex digest of the whole file


@dataclass(frozen=True)
class Split:
    records: int
    shards: list[Shard]


@dataclass(frozen=True)
class StoredImage:
    """How the records' images are stored."""

    stored_size_px: int  # square, grayscale
    format: str  # jpeg or png
    channels: int
    jpeg_quality: int | None  # None for png


@dataclass(frozen=True)
class Skipped:
    """An input file left out of the dataset, and why."""

    source: str  # as the source names it (relative to the source folder)
    reason: str


@dataclass(frozen=True)
class Copy:
    split: str
    source: str


@dataclass(frozen=True)
class Duplicate:
    """The same bytes in more than one split: listed, never moved (the test split is never touched)."""

    sha256: str
    sources: list[Copy]


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """A dataset's manifest.json, written last by make_shards (shards.py): a folder without one is not
    a dataset. `read` checks what a bucket's writer could have got wrong: the schema version, and that
    every name that becomes part of a path (shard paths; the fingerprint names the staging and cache
    folders) stays inside its folder."""

    schema_version: int = MANIFEST_SCHEMA_VERSION
    created_utc: str
    pneumo_dist_version: str
    fingerprint: str  # sha256 of the inputs and options
    source: dict  # {"uri", "format"}
    options: dict  # make_shards' ShardOptions
    seed: int
    classes: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    image: StoredImage
    counts: dict[str, dict[str, int]]  # split -> class name -> images
    patients: dict[str, int]  # split -> patients
    class_weights: dict[str, float]  # class name -> loss weight (balanced on train)
    splits: dict[str, Split]
    skipped: list[Skipped]
    duplicates: list[Duplicate]
    notes: list[str]

    @classmethod
    def read(cls, uri: str) -> Manifest:
        """The manifest of a dataset folder, or of the manifest file itself."""
        manifest_uri = manifest_uri_of(uri)
        try:
            raw = json.loads(storage.read_bytes(manifest_uri))
        except storage.StorageNotFound:
            raise ManifestError(
                f"no manifest at {manifest_uri}: not a pneumo-dist dataset, or make_shards did not finish "
                "(re-run it to complete the dataset)"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ManifestError(f"{manifest_uri} is not valid JSON: {error}") from None
        return cls.from_dict(raw, manifest_uri)

    @classmethod
    def from_dict(cls, raw, manifest_uri: str) -> Manifest:
        if not isinstance(raw, dict):
            raise ManifestError(f"{manifest_uri} is not a pneumo-dist manifest (not a JSON object)")
        version = raw.get("schema_version")
        if version != MANIFEST_SCHEMA_VERSION:
            raise ManifestError(
                f"{manifest_uri} has schema_version {version!r}; this pneumo-dist reads "
                f"{MANIFEST_SCHEMA_VERSION}"
            )
        fingerprint = raw.get("fingerprint")
        if not isinstance(fingerprint, str) or not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
            raise ManifestError(f"{manifest_uri}: fingerprint {fingerprint!r} is not a sha256 hex digest")
        try:
            splits = {
                name: Split(split["records"], [Shard(**shard) for shard in split["shards"]])
                for name, split in raw["splits"].items()
            }
            typed = {
                "splits": splits,
                "image": StoredImage(**raw["image"]),
                "skipped": [Skipped(**s) for s in raw["skipped"]],
                "duplicates": [
                    Duplicate(d["sha256"], [Copy(**c) for c in d["sources"]]) for d in raw["duplicates"]
                ],
            }
            manifest = cls(**(raw | typed))
            for split in manifest.splits:
                manifest.shard_uris(manifest_uri, split)
        except (KeyError, TypeError, AttributeError) as error:
            raise ManifestError(f"{manifest_uri}: malformed ({error!r}); re-run make_shards") from None
        return manifest

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def shard_uris(self, manifest_uri: str, split: str) -> list[str]:
        """URIs of a split's shards; shard paths in the manifest are relative to its folder."""
        manifest_uri = manifest_uri_of(manifest_uri)
        if split not in self.splits:
            present = ", ".join(self.splits) or "none"
            raise ManifestError(f"{manifest_uri} has no {split!r} split (present: {present})")
        folder = storage.parent(manifest_uri)
        return [storage.child(folder, shard.path, manifest_uri) for shard in self.splits[split].shards]

    def all_shards(self) -> list[Shard]:
        return [shard for split in self.splits.values() for shard in split.shards]
