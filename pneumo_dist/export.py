"""The export: a finished run's model with everything needed to use it, in one folder.

    export/
        model.keras      the inference model (gray 0..255 pixels in, P(PNEUMONIA) out)
        metrics.json     validation figures of the exported weights
        threshold.json   the operating thresholds and the calibration, chosen on the validation split
        config.yaml      the run's config
        export.json      written last (ExportInfo): a folder without it is an export that did not finish

train.py writes it (`publish`), predict.py and evaluate.py read it (`read`), tune.py copies the best
trial's. No TensorFlow here: the search's driver reads exports without importing it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

from pneumo_dist import storage
from pneumo_dist.config import EQUALIZE_MODES, MAX_BORDER_CROP, THRESHOLD_POLICIES
from pneumo_dist.errors import PneumoDistError

# The probabilities a calibration reads are clipped to this: only where float64 must (log of 0 or 1);
# float32 sigmoids reach 1e-45.
APPLY_RANGE = (1e-300, 1.0 - 2.0**-53)
FOLDER = "export"  # in a run's output folder
INFO_NAME = "export.json"
MODEL_FILE = "model.keras"


class ExportError(PneumoDistError):
    """A folder does not hold a complete, usable pneumo-dist export; the message says what is wrong."""


@dataclass(frozen=True)
class Preprocessing:
    """How a new image must be prepared to look like a training record (predict.py)."""

    image_size_px: int  # the model's input
    stored_size_px: int  # as make_shards stored the records
    image_format: str  # jpeg or png
    jpeg_quality: int | None
    # How the stored pixels are read (decode.read_pixels): DataConfig.equalize and border_crop.
    equalize: str = "none"
    border_crop: float = 0.0


@dataclass(frozen=True)
class Calibration:
    """The model's P(PNEUMONIA) -> a calibrated one: sigmoid(slope * logit(p) + intercept), fitted on
    the validation split (metrics.fit_platt). PneumoniaDetector applies it to every probability it
    returns; the export's thresholds are on the calibrated scale."""

    slope: float
    intercept: float
    method: str = "platt"

    def apply(self, probability):
        """A probability or a numpy array of them (numpy only: no TensorFlow here)."""
        import numpy as np

        # Clipped only where float64 must (p of 0 or 1) and a sigmoid that does not round small values to 0:
        # calibration keeps the model's ranking. Clipping at 1e-7, as the fit does (metrics.logit), tied a
        # saturated model's most confident scores and lowered the calibrated AUC (0.89 for 0.90, seen in CI).
        p = np.clip(np.asarray(probability, dtype=np.float64), *APPLY_RANGE)
        z = self.slope * (np.log(p) - np.log1p(-p)) + self.intercept
        return np.exp(-np.logaddexp(0.0, -z))


@dataclass(frozen=True)
class Member:
    """One model of an ensemble export (ensemble.py), as it was when the ensemble was made: for reports
    only (its source is never opened again: the ensemble's model.keras holds its weights)."""

    source: str  # the member's export folder
    model_version: str  # its model.keras' model_version
    val_auc: float  # on the validation split the ensemble was fitted on, before calibration


@dataclass(frozen=True)
class ExportInfo:
    files: list[str]
    model: str  # the model's file name in the folder
    threshold: float  # the operating threshold: operating_points[threshold_policy]
    target_sensitivity: float | None  # None: not recorded
    preprocessing: Preprocessing
    created_utc: str
    calibration: Calibration | None = None  # None: probabilities as the model gives them
    # Policy (THRESHOLD_POLICIES) -> its threshold, chosen on validation; "prevalence" only when the
    # training config gave a deployment prevalence (PneumoniaDetector.load can compute it for any).
    operating_points: dict[str, float] = field(default_factory=dict)
    threshold_policy: str = "sensitivity"
    validation_prevalence: float | None = None  # the calibration's prior (the prevalence policy's base)
    serving_model: str | None = None  # the SavedModel's folder (serving.py), None: not exported
    # An ensemble's models, in the order of its member_<i> layers (ensemble.py); empty: one model.
    members: list[Member] = field(default_factory=list)

    def threshold_for_prevalence(self, prevalence: float) -> float:
        """The prevalence policy's threshold for a deployment where PNEUMONIA has `prevalence`."""
        if self.calibration is None or self.validation_prevalence is None:
            raise ExportError(
                "this export has no calibrated probabilities (exported without calibration, or by an "
                "older pneumo-dist): a threshold for a prevalence needs them; export it again"
            )
        if not 0.0 < prevalence < 1.0:
            raise ExportError(f"the deployment prevalence must be in (0, 1), got {prevalence}")
        return threshold_for_prevalence(self.validation_prevalence, prevalence)

    def model_uri(self, folder: str) -> str:
        """Where the model is; refuses a name that would leave the folder (storage.UnsafeName)."""
        return storage.child(folder, self.model, storage.join(folder, INFO_NAME))


def publish(local_dir: str, uri: str, documents: dict[str, str], info: ExportInfo) -> None:
    """Complete an export whose model is already in `local_dir`: write `documents` (name -> text) there,
    copy the folder to `uri` when that is elsewhere (gs://), then write export.json, last."""
    for name, text in documents.items():
        with open(os.path.join(local_dir, name), "w") as file:
            file.write(text)
    storage.publish(local_dir, uri)
    storage.write_bytes(storage.join(uri, INFO_NAME), to_json(info).encode())


