"""The export: a finished run's model with everything needed to use it, in one folder.

    export/
        model.keras      the inference model (gray 0..255 pixels in, P(PNEUMONIA) out)
        metrics.json     validation figures of the exported weights
        threshold.json   the operating threshold, chosen on the validation split
        config.yaml      the run's config
        export.json      written last (ExportInfo): a folder without it is an export that did not finish

train.py writes it (`publish`), predict.py and evaluate.py read it (`read`), tune.py copies the best
trial's. No TensorFlow here: the search's driver reads exports without importing it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from pneumo_dist import storage
from pneumo_dist.errors import PneumoDistError

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


@dataclass(frozen=True)
class ExportInfo:
    files: list[str]
    model: str  # the model's file name in the folder
    threshold: float  # chosen on validation for target_sensitivity
    target_sensitivity: float | None  # None: not recorded
    preprocessing: Preprocessing
    created_utc: str

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
    storage.write_bytes(storage.join(uri, INFO_NAME), json.dumps(asdict(info), indent=1).encode())


def folder_of(uri: str) -> str:
    """An export folder from its URI, its export.json or its model file."""
    uri = os.fspath(uri).rstrip("/")
    name = storage.basename(uri)
    return storage.parent(uri) if name == INFO_NAME or name.endswith(".keras") else uri


def read(folder: str) -> ExportInfo:
    info_uri = storage.join(folder, INFO_NAME)
    try:
        raw = json.loads(storage.read_bytes(info_uri))
    except storage.StorageNotFound:
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
        )
        target = raw.get("target_sensitivity")
        return ExportInfo(
            files=list(raw.get("files", [])),
            model=str(raw["model"]),
            threshold=float(raw["threshold"]),
            target_sensitivity=None if target is None else float(target),
            preprocessing=preprocessing,
            created_utc=str(raw.get("created_utc", "")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ExportError(f"{info_uri}: malformed ({error!r}); export it again") from None
