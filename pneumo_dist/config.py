"""The typed config of a run (frozen dataclasses), loaded from YAML, overridden by `--set key=value`,
validated before any data is read.

Sections are passed explicitly to the code that needs them: `DataConfig` to data.py, `AugmentConfig`
to augment.py, `ModelConfig` to model.py, `TrainConfig` to train.py; train.py, tune.py and the Ray
workers all read the same `RunConfig`.

Past ~500 lines on purpose: every section's fields, their comments and their checks are the config's
one reference; split by section, a reader would look for a key in several files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import os
import typing
from dataclasses import dataclass, field

import yaml

from pneumo_dist.errors import PneumoDistError


class ConfigError(PneumoDistError, ValueError):
    """A config value is invalid; the message names the key."""


def _check(condition: bool, section: str, key: str, value, why: str) -> None:
    if not condition:
        raise ConfigError(f"{section}.{key}={value!r}: {why}")


@dataclass(frozen=True)
class AugmentConfig:
    """On-device augmentation of the grayscale batch; ranges are symmetric (+-) around identity."""

    enabled: bool = True
    rotation_deg: float = 10.0
    zoom: float = 0.1  # scale factor drawn from [1 - zoom, 1 + zoom]
    shift: float = 0.08  # fraction of the image side, in x and y
    shear_deg: float = 5.0
    # Off by default: the heart sits on the patient's left, so a flipped chest is an anatomy the model
    # never meets at test time (situs inversus is rare) and it can learn from the cardiac silhouette.
    horizontal_flip: bool = False
    brightness: float = 0.1  # added, in units of the full 0..1 range
    contrast: float = 0.15  # factor drawn from [1 - contrast, 1 + contrast], around each image's mean
    gamma: float = 0.15  # exponent drawn log-uniformly from [1 / (1 + gamma), 1 + gamma]
    # Random erasing (Zhong et al., AAAI 2020): the probability that an image gets one rectangle of 2-40%
    # of its area (aspect 0.3-3.3) filled with random gray levels, so that no small region (a lead
    # marker, a border, a text label) can carry the label alone. Off by default: RESULTS.md has the run.
    erasing: float = 0.0
    # Mixup (Zhang et al., ICLR 2018): each training image becomes lam * itself + (1 - lam) * its
    # partner in the batch (the batch reversed, as timm pairs them), lam ~ Beta(mixup, mixup) per
    # image, and its loss the same mix of the two images' (class-weighted) losses. A model cannot then
    # rest on one small region or on how sure it can be of a training image. 0: off (the default).
    mixup: float = 0.0

    def validate(self) -> None:
        for name, limit in (("rotation_deg", 180), ("shear_deg", 45)):
            value = getattr(self, name)
            _check(0 <= value <= limit, "augment", name, value, f"must be in [0, {limit}]")
        for name in ("zoom", "shift", "brightness", "contrast"):
            value = getattr(self, name)
            _check(0 <= value < 1, "augment", name, value, "must be in [0, 1)")
        _check(0 <= self.gamma <= 2, "augment", "gamma", self.gamma, "must be in [0, 2]")
        _check(0 <= self.erasing <= 1, "augment", "erasing", self.erasing, "must be in [0, 1]")
        _check(0 <= self.mixup <= 1, "augment", "mixup", self.mixup, "must be in [0, 1] (0: off)")


CACHE_MODES = ("none", "memory", "disk")
EQUALIZE_MODES = ("none", "histogram")
MAX_BORDER_CROP = 0.25  # DataConfig.border_crop's bound (an export's too)
READ_MODES = ("stage", "stream")
CLASS_BALANCE_MODES = ("weights", "sample", "none")


@dataclass(frozen=True)
class DataConfig:
    manifest_uri: str = "data/demo-shards"  # a dataset folder or its manifest.json, local or gs://
    image_size_px: int = 224  # model input side; training resizes in the augmentation warp
    global_batch_size: int = 64  # across all replicas; each replica gets global / replicas
    # When > 0, each replica (GPU) gets this many and the global batch is this x the replicas, whatever
    # global_batch_size says: the batch follows the hardware.
    batch_per_replica: int = 0
    # Pneumonia is about 2.9x NORMAL in Kaggle train. "weights": the loss weighs each class by the
    # manifest's balanced class weights; "sample": tf.data draws both classes equally often; "none".
    class_balance: str = "weights"
    shuffle_buffer: int = 2048  # records; the whole Kaggle train split is 4.4k
    cache: str = "memory"  # decoded images: "memory", "disk" (under cache_dir) or "none"
    cache_dir: str = ""  # for cache="disk"; default: under stage_dir
    # "stage": copy the shards once per node to stage_dir (verified, shared by every trial on the node);
    # "stream": read them where they are (gs:// through TensorFlow's own GCS filesystem).
    read_mode: str = "stage"
    stage_dir: str = ""  # default: <system temp>/pneumo-dist-stage
    deterministic: bool = False  # training read order; evaluation is always deterministic
    seed: int = 0
    # Per-image intensity standardisation of every record as it is read (decode.standardize_intensity):
    # "histogram" equalises each image's gray levels, so that exposure and the scanner's contrast curve
    # matter less. The export records it: evaluation, PneumoniaDetector and the SavedModel apply it too.
    equalize: str = "none"
    # The fraction of the stored image's side cut from each edge as records are read (before the
    # equalisation; the export records it too): what lies near the borders (lead markers, text, the
    # arms, the collimator's edge) then cannot carry the label. 0: nothing cut.
    border_crop: float = 0.0
    threads: int = 0  # tf.data's private thread pool; 0: the CPUs this process may use (data.host_threads)

    def validate(self) -> None:
        _check(bool(self.manifest_uri), "data", "manifest_uri", self.manifest_uri, "must not be empty")
        _check(self.threads >= 0, "data", "threads", self.threads, "must be >= 0")
        _check(
            16 <= self.image_size_px <= 1024, "data", "image_size_px", self.image_size_px, "must be 16..1024"
        )
        _check(
            self.global_batch_size >= 1, "data", "global_batch_size", self.global_batch_size, "must be >= 1"
        )
        _check(
            self.batch_per_replica >= 0, "data", "batch_per_replica", self.batch_per_replica, "must be >= 0"
        )
        _check(
            0 <= self.border_crop <= MAX_BORDER_CROP,
            "data",
            "border_crop",
            self.border_crop,
            f"must be in [0, {MAX_BORDER_CROP}]",
        )
        _check(self.shuffle_buffer >= 1, "data", "shuffle_buffer", self.shuffle_buffer, "must be >= 1")
        for name, allowed in (
            ("class_balance", CLASS_BALANCE_MODES),
            ("cache", CACHE_MODES),
            ("read_mode", READ_MODES),
            ("equalize", EQUALIZE_MODES),
        ):
            value = getattr(self, name)
            _check(value in allowed, "data", name, value, f"must be one of {', '.join(allowed)}")


PRECISIONS = ("auto", "float32", "bfloat16", "float16")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")
SWITCHES = ("auto", "on", "off")
# How the exported threshold is chosen on the validation split: the highest threshold reaching
# target_sensitivity; the largest Youden's J (sensitivity + specificity - 1); the fewest expected errors
# at deployment_prevalence (on calibrated probabilities).
THRESHOLD_POLICIES = ("sensitivity", "youden", "prevalence")
# "platt": logistic calibration on the validation split; "platt_capped": the same with its slope at most 1
# (metrics.fit_platt), so that it never sharpens the model's probabilities; "none".
CALIBRATIONS = ("platt", "platt_capped", "none")


@dataclass(frozen=True)
class ModelConfig:
    # "imagenet" (Keras' own download), a local or gs:// .h5 file of ResNet50 notop weights, or "none".
    weights: str = "imagenet"
    # Backbone layers to fine-tune, counted from the top of ResNet50's 175 layers: an int, or "all".
    unfreeze: int | str = 20
    # Train BatchNorm layers too (in training mode): only for training from scratch (weights "none").
    # Fine-tuning keeps them frozen and in inference mode, so small batches cannot wreck their statistics.
    train_batchnorm: bool = False
    dropout: float = 0.3
    dense_units: int = 256
    l2: float = 1e-4

    def validate(self) -> None:
        _check(bool(self.weights), "model", "weights", self.weights, "must be imagenet, none or a .h5 path")
        if self.weights not in ("imagenet", "none"):
            _check(
                self.weights.endswith(".h5"), "model", "weights", self.weights, "a weights file must be .h5"
            )
        unfreeze_ok = self.unfreeze == "all" or (isinstance(self.unfreeze, int) and self.unfreeze >= 0)
        _check(unfreeze_ok, "model", "unfreeze", self.unfreeze, "must be a layer count >= 0 or 'all'")
        _check(0 <= self.dropout < 1, "model", "dropout", self.dropout, "must be in [0, 1)")
        _check(self.dense_units >= 1, "model", "dense_units", self.dense_units, "must be >= 1")
        _check(self.l2 >= 0, "model", "l2", self.l2, "must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    optimizer: str = "adam"  # adam, adamw, sgd (with momentum, Nesterov by default)
    learning_rate: float = 1e-4  # peak, reached after the warm-up (at lr_reference_batch, if set)
    # When > 0, learning_rate is for this global batch and is scaled linearly to the run's global batch
    # (Goyal et al. 2017, "Accurate, Large Minibatch SGD"), with warmup_epochs of warm-up.
    lr_reference_batch: int = 0
    schedule: str = "cosine"  # cosine decay to 0 after the warm-up, or constant
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-4  # adamw only
    momentum: float = 0.9  # sgd only
    nesterov: bool = True
    grad_clip_norm: float = 0.0  # global norm; 0 = off
    label_smoothing: float = 0.0
    # When > 0, an exponential moving average of the weights, updated after every step with this decay
    # (ramped up as min(decay, (1 + step) / (10 + step)) over the first steps, as TensorFlow's
    # ExponentialMovingAverage does with num_updates): validation scores the averaged weights, and the
    # best averaged weights are the export. 0: off.
    ema_decay: float = 0.0
    head_warmup_epochs: int = 0  # epochs with the whole backbone frozen before unfreezing
    early_stopping_patience: int = 5  # epochs without a better validation AUC; 0 = off
    target_sensitivity: float = 0.95  # the sensitivity policy's threshold reaches this on validation
    # The export's operating threshold (every policy's threshold is exported and reported; the detector
    # and evaluate.py can take another). Sensitivity first: a screening model that misses pneumonia costs
    # more than one that sends a healthy chest for a second read.
    threshold_policy: str = "sensitivity"
    # The probabilities are calibrated on the validation split (logistic, Platt 1999), which removes the
    # bias class weights put in them; "none" exports them as the model gives them.
    calibration: str = "platt"
    # The prevalence of PNEUMONIA where the model will be used, if known (0: not known): the export then
    # also holds the prevalence policy's threshold for it.
    deployment_prevalence: float = 0.0
    # The export also holds saved_model/, a TensorFlow SavedModel that takes encoded images (TF Serving,
    # Vertex AI). A search writes it for its best export only.
    serving_export: bool = True
    precision: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    xla: str = "auto"  # auto: on for GPU, off on CPU
    # XLA's persistent compilation cache, shared by the trials of a node; "" = off; "default":
    # <system temp>/pneumo-dist-xla-cache-<uid>.
    xla_cache_dir: str = "default"
    # Training steps per call into TensorFlow (a tf.range loop on the device): the loss is read and the
    # progress shown once per loop; 0 = 100 with a GPU, 10 without (train.py), at most an epoch.
    steps_per_loop: int = 0
    # Gradients are all-reduced in packs of this size, so that packs overlap (MultiWorkerMirrored).
    all_reduce_pack_mb: float = 32.0
    output_uri: str = "outputs/demo"  # local folder or gs://: checkpoints, TensorBoard, export
    max_steps_per_epoch: int = 0  # debug limit; 0 = the whole train split
    checkpoints_to_keep: int = 2
    seed: int = 0
    # Bit-identical reruns (tf.config.experimental.enable_op_determinism): slower, mostly on GPU.
    deterministic_ops: bool = False

    def validate(self) -> None:
        """One check per field, in the fields' order, each naming its key (_check). Longer than a screen
        because the section has that many fields; split, a field's check would be looked for in two
        places."""
        for name, allowed in (
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("precision", PRECISIONS),
            ("xla", SWITCHES),
        ):
            value = getattr(self, name)
            _check(value in allowed, "train", name, value, f"must be one of {', '.join(allowed)}")
        _check(self.epochs >= 1, "train", "epochs", self.epochs, "must be >= 1")
        _check(0 < self.learning_rate < 1, "train", "learning_rate", self.learning_rate, "must be in (0, 1)")
        _check(self.warmup_epochs >= 0, "train", "warmup_epochs", self.warmup_epochs, "must be >= 0")
        _check(self.weight_decay >= 0, "train", "weight_decay", self.weight_decay, "must be >= 0")
        _check(0 <= self.momentum < 1, "train", "momentum", self.momentum, "must be in [0, 1)")
        _check(self.grad_clip_norm >= 0, "train", "grad_clip_norm", self.grad_clip_norm, "must be >= 0")
        _check(
            0 <= self.label_smoothing < 0.5,
            "train",
            "label_smoothing",
            self.label_smoothing,
            "must be in [0, 0.5)",
        )
        _check(0 <= self.ema_decay < 1, "train", "ema_decay", self.ema_decay, "must be in [0, 1) (0: off)")
        _check(
            0 <= self.head_warmup_epochs < self.epochs,
            "train",
            "head_warmup_epochs",
            self.head_warmup_epochs,
            f"must be in [0, epochs={self.epochs})",
        )
        _check(
            self.early_stopping_patience >= 0,
            "train",
            "early_stopping_patience",
            self.early_stopping_patience,
            "must be >= 0",
        )
        _check(
            0 < self.target_sensitivity <= 1,
            "train",
            "target_sensitivity",
            self.target_sensitivity,
            "must be in (0, 1]",
        )
        for name, allowed in (("threshold_policy", THRESHOLD_POLICIES), ("calibration", CALIBRATIONS)):
            value = getattr(self, name)
            _check(value in allowed, "train", name, value, f"must be one of {', '.join(allowed)}")
        _check(
            0 <= self.deployment_prevalence < 1,
            "train",
            "deployment_prevalence",
            self.deployment_prevalence,
            "must be in (0, 1), or 0 when not known",
        )
        if self.threshold_policy == "prevalence":
            _check(
                self.deployment_prevalence > 0 and self.calibration != "none",
                "train",
                "threshold_policy",
                self.threshold_policy,
                "needs train.deployment_prevalence (in (0, 1)) and calibrated probabilities "
                "(train.calibration: platt)",
            )
        _check(bool(self.output_uri), "train", "output_uri", self.output_uri, "must not be empty")
        _check(
            self.max_steps_per_epoch >= 0,
            "train",
            "max_steps_per_epoch",
            self.max_steps_per_epoch,
            "must be >= 0",
        )
        _check(self.steps_per_loop >= 0, "train", "steps_per_loop", self.steps_per_loop, "must be >= 0")
        _check(
            self.lr_reference_batch >= 0,
            "train",
            "lr_reference_batch",
            self.lr_reference_batch,
            "must be >= 0",
        )
        _check(
            self.all_reduce_pack_mb >= 0,
            "train",
            "all_reduce_pack_mb",
            self.all_reduce_pack_mb,
            "must be >= 0 (0: one pack)",
        )
        _check(
            self.checkpoints_to_keep >= 1,
            "train",
            "checkpoints_to_keep",
            self.checkpoints_to_keep,
            "must be >= 1",
        )


# The fine-tuning search pneumonia studies report; keys are `section.key` of this config.
DEFAULT_SEARCH_SPACE = {
    "model.unfreeze": {"choice": [0, 10, 20, 40, "all"]},
    "train.learning_rate": {"loguniform": [1e-5, 1e-3]},
    "train.optimizer": {"choice": ["adam", "sgd"]},
    "model.dropout": {"uniform": [0.2, 0.6]},
    "model.l2": {"choice": [0.0, 1e-4, 1e-3, 1e-2]},
    "model.dense_units": {"choice": [128, 256, 512]},
    "data.global_batch_size": {"choice": [32, 64]},
}
# "grid": every value, each in num_samples trials (Ray Tune's grid_search), e.g. {grid: [0, 1, 2]} for
# train.seed: the members of an ensemble (tune.ensemble_top), trained in parallel.
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
LISTS = ("choice", "grid")


@dataclass(frozen=True)
class TuneConfig:
    """The Ray Tune search: trials sample `search_space`, ASHA stops the weak ones early."""

    num_samples: int = 8
    scheduler: str = "asha"  # "asha", or "fifo": every trial runs all train.epochs (for comparison)
    # "random": independent draws from search_space; "optuna": Optuna's TPE (Ray Tune's OptunaSearch),
    # which draws the next trials where the finished ones scored well (pip install 'pneumo-dist[optuna]').
    search_alg: str = "random"
    grace_period: int = 2  # epochs each trial runs before ASHA may stop it (keep it above the warm-ups)
    reduction_factor: int = 3  # ASHA keeps the best 1/reduction_factor at each rung
    workers_per_trial: int = 1  # Ray Train workers (MultiWorkerMirroredStrategy when > 1)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # 0: no cap; trials queue for their CPUs / GPUs, as many run as the cluster holds at each moment
    # (and the autoscaler adds nodes for the queued ones).
    max_concurrent_trials: int = 0
    max_failures: int = 1  # restarts of a trial whose worker died, from its last checkpoint
    storage_uri: str = "outputs/tune"  # local folder or gs://: Ray's experiment state, trials, best model
    name: str = "search"
    search_space: dict = field(default_factory=lambda: dict(DEFAULT_SEARCH_SPACE))
    evaluate_test: bool = True  # report on the best trial's model on the test split at the end
    # > 1: the search's result (best/) is an ensemble (ensemble.py) of its ensemble_top best finished
    # trials (those that read images as the best one does), not the best trial alone.
    ensemble_top: int = 1
    seed: int = 0

    def __post_init__(self):
        # YAML 1.1 reads 1e-4 (no dot) as a string: make range bounds numbers where they are numbers.
        space = {}
        for key, spec in self.search_space.items():
            if isinstance(spec, dict):
                spec = {
                    kind: [_number_or_same(v) for v in values]
                    if kind not in LISTS and isinstance(values, list)
                    else values
                    for kind, values in spec.items()
                }
            space[key] = spec
        object.__setattr__(self, "search_space", space)

    def validate(self) -> None:
        for name in ("num_samples", "grace_period", "workers_per_trial", "ensemble_top"):
            value = getattr(self, name)
            _check(value >= 1, "tune", name, value, "must be >= 1")
        _check(
            self.scheduler in ("asha", "fifo"), "tune", "scheduler", self.scheduler, "must be asha or fifo"
        )
        _check(
            self.search_alg in ("random", "optuna"),
            "tune",
            "search_alg",
            self.search_alg,
            "must be random or optuna",
        )
        _check(
            self.search_alg != "optuna" or importlib.util.find_spec("optuna") is not None,
            "tune",
            "search_alg",
            self.search_alg,
            "needs Optuna: pip install 'pneumo-dist[optuna]'",
        )
        _check(self.reduction_factor >= 2, "tune", "reduction_factor", self.reduction_factor, "must be >= 2")
        _check(self.cpus_per_worker > 0, "tune", "cpus_per_worker", self.cpus_per_worker, "must be > 0")
        _check(self.gpus_per_worker >= 0, "tune", "gpus_per_worker", self.gpus_per_worker, "must be >= 0")
        for name in ("max_concurrent_trials", "max_failures"):
            _check(getattr(self, name) >= 0, "tune", name, getattr(self, name), "must be >= 0")
        _check(bool(self.storage_uri), "tune", "storage_uri", self.storage_uri, "must not be empty")
        _check(bool(self.name) and "/" not in self.name, "tune", "name", self.name, "must be a plain name")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def validate(self) -> RunConfig:
        for section in (self.data, self.augment, self.model, self.train, self.tune):
            section.validate()
        self._validate_search_space()
        return self

    def _validate_search_space(self) -> None:
        """Every key names a config value and every value a distribution can draw is valid for it,
        so that no trial fails on its config after cluster time was spent."""
        for key, spec in self.tune.search_space.items():
            where = f"tune.search_space[{key!r}]"
            section, _, name = key.partition(".")
            if (
                section in ("tune",)
                or section not in _SECTIONS
                or name not in _field_names(_SECTIONS[section])
            ):
                raise ConfigError(f"{where}: not a data, augment, model or train key")
            if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
                raise ConfigError(
                    f"{where}: expected one of {', '.join(DISTRIBUTIONS)}, e.g. {{choice: [1, 2]}}"
                )
            kind, values = next(iter(spec.items()))
            if not isinstance(values, list) or not values or (kind not in LISTS and len(values) != 2):
                raise ConfigError(
                    f"{where}: {kind} needs {'a list of options' if kind in LISTS else '[low, high]'}"
                )
            if kind not in LISTS and not all(isinstance(v, int | float) for v in values):
                raise ConfigError(f"{where}: {kind} bounds must be numbers, got {values}")
            if kind not in LISTS and not values[0] < values[1]:
                raise ConfigError(f"{where}: {kind} needs low < high, got {values}")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {values}")
            for value in values:
                try:
                    trial = self.to_dict()
                    trial[section][name] = value
                    trial["tune"]["search_space"] = {}  # a trial's config is not searched again
                    config_from_dict(trial, source=where)
                except ConfigError as error:
                    raise ConfigError(f"{where} can draw {value!r}, which is invalid: {error}") from None

    def warnings(self) -> list[str]:
        """Valid but probably unintended settings, for the jobs to print before any cluster time is spent."""
        found = []
        tune = self.tune
        if self.data.batch_per_replica and "data.global_batch_size" in tune.search_space:
            found.append(
                "tune.search_space draws data.global_batch_size, which data.batch_per_replica "
                f"({self.data.batch_per_replica}) overrides: search data.batch_per_replica instead"
            )
        if tune.scheduler == "asha":
            warmup = max(self._largest("train.warmup_epochs"), self._largest("train.head_warmup_epochs"))
            if tune.grace_period <= warmup:
                found.append(
                    f"tune.grace_period ({tune.grace_period}) is not above the warm-up (train.warmup_epochs "
                    f"/ head_warmup_epochs up to {warmup:g}): ASHA will compare trials before their warm-up "
                    "ends and may stop the best ones (BENCHMARKS.md)"
                )
            if tune.grace_period >= self.train.epochs:
                found.append(
                    f"tune.grace_period ({tune.grace_period}) is not below train.epochs "
                    f"({self.train.epochs}): ASHA cannot stop any trial early"
                )
        reasons = self.gpu_recipe_reasons()
        if reasons and not tune.gpus_per_worker:
            found.append(
                f"a GPU recipe ({', '.join(reasons)}) with tune.gpus_per_worker 0: every trial trains on "
                "CPUs (hours per trial) and a cluster starts no GPU node for it; set "
                "tune.gpus_per_worker: 1 (jobs/tune.py) or run train.py where a GPU is"
            )
        return found

    def gpu_recipe_reasons(self) -> list[str]:
        """What makes this config a GPU recipe: reduced precision, ImageNet weights (fine-tuning
        ResNet50 at full width), or inputs of 224 px and more."""
        reasons = []
        if self.train.precision in ("bfloat16", "float16"):
            reasons.append(f"train.precision {self.train.precision}")
        if self.model.weights == "imagenet":
            reasons.append("model.weights imagenet")
        if self.data.image_size_px >= 224:
            reasons.append(f"data.image_size_px {self.data.image_size_px}")
        return reasons

    def _largest(self, key: str) -> float:
        """A train value, or the largest the search space can draw for it."""
        section, _, name = key.partition(".")
        spec = self.tune.search_space.get(key) or {}
        return max([getattr(getattr(self, section), name), *next(iter(spec.values()), [])])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _number_or_same(value):
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


_SECTIONS = {"data": DataConfig, "augment": AugmentConfig, "model": ModelConfig, "train": TrainConfig}


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def add_config_arguments(parser, example: str) -> None:
    """--config and --set, the same in every job."""
    parser.add_argument("--config", help="YAML run config (configs/*.yaml); default: the built-in defaults")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"override one config value, e.g. --set {example} (repeatable)",
    )


def load_config(path: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or start from the defaults), apply `section.key=value` overrides, validate."""
    raw: dict = {}
    if path:
        from pneumo_dist import storage

        try:
            raw = yaml.safe_load(storage.read_bytes(path)) or {}
        except storage.StorageNotFound as error:
            raise storage.StorageNotFound(f"{error}{_similar_file(path)}") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"{path} is not valid YAML: {problem}{where}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data, augment, model, train)")
    for name, values in raw.items():
        if not isinstance(values, dict | None):
            raise ConfigError(f"{path}: section {name!r} must be a mapping of keys to values")
    raw = {name: dict(values or {}) for name, values in raw.items()}
    for name, values in raw.items():
        for key in values:
            _check_key(name, key, path)
    overridden = set()
    for override in overrides:
        key, equals, value = override.partition("=")
        section, dot, name = key.strip().partition(".")
        if not (equals and dot and name):
            raise ConfigError(f"--set {override!r}: expected section.key=value, e.g. train.epochs=5")
        _check_key(section, name, f"--set {override}")
        raw.setdefault(section, {})[name] = _parse_override(value)
        overridden.add(f"{section}.{name}")
    try:
        return config_from_dict(raw, source=path or "the defaults")
    except ConfigError as error:  # a value's error names the --set that gave it
        key = str(error).split("=", 1)[0]
        raise ConfigError(f"--set {error}" if key in overridden else str(error)) from None


