"""How a run is spread over devices and processes: the tf.distribute strategy, its all-reduce, how the
training step compiles (step kinds), and the process-wide set-up (XLA cache, thread pools) done once per
process before TensorFlow runs its first op."""

from __future__ import annotations

import os
import tempfile

import tensorflow as tf

from pneumo_dist.config import ConfigError, TrainConfig

STEP_ONE_PROGRAM = "one XLA program per step (augmentation, forward, backward, update)"
STEP_SPLIT = (
    "split step: XLA augmentation+forward+backward per replica, then the strategy's all-reduce and the "
    "update outside XLA"
)
STEP_NO_XLA = "no XLA"


def step_kind(strategy: tf.distribute.Strategy, xla: bool) -> str:
    """How the training step compiles. One replica: the whole step is one XLA program. Several
    replicas: the split step. XLA's own all-reduce (what TensorFlow puts in the program for replicas
    that are all GPUs) is not used: XlaLaunch's device assignment maps only the process's own devices,
    so a replica group that spans processes (MultiWorkerMirroredStrategy, one process per GPU under Ray
    Train) has been reported to fail at two or more workers (tensorflow/tensorflow#45940, #58961,
    tensorflow/models#10752); inside XLA the strategy's packs (train.all_reduce_pack_mb) do not apply
    either, and MirroredStrategy replaces its cross-device ops there. The split step all-reduces through
    the strategy's collectives, in packs, the path CPU replicas must take anyway (a merge call, which
    XLA cannot hold), so CI runs the same code a GPU cluster does."""
    if not xla:
        return STEP_NO_XLA
    if strategy.num_replicas_in_sync == 1:
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
        # Its default cross-device ops: collectives (NCCL between physical GPUs), which take the split
        # step's packs (all_reduce_options); NcclAllReduce would ignore them (one pack).
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def all_reduce_options(pack_mb: float) -> tf.distribute.experimental.CommunicationOptions:
    """The split step's all-reduce: gradients in packs of `pack_mb` MiB (0: one pack), merged with the
    strategy's own options (its implementation). The all-reduce of one pack runs while the next is
    being packed, and the update of a pack's variables can start as soon as its pack is reduced."""
    return tf.distribute.experimental.CommunicationOptions(bytes_per_pack=pack_bytes(pack_mb))


def pack_bytes(pack_mb: float) -> int:
    """train.all_reduce_pack_mb as TensorFlow's bytes_per_pack (0: one pack)."""
    return int(pack_mb * 2**20)


def count_packs(sizes_bytes: list[int], pack_mb: float) -> int:
    """How many packs TensorFlow's collectives make of gradients of these sizes (in the order they are
    computed): cross_device_utils.group_by_size, which closes a pack once it exceeds the pack size, run
    on the reversed list as CollectiveAllReduce does."""
    limit = pack_bytes(pack_mb)
    if not limit:
        return 1
    packs, last = 0, 0
    for size in reversed(sizes_bytes):
        if not packs or last > limit:
            packs, last = packs + 1, 0
        last += size
    return packs


def communication_options(gpus: bool, pack_mb: float) -> tf.distribute.experimental.CommunicationOptions:
    """MultiWorkerMirroredStrategy's all-reduce: NCCL between GPUs, TensorFlow's ring over gRPC
    otherwise; gradients in packs of `pack_mb` MiB, so that the all-reduce of one pack runs while the
    next is still being packed or computed (0: one pack). Under Ray Train every GPU is its own worker
    process, where AUTO would fall back to the ring through host memory even between GPUs of one node
    (tensorflow/tensorflow#50178). 32 MiB is in the range Horovod's and PyTorch DDP's bucket sizes use
    (Horovod fusion buffer 64 MiB, DDP bucket_cap_mb 25)."""
    implementation = tf.distribute.experimental.CommunicationImplementation
    return tf.distribute.experimental.CommunicationOptions(
        bytes_per_pack=pack_bytes(pack_mb),
        implementation=implementation.NCCL if gpus else implementation.RING,
    )


