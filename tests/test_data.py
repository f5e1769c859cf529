import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pneumo_dist import data, decode, schema, shards, storage
from pneumo_dist.config import ConfigError, DataConfig


def config(manifest_uri: str, **overrides) -> DataConfig:
    defaults = {"image_size_px": 32, "global_batch_size": 4, "deterministic": True, "read_mode": "stream"}
    return DataConfig(manifest_uri=manifest_uri, **(defaults | overrides))


def contexts(workers: int) -> list[tf.distribute.InputContext]:
    return [tf.distribute.InputContext(workers, i, workers) for i in range(workers)]


def eval_sources(cfg: DataConfig, dataset, split: str, context=None) -> list[str]:
    return [
        s.decode()
        for batch in data.eval_dataset(cfg, dataset, split, context, with_source=True)
        for s in batch["source"].numpy()
    ]


def image_key(image: np.ndarray) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


@pytest.mark.parametrize("shard_fixture", ["demo_shards", "demo_shards_single"], ids=["by-file", "by-record"])
@pytest.mark.parametrize("workers", [2, 3])
def test_evaluation_scores_every_record_exactly_once_across_workers(request, shard_fixture, workers):
    cfg = config(request.getfixturevalue(shard_fixture), global_batch_size=2 * workers)
    dataset = data.open_dataset(cfg)
    for split in ("val", "test"):
        seen = [s for context in contexts(workers) for s in eval_sources(cfg, dataset, split, context)]
        assert len(seen) == dataset.records(split) and len(set(seen)) == len(seen)


