"""Reading a dataset's shards into tf.data, one pipeline per worker, and staging shards onto a node.

Decoding (TFRecord -> uint8 image) is separate from batching; augmentation and normalisation happen
later, on the accelerator (augment.py). Every element is a dict: "image" uint8 (H, W, 1), "label"
float32, and for evaluation "source" (the record's source path) and decode.RECORD_ATTRIBUTES (subtype, sex,
age band, site, scanner).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import tensorflow as tf

from pneumo_dist import decode, schema, storage
from pneumo_dist.config import ConfigError, DataConfig
from pneumo_dist.errors import PneumoDistError

AUTOTUNE = tf.data.AUTOTUNE


class StagingError(PneumoDistError):
    """Shards could not be copied to local disk intact."""


class ShardMismatch(schema.ManifestError):
    """A shard is missing, or its size or sha256 is not the one its manifest records."""


@dataclass(frozen=True)
class Dataset:
    """A dataset ready to read: its manifest and where its shards are read from (local when staged)."""

    manifest: schema.Manifest
    manifest_uri: str

    def shards(self, split: str) -> list[str]:
        """The split's shard URIs, each checked against the manifest's size and sha256 on first use."""
        uris = self.manifest.shard_uris(self.manifest_uri, split)
        verify_shards(uris, self.manifest.splits[split].shards, self.manifest_uri)
        return uris

    def records(self, split: str) -> int:
        return self.manifest.splits[split].records


def open_dataset(data: DataConfig) -> Dataset:
    """Load the manifest; in stage mode copy a gs:// dataset to local disk first (once per node)."""
    data.validate()
    if data.read_mode == "stage" and storage.is_gcs(data.manifest_uri):
        staged = stage(data.manifest_uri, data.stage_dir or default_stage_dir())
        return Dataset(staged.manifest, staged.manifest_uri)
    manifest_uri = schema.manifest_uri_of(data.manifest_uri)
    return Dataset(schema.Manifest.read(manifest_uri), manifest_uri)


def default_stage_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "pneumo-dist-stage")


def steps_per_epoch(dataset: Dataset, global_batch_size: int) -> int:
    """Training steps that make one pass over the train split; the same on every worker."""
    records = dataset.records("train")
    if global_batch_size > records:
        raise ConfigError(
            f"the global batch ({global_batch_size}) is larger than the {records} records of the train split "
            f"of {dataset.manifest_uri}: lower data.global_batch_size / data.batch_per_replica"
        )
    return records // global_batch_size


def resolve_batch(data: DataConfig, replicas: int) -> DataConfig:
    """`data` with the global batch of `replicas` replicas: batch_per_replica x replicas when set, else
    global_batch_size, which must then divide among the replicas."""
    if data.batch_per_replica:
        return dataclasses.replace(data, global_batch_size=data.batch_per_replica * replicas)
    if data.global_batch_size % replicas:
        raise ConfigError(
            f"data.global_batch_size={data.global_batch_size}: must be a multiple of the {replicas} replicas "
            "(or set data.batch_per_replica)"
        )
    return data


def loss_class_weights(dataset: Dataset, class_balance: str) -> tuple[float, float]:
    """(NORMAL, PNEUMONIA) loss weights: the manifest's balanced weights in "weights" mode, else 1."""
    if class_balance != "weights":
        return 1.0, 1.0
    weights = dataset.manifest.class_weights
    return tuple(float(weights[name]) for name in schema.CLASS_NAMES)


def per_replica_batch(data: DataConfig, context: tf.distribute.InputContext | None) -> int:
    if context is None:
        return data.global_batch_size
    global_batch = resolve_batch(data, context.num_replicas_in_sync).global_batch_size
    return context.get_per_replica_batch_size(global_batch)


