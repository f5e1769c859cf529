"""Listing raw images (Kaggle folders, MedMNIST .npz, CSV, the RSNA challenge), their labels, patients
and splits.

Nothing here decodes pixels: it decides which image goes where, deterministically, before any work. A
DICOM file's header is read for its PatientID only, to keep a patient's images in one split; the id stays
in memory (shards.py stores a salted hash of it).

Past ~500 lines on purpose: five source layouts (Kaggle folders, .npz, CSV, DICOM folders, RSNA) and
the patient and split rules they all go through.
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import numpy as np

from pneumo_dist import storage
from pneumo_dist.errors import PneumoDistError
from pneumo_dist.images import has_image_extension, is_dicom, is_dicom_name
from pneumo_dist.schema import CLASS_NAMES, SPLITS, Skipped

# Kaggle names: person1_bacteria_1.jpeg, person124_virus_246.jpeg, IM-0115-0001.jpeg,
# NORMAL2-IM-0372-0001.jpeg, NORMAL2-IM-0587-0001-0002.jpeg (a patient's second view).
_PNEUMONIA_NAME = re.compile(r"^(person\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
_NORMAL_NAME = re.compile(r"^((?:NORMAL\d*-)?IM-\d+)-\d+", re.IGNORECASE)
_ACQUISITION_NAME = re.compile(r"^(NORMAL\d*-IM|IM|person)[-_]?\d", re.IGNORECASE)
_SYSTEM_FILES = {".ds_store", "thumbs.db", "desktop.ini"}
NOT_AN_IMAGE = "not an image file (expected .jpeg, .jpg, .png, .dcm or a DICOM file)"
# The RSNA Pneumonia Detection Challenge (kaggle.com/c/rsna-pneumonia-detection-challenge): the folder
# holds these files; its test images have no labels and are not listed.
RSNA_LABELS = "stage_2_train_labels.csv"  # patientId,x,y,width,height,Target: a row per box
RSNA_CLASSES = "stage_2_detailed_class_info.csv"  # patientId,class
RSNA_IMAGES = "stage_2_train_images"  # <patientId>.dcm
# What is read of a DICOM file's patient module, besides what images.DICOM_ATTRIBUTES_READ lists: the id
# while listing, only to keep a patient's images in one split (stored as a salted hash, shards.py), and
# sex and age, stored as M/F/O and a ten-year band for subgroup reports.
DICOM_PATIENT_ATTRIBUTES = ("PatientID", "PatientSex", "PatientAge")
# The first bytes of a DICOM file hold its header up to the pixels (a few KiB, more with private data);
# a header that does not fit is read whole.
_DICOM_HEADER_BYTES = 64 * 1024
_HEADER_THREADS = 32  # headers from gs:// are latency-bound reads
SEXES = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}


class SourceError(PneumoDistError):
    """The source cannot be converted as it is (wrong layout, unknown class, bad CSV row)."""


@dataclass(frozen=True)
class SourceImage:
    source: str  # path relative to the source root (npz: "file.npz:train/12"); unique
    uri: str  # where its bytes are read from (npz: the local .npz file)
    label: int  # index into CLASS_NAMES
    patient_id: str
    split: str
    subtype: str = ""  # "bacteria" / "virus" when the name says so; RSNA: its detailed class
    sex: str = ""  # M / F / O, or "" unknown (CSV column; DICOM files: from their header when written)
    age_band: str = ""  # "40-49", "90+", or "" unknown (likewise)
    boxes: tuple[float, ...] = ()  # RSNA: x, y, width, height of each opacity, in source pixels
    site: str = ""  # CSV columns: where and on what the image was taken, for subgroup reports
    scanner: str = ""
    size_bytes: int = -1  # from the listing; part of the dataset fingerprint (-1: unknown)
    version: str = ""  # CSV sources: the file's mtime / object generation, also in the fingerprint
    npz_key: str = ""  # for npz sources: array key and row
    npz_index: int = -1


@dataclass
class Listing:
    source_format: str  # "kaggle", "npz", "csv" or "rsna"
    images: list[SourceImage]
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dicom_headers_read: int = 0  # DICOM files whose DICOM_PATIENT_ATTRIBUTES were read
    # Files whose contents label the images (a CSV; RSNA's two): part of the dataset's fingerprint.
    described_by: list[str] = field(default_factory=list)


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


def age_band(years: float) -> str:
    """Ten-year bands; 90 and over in one (as HIPAA's Safe Harbor method groups ages over 89)."""
    if not 0 <= years < 200:
        return ""
    return "90+" if years >= 90 else f"{int(years // 10) * 10}-{int(years // 10) * 10 + 9}"


def dicom_age_band(value: str) -> str:
    """A DICOM Age String ("045Y", "006M", "003W", "012D") -> its band; "" when absent or malformed."""
    match = re.fullmatch(r"(\d{3})([DWMY])", value.strip().upper())
    if not match:
        return ""
    days = {"D": 1, "W": 7, "M": 365.25 / 12, "Y": 365.25}[match.group(2)]
    return age_band(int(match.group(1)) * days / 365.25)


def parse_label(text: str) -> int | None:
    """A label as a CSV gives it -> 0 (NORMAL) or 1 (PNEUMONIA); None for anything else. The one rule
    for every reader of labels: case and surrounding spaces are ignored ("Pneumonia " is PNEUMONIA), any
    other text is refused."""
    value = text.strip().upper()
    if value in CLASS_NAMES:
        return CLASS_NAMES.index(value)
    if value in ("0", "1"):
        return int(value)
    return None


def list_source(uri: str, local_npz_path: str | None = None, allow_outside_paths: bool = False) -> Listing:
    """List a source by its form: a .npz file, a .csv file, the RSNA challenge's folder (it holds
    stage_2_train_labels.csv), or a Kaggle-layout folder."""
    if uri.lower().endswith(".npz"):
        return list_npz(local_npz_path or uri, source_name=storage.basename(uri))
    if uri.lower().endswith(".csv"):
        return list_csv(uri, allow_outside_paths)
    files = storage.list_files(uri)
    if not files:
        raise SourceError(f"{uri}: no such folder, or it holds no files")
    if any(info.uri == storage.join(uri.rstrip("/"), RSNA_LABELS) for info in files):
        return list_rsna(uri, files)
    return list_kaggle(uri, files)


def list_kaggle(root: str, files: list[storage.FileInfo] | None = None) -> Listing:
    """ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/* with Kaggle's file names; DICOM files may have no
    extension (a PACS export's names), and their PatientID groups them."""
    files = storage.list_files(root) if files is None else files
    if not files:
        raise SourceError(f"{root}: no such folder, or it holds no files")
    listing = Listing("kaggle", [])
    ignored_folders: set[str] = set()
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
        patient, subtype = patient_and_subtype(name)
        listing.images.append(
            SourceImage(
                source=relative,
                uri=info.uri,
                label=CLASS_NAMES.index(class_name),
                patient_id=patient or "",
                split=split,
                subtype=subtype,
                size_bytes=info.size_bytes,
            )
        )
    for folder in sorted(ignored_folders):
        listing.notes.append(f"ignored folder {folder}/: not a split folder (train, val, test)")
    _read_dicom_patients(listing)
    unparsed_patients = sum(not image.patient_id for image in listing.images)
    if unparsed_patients:
        listing.notes.append(
            f"{unparsed_patients} files carry no patient id (no Kaggle file name, no DICOM PatientID); "
            "each is its own patient"
        )
    _own_patients(listing)
    _check_splits(listing, root)
    return listing


def _read_dicom_patients(listing: Listing, skip: set[str] = frozenset()) -> None:
    """Give each DICOM file (.dcm, or any file without an image extension whose header says DICOM: PACS
    exports name files by UID) the PatientID of its header, which wins over one parsed from its name;
    a file that is neither an image nor DICOM is skipped. A header that cannot be read leaves the image
    as it is: writing it will say why. Files in `skip` keep their patient id, but one without an image
    extension is still checked for being DICOM."""
    candidates = [
        image
        for image in listing.images
        if (is_dicom_name(image.source) and image.uri not in skip) or not has_image_extension(image.source)
    ]
    if not candidates:
        return
    with concurrent.futures.ThreadPoolExecutor(_HEADER_THREADS) as pool:
        patients = pool.map(_dicom_patient_id, candidates)
        headers = dict(zip((image.uri for image in candidates), patients, strict=True))
    kept = []
    for image in listing.images:
        header = headers.get(image.uri, "")
        if header is None:  # neither an image nor DICOM
            listing.skipped.append(Skipped(image.source, NOT_AN_IMAGE))
            continue
        listing.dicom_headers_read += image.uri in headers
        keep_id = image.uri in skip or not header
        kept.append(image if keep_id else replace(image, patient_id=f"dicom:{header}"))
    listing.images = kept


def _dicom_patient_id(image: SourceImage) -> str | None:
    """A DICOM file's PatientID ("" when it has none or the file cannot be read); None when a file
    without an image extension is not DICOM."""
    try:
        data = storage.read_prefix(image.uri, _DICOM_HEADER_BYTES)
    except storage.StorageError:
        return ""
    if not is_dicom(data):
        return "" if is_dicom_name(image.source) else None
    (patient,) = _dicom_header(data, "PatientID")
    if not patient and len(data) == _DICOM_HEADER_BYTES:  # maybe a longer header: read the whole file
        try:
            (patient,) = _dicom_header(storage.read_bytes(image.uri), "PatientID")
        except storage.StorageError:
            return ""
    return patient


def sex_and_age_band(sex: str, age: str) -> tuple[str, str]:
    """A DICOM header's PatientSex (-> M/F/O) and PatientAge (-> a ten-year band); "" for what it lacks."""
    return SEXES.get(sex.upper(), ""), dicom_age_band(age)


def _dicom_header(data: bytes, *names: str) -> list[str]:
    """These DICOM_PATIENT_ATTRIBUTES of a DICOM file's header, as stripped text; all "" when the
    header cannot be read (a header cut off by a prefix, or a damaged file, which decoding reports)."""
    import pydicom

    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=list(names))
        return [str(header.get(name, "") or "").strip() for name in names]
    except Exception:  # noqa: BLE001 - pydicom raises many types for data it cannot parse
        return [""] * len(names)


