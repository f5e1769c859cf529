"""A training run's output folder (local or gs://), written by train.py's chief worker; tune.py reads
its trials' ones:

    config.yaml                      the exact config of the run
    checkpoints/ckpt-<epoch>.*       model, optimizer (with its step, which seeds the augmentation), epoch
    checkpoints/best.weights.h5      weights of the best validation AUC so far
    checkpoints/state.json           written last: which checkpoint is complete, best epoch, history
    tensorboard/                     TensorBoard logs
    export/                          the export (export.py): model.keras, metrics.json, threshold.json,
                                     config.yaml; export.json last

No TensorFlow here: the search's driver reads its trials' states without importing it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from pneumo_dist import export, storage

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
STATE_NAME = "state.json"
BEST_WEIGHTS = "best.weights.h5"
TENSORBOARD = "tensorboard"
FOLDERS = (CHECKPOINTS, export.FOLDER, TENSORBOARD)  # what a run writes there, with CONFIG


def state_uri(output: str) -> str:
    return storage.join(output, CHECKPOINTS, STATE_NAME)


def export_info_uri(output: str) -> str:
    return storage.join(output, export.FOLDER, export.INFO_NAME)


@dataclass
class RunState:
    """checkpoints/state.json, the commit point of a run's checkpoints: written by train.py's chief after
    each epoch's checkpoint, read on --resume, by tune.py for its trials and by the benchmarks."""

    next_epoch: int = 0  # epochs run so far (0-based: the next one to run)
    best_auc: float = -1.0  # best validation AUC so far
    best_epoch: int = -1
    epochs_since_best: int = 0
    stopped_early: bool = False
    finished: bool = False  # all epochs run, or stopped early
    history: list[dict] = field(default_factory=list)  # one record per epoch (train.py's fit)
    checkpoint: str | None = None  # the complete checkpoint's prefix name, e.g. "ckpt-7"

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RunState:
        """Raises ValueError for a file that is not a run state (damaged, or another program's)."""
        fields = json.loads(raw)
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in names})

    @classmethod
    def read(cls, output: str) -> RunState | None:
        """The state of the run in `output`; None when it has none (no complete checkpoint)."""
        try:
            return cls.from_json(storage.read_bytes(state_uri(output)))
        except storage.StorageNotFound:
            return None