@pytest.mark.parametrize("shard_fixture", ["demo_shards", "demo_shards_single"], ids=["by-file", "by-record"])
def test_training_workers_see_disjoint_parts_that_cover_the_split(request, shard_fixture):
    cfg = config(request.getfixturevalue(shard_fixture), shuffle_buffer=1000)
    dataset = data.open_dataset(cfg)
    # One worker's records in training order: its eval pipeline lists exactly which records those are.
    expected = [eval_sources(cfg, dataset, "train", context) for context in contexts(2)]
    assert not set(expected[0]) & set(expected[1])
    assert len(expected[0]) + len(expected[1]) == dataset.records("train")
    for context, own in zip(contexts(2), expected, strict=True):
        per_replica = data.per_replica_batch(cfg, context)
        batches = data.train_dataset(cfg, dataset, context).take(len(own) // per_replica)
        first_epoch = [image_key(image) for batch in batches for image in batch["image"].numpy()]
        own_images = {
            image_key(image)
            for batch in data.eval_dataset(cfg, dataset, "train", context)
            for image in batch["image"].numpy()
        }
        assert len(set(first_epoch)) == len(first_epoch) and set(first_epoch) <= own_images


def test_training_batches_have_the_per_replica_shape_and_never_end(demo_shards):
    cfg = config(demo_shards, global_batch_size=8)
    dataset = data.open_dataset(cfg)
    steps = data.steps_per_epoch(dataset, 8)
    batches = list(data.train_dataset(cfg, dataset, contexts(2)[0]).take(3 * steps))
    assert len(batches) == 3 * steps
    assert all(b["image"].shape == (4, 32, 32, 1) and b["image"].dtype == tf.uint8 for b in batches)
    assert all(b["label"].dtype == tf.float32 and "source" not in b for b in batches)


def equalized_reference(image: np.ndarray) -> np.ndarray:
    """Histogram equalisation as OpenCV's equalizeHist defines it, in floats (rounded half up)."""
    counts = np.bincount(image.ravel(), minlength=256)
    cdf = np.cumsum(counts)
    darkest = counts[image.min()]
    table = np.floor(255 * (cdf - darkest) / (cdf[-1] - darkest) + 0.5)
    return np.clip(table, 0, 255).astype(np.uint8)[image]


def test_histogram_equalization_flattens_the_levels_and_ignores_the_contrast_curve():
    rng = np.random.default_rng(0)
    # A dim, low-contrast "radiograph": levels 20..99, most of them dark.
    image = (20 + 80 * rng.beta(2, 5, (64, 64, 1))).astype(np.uint8)
    equalized = decode.standardize_intensity(tf.constant(image), "histogram").numpy()
    np.testing.assert_array_equal(equalized, equalized_reference(image))
    assert equalized.min() == 0 and equalized.max() == 255
    quarters = np.histogram(equalized, bins=4, range=(0, 256))[0] / equalized.size
    assert np.all(np.abs(quarters - 0.25) < 0.05), quarters  # about flat; the input sat in one quarter
    # Another exposure of the same image (a gamma, then a window): the level order is kept, and so is
    # every equalised pixel.
    exposed = np.round(255 * ((image / 255.0) ** 0.6 - 0.1) / 0.8).clip(0, 255).astype(np.uint8)
    assert not np.array_equal(exposed, image) and len(np.unique(exposed)) == len(np.unique(image))
    again = decode.standardize_intensity(tf.constant(exposed), "histogram").numpy()
    np.testing.assert_array_equal(again, equalized)
    flat = np.full((8, 8, 1), 7, np.uint8)  # one level: nothing to spread
    np.testing.assert_array_equal(decode.standardize_intensity(tf.constant(flat), "histogram").numpy(), flat)
    np.testing.assert_array_equal(decode.standardize_intensity(tf.constant(image), "none").numpy(), image)


def test_the_pipelines_equalize_every_record_as_read(demo_shards):
    plain, equalized = (config(demo_shards, equalize=mode, cache="none") for mode in ("none", "histogram"))
    dataset = data.open_dataset(plain)
    stored_px = dataset.manifest.image.stored_size_px
    for cfg in (plain, equalized):
        assert cfg.image_size_px == 32 and stored_px == 32  # no resize: the pixels compare directly
    ours = next(iter(data.eval_dataset(equalized, dataset, "test")))["image"].numpy()
    read = next(iter(data.eval_dataset(plain, dataset, "test")))["image"].numpy()
    assert not np.array_equal(ours, read)
    for image, expected in zip(ours, read, strict=True):
        np.testing.assert_array_equal(image, equalized_reference(expected))
    train_plain, train_equalized = (
        next(iter(data.train_dataset(cfg, dataset)))["image"].numpy() for cfg in (plain, equalized)
    )
    for image, expected in zip(train_equalized, train_plain, strict=True):  # (deterministic order)
        np.testing.assert_array_equal(image, equalized_reference(expected))


def test_a_border_crop_cuts_each_edge_before_the_resize_to_the_model_input(demo_shards):
    plain, cropped = (config(demo_shards, border_crop=crop, cache="none") for crop in (0.0, 0.125))
    dataset = data.open_dataset(plain)
    assert decode.read_size(32, 0.125) == 24
    ours = next(iter(data.eval_dataset(cropped, dataset, "test")))["image"]
    read = next(iter(data.eval_dataset(plain, dataset, "test")))["image"]
    assert ours.shape[1:] == (32, 32, 1)  # cut to 24 px, then resized to the model's 32
    np.testing.assert_array_equal(ours.numpy(), decode.resize_images(read[:, 4:28, 4:28], 24, 32).numpy())
    batch = next(iter(data.train_dataset(cropped, dataset)))["image"]
    assert batch.shape[1:] == (24, 24, 1)  # the training step's warp resizes them


def test_images_are_resized_to_the_model_input(demo_shards):
    cfg = config(demo_shards, image_size_px=48)
    batch = next(iter(data.eval_dataset(cfg, data.open_dataset(cfg), "test")))
    assert batch["image"].shape[1:] == (48, 48, 1) and batch["image"].dtype == tf.uint8


def test_seeded_deterministic_training_order_repeats(demo_shards):
    def first_batches(seed):
        cfg = config(demo_shards, seed=seed)
        dataset = data.open_dataset(cfg)
        return [b["image"].numpy() for b in data.train_dataset(cfg, dataset).take(4)]

    np.testing.assert_array_equal(first_batches(1), first_batches(1))
    assert not np.array_equal(first_batches(1), first_batches(2))


def test_balanced_sampling_draws_both_classes_equally(demo_shards):
    cfg = config(demo_shards, class_balance="sample", global_batch_size=16)
    labels = np.concatenate(
        [b["label"].numpy() for b in data.train_dataset(cfg, data.open_dataset(cfg)).take(40)]
    )
    assert 0.43 < labels.mean() < 0.57


def test_class_weights_come_from_the_manifest(demo_shards):
    cfg = config(demo_shards)
    dataset = data.open_dataset(cfg)
    counts = dataset.manifest.counts["train"]
    normal, pneumonia = data.loss_class_weights(dataset, "weights")
    assert normal * counts["NORMAL"] == pytest.approx(pneumonia * counts["PNEUMONIA"])
    assert data.loss_class_weights(dataset, "sample") == (1.0, 1.0)


@pytest.mark.parametrize("cache", ["memory", "disk", "none"])
def test_cache_modes_give_the_same_records(demo_shards, tmp_path, cache):
    cfg = config(demo_shards, cache=cache, cache_dir=str(tmp_path / "cache"))
    dataset = data.open_dataset(cfg)
    for _ in range(2):  # the second pass reads the cache
        assert sorted(eval_sources(cfg, dataset, "test")) == sorted(
            eval_sources(config(demo_shards), dataset, "test")
        )
    if cache == "disk":
        assert any((tmp_path / "cache").iterdir())


def test_global_batch_must_divide_among_replicas(demo_shards):
    cfg = config(demo_shards, global_batch_size=5)
    with pytest.raises(ConfigError, match="data.global_batch_size=5: must be a multiple of the 2 replicas"):
        data.train_dataset(cfg, data.open_dataset(cfg), contexts(2)[0])


def test_bad_data_config_is_named_before_reading(tmp_path):
    with pytest.raises(ConfigError, match="data.cache='ram'"):
        data.open_dataset(DataConfig(manifest_uri=str(tmp_path), cache="ram"))
    with pytest.raises(schema.ManifestError, match="no manifest at"):
        data.open_dataset(DataConfig(manifest_uri=str(tmp_path)))


@pytest.fixture
def gcs_dataset(tiny_demo_root, bucket) -> str:
    destination = storage.join(bucket, "datasets", "demo")
    shards.make_shards(
        tiny_demo_root, destination, shards.ShardOptions(stored_size_px=32, min_shards=2), workers=1
    )
    return destination


def test_stage_copies_once_then_reuses_and_repairs_a_damaged_copy(gcs_dataset, tmp_path):
    stage_dir = str(tmp_path / "stage")
    first = data.stage(gcs_dataset, stage_dir)
    assert (first.downloaded, first.reused) == (6, 0)
    again = data.stage(gcs_dataset, stage_dir)
    assert (again.downloaded, again.reused) == (0, 6) and again.manifest_uri == first.manifest_uri
    local_shard = os.path.join(os.path.dirname(first.manifest_uri), "train-00001-of-00002.tfrecord")
    damaged = bytearray(Path(local_shard).read_bytes())
    damaged[100] ^= 0xFF  # same size, one flipped byte
    Path(local_shard).write_bytes(damaged)
    repaired = data.stage(gcs_dataset, stage_dir)
    assert (repaired.downloaded, repaired.reused) == (1, 5)
    assert Path(local_shard).read_bytes() != bytes(damaged)


def test_stage_mode_pipeline_reads_the_local_copy(gcs_dataset, tmp_path):
    cfg = config(gcs_dataset, read_mode="stage", stage_dir=str(tmp_path / "stage"))
    dataset = data.open_dataset(cfg)
    assert dataset.manifest_uri.startswith(str(tmp_path / "stage"))
    assert all(uri.startswith(str(tmp_path / "stage")) for uri in dataset.shards("train"))
    assert len(eval_sources(cfg, dataset, "test")) == 12


def test_stage_detects_a_changed_remote_shard(gcs_dataset, tmp_path):
    remote_shard = storage.join(gcs_dataset, "val-00000-of-00002.tfrecord")
    storage.write_bytes(remote_shard, storage.read_bytes(remote_shard) + b"junk")
    with pytest.raises(data.StagingError, match="val-00000-of-00002.tfrecord does not match the sha256"):
        data.stage(gcs_dataset, str(tmp_path / "stage"))


def test_labels_follow_the_manifest_counts(demo_shards):
    cfg = config(demo_shards)
    dataset = data.open_dataset(cfg)
    labels = Counter(
        int(label) for batch in data.eval_dataset(cfg, dataset, "train") for label in batch["label"].numpy()
    )
    assert labels == {
        0: dataset.manifest.counts["train"]["NORMAL"],
        1: dataset.manifest.counts["train"]["PNEUMONIA"],
    }


@pytest.fixture
def local_dataset(demo_shards, tmp_path) -> Path:
    """A private copy of the demo shards, to damage."""
    import shutil

    return Path(shutil.copytree(demo_shards, tmp_path / "ds"))


def test_a_flipped_byte_in_a_streamed_shard_is_an_error_naming_it(local_dataset):
    shard = local_dataset / "train-00001-of-00004.tfrecord"
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    shard.write_bytes(damaged)
    dataset = data.open_dataset(config(str(local_dataset)))
    assert len(dataset.shards("test")) == 4  # the intact splits read as before
    with pytest.raises(data.ShardMismatch, match="train-00001-of-00004.tfrecord does not match the sha256"):
        dataset.shards("train")


def test_a_swapped_valid_shard_is_an_error_not_a_short_split(local_dataset):
    # Both are sound TFRecord files: without the check, the split would silently read the wrong records.
    train, val = (
        local_dataset / "train-00000-of-00004.tfrecord",
        local_dataset / "val-00000-of-00004.tfrecord",
    )
    train.write_bytes(val.read_bytes())
    dataset = data.open_dataset(config(str(local_dataset)))
    with pytest.raises(data.ShardMismatch, match="train-00000-of-00004.tfrecord is .* bytes where"):
        dataset.shards("train")
    (local_dataset / "val-00001-of-00004.tfrecord").unlink()
    with pytest.raises(data.ShardMismatch, match="val-00001-of-00004.tfrecord is missing"):
        dataset.shards("val")


def test_shards_are_hashed_once_per_process_until_they_change(local_dataset, monkeypatch):
    dataset = data.open_dataset(config(str(local_dataset)))
    hashed = []
    real = storage.local_sha256
    monkeypatch.setattr(storage, "local_sha256", lambda path: hashed.append(path) or real(path))
    dataset.shards("val")
    assert len(hashed) in (0, 4)  # 0 when an earlier test already verified these very files
    hashed.clear()
    dataset.shards("val")
    assert hashed == []
    shard = local_dataset / "val-00002-of-00004.tfrecord"
    os.utime(shard, ns=(0, 10**9))  # a new modification time: the file may have changed
    dataset.shards("val")
    assert hashed == [str(shard)]


@pytest.mark.parametrize("name", ["/tmp/victim/.bashrc", "../../victim/.bashrc"])
def test_a_bucket_manifest_cannot_choose_where_staging_writes(gcs_dataset, tmp_path, name):
    victim = tmp_path / "victim" / ".bashrc"
    victim.parent.mkdir()
    victim.write_text("mine")
    manifest_uri = storage.join(gcs_dataset, schema.MANIFEST_NAME)
    manifest = json.loads(storage.read_bytes(manifest_uri))
    shard = manifest["splits"]["train"]["shards"][0]
    target = str(victim) if name.startswith("/") else name
    if name.startswith("/"):  # the object that would be downloaded over the victim
        storage.write_bytes(storage.join(gcs_dataset, target), b"attacker's bytes")
    shard["path"] = target
    storage.write_bytes(manifest_uri, json.dumps(manifest).encode())
    stage_dir = tmp_path / "stage" / "a" / "b"
    with pytest.raises(storage.UnsafeName, match=f"names '{re.escape(target)}': expected a plain relative"):
        data.stage(gcs_dataset, str(stage_dir))
    with pytest.raises(storage.UnsafeName):
        data.open_dataset(config(gcs_dataset, read_mode="stage", stage_dir=str(stage_dir)))
    assert victim.read_text() == "mine"


def test_a_manifest_fingerprint_cannot_name_a_folder(local_dataset):
    manifest = json.loads((local_dataset / schema.MANIFEST_NAME).read_text())
    manifest["fingerprint"] = "../../../home/user/.ssh"
    (local_dataset / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(schema.ManifestError, match="fingerprint .* is not a sha256 hex digest"):
        data.open_dataset(config(str(local_dataset)))


def test_a_manifest_with_a_malformed_shard_entry_is_refused(local_dataset):
    manifest = json.loads((local_dataset / schema.MANIFEST_NAME).read_text())
    del manifest["splits"]["val"]["shards"][0]["sha256"]
    (local_dataset / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(schema.ManifestError, match="manifest.json: malformed .*sha256.*re-run make_shards"):
        data.open_dataset(config(str(local_dataset)))