def train_dataset(data: DataConfig, dataset: Dataset, context: tf.distribute.InputContext | None = None):
    """Endless, shuffled, per-replica batches of this worker's part of the train split.

    Endless because every worker must run the same number of steps (`steps_per_epoch`) under
    MultiWorkerMirroredStrategy, whatever its share of the records.
    """
    batch = per_replica_batch(data, context)
    records = _worker_records(dataset.shards("train"), context, shuffle_files=True, data=data)
    decoded = records.map(
        decode.decode_example, num_parallel_calls=AUTOTUNE, deterministic=data.deterministic
    )
    stored_px = dataset.manifest.image.stored_size_px
    read_px = decode.read_size(stored_px, data.border_crop)

    def stream(part: tf.data.Dataset, name: str) -> tf.data.Dataset:
        images = part.map(
            lambda r: decode.parse_record(r, stored_px, False, data.equalize, data.border_crop),
            num_parallel_calls=AUTOTUNE,
            deterministic=data.deterministic,
        )
        images = _cache(images, data, dataset, f"train-{name}", context)
        return images.shuffle(data.shuffle_buffer, seed=data.seed, reshuffle_each_iteration=True).repeat()

    if data.class_balance == "sample":
        # Each class from its own endless stream, drawn 50:50: balanced batches, no records dropped.
        per_class = [stream(decoded.filter(lambda r, c=c: r["label"] == c), f"class{c}") for c in (0, 1)]
        images = tf.data.Dataset.sample_from_datasets(per_class, weights=[0.5, 0.5], seed=data.seed)
    else:
        images = stream(decoded, "all")
    batches = images.batch(batch, drop_remainder=True)
    if decode.needs_antialias(read_px, data.image_size_px):
        batches = _resize_batches(batches, read_px, data.image_size_px)
    # Otherwise the batches keep the stored size: the training step's augmentation warp resizes them
    # (augment.model_inputs), one resampling instead of two.
    return _with_threads(batches.prefetch(AUTOTUNE), data)


def eval_dataset(
    data: DataConfig,
    dataset: Dataset,
    split: str,
    context: tf.distribute.InputContext | None = None,
    with_source: bool = False,
):
    """This worker's part of `split`, in order, unaugmented, with the last partial batch: across all
    workers every record is scored exactly once. `with_source` adds each record's source path and
    RECORD_ATTRIBUTES."""
    records = _worker_records(dataset.shards(split), context, shuffle_files=False, data=data)
    decoded = records.map(decode.decode_example, num_parallel_calls=AUTOTUNE, deterministic=True)
    stored_px = dataset.manifest.image.stored_size_px
    read_px = decode.read_size(stored_px, data.border_crop)
    images = decoded.map(
        lambda r: decode.parse_record(r, stored_px, with_source, data.equalize, data.border_crop),
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )
    images = _cache(images, data, dataset, split, context)
    batches = images.batch(per_replica_batch(data, context))
    return _with_threads(_resize_batches(batches, read_px, data.image_size_px).prefetch(AUTOTUNE), data)


