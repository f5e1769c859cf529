"""What a training run builds under its strategy (the model, its optimizer, the variables its steps use)
and the builds this process keeps: a search's next trial whose config differs only in REUSABLE starts
from one instead of building and tracing again (train.py uses both).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import tensorflow as tf
import tf_keras

from pneumo_dist import model as model_lib
from pneumo_dist import optimizer as optimizer_lib
from pneumo_dist.config import RunConfig, TuneConfig, to_yaml

# This package's local folders of a training process (train.scratch_folder's, and the as-built
# checkpoints below): a later process removes those of a process that died.
SCRATCH_PREFIX = "pneumo-train-"


# Config values that the built model and its traced steps take as variables (the peak learning rate,
# the dropout rate) or never see: runs that differ only in these can share one build (Built).
REUSABLE = {"train": ("learning_rate", "output_uri"), "model": ("dropout",)}


@dataclass
class Built:
    """What a run builds and traces: the model, its optimizer, the variables the steps use and the step
    functions. Tracing ResNet50's training step and its first run cost ~25 s of a trial on 2 CPU cores
    (BENCHMARKS.md), XLA compilation more on a GPU; a later run of the same process whose config differs
    only in REUSABLE starts from the state this was built in (`as_built_path`, a checkpoint) instead.
    Not bit-identical to a fresh process: Keras' Dropout draws its masks from stateful random ops whose
    state lives on in the traced step (a resumed run differs from an uninterrupted one the same way)."""

    key: str
    strategy: tf.distribute.Strategy
    classifier: tf_keras.Model
    optimizer: tf_keras.optimizers.Optimizer
    schedule: optimizer_lib.WarmupCosine
    dropout_rate: tf.Variable
    epoch: tf.Variable
    checkpoint: tf.train.Checkpoint
    loss_sum: tf.Variable
    # train.ema_decay's moving averages of classifier.weights, in order (empty: off), and the function
    # that swaps them with the weights.
    averaged: list[tf.Variable] = field(default_factory=list)
    swap_averaged: Callable | None = None
    train_loops: dict = field(default_factory=dict)  # head_only -> train_loop
    predict_step: Callable | None = None
    as_built_path: str = ""  # the checkpoint of the state as built, written for reuse


# This process's builds kept for reuse, the most recently used last. A search space with a few
# architectures (e.g. model.dense_units: {choice: [64, 128, 256]}) keeps one of each; each holds ResNet50
# with its optimizer state in memory (~0.3 GB) and its as-built checkpoint on local disk (as much).
KEEP_BUILDS = 3
_kept: list[Built] = []


def graph_key(config: RunConfig) -> str:
    """The config without what REUSABLE lists (and the search's own settings)."""
    sections = {
        section: dataclasses.replace(getattr(config, section), **{name: None for name in names})
        for section, names in REUSABLE.items()
    }
    return to_yaml(dataclasses.replace(config, tune=TuneConfig(), **sections))


def previous_build(config: RunConfig, strategy: tf.distribute.Strategy) -> Built | None:
    """This process's build for `config` under `strategy`, kept by keep_for_reuse; None when there is none."""
    key = graph_key(config)
    return next((b for b in _kept if b.strategy is strategy and b.key == key), None)


def keep_for_reuse(built: Built) -> None:
    """Keep `built` (the most recently used last), with a checkpoint of its state as built; the least
    recently used beyond KEEP_BUILDS are let go."""
    if built in _kept:
        _kept.remove(built)
    else:
        # Named like scratch folders, so that a later process removes it if this one dies.
        host_prefix = f"{SCRATCH_PREFIX}{socket.gethostname()}-{os.getpid()}-"
        folder = tempfile.mkdtemp(prefix=host_prefix)
        built.as_built_path = built.checkpoint.write(os.path.join(folder, "as-built"))
    _kept.append(built)
    while len(_kept) > KEEP_BUILDS:
        shutil.rmtree(os.path.dirname(_kept.pop(0).as_built_path), ignore_errors=True)


def build(
    config: RunConfig,
    strategy: tf.distribute.Strategy,
    policy: str,
    learning_rate: float,
    steps_per_epoch: int,
) -> Built:
    """The model, its optimizer and the variables the step functions use, under the strategy. `policy`:
    the Keras precision policy; `learning_rate`: the peak, scaled for the global batch."""
    with strategy.scope():
        classifier = model_lib.build_classifier(config.model, config.data.image_size_px, policy)
        model_lib.set_trainable(classifier, config.model.unfreeze, config.model.train_batchnorm)
        optimizer, schedule = optimizer_lib.make_optimizer(
            config.train, learning_rate, steps_per_epoch, policy
        )
        # Built for every variable that will ever train, so the head warm-up can change the set.
        optimizer.build(classifier.trainable_variables)
        # Read when the step runs, not fixed when it is traced (see Built).
        dropout_rate = tf.Variable(config.model.dropout, trainable=False, name="dropout_rate")
        model_lib.set_dropout_rate(classifier, dropout_rate)
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        tracked = {"model": classifier, "optimizer": optimizer, "epoch": epoch}
        averaged = []
        if config.train.ema_decay:
            # Every weight, BatchNorm's moving statistics too (as timm's ModelEmaV2 averages its
            # buffers): the averaged model is then a consistent one. Each replica updates its own
            # copy from the same all-reduced weights, without communicating (ON_READ); a read
            # outside the step (the swap, a checkpoint) takes the first replica's, equal to all.
            averaged = [
                tf.Variable(
                    weight.read_value(),
                    trainable=False,
                    name=f"averaged_{index}",
                    synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                )
                for index, weight in enumerate(classifier.weights)
            ]
            tracked["averaged"] = averaged
        checkpoint = tf.train.Checkpoint(**tracked)
        # Each replica adds its loss share here during a loop; read (summed) once per loop.
        loss_sum = tf.Variable(
            0.0,
            trainable=False,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.SUM,
            name="loss_sum",
        )
    return Built(
        key=graph_key(config),
        strategy=strategy,
        classifier=classifier,
        optimizer=optimizer,
        schedule=schedule,
        dropout_rate=dropout_rate,
        epoch=epoch,
        checkpoint=checkpoint,
        loss_sum=loss_sum,
        averaged=averaged,
        swap_averaged=_swapper(classifier.weights, averaged) if averaged else None,
    )


def _swapper(weights: list[tf.Variable], averaged: list[tf.Variable]) -> Callable:
    """-> a function that swaps the values of `weights` and `averaged` (pairwise), on the device."""

    @tf.function
    def swap():
        for weight, average in zip(weights, averaged, strict=True):
            own = tf.identity(weight.read_value())
            weight.assign(tf.cast(average, weight.dtype))
            average.assign(tf.cast(own, average.dtype))

    return swap