def to_json(info: ExportInfo) -> str:
    return json.dumps(asdict(info), indent=1)


def add_operating_point_arguments(parser) -> None:
    """predict.py's and evaluate.py's way to choose another operating threshold than the export's
    (checked by PneumoniaDetector.load, before the model loads)."""
    parser.add_argument("--threshold", type=float, help="an operating threshold instead of the export's")
    parser.add_argument(
        "--policy",
        choices=THRESHOLD_POLICIES,
        help="another threshold policy's threshold, chosen on validation at export",
    )
    parser.add_argument(
        "--prevalence",
        type=float,
        help="PNEUMONIA's prevalence where the model is used: the prevalence policy's threshold for it",
    )


def model_version(local_model_path: str) -> str:
    """A model's version: the start of its file's SHA-256 (PneumoniaDetector.version, predictions)."""
    return storage.local_sha256(local_model_path)[:12]


def folder_of(uri: str) -> str:
    """An export folder from its URI, its export.json or its model file."""
    uri = os.fspath(uri).rstrip("/")
    name = storage.basename(uri)
    return storage.parent(uri) if name == INFO_NAME or name.endswith(".keras") else uri


def read(folder: str) -> ExportInfo:
    """The export.json of `folder`, checked. Longer than a screen: every check of a file that whoever
    wrote the bucket could have got wrong, in the order the file is read, each with its one-line error."""
    info_uri = storage.join(folder, INFO_NAME)
    try:
        raw = json.loads(storage.read_bytes(info_uri))
    except storage.StorageNotFound:
        for inside in (FOLDER, "best"):  # a run's folder, a search's experiment folder
            if storage.exists(storage.join(folder, inside, INFO_NAME)):
                raise ExportError(
                    f"{folder} is a run's folder, not an export: its export is {storage.join(folder, inside)}"
                ) from None
        raise ExportError(
            f"no {INFO_NAME} in {folder}: not a pneumo-dist export, or its export did not finish "
            "(give the run's export/ folder, or a tune run's best/ folder)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{info_uri} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ExportError(f"{info_uri} is not a pneumo-dist export description (not a JSON object)")
    missing = [key for key in ("model", "threshold", "preprocessing") if key not in raw]
    if missing:
        raise ExportError(
            f"{info_uri} lacks {', '.join(missing)}: exported by an older pneumo-dist; export it again"
        )
    try:
        step = raw["preprocessing"]
        preprocessing = Preprocessing(
            image_size_px=int(step["image_size_px"]),
            stored_size_px=int(step["stored_size_px"]),
            image_format=str(step["image_format"]),
            jpeg_quality=int(step["jpeg_quality"]) if step.get("jpeg_quality") is not None else None,
            equalize=str(step.get("equalize", "none")),
            border_crop=float(step.get("border_crop", 0.0)),
        )
        target = raw.get("target_sensitivity")
        calibration = raw.get("calibration")
        if calibration is not None:
            calibration = Calibration(
                slope=float(calibration["slope"]),
                intercept=float(calibration["intercept"]),
                method=str(calibration.get("method", "platt")),
            )
        prevalence = raw.get("validation_prevalence")
        info = ExportInfo(
            files=list(raw.get("files", [])),
            model=str(raw["model"]),
            threshold=float(raw["threshold"]),
            target_sensitivity=None if target is None else float(target),
            preprocessing=preprocessing,
            created_utc=str(raw.get("created_utc", "")),
            calibration=calibration,
            operating_points={str(k): float(v) for k, v in raw.get("operating_points", {}).items()},
            threshold_policy=str(raw.get("threshold_policy", "sensitivity")),
            validation_prevalence=None if prevalence is None else float(prevalence),
            serving_model=None if raw.get("serving_model") is None else str(raw["serving_model"]),
            members=[
                Member(str(m["source"]), str(m["model_version"]), float(m["val_auc"]))
                for m in raw.get("members", [])
            ],
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ExportError(f"{info_uri}: malformed ({error!r}); export it again") from None
    numbers = [info.threshold, *info.operating_points.values()]
    if calibration is not None:
        numbers += [calibration.slope, calibration.intercept]
    if preprocessing.equalize not in EQUALIZE_MODES:
        raise ExportError(
            f"{info_uri}: unknown preprocessing equalize {preprocessing.equalize!r} (this pneumo-dist knows "
            f"{', '.join(EQUALIZE_MODES)}): exported by a newer pneumo-dist?"
        )
    if not 0.0 <= preprocessing.border_crop <= MAX_BORDER_CROP:
        raise ExportError(f"{info_uri}: malformed (border_crop {preprocessing.border_crop}); export it again")
    if not all(math.isfinite(n) for n in numbers) or not 0.0 <= info.threshold <= 1.0:
        raise ExportError(
            f"{info_uri}: malformed (a threshold or calibration is not a finite number); export it again"
        )
    return info


def threshold_for_prevalence(validation_prevalence: float, deployment_prevalence: float) -> float:
    """On probabilities calibrated on a split where PNEUMONIA has `validation_prevalence`: the threshold
    at which the probability under `deployment_prevalence` is 0.5, i.e. the fewest expected errors where
    pneumonia is that common. Bayes' rule: a change of prior multiplies the posterior odds by the ratio
    of the prior odds (Saerens et al., Neural Computation 2002)."""

    def odds(p: float) -> float:
        return p / (1.0 - p)

    return 1.0 / (1.0 + odds(deployment_prevalence) / odds(validation_prevalence))