def describe_strategy(strategy: tf.distribute.Strategy, kind: str, packs: int, pack_mb: float) -> str:
    """One line for the start-up log: the strategy, its replicas, how it all-reduces (`packs` of
    `pack_mb` MiB) and how the step compiles (`kind`)."""
    name = type(strategy).__name__
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return f"{name} (one replica, no all-reduce); {kind}"
    options = getattr(strategy.extended, "_communication_options", None)
    implementation = options.implementation.name if options is not None else "AUTO"
    if implementation == "AUTO":  # the runtime's choice: NCCL between GPUs, the ring otherwise
        devices = strategy.extended.worker_devices
        implementation = "NCCL" if all("GPU" in d.upper() for d in devices) else "RING"
    packing = f"{packs} packs of ~{pack_mb:g} MiB" if packs > 1 else "one pack"
    return f"{name}, {replicas} replicas, all-reduce {implementation} in {packing}; {kind}"


def own_gpu_indices(cuda_visible_devices: str | None, assigned: list[str]) -> list[int] | None:
    """The positions, among the GPUs CUDA_VISIBLE_DEVICES shows this process, of the ones assigned to
    it (Ray's ids, as CUDA_VISIBLE_DEVICES spells them); None: no restriction (no GPU assigned, or
    only the assigned ones are visible anyway)."""
    visible = [d.strip() for d in (cuda_visible_devices or "").split(",") if d.strip()]
    if not assigned or not visible or sorted(visible) == sorted(assigned):
        return None
    return sorted(visible.index(gpu) for gpu in assigned if gpu in visible)


def configure_process(
    cfg: TrainConfig, threads: int | None = None, gpu_indices: list[int] | None = None
) -> str:
    """Process-wide settings, effective only before TensorFlow runs its first op (call it first):
    XLA's persistent compilation cache (a trial that compiles what an earlier one on the node compiled
    loads it instead), TF_GPU_THREAD_MODE=gpu_private (each GPU launches kernels from its own threads,
    NVIDIA's TensorFlow recipes), and, given `threads`, TensorFlow's op thread pools sized to this
    process's CPUs rather than to every vCPU of the node; given `gpu_indices`, only those of the GPUs
    the process sees are TensorFlow's (own_gpu_indices). Returns the cache folder ("" = none).

    Once per process: a later call (train.train after its job already set the process up) returns the
    first call's folder and changes nothing."""
    if _process_cache:
        return _process_cache[0]
    cache = cfg.xla_cache_dir
    if cache == "default":
        # Per user and private: the cache holds executables this process will run.
        cache = os.path.join(tempfile.gettempdir(), f"pneumo-dist-xla-cache-{os.getuid()}")
    if cache:
        _check_cache_folder(cache)
        flags = os.environ.get("TF_XLA_FLAGS", "")
        if "tf_xla_persistent_cache_directory" not in flags:
            os.environ["TF_XLA_FLAGS"] = f"{flags} --tf_xla_persistent_cache_directory={cache}".strip()
    os.environ.setdefault("TF_GPU_THREAD_MODE", "gpu_private")
    if gpu_indices is not None:
        gpus = tf.config.list_physical_devices("GPU")
        tf.config.set_visible_devices([gpus[i] for i in gpu_indices], "GPU")
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            # At least 2: a collective op blocks its thread while it waits for the other workers.
            tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
        except RuntimeError:  # TensorFlow already running: keep its pools
            pass
    _process_cache.append(cache)
    return cache


def _check_cache_folder(cache: str) -> None:
    """Create the XLA cache folder (private), or refuse one that another user owns or others may write:
    XLA loads the executables it finds there. The default path in the shared temporary folder is
    predictable, so a folder someone else made there first is refused, not used."""
    try:
        os.makedirs(cache, mode=0o700, exist_ok=True)
        found = os.stat(cache)
    except OSError as error:
        raise ConfigError(
            f"train.xla_cache_dir={cache}: cannot create it ({error.strerror or error})"
        ) from None
    if found.st_uid != os.getuid() or found.st_mode & 0o022:
        raise ConfigError(
            f"train.xla_cache_dir={cache} is owned by another user or writable by others (mode "
            f"{found.st_mode & 0o777:o}): XLA would run executables from it; give another folder, or "
            f'chmod go-w it if it is yours, or "" for no cache'
        )


_process_cache: list[str] = []  # configure_process's folder, once it has run


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0)
