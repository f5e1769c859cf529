"""Several exported models as one export: an ensemble whose P(PNEUMONIA) is the sigmoid of its members'
mean logit (Lakshminarayanan et al., NeurIPS 2017, average probabilities; the mean logit is the same
ranking rule up to how disagreement is weighed, and keeps the export's calibration a function of one
number).

    model.keras  gray pixels -> gray_to_rgb -> imagenet_caffe -> member_0 .. member_<k-1> (each a
                 classifier ending in its pre-sigmoid logit) -> mean_logit -> pneumonia (sigmoid)

It is an export like any other (export.py): one PneumoniaDetector, one SavedModel, the calibration and
every threshold policy fitted on the ensemble's own validation scores; export.json lists the members.
Made by `train.py --ensemble K` (K seeds of one recipe) and by a search's `tune.ensemble_top` (its K best
trials). Members must read images the same way (export.Preprocessing): one input serves them all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tf_keras

from pneumo_dist import data, exporter, run_folder, schema, storage
from pneumo_dist import export as export_lib
from pneumo_dist import metrics as metrics_lib
from pneumo_dist import model as model_lib
from pneumo_dist.config import DataConfig, RunConfig
from pneumo_dist.errors import PneumoDistError

MEMBERS_FOLDER = "members"  # train.py --ensemble: OUTPUT/members/seed-<seed>/, each a run's folder


class EnsembleError(PneumoDistError):
    """The models cannot be combined; the message says which and why."""


def ensemble_model(detectors: list[tf_keras.Model]) -> tf_keras.Model:
    """Exported inference models (model.inference_model's) -> one whose output is the sigmoid of their
    mean logit. Each member keeps its classifier's layers and weights, its output layer made linear."""
    if len(detectors) < 2:
        raise EnsembleError(f"an ensemble needs at least 2 models, got {len(detectors)}")
    gray, normalized = model_lib.inference_front(detectors[0].input_shape[1])
    logits = [
        _logit_classifier(_classifier(detector), f"{model_lib.MEMBER_PREFIX}{index}")(
            normalized, training=False
        )
        for index, detector in enumerate(detectors)
    ]
    mean = tf_keras.layers.Average(name=model_lib.MEAN_LAYER)(logits)
    probability = tf_keras.layers.Activation("sigmoid", dtype="float32", name=model_lib.OUTPUT_LAYER)(mean)
    return tf_keras.Model(gray, probability, name="pneumonia_ensemble")


def member_config(config: RunConfig, index: int) -> RunConfig:
    """The recipe's run of the `index`th member of `train.py --ensemble`: seed train.seed + index (its
    initial weights, augmentation and data order), in its own run folder under the ensemble's."""
    seed = config.train.seed + index
    output = storage.join(config.train.output_uri, MEMBERS_FOLDER, f"seed-{seed}")
    train = dataclasses.replace(config.train, seed=seed, output_uri=output, serving_export=False)
    return dataclasses.replace(config, train=train)


def train_ensemble(
    config: RunConfig,
    members: int,
    strategy: tf.distribute.Strategy | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_member: Callable[[int, RunConfig], None] | None = None,
    **callbacks,
) -> exporter.Exported:
    """Train `members` seeds of `config` one after another (member_config) and export them as one
    ensemble to train.output_uri/export. `resume`: members already exported are kept, an interrupted one
    continues from its checkpoint. `callbacks`: train.train's on_step / on_epoch, for every member.
    (A search trains members in parallel: tune.ensemble_top.)"""
    from pneumo_dist import train as train_lib

    output = config.train.output_uri
    if members < 2:
        raise EnsembleError(f"an ensemble needs at least 2 members, got {members}")
    if not (resume or overwrite) and storage.exists(run_folder.export_info_uri(output)):
        raise EnsembleError(
            f"{output} already holds an export: pass --resume to continue it, --overwrite to replace it, "
            "or choose another train.output_uri"
        )
    uris = []
    for index in range(members):
        member = member_config(config, index)
        member_output = member.train.output_uri
        finished = storage.exists(run_folder.export_info_uri(member_output))
        if on_member:
            on_member(index, member)
        if not (resume and finished):
            started = resume and storage.exists(run_folder.state_uri(member_output))
            train_lib.train(member, strategy, resume=started, overwrite=overwrite, **callbacks)
        uris.append(storage.join(member_output, export_lib.FOLDER))
    return export_ensemble(uris, config, storage.join(output, export_lib.FOLDER))


def export_ensemble(
    member_uris: list[str], config: RunConfig, export_uri: str, warn: Callable[[str], None] = print
) -> exporter.Exported:
    """Combine the exports at `member_uris` into the export folder `export_uri`, its calibration and
    thresholds (the policies of `config.train`) fitted on the ensemble's scores of `config.data`'s
    validation split."""
    from pneumo_dist.predict import PneumoniaDetector

    if len(member_uris) < 2:
        raise EnsembleError(f"an ensemble needs at least 2 models, got {len(member_uris)}")
    # Said before any model loads (tens of seconds each for ResNet50).
    infos = [export_lib.read(export_lib.folder_of(uri)) for uri in member_uris]
    for uri, info in zip(member_uris, infos, strict=True):
        if info.preprocessing != infos[0].preprocessing:
            raise EnsembleError(
                f"{uri} reads images otherwise than {member_uris[0]} ({info.preprocessing} vs "
                f"{infos[0].preprocessing}): an ensemble's members share one input"
            )
        if info.members:
            raise EnsembleError(f"{uri} is an ensemble itself: combine its members instead")
    detectors = [PneumoniaDetector.load(uri) for uri in member_uris]
    model = ensemble_model([detector.model for detector in detectors])
    from pneumo_dist import evaluate

    manifest_uri = schema.manifest_uri_of(config.data.manifest_uri)
    data_config = evaluate.split_data_config(detectors[0], manifest_uri, batch_size=64)
    dataset = data.open_dataset(data_config)
    labels, scores, member_scores = score(model, data_config, dataset, "val")
    members = [
        export_lib.Member(detector.uri, detector.version, metrics_lib.roc_auc(labels, column))
        for detector, column in zip(detectors, member_scores.T, strict=True)
    ]
    stored = dataset.manifest.image
    return exporter.export_model(model, config, stored, labels, scores, export_uri, warn, members)


def score(
    model: tf_keras.Model, data_config: DataConfig, dataset: data.Dataset, split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, the ensemble's P(PNEUMONIA), each member's P(PNEUMONIA) (N, k)) of every record of `split`,
    uncalibrated."""
    probe = model_lib.member_probe(model)
    forward = tf.function(lambda x: probe(x, training=False), reduce_retracing=True)
    labels, scores, members = [], [], []
    for batch in data.eval_dataset(data_config, dataset, split):
        probability, logits = forward(tf.cast(batch["image"], tf.float32))
        labels.append(batch["label"].numpy())
        scores.append(probability.numpy()[:, 0])
        members.append(tf.sigmoid(logits).numpy())
    as_float = np.float64
    return (
        np.concatenate(labels).astype(np.int64),
        np.concatenate(scores).astype(as_float),
        np.concatenate(members).astype(as_float),
    )


def _classifier(detector: tf_keras.Model) -> tf_keras.Model:
    """The classifier inside an exported inference model (model.inference_model)."""
    nested = [layer for layer in detector.layers if isinstance(layer, tf_keras.Model)]
    if len(nested) != 1 or model_lib.OUTPUT_LAYER not in [layer.name for layer in nested[0].layers]:
        raise EnsembleError(f"model {detector.name!r} is not a pneumo-dist export of one classifier")
    return nested[0]


def _logit_classifier(classifier: tf_keras.Model, name: str) -> tf_keras.Model:
    """A copy of `classifier` named `name` whose output layer gives the logit, not the probability."""
    config = classifier.get_config()
    config["name"] = name
    for layer in config["layers"]:
        if layer["config"]["name"] == model_lib.OUTPUT_LAYER:
            layer["config"]["activation"] = "linear"
    copy = tf_keras.Model.from_config(config)
    copy.set_weights(classifier.get_weights())
    return copy