def _own_patients(listing: Listing) -> None:
    """An image with no patient id is its own patient (its source path as the id)."""
    listing.images = [
        image if image.patient_id else replace(image, patient_id=image.source) for image in listing.images
    ]


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
            try:
                images, labels = arrays[images_key], arrays[labels_key].reshape(-1)
            except ValueError as error:  # object arrays: pickled Python objects, never loaded
                raise SourceError(f"{source_name}: {images_key!r} or {labels_key!r}: {error}") from None
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
    """A CSV with a header: path,label[,patient_id][,split][,subtype][,sex][,age][,site][,scanner];
    paths relative to the CSV's folder. `sex` is M/F/O (or male/female/other), `age` years (stored as a
    ten-year band), `site` and `scanner` free text (evaluation reports figures per value).

    A row naming a file outside the CSV's folder (`..`, an absolute path, another bucket) is an error
    unless `allow_outside_paths`: a CSV from a bucket must not choose which local files get read.
    """
    folder = storage.parent(uri)
    listing = Listing("csv", [], described_by=[uri])
    seen: set[str] = set()
    given_ids: set[str] = set()  # images whose row names the patient: the CSV's column wins
    for where, row in _csv_rows(uri, ("path", "label")):
        path = row["path"]
        label = parse_label(row["label"])
        if label is None:
            raise SourceError(f"{where}: label {row['label']!r} is not one of {', '.join(CLASS_NAMES)}, 0, 1")
        split = (row.get("split") or "train").lower()  # as labels: case and surrounding spaces ignored
        if split not in SPLITS:
            raise SourceError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        if path in seen:
            raise SourceError(f"{where}: {path} is listed twice")
        seen.add(path)
        name = path.rsplit("/", 1)[-1]
        image_uri = _csv_row_uri(folder, path)
        if not allow_outside_paths and not _inside(image_uri, folder):
            raise SourceError(
                f"{where}: {path} is outside the CSV's folder {folder}; pass --allow-outside-paths "
                "to read files elsewhere"
            )
        parsed_patient, parsed_subtype = patient_and_subtype(name)
        if row.get("patient_id"):
            given_ids.add(image_uri)
        listing.images.append(
            SourceImage(
                source=path,
                uri=image_uri,
                label=label,
                patient_id=row.get("patient_id") or parsed_patient or "",
                split=split,
                subtype=(row.get("subtype") or parsed_subtype).lower(),
                sex=_csv_sex(row.get("sex", ""), where),
                age_band=_csv_age_band(row.get("age", ""), where),
                site=row.get("site", ""),
                scanner=row.get("scanner", ""),
            )
        )
    _describe_files(listing)
    _read_dicom_patients(listing, skip=given_ids)
    unparsed_patients = sum(not image.patient_id for image in listing.images)
    if unparsed_patients:
        listing.notes.append(f"{unparsed_patients} rows have no patient id; each is its own patient")
    _own_patients(listing)
    _check_splits(listing, uri)
    return listing


