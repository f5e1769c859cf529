"""The optimizer of a run: the learning-rate schedule (linear warm-up, cosine decay), its linear scaling
with the global batch, and Adam/AdamW whose dense update is TensorFlow's fused kernel."""

from __future__ import annotations

import math

import tensorflow as tf
import tf_keras

from pneumo_dist.config import TrainConfig


class WarmupCosine(tf_keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak`, then cosine decay to 0 at `total_steps` (or constant). `peak` is a
    variable: read when the step runs, so trials that differ in learning rate trace the same step."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, cosine: bool = True):
        self.peak = tf.Variable(peak, dtype=tf.float32, trainable=False, name="peak_learning_rate")
        self.warmup_steps, self.total_steps, self.cosine = warmup_steps, total_steps, cosine

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = tf.cast(self.warmup_steps, tf.float32)
        rising = self.peak * (step + 1.0) / tf.maximum(warmup, 1.0)
        if self.cosine:
            progress = (step - warmup) / tf.maximum(float(self.total_steps) - warmup, 1.0)
            after = 0.5 * self.peak * (1.0 + tf.cos(math.pi * tf.clip_by_value(progress, 0.0, 1.0)))
        else:
            after = tf.identity(self.peak)
        return tf.where(step < warmup, rising, after)

    def get_config(self) -> dict:
        return {
            "peak": float(self.peak.numpy()),
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "cosine": self.cosine,
        }


def scaled_learning_rate(cfg: TrainConfig, global_batch: int) -> float:
    """train.learning_rate, scaled linearly from train.lr_reference_batch to `global_batch` when set."""
    if not cfg.lr_reference_batch:
        return cfg.learning_rate
    return cfg.learning_rate * global_batch / cfg.lr_reference_batch


class _FusedAdamUpdate:
    """Adam's dense update as TF's fused kernel, one ResourceApplyAdam op per variable (XLA compiles it
    too) instead of tf-keras' ~20: the same arithmetic as tf_keras Adam.update_step (m += (g - m)(1 - b1),
    v += (g^2 - v)(1 - b2), var -= alpha m / (sqrt(v) + eps), alpha = lr sqrt(1 - b2^t) / (1 - b1^t)).
    ResNet50's training step then traces in 9.0 s instead of 14.8 and its first call (graph optimisation)
    takes 6.5 s instead of 13 (2-core CPU): every trial and every restarted worker pays these."""

    def update_step(self, gradient, variable):
        if isinstance(gradient, tf.IndexedSlices) or self.amsgrad or getattr(self, "adaptive_epsilon", False):
            return super().update_step(gradient, variable)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        index = self._index_dict[self._var_key(variable)]
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=self._momentums[index].handle,
            v=self._velocities[index].handle,
            beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(self.learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype),
            grad=gradient,
        )


class FusedAdam(_FusedAdamUpdate, tf_keras.optimizers.Adam):
    pass


class FusedAdamW(_FusedAdamUpdate, tf_keras.optimizers.AdamW):
    pass


def make_optimizer(cfg: TrainConfig, learning_rate: float, steps_per_epoch: int, policy: str):
    """-> (optimizer, its learning-rate schedule). Call under the strategy's scope."""
    schedule = WarmupCosine(
        learning_rate,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        total_steps=cfg.epochs * steps_per_epoch,
        cosine=cfg.schedule == "cosine",
    )
    # Not compiled on its own: the whole training step is one XLA program where XLA is on.
    common = {"jit_compile": False}
    if cfg.grad_clip_norm:
        common["global_clipnorm"] = cfg.grad_clip_norm
    if cfg.optimizer == "adam":
        optimizer = FusedAdam(schedule, **common)
    elif cfg.optimizer == "adamw":
        optimizer = FusedAdamW(schedule, weight_decay=cfg.weight_decay, **common)
    else:
        optimizer = tf_keras.optimizers.SGD(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov, **common)
    if policy == "mixed_float16":
        optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer, schedule