def _check_key(section: str, key: str, source: str) -> None:
    """An unknown section or key is an error naming where it came from and the nearest known key."""
    known = [f"{name}.{field}" for name, cls in _SECTIONS.items() for field in _field_names(cls)]
    known += [f"tune.{field}" for field in _field_names(TuneConfig)]
    wanted = f"{section}.{key}"
    if wanted in known:
        return
    # The same key in another section first (model.learning_rate is train.learning_rate), then spelling.
    same = [name for name in known if name.endswith(f".{key}")]
    close = same or difflib.get_close_matches(wanted, known, n=1, cutoff=0.75)
    hint = f"; did you mean {close[0]}?" if close else ""
    sections = [*_SECTIONS, "tune"]
    if not close and section in sections:
        hint = f" (known: {', '.join(name for name in known if name.startswith(section + '.'))})"
    elif not close:
        hint = f" (sections: {', '.join(sections)})"
    raise ConfigError(f"{source or 'the defaults'}: unknown key {wanted}{hint}")


def _similar_file(path: str) -> str:
    """ "; did you mean X?" for a local config path with a near namesake in its folder (demo.yml)."""
    folder = os.path.dirname(path) or "."
    if "://" in path or not os.path.isdir(folder):
        return ""
    names = [n for n in sorted(os.listdir(folder)) if n.endswith((".yaml", ".yml"))]
    close = difflib.get_close_matches(os.path.basename(path), names, n=1, cutoff=0.6)
    return f"; did you mean {os.path.join(os.path.dirname(path), close[0])}?" if close else ""