def host_threads() -> int:
    """The CPUs this process may use: Ray sets OMP_NUM_THREADS to a worker's CPU share; else the
    process's CPU affinity. Several TensorFlow processes on one node (one per GPU under Ray Train) must
    not each size their thread pools to every vCPU of the node."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return max(1, len(os.sched_getaffinity(0)))


def _with_threads(batches: tf.data.Dataset, data: DataConfig) -> tf.data.Dataset:
    options = tf.data.Options()
    options.threading.private_threadpool_size = data.threads or host_threads()
    return batches.with_options(options)


def _worker_records(files: list[str], context, shuffle_files: bool, data: DataConfig) -> tf.data.Dataset:
    """Serialized records of this worker's part: whole shards when there are at least as many shards as
    input pipelines, else every n-th record. Either way the parts are disjoint and cover everything."""
    pipelines, pipeline_id = (context.num_input_pipelines, context.input_pipeline_id) if context else (1, 0)
    by_file = len(files) >= pipelines
    if by_file:
        files = files[pipeline_id::pipelines]
    names = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_files:
        names = names.shuffle(len(files), seed=data.seed, reshuffle_each_iteration=True)
    records = names.interleave(
        tf.data.TFRecordDataset,
        num_parallel_calls=AUTOTUNE,
        deterministic=data.deterministic or not shuffle_files,
    )
    return records if by_file else records.shard(pipelines, pipeline_id)


def _resize_batches(batches: tf.data.Dataset, stored_px: int, image_size_px: int) -> tf.data.Dataset:
    # Per batch rather than per image: one op over the batch costs less than many small ones.
    def resize(batch: dict) -> dict:
        return batch | {"image": decode.resize_images(batch["image"], stored_px, image_size_px)}

    return batches.map(resize, num_parallel_calls=AUTOTUNE)


def _cache(
    images: tf.data.Dataset, data: DataConfig, dataset: Dataset, name: str, context
) -> tf.data.Dataset:
    if data.cache == "none":
        return images
    if data.cache == "memory":
        return images.cache()
    # One file per process: tf.data refuses a disk cache that another live iterator is writing.
    worker = f"{context.input_pipeline_id}of{context.num_input_pipelines}" if context else "0of1"
    folder = data.cache_dir or os.path.join(data.stage_dir or default_stage_dir(), "cache")
    os.makedirs(folder, exist_ok=True)
    read = f"{data.image_size_px}px-{data.equalize}-crop{data.border_crop:g}"
    key = f"{dataset.manifest.fingerprint[:16]}-{read}-{name}-{worker}-pid{os.getpid()}"
    return images.cache(os.path.join(folder, key))


# --- verification -----------------------------------------------------------------------------------

# (uri, version, size) of shards whose sha256 matched their manifest in this process. The version is the
# local file's mtime or the GCS object's generation, so a file changed since is checked again.
_verified: set[tuple[str, str, int]] = set()
_verified_lock = threading.Lock()


def verify_shards(uris: list[str], entries: list[schema.Shard], manifest_uri: str) -> None:
    """Check each shard's size and sha256 against its manifest `entries`, once per process per version
    of the file: a damaged or swapped shard is an error naming it, never a traceback from TensorFlow
    halfway through an epoch or a split that is silently short of records."""
    found = storage.describe_files(uris)
    to_hash = []
    for uri, entry in zip(uris, entries, strict=True):
        info = found.get(uri)
        if info is None:
            raise ShardMismatch(f"{uri} is missing: {manifest_uri} lists it; re-run make_shards")
        if info.size_bytes != entry.bytes:
            raise ShardMismatch(
                f"{uri} is {info.size_bytes} bytes where {manifest_uri} says {entry.bytes}: the shard "
                "was changed or damaged after make_shards wrote it; re-run make_shards --overwrite"
            )
        with _verified_lock:
            if (uri, info.version, info.size_bytes) not in _verified:
                to_hash.append((uri, info, entry.sha256))
    if not to_hash:
        return
    # A few at a time: a gs:// shard (up to ~100 MB) is hashed from memory.
    with ThreadPoolExecutor(min(4, len(to_hash))) as pool:
        digests = list(pool.map(lambda item: _sha256(item[0]), to_hash))
    for (uri, info, expected), digest in zip(to_hash, digests, strict=True):
        if digest != expected:
            raise ShardMismatch(
                f"{uri} does not match the sha256 in {manifest_uri}: the shard was changed or damaged "
                "after make_shards wrote it; re-run make_shards --overwrite"
            )
        with _verified_lock:
            _verified.add((uri, info.version, info.size_bytes))


def _sha256(uri: str) -> str:
    if storage.is_gcs(uri):
        return hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    return storage.local_sha256(uri)


# --- staging -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Staged:
    manifest: schema.Manifest
    manifest_uri: str  # the local copy's manifest
    downloaded: int  # shards copied this time
    reused: int  # shards already there and intact


def stage(manifest_uri: str, stage_dir: str) -> Staged:
    """Copy a dataset's shards to `stage_dir` once per node, verified against the manifest checksums.

    Concurrent callers on one node (several trials) wait for each other; a damaged local copy is
    downloaded again.
    """
    manifest_uri = schema.manifest_uri_of(manifest_uri)
    manifest = schema.Manifest.read(manifest_uri)
    remote_folder = storage.parent(manifest_uri)
    local_folder = os.path.join(stage_dir, manifest.fingerprint[:16])
    local_manifest = os.path.join(local_folder, schema.MANIFEST_NAME)
    os.makedirs(local_folder, exist_ok=True)
    with _exclusive_lock(local_folder + ".lock"):
        shards = manifest.all_shards()

        def local(shard: schema.Shard) -> str:
            return storage.child(local_folder, shard.path, manifest_uri)

        missing = [s for s in shards if not _intact(local(s), s.sha256)]
        storage.copy_many((storage.child(remote_folder, s.path, manifest_uri), local(s)) for s in missing)
        for shard in missing:
            if not _intact(local(shard), shard.sha256):
                remote = storage.join(remote_folder, shard.path)
                raise StagingError(
                    f"{remote} does not match the sha256 in {manifest_uri}: the dataset was changed after "
                    "make_shards wrote it; re-run make_shards --overwrite"
                )
        storage.write_bytes(local_manifest, storage.read_bytes(manifest_uri))
    return Staged(manifest, local_manifest, len(missing), len(shards) - len(missing))


def _intact(path: str, sha256: str) -> bool:
    return os.path.exists(path) and storage.local_sha256(path) == sha256


@contextlib.contextmanager
def _exclusive_lock(path: str):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
