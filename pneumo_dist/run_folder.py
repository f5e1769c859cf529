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
