"""The one writer of an export folder (its format: export.py): a trained classifier's inference model,
the calibration and operating thresholds fitted on its validation scores, its validation metrics, the
SavedModel, and export.json last. train.py calls `export_run`, ensemble.py `export_model`; tune.py adds
a SavedModel to a finished export with `add_serving_model`."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras

from pneumo_dist import export as export_lib
from pneumo_dist import metrics as metrics_lib
from pneumo_dist import model as model_lib
from pneumo_dist import serving, storage
from pneumo_dist.config import RunConfig, TrainConfig, to_yaml
from pneumo_dist.run_folder import CONFIG, RunState
from pneumo_dist.schema import StoredImage

METRICS_NAME = "metrics.json"
THRESHOLD_NAME = "threshold.json"


@dataclass(frozen=True)
class Exported:
    uri: str
    threshold: float
    val_metrics: dict  # at the exported threshold


@dataclass(frozen=True)
class _Operating:
    """The thresholds chosen on the validation scores and the one exported."""

    calibration: export_lib.Calibration | None
    probabilities: np.ndarray  # calibrated when `calibration`
    points: dict[str, float]  # policy -> threshold
    policy: str
    threshold: float
    prevalence: float  # PNEUMONIA's share of the validation split


def export_run(
    classifier: tf_keras.Model,
    strategy: tf.distribute.Strategy,
    config: RunConfig,
    stored: StoredImage,
    labels: np.ndarray,
    scores: np.ndarray,
    state: RunState,
    work: str,
    output: str,
    chief: bool,
    warn: Callable[[str], None],
) -> Exported:
    """Write `work`/export (every worker: saving reads distributed variables collectively) and, on the
    chief, publish it to `output`/export. `labels`, `scores`: the exported weights' validation scores;
    `stored`: how the records' images were stored (the manifest's)."""
    operating = _choose_operating_point(config.train, labels, scores, warn)
    at_threshold = metrics_lib.binary_metrics(labels, operating.probabilities, operating.threshold)
    export_dir = _fresh_folder(work)
    model_path = os.path.join(export_dir, export_lib.MODEL_FILE)
    # A plain model (not one of the strategy's distributed variables) can be served as it is.
    plain = strategy is tf.distribute.get_strategy()
    if model_lib.is_mixed_precision(classifier):
        # Float32 whatever the training precision: bfloat16 keeps 8 bits of mantissa (0.4% per value),
        # and float16 has no CPU kernels for some of ResNet50's ops (seen: FusedBatchNormV3). Every
        # worker copies: reading BatchNorm's per-replica statistics is collective.
        detector = model_lib.inference_model(model_lib.float32_copy(classifier, config.model))
        detector.save(model_path)
        plain = True  # the copy is built outside the strategy
    else:
        with strategy.scope():
            detector = model_lib.inference_model(classifier)
        with model_lib.saveable_rates(classifier):  # every worker saves: reads are collective
            detector.save(model_path)
    export_uri = storage.join(output, export_lib.FOLDER)
    if chief:
        if config.train.serving_export and not plain:
            # Under a distribution strategy the model's variables are distributed (and some reads of
            # them collective): the chief serves a plain copy of the file it just wrote.
            detector = tf_keras.models.load_model(model_path, compile=False, safe_mode=True)
        history = {"best_epoch": state.best_epoch, "history": state.history}
        _complete(
            detector, config, stored, labels, scores, operating, at_threshold, history, export_dir, export_uri
        )
    return Exported(uri=export_uri, threshold=operating.threshold, val_metrics=at_threshold)


def export_model(
    detector: tf_keras.Model,
    config: RunConfig,
    stored: StoredImage,
    labels: np.ndarray,
    scores: np.ndarray,
    export_uri: str,
    warn: Callable[[str], None],
    members: list[export_lib.Member],
) -> Exported:
    """Export a plain inference model that was not trained by a run (an ensemble of exports, ensemble.py)
    to the folder `export_uri`, its operating point chosen on `scores`, its validation scores of `labels`."""
    operating = _choose_operating_point(config.train, labels, scores, warn)
    at_threshold = metrics_lib.binary_metrics(labels, operating.probabilities, operating.threshold)
    with tempfile.TemporaryDirectory(prefix="pneumo-export-") as work:
        export_dir = _fresh_folder(work)
        detector.save(os.path.join(export_dir, export_lib.MODEL_FILE))
        described = {"members": [dataclasses.asdict(member) for member in members]}
        _complete(
            detector,
            config,
            stored,
            labels,
            scores,
            operating,
            at_threshold,
            described,
            export_dir,
            export_uri,
            members,
        )
    return Exported(uri=export_uri, threshold=operating.threshold, val_metrics=at_threshold)


def _fresh_folder(work: str) -> str:
    export_dir = os.path.join(work, export_lib.FOLDER)
    if os.path.isdir(export_dir):
        shutil.rmtree(export_dir)  # a previous, possibly partial export
    os.makedirs(export_dir)
    return export_dir


def _complete(
    detector: tf_keras.Model,
    config: RunConfig,
    stored: StoredImage,
    labels: np.ndarray,
    scores: np.ndarray,
    operating: _Operating,
    at_threshold: dict,
    described: dict,
    export_dir: str,
    export_uri: str,
    members: list[export_lib.Member] = (),
) -> None:
    """The documents of an export whose model.keras is in `export_dir`, its SavedModel when asked for,
    then publish it to `export_uri`: export.json last. `detector`: the plain model in that file;
    `described`: what metrics.json says of where the model came from (its epochs, or an ensemble's
    members)."""
    documents = {
        METRICS_NAME: json.dumps(_metrics(labels, scores, operating, at_threshold, described), indent=1),
        THRESHOLD_NAME: json.dumps(_threshold_document(config.train, operating, at_threshold), indent=1),
        CONFIG: to_yaml(config),
    }
    info = _export_info(config, stored, operating, sorted([export_lib.MODEL_FILE, *documents]), list(members))
    if config.train.serving_export:
        version = export_lib.model_version(os.path.join(export_dir, export_lib.MODEL_FILE))
        serving.save(detector, info, version, info.threshold, os.path.join(export_dir, serving.FOLDER))
        info = _with_serving_model(info)
    export_lib.publish(export_dir, export_uri, documents, info)


def add_serving_model(detector) -> None:
    """Write saved_model/ into a finished export (a PneumoniaDetector's folder, local or gs://) and
    name it in export.json, rewritten last: until then the export is the one it was."""
    uri = storage.join(detector.uri, serving.FOLDER)
    serving.save(detector.model, detector.info, detector.version, detector.info.threshold, uri)
    info = _with_serving_model(detector.info)
    storage.write_bytes(storage.join(detector.uri, export_lib.INFO_NAME), export_lib.to_json(info).encode())


def _with_serving_model(info: export_lib.ExportInfo) -> export_lib.ExportInfo:
    files = sorted({*info.files, serving.FOLDER})
    return dataclasses.replace(info, serving_model=serving.FOLDER, files=files)


def _choose_operating_point(
    cfg: TrainConfig, labels: np.ndarray, scores: np.ndarray, warn: Callable[[str], None]
) -> _Operating:
    calibration, probabilities = _calibration(cfg, labels, scores, warn)
    prevalence = float(np.mean(np.asarray(labels) > 0.5))
    points = {
        "sensitivity": metrics_lib.threshold_for_sensitivity(labels, probabilities, cfg.target_sensitivity),
        "youden": metrics_lib.threshold_youden(labels, probabilities),
    }
    if calibration and cfg.deployment_prevalence:
        points["prevalence"] = export_lib.threshold_for_prevalence(prevalence, cfg.deployment_prevalence)
    policy = cfg.threshold_policy
    if policy not in points:  # the prevalence policy, when calibration could not be fitted
        warn(f"no {policy} threshold without calibration; exporting the sensitivity one")
        policy = "sensitivity"
    return _Operating(calibration, probabilities, points, policy, points[policy], prevalence)


def _calibration(
    cfg: TrainConfig, labels: np.ndarray, scores: np.ndarray, warn: Callable[[str], None]
) -> tuple[export_lib.Calibration | None, np.ndarray]:
    """The calibration fitted on the validation scores (train.calibration) and the calibrated scores."""
    if cfg.calibration == "none":
        return None, scores
    fitted = metrics_lib.fit_platt(
        labels, scores, max_slope=1.0 if cfg.calibration == "platt_capped" else None
    )
    if fitted is None:
        warn(
            "the validation split cannot calibrate the model (one class, or it ranks backwards); "
            "exporting its probabilities as they are"
        )
        return None, scores
    calibration = export_lib.Calibration(*fitted, method=cfg.calibration)
    return calibration, calibration.apply(scores)


def _metrics(
    labels: np.ndarray, scores: np.ndarray, operating: _Operating, at_threshold: dict, described: dict
) -> dict:
    probabilities, calibration = operating.probabilities, operating.calibration
    return {
        "split": "val",
        "note": "validation figures, not test figures: run evaluate.py on the test split",
        "calibration": {
            **(dataclasses.asdict(calibration) if calibration else {"method": "none"}),
            "val_ece_as_trained": metrics_lib.expected_calibration_error(labels, scores),
            "val_ece": metrics_lib.expected_calibration_error(labels, probabilities),
        },
        "at_0.5": metrics_lib.binary_metrics(labels, probabilities, 0.5),
        "at_threshold": at_threshold,
        "operating_points": {
            name: metrics_lib.binary_metrics(labels, probabilities, value)
            for name, value in operating.points.items()
        },
        **described,
    }


def _threshold_document(cfg: TrainConfig, operating: _Operating, at_threshold: dict) -> dict:
    return {
        "threshold": operating.threshold,
        "policy": operating.policy,
        "operating_points": operating.points,
        "target_sensitivity": cfg.target_sensitivity,
        "deployment_prevalence": cfg.deployment_prevalence or None,
        "chosen_on": "val",
        "val_prevalence": operating.prevalence,
        "val_sensitivity": at_threshold["sensitivity"],
        "val_specificity": at_threshold["specificity"],
    }


def _export_info(
    config: RunConfig,
    stored: StoredImage,
    operating: _Operating,
    files: list[str],
    members: list[export_lib.Member],
) -> export_lib.ExportInfo:
    return export_lib.ExportInfo(
        files=files,
        model=export_lib.MODEL_FILE,
        threshold=operating.threshold,
        target_sensitivity=config.train.target_sensitivity,
        preprocessing=export_lib.Preprocessing(
            image_size_px=config.data.image_size_px,
            stored_size_px=stored.stored_size_px,
            image_format=stored.format,
            jpeg_quality=stored.jpeg_quality,
            equalize=config.data.equalize,
            border_crop=config.data.border_crop,
        ),
        created_utc=storage.utc_timestamp(),
        calibration=operating.calibration,
        operating_points=operating.points,
        threshold_policy=operating.policy,
        validation_prevalence=operating.prevalence if operating.calibration else None,
        members=members,
    )
