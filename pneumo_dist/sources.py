"""Listing raw images (Kaggle folders, MedMNIST .npz, CSV), their labels, patients and splits.

Nothing here decodes pixels: it decides which image goes where, deterministically, before any work.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import numpy as np

from pneumo_dist import storage
from pneumo_dist.errors import PneumoDistError
from pneumo_dist.images import has_image_extension
from pneumo_dist.schema import CLASS_NAMES, SPLITS

# Kaggle names: person1_bacteria_1.jpeg, person124_virus_246.jpeg, IM-0115-0001.jpeg,
# NORMAL2-IM-0372-0001.jpeg, NORMAL2-IM-0587-0001-0002.jpeg (a patient's second view).
_PNEUMONIA_NAME = re.compile(r"^(person\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
_NORMAL_NAME = re.compile(r"^((?:NORMAL\d*-)?IM-\d+)-\d+", re.IGNORECASE)
_ACQUISITION_NAME = re.compile(r"^(NORMAL\d*-IM|IM|person)[-_]?\d", re.IGNORECASE)
_SYSTEM_FILES = {".ds_store", "thumbs.db", "desktop.ini"}


class SourceError(PneumoDistError):
    """The source cannot be converted as it is (wrong layout, unknown class, bad CSV row)."""


@dataclass(frozen=True)
class SourceImage:
    source: str  # path relative to the source root (npz: "file.npz:train/12"); unique
    uri: str  # where its bytes are read from (npz: the local .npz file)
    label: int  # index into CLASS_NAMES
    patient_id: str
    split: str
    subtype: str = ""  # "bacteria" / "virus" when the name says so
    size_bytes: int = -1  # from the listing; part of the dataset fingerprint (-1: unknown)
    version: str = ""  # CSV sources: the file's mtime / object generation, also in the fingerprint
    npz_key: str = ""  # for npz sources: array key and row
    npz_index: int = -1


@dataclass(frozen=True)
class Skipped:
    source: str
    reason: str


@dataclass
class Listing:
    source_format: str  # "kaggle", "npz" or "csv"
    images: list[SourceImage]
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def patient_and_subtype(file_name: str) -> tuple[str | None, str]:
    """Patient id and pneumonia subtype from a Kaggle file name; (None, "") when it has neither."""
    if match := _PNEUMONIA_NAME.match(file_name):
        return match.group(1).lower(), match.group(2).lower()
    if match := _NORMAL_NAME.match(file_name):
        return match.group(1).upper(), ""
    return None, ""


def acquisition_group(file_name: str) -> str:
    """Which family of the Kaggle chest_xray file names an image has: "IM" and "NORMAL2-IM" (NORMAL
    images, added to the data set in different batches) or "person" (PNEUMONIA); "" for other names.
    Evaluation reports figures per family: a model can do well on one and badly on another."""
    match = _ACQUISITION_NAME.match(file_name)
    if not match:
        return ""
    family = match.group(1)
    return "person" if family.lower() == "person" else family.upper()


def parse_label(text: str) -> int | None:
    value = text.strip().upper()
    if value in CLASS_NAMES:
        return CLASS_NAMES.index(value)
    if value in ("0", "1"):
        return int(value)
    return None


def list_source(uri: str, local_npz_path: str | None = None, allow_outside_paths: bool = False) -> Listing:
    """List a source by its form: a .npz file, a .csv file, or a Kaggle-layout folder."""
    if uri.lower().endswith(".npz"):
        return list_npz(local_npz_path or uri, source_name=storage.basename(uri))
    if uri.lower().endswith(".csv"):
        return list_csv(uri, allow_outside_paths)
    return list_kaggle(uri)


def list_kaggle(root: str) -> Listing:
    """ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/* with Kaggle's file names."""
    files = storage.list_files(root)
    if not files:
        raise SourceError(f"{root}: no such folder, or it holds no files")
    listing = Listing("kaggle", [])
    ignored_folders: set[str] = set()
    unparsed_patients = 0
    prefix = root.rstrip("/") + "/"
    for info in files:
        relative = info.uri[len(prefix) :]
        parts = relative.split("/")
        name = parts[-1]
        if name.lower() in _SYSTEM_FILES or any(p.startswith((".", "__MACOSX")) for p in parts):
            listing.skipped.append(Skipped(relative, "system file, not an image"))
            continue
        if parts[0] in CLASS_NAMES:
            raise SourceError(
                f"{root} holds class folders ({parts[0]}/) directly; expected ROOT/train/{parts[0]}/...: "
                "pass the folder above the split folders, or put these images under train/"
            )
        if parts[0] not in SPLITS:
            if len(parts) > 1:
                ignored_folders.add(parts[0])
            listing.skipped.append(Skipped(relative, "not inside a split folder (train, val, test)"))
            continue
        if len(parts) < 3:
            listing.skipped.append(Skipped(relative, "not inside a class folder (NORMAL, PNEUMONIA)"))
            continue
        split, class_name = parts[0], parts[1]
        if class_name not in CLASS_NAMES:
            raise SourceError(
                f"unknown class folder {storage.join(root, split, class_name)}: expected only "
                f"{' and '.join(CLASS_NAMES)} inside {split}/ (move or remove it)"
            )
        if not has_image_extension(name):
            listing.skipped.append(Skipped(relative, "not an image file (expected .jpeg, .jpg or .png)"))
            continue
        patient, subtype = patient_and_subtype(name)
        if patient is None:
            unparsed_patients += 1
            patient = relative  # its own group: safe, if pessimistic
        listing.images.append(
            SourceImage(
                source=relative,
                uri=info.uri,
                label=CLASS_NAMES.index(class_name),
                patient_id=patient,
                split=split,
                subtype=subtype,
                size_bytes=info.size_bytes,
            )
        )
    for folder in sorted(ignored_folders):
        listing.notes.append(f"ignored folder {folder}/: not a split folder (train, val, test)")
    if unparsed_patients:
        listing.notes.append(
            f"{unparsed_patients} file names carry no Kaggle patient id; each is its own patient"
        )
    _check_splits(listing, root)
    return listing


def list_npz(path: str, source_name: str) -> Listing:
    """A MedMNIST .npz with {train,val,test}_{images,labels} (local path; gs:// is fetched by the caller)."""
    try:
        arrays = np.load(path)
    except (OSError, ValueError) as error:
        raise SourceError(f"{source_name}: not a readable .npz file: {error}") from None
    listing = Listing("npz", [])
    with arrays:
        for split in SPLITS:
            images_key, labels_key = f"{split}_images", f"{split}_labels"
            if images_key not in arrays.files and labels_key not in arrays.files:
                continue
            for key in (images_key, labels_key):
                if key not in arrays.files:
                    raise SourceError(
                        f"{source_name}: has no {key!r} array (found: {', '.join(arrays.files)})"
                    )
            images, labels = arrays[images_key], arrays[labels_key].reshape(-1)
            if images.ndim not in (3, 4) or images.dtype != np.uint8:
                raise SourceError(
                    f"{source_name}: {images_key!r} must be uint8 (N, H, W[, C]), got {images.dtype} "
                    f"{images.shape}"
                )
            if len(images) != len(labels):
                raise SourceError(
                    f"{source_name}: {images_key!r} has {len(images)} rows "
                    f"but {labels_key!r} has {len(labels)}"
                )
            if not np.isin(labels, (0, 1)).all():
                raise SourceError(f"{source_name}: {labels_key!r} holds labels other than 0 and 1")
            row_bytes = int(np.prod(images.shape[1:]))
            listing.images.extend(
                SourceImage(
                    source=f"{source_name}:{split}/{index}",
                    uri=path,
                    label=int(label),
                    patient_id=f"{split}/{index}",
                    split=split,
                    size_bytes=row_bytes,
                    npz_key=images_key,
                    npz_index=index,
                )
                for index, label in enumerate(labels)
            )
    listing.notes.append("MedMNIST has no patient ids: each image is its own patient")
    _check_splits(listing, source_name)
    return listing


def list_csv(uri: str, allow_outside_paths: bool = False) -> Listing:
    """A CSV with a header: path,label[,patient_id][,split][,subtype]; paths relative to the CSV's folder.

    A row naming a file outside the CSV's folder (`..`, an absolute path, another bucket) is an error
    unless `allow_outside_paths`: a CSV from a bucket must not choose which local files get read.
    """
    try:
        text = storage.read_bytes(uri).decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise SourceError(f"{uri}: not UTF-8 text: {error}") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = {"path", "label"} - set(columns)
    if missing:
        raise SourceError(f"{uri}: header must name path and label (missing: {', '.join(sorted(missing))})")
    folder = storage.parent(uri)
    listing = Listing("csv", [])
    unparsed_patients = 0
    seen: set[str] = set()
    for line_number, raw in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
        path = row["path"]
        where = f"{uri} line {line_number}"
        if not path:
            raise SourceError(f"{where}: empty path")
        label = parse_label(row["label"])
        if label is None:
            raise SourceError(f"{where}: label {row['label']!r} is not one of {', '.join(CLASS_NAMES)}, 0, 1")
        split = row.get("split") or "train"
        if split not in SPLITS:
            raise SourceError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        if path in seen:
            raise SourceError(f"{where}: {path} is listed twice")
        seen.add(path)
        if not has_image_extension(path):
            listing.skipped.append(Skipped(path, "not an image file (expected .jpeg, .jpg or .png)"))
            continue
        image_uri = _csv_row_uri(folder, path)
        if not allow_outside_paths and not _inside(image_uri, folder):
            raise SourceError(
                f"{where}: {path} is outside the CSV's folder {folder}; pass --allow-outside-paths "
                "to read files elsewhere"
            )
        name = path.rsplit("/", 1)[-1]
        parsed_patient, parsed_subtype = patient_and_subtype(name)
        patient = row.get("patient_id") or parsed_patient
        if patient is None:
            unparsed_patients += 1
            patient = path
        listing.images.append(
            SourceImage(
                source=path,
                uri=image_uri,
                label=label,
                patient_id=patient,
                split=split,
                subtype=(row.get("subtype") or parsed_subtype).lower(),
            )
        )
    if unparsed_patients:
        listing.notes.append(f"{unparsed_patients} rows have no patient id; each is its own patient")
    _describe_files(listing)
    _check_splits(listing, uri)
    return listing


def _csv_row_uri(folder: str, path: str) -> str:
    if storage.is_gcs(path):
        return path
    if storage.is_gcs(folder) and not os.path.isabs(path):
        return storage.join(folder, path)
    return os.path.normpath(os.path.join(folder, path))  # an absolute path stays itself


def _inside(image_uri: str, folder: str) -> bool:
    if storage.is_gcs(folder) or storage.is_gcs(image_uri):
        prefix = folder.rstrip("/") + "/"
        return image_uri.startswith(prefix) and ".." not in image_uri[len(prefix) :].split("/")
    root = os.path.abspath(folder)
    return os.path.abspath(image_uri).startswith(root.rstrip(os.sep) + os.sep)


def _describe_files(listing: Listing) -> None:
    """Give each CSV image its size and version (the fingerprint must change when a file does); a row
    naming a folder or a missing file is skipped with the reason."""
    found = storage.describe_files([image.uri for image in listing.images])
    kept = []
    for image in listing.images:
        info = found.get(image.uri)
        if info is None:
            is_folder = not storage.is_gcs(image.uri) and os.path.isdir(image.uri)
            reason = "a folder, not a file" if is_folder else "no such file"
            listing.skipped.append(Skipped(image.source, reason))
        else:
            kept.append(replace(image, size_bytes=info.size_bytes, version=info.version))
    listing.images = kept


def _check_splits(listing: Listing, where: str) -> None:
    counts = Counter((image.split, image.label) for image in listing.images)
    present = [split for split in SPLITS if any(counts[(split, label)] for label in (0, 1))]
    if "train" not in present:
        raise SourceError(f"{where}: no train images found (found splits: {', '.join(present) or 'none'})")
    for split in present:
        for label, class_name in enumerate(CLASS_NAMES):
            if not counts[(split, label)]:
                raise SourceError(f"{where}: the {split} split has no {class_name} images")
    for split in SPLITS:
        if split not in present:
            listing.notes.append(f"the source has no {split} split")


def assign_splits(
    images: list[SourceImage], val_fraction: float, keep_val: bool, seed: int
) -> tuple[list[SourceImage], list[str]]:
    """Carve a validation split out of train, stratified by class and grouped by patient.

    The source's own val split is merged into train first unless `keep_val`; the test split is never
    touched. Returns the images with their final split, sorted by source, and notes on what was done.
    """
    notes: list[str] = []
    source_val = [image for image in images if image.split == "val"]
    if keep_val:
        if not source_val:
            raise SourceError("keep_val is set but the source has no val split")
        notes.append(f"kept the source's own val split ({len(source_val)} images)")
        return sorted(images, key=lambda image: image.source), notes
    if source_val:
        notes.append(f"merged the source's val split ({len(source_val)} images) into train")
    pool = [image for image in images if image.split in ("train", "val")]
    test = [image for image in images if image.split == "test"]
    val_patients = _pick_validation_patients(pool, val_fraction, seed)
    assigned = [
        replace(image, split="val" if image.patient_id in val_patients else "train") for image in pool
    ]
    if val_fraction > 0:
        notes.append(
            f"validation: {len(val_patients)} patients, "
            f"{sum(image.split == 'val' for image in assigned)} images carved out of train"
        )
    return sorted(assigned + test, key=lambda image: image.source), notes


def _pick_validation_patients(pool: list[SourceImage], val_fraction: float, seed: int) -> set[str]:
    if not 0 <= val_fraction < 1:
        raise SourceError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_patient: dict[str, list[SourceImage]] = defaultdict(list)
    for image in pool:
        by_patient[image.patient_id].append(image)
    # A patient is stratified by its majority class (ties: the lower label); in Kaggle each patient
    # has one class anyway.
    patients_by_class: dict[int, list[str]] = defaultdict(list)
    for patient, patient_images in sorted(by_patient.items()):
        labels = Counter(image.label for image in patient_images)
        patients_by_class[max(sorted(labels), key=labels.__getitem__)].append(patient)
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for label in sorted(patients_by_class):
        patients = patients_by_class[label]
        target = round(val_fraction * sum(len(by_patient[p]) for p in patients))
        taken = 0
        for index in rng.permutation(len(patients)):
            if taken >= target:
                break
            chosen.add(patients[index])
            taken += len(by_patient[patients[index]])
    return chosen
