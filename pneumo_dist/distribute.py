"""How a run is spread over devices and processes: the tf.distribute strategy, its all-reduce, how the
training step compiles (step kinds), and the process-wide set-up (XLA cache, thread pools) done once per
process before TensorFlow runs its first op."""

from __future__ import annotations

import os
import tempfile

import tensorflow as tf

from pneumo_dist.config import TrainConfig

STEP_ONE_PROGRAM = "one XLA program per step (augmentation, forward, backward, all-reduce, update)"
STEP_SPLIT = "XLA augmentation+forward+backward; all-reduce and update outside it (CPU replicas)"
STEP_NO_XLA = "no XLA"


def step_kind(strategy: tf.distribute.Strategy, xla: bool) -> str:
    """How the training step compiles. With XLA, one program per step where TensorFlow lets the
    all-reduce into an XLA program: one replica, or replicas that are all GPUs (the strategies' own
    rule, `_use_merge_call`: without a merge call the replica context's all-reduce is an XLA
    collective). Replicas on CPUs need a merge call, which XLA cannot hold: the all-reduce and the
    update then run outside the compiled part."""
    if not xla:
        return STEP_NO_XLA
    if strategy.num_replicas_in_sync == 1:
        return STEP_ONE_PROGRAM
    if all("GPU" in device.upper() for device in strategy.extended.worker_devices):
        return STEP_ONE_PROGRAM
    return STEP_SPLIT


def choose_strategy(local: bool = False, train_cfg: TrainConfig | None = None) -> tf.distribute.Strategy:
    """`local`: one process, one device (the debug mode). Otherwise MultiWorkerMirroredStrategy when
    TF_CONFIG describes a cluster (Ray Train sets it), MirroredStrategy over several local GPUs, else
    the default strategy (CPU or one GPU)."""
    if local:
        return tf.distribute.get_strategy()
    pack_mb = (train_cfg or TrainConfig()).all_reduce_pack_mb
    gpus = bool(tf.config.list_physical_devices("GPU"))
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=communication_options(gpus, pack_mb)
        )
    if gpus and len(tf.config.list_logical_devices("GPU")) > 1:
        # NCCL between the GPUs of one node (MirroredStrategy's default, made explicit).
        return tf.distribute.MirroredStrategy(cross_device_ops=tf.distribute.NcclAllReduce())
    return tf.distribute.get_strategy()


def communication_options(gpus: bool, pack_mb: float) -> tf.distribute.experimental.CommunicationOptions:
    """MultiWorkerMirroredStrategy's all-reduce: NCCL between GPUs, TensorFlow's ring over gRPC
    otherwise; gradients in packs of `pack_mb` MiB, so that the all-reduce of one pack runs while the
    next is still being packed or computed (0: one pack). Under Ray Train every GPU is its own worker
    process, where AUTO would fall back to the ring through host memory even between GPUs of one node
    (tensorflow/tensorflow#50178). 32 MiB is in the range Horovod's and PyTorch DDP's bucket sizes use
    (Horovod fusion buffer 64 MiB, DDP bucket_cap_mb 25)."""
    implementation = tf.distribute.experimental.CommunicationImplementation
    return tf.distribute.experimental.CommunicationOptions(
        bytes_per_pack=int(pack_mb * 2**20),
        implementation=implementation.NCCL if gpus else implementation.RING,
    )


def describe_strategy(strategy: tf.distribute.Strategy) -> str:
    """One line for the start-up log: the strategy, its replicas and how it all-reduces."""
    name = type(strategy).__name__
    replicas = strategy.num_replicas_in_sync
    extended = strategy.extended
    options = getattr(extended, "_communication_options", None)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and options is not None:
        implementation = options.implementation.name
        pack = f"{options.bytes_per_pack / 2**20:g} MiB packs" if options.bytes_per_pack else "one pack"
        return f"{name}, {replicas} replicas, all-reduce {implementation} in {pack}"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return f"{name}, {replicas} replicas, all-reduce {type(extended._cross_device_ops).__name__}"
    return f"{name} (one replica, no all-reduce)"


def configure_process(cfg: TrainConfig, threads: int | None = None) -> str:
    """Process-wide settings, effective only before TensorFlow runs its first op (call it first):
    XLA's persistent compilation cache (a trial that compiles what an earlier one on the node compiled
    loads it instead), TF_GPU_THREAD_MODE=gpu_private (each GPU launches kernels from its own threads,
    NVIDIA's TensorFlow recipes), and, given `threads`, TensorFlow's op thread pools sized to this
    process's CPUs rather than to every vCPU of the node. Returns the cache folder ("" = none).

    Once per process: a later call (train.train after its job already set the process up) returns the
    first call's folder and changes nothing."""
    if _process_cache:
        return _process_cache[0]
    cache = cfg.xla_cache_dir
    if cache == "default":
        # Per user and private: the cache holds executables this process will run.
        cache = os.path.join(tempfile.gettempdir(), f"pneumo-dist-xla-cache-{os.getuid()}")
    if cache:
        os.makedirs(cache, mode=0o700, exist_ok=True)
        flags = os.environ.get("TF_XLA_FLAGS", "")
        if "tf_xla_persistent_cache_directory" not in flags:
            os.environ["TF_XLA_FLAGS"] = f"{flags} --tf_xla_persistent_cache_directory={cache}".strip()
    os.environ.setdefault("TF_GPU_THREAD_MODE", "gpu_private")
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            # At least 2: a collective op blocks its thread while it waits for the other workers.
            tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
        except RuntimeError:  # TensorFlow already running: keep its pools
            pass
    _process_cache.append(cache)
    return cache


_process_cache: list[str] = []  # configure_process's folder, once it has run


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0)
