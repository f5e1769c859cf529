"""The training loop, the same under any tf.distribute strategy (none, MirroredStrategy,
MultiWorkerMirroredStrategy): data -> model -> epochs of custom steps -> validation -> checkpoint ->
export. It knows nothing of Ray: tune.py calls `train` on each Ray worker with an `on_epoch` callback.

The output folder it writes: run_folder.py.

Past ~500 lines on purpose: the loop, its checkpoints, resume and the hand-over to the exporter share
one run's state (_Run) and read top to bottom.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import math
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras

from pneumo_dist import augment, data, distribute, exporter, storage
from pneumo_dist import build as build_lib
from pneumo_dist import export as export_lib
from pneumo_dist import metrics as metrics_lib
from pneumo_dist import model as model_lib
from pneumo_dist import optimizer as optimizer_lib
from pneumo_dist.config import RunConfig, TrainConfig, to_yaml
from pneumo_dist.errors import PneumoDistError
from pneumo_dist.run_folder import (
    BEST_WEIGHTS,
    CHECKPOINTS,
    CONFIG,
    FOLDERS,
    STATE_NAME,
    TENSORBOARD,
    RunState,
)

# Steps per loop by default: a GPU step of ResNet50 takes ~0.1-0.3 s, so 100 steps make each host
# round-trip (~1 ms) negligible; TF Model Garden's image classification configs use
# steps_per_loop 100-1000 the same way (orbit). Never more than an epoch.
DEFAULT_STEPS_PER_LOOP = 100
# Without a GPU a step takes ~0.3-3 s, so a host read per 10 steps costs nothing measurable (steps_per_loop
# 1 vs 20 at batch 16 and 64 px on 2 cores: 6.3 vs 6.5 img/s, BENCHMARKS.md), and the progress bar moves
# every few seconds instead of once an epoch.
CPU_STEPS_PER_LOOP = 10


class TrainingError(PneumoDistError):
    """The run cannot start or go on; the message says why."""


@dataclass(frozen=True)
class TrainResult:
    best_epoch: int  # 0-based
    best_val_auc: float
    epochs_run: int  # epochs completed in total, including those before a resume
    stopped_early: bool
    history: list[dict]
    export_uri: str
    threshold: float
    val_metrics: dict  # at the exported threshold


def train(
    config: RunConfig,
    strategy: tf.distribute.Strategy | None = None,
    resume: bool = False,
    on_step: Callable[[int, int, int, float], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    overwrite: bool = False,
    reuse: bool = False,
) -> TrainResult:
    """Train, validate every epoch, checkpoint, stop early, export the best model; returns the result.

    An output folder that already holds a run is an error unless `resume` (continue it) or `overwrite`
    (replace its checkpoints, export and logs): a new run never silently deletes an earlier one.

    `on_step(epoch, steps_done, steps, loss)` (at the epoch's start with 0 steps and a NaN loss, then
    once per loop of train.steps_per_loop steps, with the loop's mean loss) and `on_epoch(record)`
    (once the epoch's checkpoint is written) are for progress displays and Ray's reporting.

    `reuse`: keep the built model and its traced step functions for later `reuse` runs of this
    process, and use a kept one whose config differs from this run's only in REUSABLE (a search's
    trials, one after another in a process Tune reuses); see build.Built.
    """
    config.validate()
    distribute.configure_process(config.train)
    if not resume and not overwrite:
        _refuse_existing_run(config.train.output_uri.rstrip("/"))
    strategy = strategy or distribute.choose_strategy(train_cfg=config.train)
    # A gs:// output (and every non-chief worker) works in a local folder that must not outlive the run:
    # it holds a full checkpoint, ~1 GB for ResNet50 with its optimizer state.
    with scratch_folder() as scratch:
        run = _Run(config, strategy, scratch, reuse)
        try:
            return run.fit(resume, on_step, on_epoch)
        finally:
            run.close()  # a checkpoint still uploading finishes, before its local files go


def tensorboard_tag(key: str) -> str:
    """An epoch record's key as a TensorBoard tag, in groups: val/auc, train/loss, system/seconds."""
    if key.startswith("val_"):
        return "val/" + key.removeprefix("val_")
    if key in ("train_loss", "learning_rate"):
        return "train/" + key.removeprefix("train_")
    return "system/" + key


def _refuse_existing_run(output: str) -> None:
    # Checked by every worker before any of them writes: the chief writes only after the model is built,
    # which needs every worker.
    found = [name for name in FOLDERS if storage.list_files(storage.join(output, name))]
    if storage.exists(storage.join(output, CONFIG)):
        found.insert(0, CONFIG)
    if found:
        raise TrainingError(
            f"{output} already holds a run ({', '.join(found)}): pass --resume to continue it, "
            "--overwrite to replace it, or choose another train.output_uri"
        )


def scratch_folder() -> tempfile.TemporaryDirectory:
    """This process's local working folder, named after the host and process id. Removes first the
    folders of processes of this host that have died without removing theirs: a Ray worker killed by the
    OOM killer or a node failure would otherwise leave a checkpoint behind on every restart."""
    host_prefix = f"{build_lib.SCRATCH_PREFIX}{socket.gethostname()}-"
    for path in glob.glob(os.path.join(tempfile.gettempdir(), host_prefix + "*")):
        pid = os.path.basename(path)[len(host_prefix) :].split("-", 1)[0]
        if pid.isdigit() and not storage.process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{host_prefix}{os.getpid()}-")


class _Run:
    """One training run's state; a class only because the step functions share the model and optimizer."""

    def __init__(
        self, config: RunConfig, strategy: tf.distribute.Strategy, scratch: str, reuse: bool = False
    ):
        """The run's set-up, in the order it must happen: seeds before the model, the dataset before the
        batch arithmetic, the build (or the reused one) before the distributed dataset. Longer than a
        screen; each piece with a name is its own function (_set_seeds, build.build, data.resolve_batch)."""
        started = time.perf_counter()
        self.config, self.strategy = config, strategy
        self.train_cfg: TrainConfig = config.train
        self.chief = distribute.is_chief(strategy)
        self.output = config.train.output_uri.rstrip("/")
        # The chief writes a local output in place; a gs:// output and other workers' copies (which must
        # still be written: saving reads distributed variables collectively) go through a local folder.
        local_output = self.chief and not storage.is_gcs(self.output)
        self.work = self.output if local_output else scratch
        built = build_lib.previous_build(config, strategy) if reuse else None
        _set_seeds(config.train.seed, reused=built is not None)
        self.xla = model_lib.resolve_xla(config.train)
        if self.xla and config.train.deterministic_ops:
            # Found at the first step otherwise: "GPU MaxPool gradient ops do not yet have a
            # deterministic XLA implementation" (XLA's CPU and GPU alike, TF 2.21).
            raise TrainingError(
                "train.deterministic_ops needs train.xla: off (XLA has no deterministic gradient of "
                "ResNet50's max pooling)"
            )
        _set_op_determinism(config.train.deterministic_ops)

        self.dataset = data.open_dataset(config.data)
        if "val" not in self.dataset.manifest.splits:
            raise TrainingError(
                f"{self.dataset.manifest_uri} has no val split: training needs one for early stopping and "
                "the threshold (re-run make_shards with --val-fraction > 0)"
            )
        # The data config with the global batch this strategy's replicas make (data.batch_per_replica).
        self.data_cfg = data.resolve_batch(config.data, strategy.num_replicas_in_sync)
        steps = data.steps_per_epoch(self.dataset, self.data_cfg.global_batch_size)
        if config.train.max_steps_per_epoch:
            steps = min(steps, config.train.max_steps_per_epoch)
        self.steps_per_epoch = steps
        on_gpu = bool(tf.config.list_physical_devices("GPU"))
        default_loop = DEFAULT_STEPS_PER_LOOP if on_gpu else CPU_STEPS_PER_LOOP
        self.steps_per_loop = min(config.train.steps_per_loop or default_loop, steps)
        self.host_reads = 0  # loss reads from the device: one per loop (tests count them)
        # The chief's upload of the last checkpoint to a gs:// output, while the next epoch trains.
        self._uploads: concurrent.futures.ThreadPoolExecutor | None = None
        self._upload: concurrent.futures.Future | None = None
        self.best_val_scores: tuple[np.ndarray, np.ndarray] | None = None  # (labels, probabilities)
        self.policy = model_lib.resolve_precision(config.train)
        self.class_weights = data.loss_class_weights(self.dataset, config.data.class_balance)
        self.learning_rate = optimizer_lib.scaled_learning_rate(config.train, self.data_cfg.global_batch_size)
        self.reused_build = built is not None
        if built is None:
            built = build_lib.build(config, strategy, self.policy, self.learning_rate, self.steps_per_epoch)
        else:
            # This process's previous run built and traced the same graph: back to the state it was
            # built in, with this run's learning rate and dropout rate.
            built.checkpoint.read(built.as_built_path).assert_existing_objects_matched()
            built.schedule.peak.assign(self.learning_rate)
            built.dropout_rate.assign(config.model.dropout)
        if reuse:
            build_lib.keep_for_reuse(built)
        self.built = built
        self.classifier, self.optimizer, self.epoch = built.classifier, built.optimizer, built.epoch
        self.checkpoint, self.loss_sum = built.checkpoint, built.loss_sum
        self.train_batches = strategy.distribute_datasets_from_function(
            lambda context: data.train_dataset(self.data_cfg, self.dataset, context)
        )
        self.step_kind = distribute.step_kind(strategy, self.xla)
        self.setup_seconds = time.perf_counter() - started  # data, model and optimizer set-up

    def describe(self) -> str:
        """The start-up line: strategy, all-reduce, step, batch, loop and precision."""
        per_replica = self.data_cfg.global_batch_size // self.strategy.num_replicas_in_sync
        pack_mb = self.train_cfg.all_reduce_pack_mb
        sizes = [v.shape.num_elements() * v.dtype.size for v in self.classifier.trainable_variables]
        packs = distribute.count_packs(sizes, pack_mb)
        return (
            f"train: {distribute.describe_strategy(self.strategy, self.step_kind, packs, pack_mb)}; "
            f"batch {self.data_cfg.global_batch_size} ({per_replica} per replica), learning rate "
            f"{self.learning_rate:.3g}; {self.steps_per_epoch} steps per epoch in loops of "
            f"{self.steps_per_loop}; {self.policy}"
        )

    # --- the loop -----------------------------------------------------------------------------------

    def fit(self, resume: bool, on_step, on_epoch) -> TrainResult:
        cfg = self.train_cfg
        state = self._restore() if resume else RunState()
        # A resumed run may have been given more epochs than the one that wrote the checkpoint.
        state.finished = state.next_epoch >= cfg.epochs or state.stopped_early
        writer = self._begin(resume, state)
        iterator = iter(self.train_batches)
        phase, first_epoch = None, state.next_epoch
        result = self._export(state) if state.finished else None  # resumed after the last epoch
        while not state.finished:
            epoch = state.next_epoch
            head_only = epoch < cfg.head_warmup_epochs
            if phase != head_only:
                train_loop, phase = self._train_loop_for(head_only), head_only
            start = time.perf_counter()
            loss_sum = self._train_epoch(epoch, train_loop, iterator, on_step, writer)
            seconds = time.perf_counter() - start
            self._wait_for_upload()  # the previous checkpoint's: before best weights are written
            with self._averaged_weights():  # (the weights themselves when train.ema_decay is 0)
                labels, probabilities = self.predict("val")
                metrics = metrics_lib.binary_metrics(labels, probabilities)
                improved = not math.isnan(metrics["auc"]) and metrics["auc"] > state.best_auc
                if improved:
                    self._save_best_weights()
            record = {
                "epoch": epoch,
                "train_loss": loss_sum / self.steps_per_epoch,
                "learning_rate": float(self.optimizer.learning_rate.numpy()),
                "step": int(self.optimizer.iterations.numpy()),
                "seconds": seconds,
                "images_per_s": self.steps_per_epoch * self.data_cfg.global_batch_size / seconds,
                "head_only": head_only,
                **{f"val_{k}": v for k, v in metrics.items()},
            }
            if epoch == first_epoch:
                record["setup_s"] = self.setup_seconds  # the first epoch this process ran
                record["reused_build"] = int(self.reused_build)  # (a number: Ray reports take numbers)
            if improved:
                state.best_auc, state.best_epoch, state.epochs_since_best = metrics["auc"], epoch, 0
                self.best_val_scores = labels, probabilities  # the export's threshold comes from these
            else:
                state.epochs_since_best += 1
            state.history.append(record)
            state.next_epoch = epoch + 1
            patience = cfg.early_stopping_patience
            state.stopped_early = bool(patience) and state.epochs_since_best >= patience
            state.finished = state.next_epoch >= cfg.epochs or state.stopped_early
            self._save_checkpoint(epoch, state, improved)
            if writer:
                self._log_epoch(writer, epoch, record)
            if state.finished:
                # Before the last report: a scheduler may end the process as soon as it gets it.
                export_started = time.perf_counter()
                result = self._export(state)
                record["export_s"] = time.perf_counter() - export_started
            if on_epoch:
                on_epoch(record)
        if writer:
            writer.close()  # before the caller deletes a temporary working folder
        return result

    def _begin(self, resume: bool, state: RunState):
        """The chief's start of a run: a fresh run's folders emptied and its config written, the run
        described; -> its TensorBoard writer (None on other workers)."""
        if not self.chief:
            return None
        if not resume:
            # A fresh run replaces an earlier one's results, so that its checkpoints are never mixed
            # with ours (and a state.json of theirs cannot name a checkpoint of ours).
            for folder in FOLDERS:
                storage.delete_tree(storage.join(self.output, folder))  # never follows links out
            storage.write_bytes(storage.join(self.output, CONFIG), to_yaml(self.config).encode())
        print(self.describe(), flush=True)
        if resume:
            best = f"best validation AUC {state.best_auc:.4f} at epoch {state.best_epoch + 1}"
            print(f"train: resuming {self.output} after epoch {state.next_epoch} ({best})", flush=True)
        # One TensorBoard run per training run, named after its folder (tensorboard --logdir of several
        # runs' folders, or of a search's trials, then tells them apart).
        run_name = storage.basename(self.output.rstrip("/")) or "run"
        return tf.summary.create_file_writer(os.path.join(self.work, TENSORBOARD, run_name))

    def _train_loop_for(self, head_only: bool):
        """Freeze the backbone (head_only) or unfreeze model.unfreeze of its layers; -> the train loop
        traced for that set of trainable variables (one per phase, kept with the build for reuse)."""
        unfreeze = 0 if head_only else self.config.model.unfreeze
        model_lib.set_trainable(self.classifier, unfreeze, self.config.model.train_batchnorm)
        if head_only not in self.built.train_loops:
            self.built.train_loops[head_only] = self._make_train_loop()
        return self.built.train_loops[head_only]

    def _train_epoch(self, epoch: int, train_loop, iterator, on_step, writer) -> float:
        """One epoch's steps, train.steps_per_loop to a call of `train_loop`; -> the summed loss."""
        loss_sum, done = 0.0, 0
        if on_step:
            on_step(epoch, 0, self.steps_per_epoch, math.nan)  # the epoch starts
        while done < self.steps_per_epoch:
            steps = min(self.steps_per_loop, self.steps_per_epoch - done)
            # The one host read of a loop: everything before it stayed on the device.
            loop_loss = float(train_loop(iterator, tf.constant(steps, tf.int32)))
            self.host_reads += 1
            loss_sum += loop_loss
            done += steps
            if on_step:
                on_step(epoch, done, self.steps_per_epoch, loop_loss / steps)
            if writer:
                with writer.as_default(step=int(self.optimizer.iterations.numpy())):
                    tf.summary.scalar("train/loop_loss", loop_loss / steps)
        return loss_sum

    def _log_epoch(self, writer, epoch: int, record: dict) -> None:
        """The epoch's record as TensorBoard scalars, published to the run folder."""
        with writer.as_default(step=epoch):
            for key, value in record.items():
                if isinstance(value, float) and not math.isnan(value):
                    tf.summary.scalar(tensorboard_tag(key), value)
        writer.flush()
        storage.publish(os.path.join(self.work, TENSORBOARD), storage.join(self.output, TENSORBOARD))

    def _make_train_loop(self):
        """-> train_loop(iterator, steps): `steps` training steps in one call, a tf.range loop on the
        device (TF Model Garden's orbit loop does the same); returns the summed loss of those steps.

        One function, longer than a screen: the step's two forms (one XLA program per step; compiled
        forward-backward, then the strategy's all-reduce, then the update) share `forward_backward` and
        `update`, closures over the same variables, and read best as one description of the step."""
        strategy, classifier, optimizer = self.strategy, self.classifier, self.optimizer
        cfg, augment_cfg = self.train_cfg, self.config.augment
        size = self.config.data.image_size_px
        global_batch = self.data_cfg.global_batch_size
        class_weights = self.class_weights
        loss_scaling = isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
        variables = classifier.trainable_variables
        loss_sum = self.loss_sum
        averaged, weights = self.built.averaged, classifier.weights
        mixing = augment_cfg.enabled and augment_cfg.mixup > 0

        def forward_backward(images, labels, replica):
            # The seed comes from the step counter on the device: no host round-trip. The replica id
            # is an argument, not a constant read inside: every replica runs the same compiled program.
            seed = augment.step_seed(cfg.seed, optimizer.iterations, replica)
            inputs = augment.model_inputs(images, augment_cfg, seed, size)
            lam = None
            if mixing:
                inputs, lam = augment.mixup(inputs, augment_cfg.mixup, seed)
            with tf.GradientTape() as tape:
                probabilities = classifier(inputs, training=True)[:, 0]
                per_example = example_losses(labels, probabilities, class_weights, cfg.label_smoothing, lam)
                # Divided by the global batch: the replicas' gradients are summed.
                loss = tf.reduce_sum(per_example) / global_batch
                if classifier.losses:
                    loss += tf.nn.scale_regularization_loss(tf.add_n(classifier.losses))
                scaled = optimizer.get_scaled_loss(loss) if loss_scaling else loss
            gradients = tape.gradient(scaled, variables)
            if loss_scaling:
                gradients = optimizer.get_unscaled_gradients(gradients)
            return loss, gradients

        def update(loss, gradients, aggregated: bool):
            # The optimizer is not jit-compiled on its own (that would be one XLA program per
            # variable); its fused kernels are one op per variable (optimizer.FusedAdam).
            pairs = zip(gradients, variables, strict=True)
            optimizer.apply_gradients(pairs, skip_gradients_aggregation=aggregated)
            loss_sum.assign_add(loss)
            if averaged:
                step = tf.cast(optimizer.iterations, tf.float32)  # 1 after the first update
                decay = tf.minimum(cfg.ema_decay, (1.0 + step) / (10.0 + step))
                for average, weight in zip(averaged, weights, strict=True):
                    average.assign_sub((1.0 - decay) * (average - tf.cast(weight, average.dtype)))

        if self.step_kind == distribute.STEP_ONE_PROGRAM:
            # One replica: augmentation, forward, backward and update in one XLA program per step.
            @tf.function(jit_compile=True)
            def replica_step(batch):
                replica = tf.distribute.get_replica_context().replica_id_in_sync_group
                loss, gradients = forward_backward(batch["image"], batch["label"], replica)
                update(loss, gradients, aggregated=False)

            self.forward_backward = replica_step
        else:
            # Several replicas: the gradients leave the compiled part and are all-reduced by the
            # strategy's collectives (NCCL between GPUs, in packs of train.all_reduce_pack_mb), as
            # XLA's own all-reduce cannot span processes (distribute.step_kind); then the update.
            compiled = tf.function(forward_backward, jit_compile=self.xla)
            packs = distribute.all_reduce_options(cfg.all_reduce_pack_mb)

            def replica_step(batch):
                context = tf.distribute.get_replica_context()
                replica = context.replica_id_in_sync_group
                loss, gradients = compiled(batch["image"], batch["label"], replica)
                if strategy.num_replicas_in_sync > 1:
                    gradients = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients, options=packs)
                update(loss, gradients, aggregated=True)

            self.forward_backward = compiled  # (tests count its traces)

        self.replica_step = replica_step  # (tests read its compiled HLO)

        @tf.function
        def train_loop(iterator, steps):
            loss_sum.assign(0.0)
            for _ in tf.range(steps):
                strategy.run(replica_step, args=(next(iterator),))
            return loss_sum.read_value()

        return train_loop

    def predict(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Labels and probabilities of every record of `split`, the same arrays on every worker."""
        batches = self.strategy.distribute_datasets_from_function(
            lambda context: data.eval_dataset(self.config.data, self.dataset, split, context)
        )
        if self.built.predict_step is None:  # traced once, not once per epoch
            self.built.predict_step = self._make_predict_step()
        labels, probabilities = [], []
        for batch in batches:
            batch_labels, batch_probabilities = self.built.predict_step(batch)
            labels.append(batch_labels.numpy())
            probabilities.append(batch_probabilities.numpy())
        return np.concatenate(labels), np.concatenate(probabilities)

    def _make_predict_step(self):
        strategy, classifier = self.strategy, self.classifier

        # Compiled like the training step where XLA is on: XLA compiles one program per batch shape
        # (the full batch and the split's last one).
        @tf.function(jit_compile=self.xla)
        def score(images):
            return classifier(augment.model_inputs(images, None, None), training=False)[:, 0]

        @tf.function(reduce_retracing=True)
        def predict_step(batch):
            def replica_fn(element):
                return element["label"], score(element["image"])

            labels, probabilities = strategy.run(replica_fn, args=(batch,))
            return strategy.gather(labels, axis=0), strategy.gather(probabilities, axis=0)

        return predict_step

    # --- checkpoints --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _averaged_weights(self):
        """The model holds train.ema_decay's averaged weights inside, its own outside (a no-op when off)."""
        swap = self.built.swap_averaged
        if swap is None:
            yield
            return
        swap()
        try:
            yield
        finally:
            swap()

    def _save_best_weights(self) -> None:
        """The model's weights as the best so far (local; _save_checkpoint publishes them)."""
        folder = os.path.join(self.work, CHECKPOINTS)
        os.makedirs(folder, exist_ok=True)
        # Saved beside and renamed into place: a run killed mid-save keeps the previous best weights
        # instead of a truncated file that would fail its export on every resume.
        # (The name must end in .weights.h5: Keras picks the file format by the suffix.)
        partial = os.path.join(folder, f".best-partial-{os.getpid()}.weights.h5")
        try:
            self.classifier.save_weights(partial)
            os.replace(partial, os.path.join(folder, BEST_WEIGHTS))
        finally:
            if os.path.exists(partial):
                os.remove(partial)

    def _save_checkpoint(self, epoch: int, state: RunState, improved: bool) -> None:
        folder = os.path.join(self.work, CHECKPOINTS)
        os.makedirs(folder, exist_ok=True)
        self.epoch.assign(epoch)
        prefix = self.checkpoint.write(os.path.join(folder, f"ckpt-{epoch}"))
        state.checkpoint = os.path.basename(prefix)
        keep = tuple(f"ckpt-{e}." for e in range(epoch - self.train_cfg.checkpoints_to_keep + 1, epoch + 1))
        old = [name for name in os.listdir(folder) if name.startswith("ckpt-") and not name.startswith(keep)]
        if not self.chief:
            storage.discard(folder, folder, old)  # its own copies only
            return
        remote = storage.join(self.output, CHECKPOINTS)
        files = [name for name in os.listdir(folder) if name.startswith(f"ckpt-{epoch}.")]
        storage.write_bytes(os.path.join(folder, STATE_NAME), state.to_json())

        def upload() -> None:
            storage.publish(folder, remote, files + ([BEST_WEIGHTS] if improved else []))
            # The state file is the commit point: a checkpoint it does not name may be incomplete.
            storage.publish(folder, remote, [STATE_NAME])
            storage.discard(folder, remote, old)

        if not storage.is_gcs(remote) or state.finished:
            upload()
            return
        # To a bucket, ResNet50's checkpoint (~0.3 GB with its optimizer state) uploads while the next
        # epoch trains; that epoch waits for it before it writes any checkpoint file (_wait_for_upload).
        if self._uploads is None:
            self._uploads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-upload")
        self._upload = self._uploads.submit(upload)

    def close(self) -> None:
        if self._uploads is not None:
            self._uploads.shutdown(wait=True)
        self._wait_for_upload()

    def _wait_for_upload(self) -> None:
        """Until the last checkpoint's upload is done; an upload's error is raised here."""
        upload, self._upload = self._upload, None
        if upload is not None:
            upload.result()

    def _restore(self) -> RunState:
        remote = storage.join(self.output, CHECKPOINTS)
        try:
            state = RunState.from_json(storage.read_bytes(storage.join(remote, STATE_NAME)))
        except storage.StorageNotFound:
            raise TrainingError(
                f"--resume: no checkpoint in {remote} (no {STATE_NAME}); start without --resume"
            ) from None
        except (ValueError, TypeError) as error:
            raise TrainingError(f"--resume: {remote}/{STATE_NAME} is damaged ({error})") from None
        folder = os.path.join(self.work, CHECKPOINTS)
        checkpoint = storage.child(folder, state.checkpoint, storage.join(remote, STATE_NAME))
        names = [storage.basename(f.uri) for f in storage.list_files(remote)]
        wanted = [n for n in names if n.startswith(state.checkpoint + ".") or n == BEST_WEIGHTS]
        storage.fetch(remote, folder, wanted)
        self.checkpoint.read(checkpoint).assert_existing_objects_matched()
        return state

    # --- export -------------------------------------------------------------------------------------

    def _export(self, state: RunState) -> TrainResult:
        if self.chief:
            where = storage.join(self.output, export_lib.FOLDER)
            last, best = state.next_epoch, state.best_epoch + 1
            print(
                f"train: epoch {last} was the last; exporting epoch {best}'s weights to {where}", flush=True
            )
        self.classifier.load_weights(os.path.join(self.work, CHECKPOINTS, BEST_WEIGHTS))
        # The best epoch's validation scores, scored again only when an earlier process ran that epoch.
        labels, scores = self.best_val_scores or self.predict("val")
        exported = exporter.export_run(
            self.classifier,
            self.strategy,
            self.config,
            self.dataset.manifest.image,
            labels,
            scores,
            state,
            self.work,
            self.output,
            self.chief,
            self._warn,
        )
        return TrainResult(
            best_epoch=state.best_epoch,
            best_val_auc=state.best_auc,
            epochs_run=state.next_epoch,
            stopped_early=state.stopped_early,
            history=state.history,
            export_uri=exported.uri,
            threshold=exported.threshold,
            val_metrics=exported.val_metrics,
        )

    def _warn(self, message: str) -> None:
        if self.chief:
            print(f"train: warning: {message}", file=sys.stderr, flush=True)


def _set_op_determinism(deterministic: bool) -> None:
    """TensorFlow's op determinism as the run asks: it is process-wide, so a run without it that follows
    one with it in the same process (a search's reused process) turns it off again; left on, it makes
    XLA refuse ResNet50's max-pool gradient. (No public switch-off in TF 2.21: TensorFlow's own.)"""
    from tensorflow.python.framework import config as tf_config

    if deterministic:
        tf.config.experimental.enable_op_determinism()
    elif tf_config.is_op_determinism_enabled():
        tf_config.disable_op_determinism()


def example_losses(
    labels: tf.Tensor,
    probabilities: tf.Tensor,
    class_weights: tuple[float, float],
    label_smoothing: float = 0.0,
    lam: tf.Tensor | None = None,
) -> tf.Tensor:
    """(B,) binary cross-entropy of each example, weighted by its class's weight (NORMAL, PNEUMONIA).
    With `lam` (augment.mixup's), example i is a mix of images i and B-1-i, and its loss the same mix
    of theirs: lam_i * loss(label_i) + (1 - lam_i) * loss(label_B-1-i), each weighted by its own class."""

    def weighted(labels):
        targets = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
        losses = tf_keras.backend.binary_crossentropy(targets, probabilities)
        return losses * tf.where(labels > 0.5, class_weights[1], class_weights[0])

    if lam is None:
        return weighted(labels)
    return lam * weighted(labels) + (1.0 - lam) * weighted(tf.reverse(labels, axis=[0]))


def _set_seeds(seed: int, reused: bool) -> None:
    """Python's, numpy's and TensorFlow's seeds. A reused build keeps TensorFlow's global seed when it is
    this run's already: setting it again would clear TensorFlow's kernel caches, and the reused step would
    be instantiated and optimised again at its first call (~11 s on 2 cores, BENCHMARKS.md)."""
    if not reused or tf.compat.v1.random.get_seed(0)[0] != seed:
        tf_keras.utils.set_random_seed(seed)
    else:
        random.seed(seed)
        np.random.seed(seed)