def config_from_dict(raw: dict, source: str = "config") -> RunConfig:
    sections = {f.name: f for f in dataclasses.fields(RunConfig)}
    built = {}
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section {name!r} (known: {', '.join(sections)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping of keys to values")
        built[name] = _build_section(typing.get_type_hints(RunConfig)[name], name, values, source)
    return RunConfig(**built).validate()


def _build_section(cls, section: str, values: dict, source: str):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            _check_key(section, key, source)  # raises, naming the nearest key
        kwargs[key] = _coerce(hints[key], value, f"{section}.{key}")
    return cls(**kwargs)


def _coerce(kind, value, where: str):
    """Accept a value of the field's type, an int for a float, and for a float a string such as "3e-4"
    (YAML 1.1 reads numbers without a dot as strings), and for a string on / off (which YAML 1.1 reads
    as booleans: `train.xla: on`); nothing else."""
    allowed = typing.get_args(kind) or (kind,)
    if isinstance(value, bool):
        if bool in allowed:
            return value
        if str in allowed:
            return "on" if value else "off"
    elif isinstance(value, int) and int in allowed:
        return value
    elif isinstance(value, int | float) and float in allowed:
        return float(value)
    elif isinstance(value, str) and str in allowed:
        return value
    elif isinstance(value, str) and float in allowed:
        with contextlib.suppress(ValueError):
            return float(value)
    elif isinstance(value, dict) and dict in allowed:
        return value
    names = " or ".join(t.__name__ for t in allowed)
    raise ConfigError(f"{where}={value!r}: must be {names}")


def _parse_override(text: str):
    """The value as YAML reads it: numbers, true/false, strings."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
