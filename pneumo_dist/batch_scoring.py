"""Scoring an archive of images on Ray Data: `jobs/predict.py --ray`.

    files (a local folder or a gs:// prefix, listed once, sorted)
      -> read and make the stored-format image on CPU tasks (Pillow, as make_shards)
      -> decode, resize and score in map_batches on a pool of model actors (one per GPU, or per N CPUs)
      -> OUT/part-NNNNN.parquet, written by the driver as each part's last row arrives

The sorted list is cut into parts of `part_size` images; a part's file is written once all its rows
are in, atomically (storage.write_bytes). A run that died is started again with the same command: the
parts whose files exist are skipped. OUT/_job.json records what the parts were cut from (the list's
hash, the part size, the model and its threshold), and a run with other inputs is refused rather than
mixed into the same folder. A bad image is a row with `error` set; it never stops the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable

import numpy as np

from pneumo_dist import export as export_lib
from pneumo_dist import images, storage
from pneumo_dist.errors import PneumoDistError

JOB_FILE = "_job.json"
PART_NAME = "part-{:05d}.parquet"
COLUMNS = ("path", "label", "probability", "threshold", "model_version", "error", "sha256", "height", "width")


class ScoringError(PneumoDistError):
    pass


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """PneumoniaDetector.load's choice of threshold (None: the export's)."""

    threshold: float | None = None
    policy: str | None = None
    prevalence: float | None = None


def list_images(inputs: list[str]) -> list[str]:
    """Image files (.jpeg/.jpg/.png/.dcm, and DICOM files of any name, by their preamble) under local
    folders and gs:// prefixes, and files given as they are; sorted and without repeats, so the same
    inputs always make the same parts."""
    found = set()
    for item in inputs:
        if storage.is_gcs(item) or os.path.isdir(item):
            found.update(f.uri for f in storage.list_files(item) if images.is_image_file(f.uri))
        else:
            found.add(item)
    return sorted(found)


def score(
    paths: list[str],
    model_uri: str,
    out: str,
    point: OperatingPoint = OperatingPoint(),
    part_size: int = 10_000,
    address: str | None = None,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float | None = None,
    batch_size: int = 64,
    tta_views: int = 1,
    verbose: bool = False,
    on_scored: Callable[[int], None] | None = None,
) -> dict[str, int | str]:
    """Score `paths` into OUT's parts on Ray (ray_setup.connect_ray's `address`, joined only once the model,
    the operating point and OUT are known to be right) -> counts of labels and errors over the parts
    this run wrote, "skipped_parts" and "ray" (cluster or in-process). `gpus_per_actor` None: 1 on a
    cluster with GPUs, else 0; `actors` None: one per GPU, else the CPUs but one. `on_scored(n)`: n
    more images scored (a progress bar; Ray Data's own bars and start-up lines only when `verbose`).
    Longer than a screen, read top to bottom: check the model, claim OUT, find the parts already
    written, join Ray, score the rest part by part, count."""
    folder = export_lib.folder_of(model_uri)
    info = check_model(model_uri, point)
    parts = [paths[start : start + part_size] for start in range(0, len(paths), part_size)]
    _claim(out, paths, part_size, folder, point, _model_identity(folder, info, point))
    written = {storage.basename(f.uri) for f in storage.list_files(out)}  # one listing, not one per part
    done = {i for i in range(len(parts)) if PART_NAME.format(i) in written}
    pending = [i for i in range(len(parts)) if i not in done]
    counts: dict[str, int | str] = {"skipped_parts": len(done)}
    if not pending:
        return counts | {"ray": "not started"}
    from pneumo_dist import ray_setup

    counts["ray"] = ray_setup.connect_ray(address, verbose)
    import ray

    if not verbose:
        context = ray.data.DataContext.get_current()  # (importing ray.data sets its logging up)
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its start and end lines, its bars' notice

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 1), resources.get("GPU", 0)
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus else 0.0
    if actors is None:
        actors = int(gpus // gpus_per_actor) if gpus_per_actor else max(1, int((cpus - 1) // cpus_per_actor))
    if actors * cpus_per_actor > cpus - 1:
        raise ScoringError(
            f"{actors} actors x {cpus_per_actor:g} CPUs leave less than 1 of the cluster's {cpus:g} CPUs "
            "to read and prepare the images: give fewer --actors or a smaller --cpus-per-actor"
        )
    rows = [{"path": path, "part": index} for index in pending for path in parts[index]]
    dataset = (
        ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // 16, 2000)))
        .map_batches(
            _prepare_batch, fn_kwargs={"preprocessing": info.preprocessing}, batch_size=16, num_cpus=1
        )
        .map_batches(
            _Scorer,
            fn_constructor_kwargs={"folder": folder, "point": point, "tta_views": tta_views},
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_size=batch_size,
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor,
        )
    )
    waiting = {index: [] for index in pending}
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        if on_scored:
            on_scored(len(batch["path"]))
        for index in map(int, np.unique(batch["part"])):
            chosen = batch["part"] == index
            waiting[index].append({name: batch[name][chosen] for name in COLUMNS})
            if sum(len(b["path"]) for b in waiting[index]) == len(parts[index]):
                for label in _write_part(out, index, waiting.pop(index)):
                    counts[label] = counts.get(label, 0) + 1
    if waiting:  # cannot happen unless Ray Data lost rows: say so rather than leave a gap silently
        raise ScoringError(f"parts {sorted(waiting)} did not receive all their rows; run the job again")
    return counts


def check_model(model_uri: str, point: OperatingPoint) -> export_lib.ExportInfo:
    """The export's info, once its model file is known to exist and the operating point to be valid:
    what the model actors would otherwise fail on, after Ray had started."""
    from pneumo_dist import predict

    folder = export_lib.folder_of(model_uri)
    info = export_lib.read(folder)
    predict.operating_point(info, point.threshold, point.policy, point.prevalence)
    if not storage.exists(info.model_uri(folder)):
        raise export_lib.ExportError(f"{info.model_uri(folder)} is missing: the export is incomplete")
    return info


def _model_identity(folder: str, info: export_lib.ExportInfo, point: OperatingPoint) -> dict:
    """What the rows' scores depend on: the model file's version (the rows' model_version), the
    threshold it is used at and the calibration. Another model put in the same folder changes it."""
    from pneumo_dist import predict

    model_uri = info.model_uri(folder)
    with tempfile.TemporaryDirectory(prefix="pneumo-model-version-") as scratch:
        local = model_uri
        if storage.is_gcs(model_uri):
            local = os.path.join(scratch, "model")
            storage.download(model_uri, local)
        version = export_lib.model_version(local)
    threshold, _ = predict.operating_point(info, point.threshold, point.policy, point.prevalence)
    calibration = dataclasses.asdict(info.calibration) if info.calibration else None
    return {"model_version": version, "threshold": threshold, "calibration": calibration}


def _claim(
    out: str, paths: list[str], part_size: int, model_folder: str, point: OperatingPoint, model: dict
) -> None:
    """Write OUT/_job.json, or check that the one there describes this job: the same images, parts,
    model folder, operating point, and the same model in it (version, threshold, calibration)."""
    job = {
        "paths_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
        "images": len(paths),
        "part_size": part_size,
        "model": model_folder,
        "operating_point": dataclasses.asdict(point),
        **model,
    }
    uri = storage.join(out, JOB_FILE)
    if storage.exists(uri):
        try:
            previous = json.loads(storage.read_bytes(uri))
        except (json.JSONDecodeError, UnicodeDecodeError):
            previous = None
        if (
            isinstance(previous, dict)
            and {k: previous.get(k) for k in model} != model
            and all(previous.get(k) == v for k, v in job.items() if k not in model)
        ):
            raise ScoringError(
                f"{out} holds scores of model {previous.get('model_version')} (threshold "
                f"{previous.get('threshold')}), and {model_folder} now holds model {model['model_version']} "
                f"(threshold {model['threshold']}): give another --out, or restore that model to finish it"
            )
        if previous != job:
            raise ScoringError(
                f"{out} holds the output of another scoring job (other images, part size, model or "
                f"threshold: see {uri}); give another --out, or the same inputs and flags to finish it"
            )
        return
    if storage.list_files(out):
        raise ScoringError(f"{out} is not empty and is not a scoring job's output: give another --out")
    storage.write_bytes(uri, json.dumps(job, indent=1).encode())


def _write_part(out: str, index: int, batches: list[dict]) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {name: np.concatenate([b[name] for b in batches]) for name in COLUMNS}
    order = np.argsort(columns["path"], kind="stable")
    table = pa.table(
        {
            "path": pa.array(columns["path"][order].tolist(), pa.string()),
            "label": pa.array([v or None for v in columns["label"][order].tolist()], pa.string()),
            "probability": pa.array(
                [None if np.isnan(v) else float(v) for v in columns["probability"][order]], pa.float64()
            ),
            "threshold": pa.array(columns["threshold"][order], pa.float64()),
            "model_version": pa.array(columns["model_version"][order].tolist(), pa.string()),
            "error": pa.array([v or None for v in columns["error"][order].tolist()], pa.string()),
            "sha256": pa.array([v or None for v in columns["sha256"][order].tolist()], pa.string()),
            "height": pa.array([v if v > 0 else None for v in columns["height"][order].tolist()], pa.int64()),
            "width": pa.array([v if v > 0 else None for v in columns["width"][order].tolist()], pa.int64()),
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(storage.join(out, PART_NAME.format(index)), buffer.getvalue())
    return [label or "error" for label in columns["label"].tolist()]


def _prepare_batch(batch: dict, preprocessing: export_lib.Preprocessing) -> dict:
    """Read each file and make its stored-format image as make_shards did (Pillow only: these workers
    never import TensorFlow); a bad one gets its error. The actors do the rest of PneumoniaDetector's
    preparation (decode and resize, as the input pipeline)."""
    count = len(batch["path"])
    stored, errors, digests = [b""] * count, [""] * count, [""] * count
    heights, widths = np.zeros(count, np.int64), np.zeros(count, np.int64)
    quality = preprocessing.jpeg_quality or images.DEFAULT_JPEG_QUALITY
    for i, path in enumerate(batch["path"]):
        try:
            content = images.read_file(str(path))
            digests[i] = hashlib.sha256(content).hexdigest()
            stored[i], (heights[i], widths[i]) = images.to_stored_image(
                content, preprocessing.stored_size_px, preprocessing.image_format, quality
            )
        except images.BadImage as error:
            errors[i] = f"{path}: {error}"
    return {
        "path": batch["path"],
        "part": batch["part"],
        "stored": np.array(stored, dtype=object),
        "error": np.array(errors, dtype=object),
        "sha256": np.array(digests, dtype=object),
        "height": heights,
        "width": widths,
    }


class _Scorer:
    """A model actor: loads the export once; decodes and resizes each stored image, scores the batch."""

    def __init__(self, folder: str, point: OperatingPoint, tta_views: int):
        from pneumo_dist import predict

        self.detector = predict.PneumoniaDetector.load(folder, **dataclasses.asdict(point))
        self.tta_views = tta_views

    def __call__(self, batch: dict) -> dict:
        from pneumo_dist import predict

        detector = self.detector
        ok = np.array([not e for e in batch["error"]], bool)
        probabilities = np.full(len(ok), np.nan)
        if ok.any():
            preprocessing = detector.info.preprocessing
            pixels = [
                predict.stored_to_pixels(bytes(b), preprocessing)
                for b, k in zip(batch["stored"], ok, strict=True)
                if k
            ]
            probabilities[ok] = detector.probabilities(np.stack(pixels), self.tta_views)
        labels = [
            detector.prediction(float(p), "").label if k else ""
            for p, k in zip(probabilities, ok, strict=True)
        ]
        count = len(ok)
        return {
            "path": batch["path"],
            "part": batch["part"],
            "label": np.array(labels, dtype=object),
            "probability": probabilities,
            "threshold": np.full(count, detector.threshold),
            "model_version": np.array([detector.version] * count, dtype=object),
            "error": batch["error"],
            "sha256": batch["sha256"],
            "height": batch["height"],
            "width": batch["width"],
        }
