"""Writing a dataset once: source images -> shuffled TFRecord shards + manifest, locally or on GCS.

Each shard is written by a worker process and published atomically together with a small sidecar
(_work/<shard>.json); the manifest is written last. A folder without a manifest is never a dataset, and a
re-run with the same inputs and options reuses every shard whose sidecar exists.

Past ~500 lines on purpose: one file format's writer (shards, sidecars, plan, manifest) with its crash
safety and cleanup rules, which only make sense read together.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import secrets
import sys
import tempfile
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

import pneumo_dist
from pneumo_dist import folder_lock, pseudonyms, schema, sources, storage, tfrecord
from pneumo_dist import images as imaging
from pneumo_dist.errors import PneumoDistError
from pneumo_dist.sources import SourceImage

DEFAULT_STORED_SIZE_PX = 256
WORK_FOLDER = "_work"
PLAN_NAME = "plan.json"
LOCK_NAME = "lock.json"
_SIZE_SAMPLE = 8  # images encoded up front to estimate the bytes per record, hence the shard count


class ShardError(PneumoDistError):
    """make_shards cannot go on; the message names the file, folder or option."""


@dataclass(frozen=True)
class ShardOptions:
    stored_size_px: int | None = None  # None: 256, or the native size of a .npz source
    image_format: str = "jpeg"
    jpeg_quality: int = imaging.DEFAULT_JPEG_QUALITY
    val_fraction: float = 0.15
    keep_val: bool = False
    seed: int = 0
    # tf.data wants many more shards than parallel readers and each ideally tens of MB or more. The
    # whole Kaggle set is about 100 MB at 256 px, so the shard floor matters more than the size target.
    shard_target_mb: float = 100.0
    min_shards: int = 16
    max_pixels: int = imaging.DEFAULT_MAX_PIXELS
    strict: bool = False  # stop at the first bad file, and at images found in two splits
    allow_outside_paths: bool = False  # CSV rows may name files outside the CSV's folder
    # Records keep a patient id only as HMAC-SHA256(patient_key, id) (pseudonym). The key is secret: no
    # output holds it, the manifest only its fingerprint (patient_key_fingerprint); the same key links
    # two datasets' patients. None: a random key for this run only (nothing links its pseudonyms to
    # another run's, and a re-run cannot reuse its shards); jobs/make_shards.py gives the user's key.
    patient_key: str | None = field(default=None, repr=False)

    def validate(self) -> None:
        def bad(name: str, why: str) -> ShardError:
            return ShardError(f"option {name}={getattr(self, name)!r}: {why}")

        if self.stored_size_px is not None and not 8 <= self.stored_size_px <= 4096:
            raise bad("stored_size_px", "must be between 8 and 4096")
        if self.image_format not in imaging.IMAGE_FORMATS:
            raise bad("image_format", f"must be one of {', '.join(imaging.IMAGE_FORMATS)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise bad("jpeg_quality", "must be between 1 and 100")
        if not 0 <= self.val_fraction < 1:
            raise bad("val_fraction", "must be in [0, 1)")
        if self.shard_target_mb <= 0:
            raise bad("shard_target_mb", "must be positive")
        if self.min_shards < 1:
            raise bad("min_shards", "must be at least 1")
        if self.max_pixels < 1:
            raise bad("max_pixels", "must be positive")
        if self.patient_key is not None and len(self.patient_key) < pseudonyms.MIN_KEY_CHARS:
            # (never echoed)
            raise ShardError(f"the patient key must be at least {pseudonyms.MIN_KEY_CHARS} characters")


@dataclass(frozen=True)
class ShardTask:
    name: str  # e.g. "train-00003-of-00016.tfrecord"
    images: tuple[SourceImage, ...]
    destination: str  # the dataset folder


@dataclass(frozen=True)
class Sidecar:
    """_work/<shard>.json: what write_shard wrote into one shard, published after the shard (its presence
    means the shard is complete); the manifest is built from these."""

    path: str  # the shard's name
    records: int
    bytes: int
    sha256: str  # of the shard file
    counts: dict[str, int]  # class name -> records
    patients: list[str]  # pseudonyms
    contents: list[tuple[str, str]]  # (sha256 of the source bytes, source) per record: duplicates
    skipped: list[schema.Skipped]
    dicom_records: int

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Sidecar:
        """Raises ValueError, TypeError, KeyError or AttributeError for a file that is not a sidecar."""
        fields = json.loads(raw)
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
        contents = [(sha256, source) for sha256, source in fields["contents"]]
        skipped = [schema.Skipped(**s) for s in fields["skipped"]]
        return cls(**(fields | {"contents": contents, "skipped": skipped}))


@dataclass(frozen=True)
class Plan:
    """_work/plan.json, written before the first shard: the run's fingerprint and shard names, so that a
    re-run knows which files an interrupted run wrote (and may delete) and whether its shards fit."""

    fingerprint: str | None = None
    shards: list[str] = field(default_factory=list)

    def write(self, uri: str) -> None:
        storage.write_bytes(uri, json.dumps(dataclasses.asdict(self)).encode())

    @classmethod
    def read(cls, uri: str) -> Plan:
        """The plan at `uri`; an empty plan when there is none, or it is damaged (it names nothing then)."""
        try:
            fields = json.loads(storage.read_bytes(uri))
        except (storage.StorageNotFound, json.JSONDecodeError, UnicodeDecodeError):
            return cls()
        if not isinstance(fields, dict):
            return cls()
        names = fields.get("shards")
        fingerprint = fields.get("fingerprint")
        return cls(
            fingerprint if isinstance(fingerprint, str) else None,
            [n for n in names if isinstance(n, str)] if isinstance(names, list) else [],
        )


@dataclass(frozen=True)
class Result:
    manifest_uri: str
    manifest: schema.Manifest
    shards_written: int
    shards_reused: int
    unchanged: bool  # a complete dataset from the same inputs and options was already there


def make_shards(
    source_uri: str,
    destination: str,
    options: ShardOptions = ShardOptions(),
    overwrite: bool = False,
    workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Result:
    """Convert `source_uri` into a dataset at `destination`. `on_progress(done, total)` counts images.
    Longer than a screen, read top to bottom: list the source, assign splits, fingerprint the inputs,
    claim the destination (or find it complete), plan, write the shards, write the manifest last."""
    options.validate()
    destination = destination.rstrip("/")
    # The workers start first, so that their start-up overlaps listing and planning.
    with (
        _worker_pool(workers) as pool,
        tempfile.TemporaryDirectory(prefix="pneumo-shards-") as scratch,
        folder_lock.hold(destination, _work_folder(destination), LOCK_NAME),
    ):
        local_npz = None
        if source_uri.lower().endswith(".npz") and storage.is_gcs(source_uri):
            local_npz = os.path.join(scratch, storage.basename(source_uri))
            storage.download(source_uri, local_npz)
        listing = sources.list_source(source_uri, local_npz, options.allow_outside_paths)
        if options.strict and listing.skipped:
            first = listing.skipped[0]
            raise ShardError(f"{first.source}: {first.reason} (--strict stops at the first bad file)")
        assigned, split_notes = sources.assign_splits(
            listing.images, options.val_fraction, options.keep_val, options.seed
        )
        options = _resolve_stored_size(options, listing)
        inputs = _inputs_digest(listing, assigned)
        if options.patient_key is None:
            options = dataclasses.replace(options, patient_key=secrets.token_hex(32))
        fingerprint = _fingerprint(inputs, options)
        manifest_uri = storage.join(destination, schema.MANIFEST_NAME)

        existing = _read_manifest_if_any(manifest_uri)
        if existing is not None and not overwrite:
            if existing.get("fingerprint") == fingerprint:
                return Result(manifest_uri, schema.Manifest.from_dict(existing, manifest_uri), 0, 0, True)
            raise ShardError(
                f"{destination} already holds a dataset made from other inputs or options "
                f"({manifest_uri}); pass --overwrite to replace it"
            )
        plan_uri = storage.join(destination, WORK_FOLDER, PLAN_NAME)
        plan = Plan.read(plan_uri)
        ours = _claim(destination, existing, plan, overwrite)
        tasks = _plan_shards(assigned, options, destination, pool)
        if overwrite or existing is not None or plan.fingerprint != fingerprint:
            _delete(ours, destination)
            Plan(fingerprint, [task.name for task in tasks]).write(plan_uri)

        done, written = _write_shards(tasks, options, pool, on_progress)
        manifest = _build_manifest(source_uri, listing, split_notes, options, fingerprint, tasks, done)
        if options.strict and manifest.duplicates:
            first = manifest.duplicates[0].sources
            raise ShardError(
                f"{len(manifest.duplicates)} images appear in more than one split, e.g. "
                f"{first[0].source} ({first[0].split}) = {first[1].source} ({first[1].split}) "
                "(--strict); no manifest was written"
            )
        # The manifest is the commit point: written last, atomically.
        storage.write_bytes(manifest_uri, manifest.to_json())
        _delete(_work_files(destination, [task.name for task in tasks]), destination)
        _delete_leftover_temporaries(destination)
        return Result(manifest_uri, manifest, written, len(tasks) - written, unchanged=False)


def _claim(destination: str, existing: dict | None, plan: Plan, overwrite: bool) -> set[str]:
    """The files under `destination` an earlier make_shards wrote (ours to replace); a ShardError when
    others are there too, unless `overwrite` (they are left alone then)."""
    present = [info.uri for info in storage.list_files(destination)]
    ours = _files_we_wrote(destination, existing, plan, present)
    foreign = [uri for uri in present if uri not in ours]
    if foreign and not overwrite:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ShardError(
            f"{destination} holds files make_shards did not write ({shown}): choose an empty folder, "
            "or pass --overwrite to write the dataset beside them (they are left alone)"
        )
    return ours


def _write_shards(
    tasks: list[ShardTask], options: ShardOptions, pool, on_progress
) -> tuple[dict[str, Sidecar], int]:
    """Write every shard without a sidecar (an interrupted run's finished shards are kept) in `pool`;
    -> (every shard's sidecar by name, the number written now)."""
    done = {task.name: _read_sidecar(task.destination, task.name) for task in tasks}
    pending = [task for task in tasks if done[task.name] is None]
    total = sum(len(task.images) for task in tasks)
    progress = total - sum(len(task.images) for task in pending)
    if on_progress:
        on_progress(progress, total)
    futures = {pool.submit(write_shard, task, options): task for task in pending}
    for future in concurrent.futures.as_completed(futures):
        task, sidecar = futures[future], future.result()
        done[task.name] = sidecar
        progress += len(task.images)
        if on_progress:
            on_progress(progress, total)
    return done, len(pending)


# --- planning ---------------------------------------------------------------------------------------


def _resolve_stored_size(options: ShardOptions, listing: sources.Listing) -> ShardOptions:
    if options.stored_size_px is not None:
        return options
    size = DEFAULT_STORED_SIZE_PX
    if listing.source_format == "npz":
        first = listing.images[0]
        with np.load(first.uri) as arrays:
            size = int(max(arrays[first.npz_key].shape[1:3]))
    return dataclasses.replace(options, stored_size_px=size)


def public_options(options: ShardOptions) -> dict:
    """The options as the manifest and the dataset's fingerprint hold them: the key as its fingerprint."""
    settings = dataclasses.asdict(options)
    key = settings.pop("patient_key")
    settings["patient_key_fingerprint"] = pseudonyms.key_fingerprint(key) if key else None
    return settings


def _inputs_digest(listing: sources.Listing, assigned: list[SourceImage]) -> bytes:
    """sha256 of what the dataset is made from: the source's form, the files that label it, and each
    image with its split."""
    digest = hashlib.sha256(listing.source_format.encode())
    for uri in listing.described_by:
        digest.update(storage.read_bytes(uri))  # labels, patient ids, subtypes, ...
    for image in assigned:
        line = f"{image.source}|{image.split}|{image.label}|{image.size_bytes}"
        # A CSV's images also count their modification time: a CSV names files it does not describe.
        digest.update(f"{line}|{image.version}\n".encode() if image.version else f"{line}\n".encode())
    return digest.digest()


def _fingerprint(inputs: bytes, options: ShardOptions) -> str:
    """Identifies the inputs (_inputs_digest) and options; the same fingerprint means the same dataset."""
    settings = public_options(options)
    # Whether we stop, or may read outside a CSV's folder, does not change what is written.
    settings.pop("strict")
    settings.pop("allow_outside_paths")
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode() + inputs).hexdigest()


def _plan_shards(
    assigned: list[SourceImage], options: ShardOptions, destination: str, pool
) -> list[ShardTask]:
    bytes_per_image = _estimate_bytes_per_image(assigned, options, pool)
    tasks = []
    for split in schema.SPLITS:
        split_images = [image for image in assigned if image.split == split]
        if not split_images:
            continue
        # Seeded per split, so that one split's order does not depend on the others.
        rng = np.random.default_rng([options.seed, schema.SPLITS.index(split)])
        shuffled = [split_images[i] for i in rng.permutation(len(split_images))]
        by_size = math.ceil(len(shuffled) * bytes_per_image / (options.shard_target_mb * 1e6))
        count = min(len(shuffled), max(options.min_shards, by_size))
        for index in range(count):
            tasks.append(
                ShardTask(
                    name=f"{split}-{index:05d}-of-{count:05d}.tfrecord",
                    images=tuple(shuffled[index::count]),
                    destination=destination,
                )
            )
    return tasks


def _estimate_bytes_per_image(assigned: list[SourceImage], options: ShardOptions, pool) -> float:
    sample = assigned[:: max(1, len(assigned) // _SIZE_SAMPLE)][:_SIZE_SAMPLE]
    sizes = [size for size in pool.map(_encoded_size, sample, itertools.repeat(options)) if size]
    return float(np.mean(sizes)) if sizes else options.stored_size_px**2


# --- the worker -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _worker_pool(workers: int | None):
    """Processes for the CPU-bound conversion; one thread in this process when workers <= 1."""
    workers = workers or os.cpu_count() or 1
    if workers <= 1:
        pool = concurrent.futures.ThreadPoolExecutor(1)
    else:
        context = multiprocessing.get_context(_start_method())
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_end_with_parent, initargs=(os.getpid(),)
        )
        for _ in range(workers):
            pool.submit(int)  # start every worker now rather than on demand
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _end_with_parent(parent: int) -> None:
    """A worker ends when make_shards' process ends, however it ends: killed (SIGKILL runs no
    cleanup), its workers would otherwise go on converting for nobody. Linux's PR_SET_PDEATHSIG;
    elsewhere nothing."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the signal was asked for
        os._exit(1)


def _start_method() -> str:
    # fork starts a worker in milliseconds where spawn spends ~0.3 s re-importing (15% of converting 600
    # X-rays on 2 cores). But forking a process that runs other threads (TensorFlow's pools, a progress
    # bar's monitor) can deadlock the child, and macOS frameworks are not fork-safe: fork only a
    # single-threaded Linux process without TensorFlow loaded. GCS clients are per process (storage.py).
    single_threaded = threading.active_count() == 1 and "tensorflow" not in sys.modules
    return "fork" if sys.platform == "linux" and single_threaded else "spawn"


def _encoded_size(image: SourceImage, options: ShardOptions) -> int | None:
    try:
        return len(_convert(image, options)[0])
    except (imaging.BadImage, storage.StorageNotFound, storage.UnreadableFile):
        return None


def write_shard(task: ShardTask, options: ShardOptions) -> Sidecar:
    """Convert one shard's images, publish the shard, then its sidecar; return the sidecar."""
    uri = storage.join(task.destination, task.name)
    skipped: list[schema.Skipped] = []
    counts: Counter = Counter()
    patients: set[str] = set()
    contents: list[tuple[str, str]] = []  # (source sha256, source): duplicates across splits
    digest = hashlib.sha256()
    records = dicom_records = 0
    if not storage.is_gcs(uri):
        os.makedirs(task.destination, exist_ok=True)
    fd, local_path = tempfile.mkstemp(
        prefix=f".{task.name}.", suffix=".tmp", dir=None if storage.is_gcs(uri) else task.destination
    )
    storage.give_ordinary_permissions(local_path)  # as the manifest and every other file: 0644
    try:
        with os.fdopen(fd, "wb") as out:
            for image in task.images:
                try:
                    encoded, sha256, (height, width), dicom = _convert(image, options)
                except (imaging.BadImage, storage.StorageNotFound, storage.UnreadableFile) as error:
                    if options.strict:
                        raise ShardError(
                            f"{image.source}: {error} (--strict stops at the first bad file)"
                        ) from None
                    skipped.append(schema.Skipped(image.source, str(error)))
                    continue
                patient = pseudonyms.pseudonym(image.patient_id, options.patient_key)
                if dicom is not None:  # the source's own values win over the file's
                    dicom_records += 1
                    image = dataclasses.replace(
                        image, sex=image.sex or dicom[0], age_band=image.age_band or dicom[1]
                    )
                features = _features(image, patient, encoded, sha256, height, width, options)
                record = tfrecord.frame(tfrecord.encode_example(features))
                out.write(record)
                digest.update(record)
                records += 1
                counts[schema.CLASS_NAMES[image.label]] += 1
                patients.add(patient)
                contents.append((sha256, image.source))
        size_bytes = os.path.getsize(local_path)
        storage.move_local_into_place(local_path, uri)
    finally:
        if os.path.exists(local_path):
            os.remove(local_path)
    sidecar = Sidecar(
        path=task.name,
        records=records,
        bytes=size_bytes,
        sha256=digest.hexdigest(),
        counts=dict(sorted(counts.items())),
        patients=sorted(patients),
        contents=contents,
        skipped=skipped,
        dicom_records=dicom_records,
    )
    storage.write_bytes(_sidecar_uri(task.destination, task.name), sidecar.to_json())
    return sidecar


def _convert(
    image: SourceImage, options: ShardOptions
) -> tuple[bytes, str, tuple[int, int], tuple[str, str] | None]:
    """-> (encoded stored image, sha256 of the source bytes, (original height, original width), a DICOM
    file's (sex, age band) or None for other files)."""
    if image.npz_key:
        pixels = _npz_array(image.uri, image.npz_key)[image.npz_index]
        encoded = imaging.array_to_stored_image(
            pixels, options.stored_size_px, options.image_format, options.jpeg_quality
        )
        return encoded, hashlib.sha256(pixels.tobytes()).hexdigest(), pixels.shape[:2], None
    data = storage.read_bytes(image.uri)
    sha256 = hashlib.sha256(data).hexdigest()
    if not imaging.is_dicom(data):
        encoded, original_size = imaging.to_stored_image(
            data, options.stored_size_px, options.image_format, options.jpeg_quality, options.max_pixels
        )
        return encoded, sha256, original_size, None
    # One parse of the file: its pixels and the patient's sex and age.
    gray, original_size, header = imaging.decode_dicom(data, options.max_pixels, ("PatientSex", "PatientAge"))
    encoded = imaging.encode(
        imaging.resize_square(gray, options.stored_size_px), options.image_format, options.jpeg_quality
    )
    sex_and_age = sources.sex_and_age_band(header["PatientSex"], header["PatientAge"])
    return encoded, sha256, original_size, sex_and_age


@functools.cache
def _npz_array(path: str, key: str) -> np.ndarray:
    with np.load(path) as arrays:
        return arrays[key]


def _features(
    image: SourceImage, patient: str, encoded: bytes, sha256: str, height: int, width: int, options
) -> dict:
    return {
        schema.IMAGE_KEY: encoded,
        schema.IMAGE_FORMAT_KEY: options.image_format.encode(),
        schema.LABEL_KEY: image.label,
        schema.SUBTYPE_KEY: image.subtype.encode(),
        schema.PATIENT_KEY: patient.encode(),
        schema.SEX_KEY: image.sex.encode(),
        schema.AGE_BAND_KEY: image.age_band.encode(),
        schema.SITE_KEY: image.site.encode(),
        schema.SCANNER_KEY: image.scanner.encode(),
        schema.BOXES_KEY: image.boxes,
        schema.SOURCE_KEY: image.source.encode(),
        schema.SOURCE_SHA256_KEY: sha256.encode(),
        schema.ORIGINAL_HEIGHT_KEY: int(height),
        schema.ORIGINAL_WIDTH_KEY: int(width),
    }


# --- state on the destination -----------------------------------------------------------------------


def _sidecar_uri(destination: str, shard_name: str) -> str:
    return storage.join(destination, WORK_FOLDER, shard_name + ".json")


def _read_sidecar(destination: str, shard_name: str) -> Sidecar | None:
    # The sidecar is published after its shard, so its presence means the shard is complete. One that
    # cannot be read (damaged by a crash of the disk or VM) means the shard must be written again.
    try:
        return Sidecar.from_json(storage.read_bytes(_sidecar_uri(destination, shard_name)))
    except storage.StorageNotFound:
        return None
    except (ValueError, TypeError, KeyError, AttributeError):  # (JSON and Unicode errors are ValueErrors)
        return None


def _read_manifest_if_any(manifest_uri: str) -> dict | None:
    try:
        manifest = json.loads(storage.read_bytes(manifest_uri))
    except storage.StorageNotFound:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ShardError(f"{manifest_uri} exists but is not valid JSON ({error}); use --overwrite") from None
    if not isinstance(manifest, dict):
        raise ShardError(f"{manifest_uri} is not a pneumo-dist manifest; use --overwrite")
    return manifest


_SHARD_NAME = re.compile(r"(train|val|test)-\d{5}-of-\d{5}\.tfrecord")


# A killed process leaves its temporary files beside their targets (storage.write_bytes, write_shard).
_TEMPORARY = re.compile(r"\.(.+)\.[^./]+\.tmp")


def _files_we_wrote(destination: str, manifest: dict | None, plan: Plan, present: list[str]) -> set[str]:
    """URIs under `destination` that an earlier make_shards wrote, by the names its manifest and its plan
    recorded, with their sidecars and, among the `present` files, the temporary files of a killed run.
    Nothing else is ever deleted."""
    names = set(plan.shards)
    with contextlib.suppress(AttributeError, KeyError, TypeError):  # a damaged manifest names nothing
        names.update(shard["path"] for split in manifest["splits"].values() for shard in split["shards"])
    shards = sorted(n for n in names if isinstance(n, str) and _SHARD_NAME.fullmatch(n))
    ours = {storage.join(destination, name) for name in [schema.MANIFEST_NAME, *shards]}
    ours.update(_work_files(destination, shards))
    for uri in present:
        folder, _, name = uri.rpartition("/")
        match = _TEMPORARY.fullmatch(name)
        if match and storage.join(folder, match.group(1)) in ours:
            ours.add(uri)
    return ours


def _work_folder(destination: str) -> str:
    return storage.join(destination, WORK_FOLDER)


def _delete_leftover_temporaries(destination: str) -> None:
    """The half-written shards of runs that were killed (no cleanup runs then), once a run completed:
    the lock held, no other make_shards writes here. Only files named as ours."""
    if storage.is_gcs(destination):
        return  # (a bucket's shards are written in the local temporary folder)
    for name in os.listdir(destination):
        match = _TEMPORARY.fullmatch(name)
        if match and _SHARD_NAME.fullmatch(match.group(1)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(destination, name))


def _work_files(destination: str, shard_names: list[str]) -> set[str]:
    """The plan, the lock and each shard's sidecar."""
    work = _work_folder(destination)
    names = [PLAN_NAME, LOCK_NAME, *(name + ".json" for name in shard_names)]
    return {storage.join(work, name) for name in names}


def _delete(uris: set[str], destination: str) -> None:
    """Delete these files (the manifest first: a dataset stops being one before its shards go), never
    the lock, then the work folder if that left it empty."""
    manifest = storage.join(destination, schema.MANIFEST_NAME)
    lock = storage.join(_work_folder(destination), LOCK_NAME)
    for uri in sorted(uris, key=lambda uri: uri != manifest):
        if uri != lock:
            storage.delete(uri)


def _duplicates(copies: dict[str, list[schema.Copy]]) -> tuple[list[schema.Duplicate], int]:
    """-> (the same bytes in two splits, the number of groups of identical images within one split).
    Across splits: a patient with no id, or one filed twice; listed, never moved (the test split is never
    touched). Within a split a duplicate only weighs an image twice."""
    duplicates = [
        schema.Duplicate(sha256, sorted(found, key=lambda f: (f.split, f.source)))
        for sha256, found in sorted(copies.items())
        if len({f.split for f in found}) > 1
    ]
    within = sum(1 for found in copies.values() if len(found) > 1 and len({f.split for f in found}) == 1)
    return duplicates, within


def _build_manifest(source_uri, listing, split_notes, options, fingerprint, tasks, done) -> schema.Manifest:
    """The manifest from the listing and each shard's sidecar (`done`): per split its counts, patients and
    shards, then the skipped files, duplicates, notes and class weights. Longer than a screen: most of it
    is the Manifest's fields, one per line."""
    splits: dict[str, schema.Split] = {}
    counts: dict[str, dict[str, int]] = {}
    patients: dict[str, int] = {}
    skipped = list(listing.skipped)
    copies: dict[str, list[schema.Copy]] = defaultdict(list)
    for split in schema.SPLITS:
        shard_names = [task.name for task in tasks if task.name.startswith(split + "-")]
        if not shard_names:
            continue
        sidecars = [done[name] for name in shard_names]
        split_counts = Counter()
        split_patients: set[str] = set()
        for sidecar in sidecars:
            split_counts.update(sidecar.counts)
            split_patients.update(sidecar.patients)
            skipped.extend(sidecar.skipped)
        for sidecar in sidecars:
            for sha256, source in sidecar.contents:
                copies[sha256].append(schema.Copy(split, source))
        for class_name in schema.CLASS_NAMES:
            if not split_counts[class_name]:
                raise ShardError(
                    f"the {split} split has no readable {class_name} images: too few images for "
                    f"val_fraction={options.val_fraction}, or all of them were skipped as bad files"
                )
        counts[split] = {name: split_counts[name] for name in schema.CLASS_NAMES}
        patients[split] = len(split_patients)
        splits[split] = schema.Split(
            records=sum(s.records for s in sidecars),
            shards=[schema.Shard(s.path, s.records, s.bytes, s.sha256) for s in sidecars],
        )
    duplicates, within = _duplicates(copies)
    notes = listing.notes + split_notes
    if within:
        notes = [*notes, f"{within} groups of identical images within one split"]
    train = counts["train"]
    total = sum(train.values())
    source = {"uri": source_uri, "format": listing.source_format}
    if listing.dicom_headers_read or any(sidecar.dicom_records for sidecar in done.values()):
        # What was read of the DICOM files: pixels and display, the patient's id, sex and age.
        source["dicom_attributes_read"] = sorted(
            {*imaging.DICOM_ATTRIBUTES_READ, *sources.DICOM_PATIENT_ATTRIBUTES}
        )
    return schema.Manifest(
        created_utc=storage.utc_timestamp(),
        pneumo_dist_version=pneumo_dist.__version__,
        fingerprint=fingerprint,
        source=source,
        options=public_options(options),
        seed=options.seed,
        image=schema.StoredImage(
            stored_size_px=options.stored_size_px,
            format=options.image_format,
            channels=1,
            jpeg_quality=options.jpeg_quality if options.image_format == "jpeg" else None,
        ),
        counts=counts,
        patients=patients,
        # Balanced weights, n / (classes * n_class): the loss weighs both classes equally.
        class_weights={name: total / (len(train) * n) for name, n in train.items()},
        splits=splits,
        skipped=sorted(skipped, key=lambda s: s.source),
        duplicates=duplicates,
        notes=notes,
    )