def list_rsna(root: str, files: list[storage.FileInfo]) -> Listing:
    """The RSNA Pneumonia Detection Challenge's folder: stage_2_train_images/<patientId>.dcm, labelled by
    stage_2_train_labels.csv (a row per opacity box; Target 1 is PNEUMONIA, its boxes are kept) and,
    when present, stage_2_detailed_class_info.csv (the detailed class, kept as the subtype). Every image
    is train: validation is carved out by patient, and the challenge's test images have no labels.
    Longer than a screen: both CSVs are checked row by row, each error naming its line."""
    root = root.rstrip("/")
    labels_uri = storage.join(root, RSNA_LABELS)
    listing = Listing("rsna", [], described_by=[labels_uri])
    targets: dict[str, int] = {}
    boxes: dict[str, list[float]] = defaultdict(list)
    for where, row in _csv_rows(labels_uri, ("patientId", "x", "y", "width", "height", "Target")):
        patient, target = row["patientId"], row["Target"]
        if target not in ("0", "1"):
            raise SourceError(f"{where}: Target {target!r} is not 0 or 1")
        if targets.setdefault(patient, int(target)) != int(target):
            # The line, not the id: no patient identifier goes to a log.
            raise SourceError(f"{where}: this patientId has rows with Target 0 and Target 1")
        if target == "1":
            try:
                box = [float(row[key]) for key in ("x", "y", "width", "height")]
            except ValueError:
                box = []
            # float() takes "nan", "inf" and "-5": a box is finite, inside positive coordinates, not empty.
            if len(box) != 4 or not all(math.isfinite(v) and v >= 0 for v in box) or min(box[2:]) <= 0:
                raise SourceError(
                    f"{where}: Target 1 needs a box: x, y >= 0 and width, height > 0 as finite numbers"
                )
            boxes[patient] += box
    classes: dict[str, str] = {}
    classes_uri = storage.join(root, RSNA_CLASSES)
    if any(info.uri == classes_uri for info in files):
        listing.described_by.append(classes_uri)
        for where, row in _csv_rows(classes_uri, ("patientId", "class")):
            detailed = row["class"].lower()
            if classes.setdefault(row["patientId"], detailed) != detailed:
                raise SourceError(f"{where}: this patientId has another class on an earlier line")
    else:
        listing.notes.append(f"no {RSNA_CLASSES}: the records carry no detailed class")
    by_uri = {info.uri: info for info in files}
    images_folder = storage.join(root, RSNA_IMAGES)
    for patient in sorted(targets):
        try:
            uri = storage.child(images_folder, f"{patient}.dcm", read_from=labels_uri)
        except storage.UnsafeName as error:
            raise SourceError(str(error)) from None
        source = f"{RSNA_IMAGES}/{patient}.dcm"
        if uri not in by_uri:
            listing.skipped.append(Skipped(source, "no such file"))
            continue
        listing.images.append(
            SourceImage(
                source=source,
                uri=uri,
                label=targets[patient],
                patient_id=patient,
                split="train",
                subtype=classes.get(patient, ""),
                size_bytes=by_uri[uri].size_bytes,
                boxes=tuple(boxes[patient]),
            )
        )
    unlabelled = sum(info.uri.startswith(images_folder + "/") for info in files) - len(listing.images)
    if unlabelled:
        listing.notes.append(
            f"ignored {unlabelled} files in {RSNA_IMAGES}/ that {RSNA_LABELS} does not label"
        )
    _check_splits(listing, root)
    return listing


def _csv_rows(uri: str, required: tuple[str, ...]):
    """(where, row) of each line of a CSV with a header naming at least `required`; values stripped."""
    try:
        text = storage.read_bytes(uri).decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise SourceError(f"{uri}: not UTF-8 text: {error}") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = set(required) - {c.strip() for c in reader.fieldnames or []}
    if missing:
        named = ", ".join(required[:-1]) + " and " + required[-1]
        raise SourceError(f"{uri}: header must name {named} (missing: {', '.join(sorted(missing))})")
    for line_number, raw in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
        where = f"{uri} line {line_number}"
        if not row.get(required[0]):
            raise SourceError(f"{where}: empty {required[0]}")
        yield where, row


def _csv_sex(value: str, where: str) -> str:
    if not value:
        return ""
    if value.upper() not in SEXES:
        raise SourceError(f"{where}: sex {value!r} is not one of M, F, O (male, female, other) or empty")
    return SEXES[value.upper()]


def _csv_age_band(value: str, where: str) -> str:
    if not value:
        return ""
    try:
        years = float(value)
    except ValueError:
        years = math.nan
    if not 0 <= years < 200:
        raise SourceError(f"{where}: age {value!r} is not a number of years (0-199) or empty")
    return age_band(years)


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
