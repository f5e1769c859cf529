"""pneumo-dist: distributed ResNet50 fine-tuning for NORMAL vs PNEUMONIA chest X-rays."""

import os

# TensorFlow 2.21 gives Keras 3 unless this is set before tf.keras is first touched; our models,
# checkpoints and Ray workers all use tf-keras (Keras 2). Every entry point and Ray worker imports
# pneumo_dist before TensorFlow, so setting it here covers them all. An explicit user setting wins
# only if it agrees: anything else would silently train a different Keras.
if os.environ.get("TF_USE_LEGACY_KERAS", "1") not in ("1", "true", "True"):
    raise ImportError(
        f"TF_USE_LEGACY_KERAS={os.environ['TF_USE_LEGACY_KERAS']!r}: pneumo-dist needs tf-keras; "
        "unset it or set it to 1"
    )
os.environ["TF_USE_LEGACY_KERAS"] = "1"

# TensorFlow turns its oneDNN CPU kernels on by default only on some Intel CPUs. Measured on a 2-core
# AMD EPYC VM (BENCHMARKS.md): a ResNet50 training step at 32 px, batch 64, 4.2 s without them, 0.84 s
# with. Read when TensorFlow loads, so it is set here too; TF_ENABLE_ONEDNN_OPTS=0 turns them off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
