import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pneumo_dist import folder_lock, pseudonyms, schema, shards, sources, storage
from pneumo_dist.demo import DemoSpec, write_demo_dataset

from .conftest import REPO, TEST_PATIENT_KEY

SMALL = shards.ShardOptions(stored_size_px=32, min_shards=4, patient_key=TEST_PATIENT_KEY)


def read_records(shard_uris: list[str]) -> list[dict]:
    """Parse shards with TensorFlow itself: proves our writer emits real TFRecords and Examples."""
    import tensorflow as tf

    spec = {
        schema.IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
        schema.LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
        schema.PATIENT_KEY: tf.io.FixedLenFeature([], tf.string),
        schema.SOURCE_KEY: tf.io.FixedLenFeature([], tf.string),
        schema.SUBTYPE_KEY: tf.io.FixedLenFeature([], tf.string),
        schema.SOURCE_SHA256_KEY: tf.io.FixedLenFeature([], tf.string),
        schema.ORIGINAL_HEIGHT_KEY: tf.io.FixedLenFeature([], tf.int64),
        schema.ORIGINAL_WIDTH_KEY: tf.io.FixedLenFeature([], tf.int64),
        schema.SEX_KEY: tf.io.FixedLenFeature([], tf.string),
        schema.AGE_BAND_KEY: tf.io.FixedLenFeature([], tf.string),
        schema.SITE_KEY: tf.io.FixedLenFeature([], tf.string),
        schema.SCANNER_KEY: tf.io.FixedLenFeature([], tf.string),
        schema.BOXES_KEY: tf.io.VarLenFeature(tf.float32),
    }
    records = []
    for serialized in tf.data.TFRecordDataset(shard_uris):
        parsed = tf.io.parse_single_example(serialized, spec)
        record = {k: v.numpy() for k, v in parsed.items() if k != schema.BOXES_KEY}
        record[schema.BOXES_KEY] = parsed[schema.BOXES_KEY].values.numpy().tolist()
        record["pixels"] = tf.io.decode_image(parsed[schema.IMAGE_KEY]).numpy()
        records.append(record)
    return records


def local_shards(result, split):
    return result.manifest.shard_uris(result.manifest_uri, split)


def test_records_read_back_with_tensorflow_and_match_the_sources(tiny_demo_root, tmp_path):
    result = shards.make_shards(tiny_demo_root, str(tmp_path / "ds"), SMALL, workers=1)
    listing = {image.source: image for image in sources.list_kaggle(tiny_demo_root).images}
    # The manifest holds the key's fingerprint only.
    assert result.manifest.options["patient_key_fingerprint"] == pseudonyms.key_fingerprint(TEST_PATIENT_KEY)
    assert "patient_key" not in result.manifest.options
    written = b"".join(p.read_bytes() for p in (tmp_path / "ds").rglob("*") if p.is_file())
    assert TEST_PATIENT_KEY.encode() not in written
    salt = TEST_PATIENT_KEY
    seen = []
    for split in ("train", "val", "test"):
        for record in read_records(local_shards(result, split)):
            source = listing[record[schema.SOURCE_KEY].decode()]
            data = Path(source.uri).read_bytes()
            assert record["pixels"].shape == (32, 32, 1) and record["pixels"].dtype == np.uint8
            assert record[schema.LABEL_KEY] == source.label
            # The patient id only as its salted hash (the split still groups by the id itself).
            assert record[schema.PATIENT_KEY].decode() == pseudonyms.pseudonym(source.patient_id, salt)
            assert source.patient_id.encode() not in record[schema.PATIENT_KEY]
            assert record[schema.SEX_KEY] == record[schema.AGE_BAND_KEY] == b""
            assert record[schema.BOXES_KEY] == []
            assert record[schema.SUBTYPE_KEY].decode() == source.subtype
            assert record[schema.SOURCE_SHA256_KEY].decode() == hashlib.sha256(data).hexdigest()
            assert record[schema.ORIGINAL_HEIGHT_KEY] >= 40 and record[schema.ORIGINAL_WIDTH_KEY] >= 40
            seen.append(source.source)
    assert sorted(seen) == sorted(listing)  # every image exactly once


def test_manifest_describes_counts_checksums_and_options(tiny_demo_root, tmp_path):
    result = shards.make_shards(tiny_demo_root, str(tmp_path / "ds"), SMALL, workers=2)
    manifest = schema.Manifest.read(str(tmp_path / "ds"))
    assert manifest == result.manifest
    assert manifest.counts["test"] == {"NORMAL": 6, "PNEUMONIA": 6}
    assert sum(sum(c.values()) for c in manifest.counts.values()) == 44
    for split, entry in manifest.splits.items():
        assert entry.records == sum(manifest.counts[split].values())
        assert len(entry.shards) == 4
        for shard in entry.shards:
            data = (tmp_path / "ds" / shard.path).read_bytes()
            assert shard.sha256 == hashlib.sha256(data).hexdigest() and shard.bytes == len(data)
    train = manifest.counts["train"]
    weights = manifest.class_weights
    assert weights["NORMAL"] * train["NORMAL"] == pytest.approx(weights["PNEUMONIA"] * train["PNEUMONIA"])
    assert manifest.image == schema.StoredImage(stored_size_px=32, format="jpeg", channels=1, jpeg_quality=95)
    assert manifest.options["seed"] == 0 and manifest.skipped == []
    names = {f"{split}-{i:05d}-of-00004.tfrecord" for split in schema.SPLITS for i in range(4)}
    expected = names | {schema.MANIFEST_NAME}
    assert set(os.listdir(tmp_path / "ds")) == expected  # no work folder, lock or temporary files


def test_same_inputs_give_identical_shard_bytes(tiny_demo_root, tmp_path):
    first = shards.make_shards(tiny_demo_root, str(tmp_path / "a"), SMALL, workers=2)
    second = shards.make_shards(tiny_demo_root, str(tmp_path / "b"), SMALL, workers=1)
    assert first.manifest.splits == second.manifest.splits
    other_seed = shards.make_shards(
        tiny_demo_root,
        str(tmp_path / "c"),
        shards.ShardOptions(patient_key=TEST_PATIENT_KEY, stored_size_px=32, min_shards=4, seed=1),
        workers=1,
    )
    assert other_seed.manifest.splits != first.manifest.splits


def test_records_are_shuffled_across_shards(tiny_demo_root, tmp_path):
    result = shards.make_shards(tiny_demo_root, str(tmp_path / "ds"), SMALL, workers=1)
    for shard_uri in local_shards(result, "train"):
        labels = Counter(int(r[schema.LABEL_KEY]) for r in read_records([shard_uri]))
        assert labels[0] and labels[1], f"{shard_uri} holds one class only: {labels}"


def test_rerun_is_a_no_op_and_other_options_need_overwrite(tiny_demo_root, tmp_path):
    destination = str(tmp_path / "ds")
    first = shards.make_shards(tiny_demo_root, destination, SMALL, workers=1)
    manifest_mtime = os.path.getmtime(first.manifest_uri)
    again = shards.make_shards(tiny_demo_root, destination, SMALL, workers=1)
    assert again.unchanged and os.path.getmtime(first.manifest_uri) == manifest_mtime
    png = shards.ShardOptions(
        patient_key=TEST_PATIENT_KEY, stored_size_px=32, min_shards=2, image_format="png"
    )
    with pytest.raises(shards.ShardError, match="already holds a dataset .* pass --overwrite"):
        shards.make_shards(tiny_demo_root, destination, png, workers=1)
    replaced = shards.make_shards(tiny_demo_root, destination, png, overwrite=True, workers=1)
    assert replaced.manifest.image.format == "png"
    assert len([n for n in os.listdir(destination) if n.endswith(".tfrecord")]) == 6  # old shards gone


def test_interrupted_run_leaves_no_manifest_and_a_rerun_reuses_finished_shards(tiny_demo_root, tmp_path):
    destination = tmp_path / "ds"
    # A folder where a shard must go makes publishing that one shard fail, after others were published.
    (destination / "train-00002-of-00004.tfrecord").mkdir(parents=True)
    with pytest.raises(storage.StorageError, match="cannot write .*train-00002-of-00004.tfrecord"):
        shards.make_shards(tiny_demo_root, str(destination), SMALL, workers=1)
    assert not (destination / schema.MANIFEST_NAME).exists()
    with pytest.raises(schema.ManifestError, match="make_shards did not finish"):
        schema.Manifest.read(str(destination))
    (destination / "train-00002-of-00004.tfrecord").rmdir()
    resumed = shards.make_shards(tiny_demo_root, str(destination), SMALL, workers=1)
    # Shards 0 and 1 were published before 2 failed (and maybe 3 while it did): they are reused.
    assert resumed.shards_reused >= 2 and resumed.shards_written + resumed.shards_reused == 12
    fresh = shards.make_shards(tiny_demo_root, str(tmp_path / "fresh"), SMALL, workers=1)
    assert resumed.manifest.splits == fresh.manifest.splits
    assert not (destination / shards.WORK_FOLDER).exists()


def test_killed_run_leaves_no_manifest_and_a_rerun_completes_it(tiny_demo_root, tmp_path):
    destination = tmp_path / "ds"
    command = [
        sys.executable,
        "jobs/make_shards.py",
        tiny_demo_root,
        str(destination),
        "--size",
        "32",
        "--min-shards",
        "16",
        "--workers",
        "1",
    ]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen(command, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = destination / shards.WORK_FOLDER
    deadline = time.monotonic() + 60
    while not (work.exists() and any(p.suffix == ".json" and p.name != "plan.json" for p in work.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline, (
            "make_shards ended before it was killed"
        )
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (destination / schema.MANIFEST_NAME).exists()
    finished = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "reused from an interrupted run" in finished.stdout
    manifest = schema.Manifest.read(str(destination))
    assert sum(entry.records for entry in manifest.splits.values()) == 44


def write_bad_files(root):
    normal = root / "train" / "NORMAL"
    good = next(normal.iterdir()).read_bytes()
    (normal / "IM-9001-0001.jpeg").write_bytes(b"")
    (normal / "IM-9002-0001.jpeg").write_bytes(good[: len(good) // 3])
    (normal / "IM-9003-0001.jpeg").write_text("<html>not an image</html>")
    (normal / ".DS_Store").write_bytes(b"\0\0")


def test_bad_files_are_skipped_counted_and_listed(demo_copy, tmp_path):
    write_bad_files(demo_copy)
    result = shards.make_shards(str(demo_copy), str(tmp_path / "ds"), SMALL, workers=2)
    reasons = {s.source: s.reason for s in result.manifest.skipped}
    assert reasons == {
        "train/NORMAL/.DS_Store": "system file, not an image",
        "train/NORMAL/IM-9001-0001.jpeg": "empty file (0 bytes)",
        "train/NORMAL/IM-9002-0001.jpeg": reasons["train/NORMAL/IM-9002-0001.jpeg"],
        "train/NORMAL/IM-9003-0001.jpeg": "not a readable image (not a JPEG or PNG, or a corrupt header)",
    }
    assert reasons["train/NORMAL/IM-9002-0001.jpeg"].startswith("truncated or corrupt image")
    assert sum(entry.records for entry in result.manifest.splits.values()) == 44


def test_strict_stops_at_the_first_bad_file(demo_copy, tmp_path):
    write_bad_files(demo_copy)
    (demo_copy / "train" / "NORMAL" / ".DS_Store").unlink()
    with pytest.raises(shards.ShardError, match=r"train/NORMAL/IM-900\d-0001.jpeg: .*--strict"):
        shards.make_shards(
            str(demo_copy),
            str(tmp_path / "ds"),
            shards.ShardOptions(patient_key=TEST_PATIENT_KEY, stored_size_px=32, strict=True),
            workers=2,
        )
    assert not (tmp_path / "ds" / schema.MANIFEST_NAME).exists()


def test_a_class_left_empty_by_bad_files_is_an_error(demo_copy, tmp_path):
    for path in (demo_copy / "test" / "NORMAL").iterdir():
        path.write_bytes(b"")
    with pytest.raises(shards.ShardError, match="the test split has no readable NORMAL images"):
        shards.make_shards(str(demo_copy), str(tmp_path / "ds"), SMALL, workers=1)
    assert not (tmp_path / "ds" / schema.MANIFEST_NAME).exists()


def test_gcs_source_to_gcs_destination(tiny_demo_root, bucket, tmp_path):
    storage.copy_tree(tiny_demo_root, storage.join(bucket, "raw"))
    destination = storage.join(bucket, "datasets", "demo")
    result = shards.make_shards(storage.join(bucket, "raw"), destination, SMALL, workers=2)
    local = shards.make_shards(tiny_demo_root, str(tmp_path / "ds"), SMALL, workers=1)
    assert result.manifest.splits == local.manifest.splits  # same bytes, wherever they live
    assert schema.Manifest.read(destination) == result.manifest
    assert not storage.list_files(storage.join(destination, shards.WORK_FOLDER))
    assert shards.make_shards(storage.join(bucket, "raw"), destination, SMALL, workers=2).unchanged


def test_interrupted_gcs_run_resumes(tiny_demo_root, bucket):
    destination = storage.join(bucket, "ds")
    options = shards.ShardOptions(patient_key=TEST_PATIENT_KEY, stored_size_px=32, min_shards=4, strict=True)
    broken_image = storage.join(bucket, "raw", "test", "NORMAL", "IM-0999-0001.jpeg")
    storage.copy_tree(tiny_demo_root, storage.join(bucket, "raw"))
    storage.write_bytes(broken_image, b"")
    with pytest.raises(shards.ShardError, match="IM-0999-0001.jpeg: empty file"):
        shards.make_shards(storage.join(bucket, "raw"), destination, options, workers=1)
    assert not storage.exists(storage.join(destination, schema.MANIFEST_NAME))
    sidecars = storage.list_files(storage.join(destination, shards.WORK_FOLDER))
    assert len(sidecars) > 1  # the plan and the shards finished before the bad file
    lenient = shards.ShardOptions(
        patient_key=TEST_PATIENT_KEY, stored_size_px=32, min_shards=4
    )  # same fingerprint: strict is not in it
    result = shards.make_shards(storage.join(bucket, "raw"), destination, lenient, workers=1)
    assert result.shards_reused == len(sidecars) - 1
    assert [s.source for s in result.manifest.skipped] == ["test/NORMAL/IM-0999-0001.jpeg"]


def test_npz_source_on_gcs_keeps_native_size(bucket, tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 10), ("test", 10)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    np.savez(tmp_path / "mnist.npz", **arrays)
    storage.upload(str(tmp_path / "mnist.npz"), storage.join(bucket, "mnist.npz"))
    options = shards.ShardOptions(
        patient_key=TEST_PATIENT_KEY, image_format="png", keep_val=True, min_shards=2
    )
    result = shards.make_shards(
        storage.join(bucket, "mnist.npz"), storage.join(bucket, "ds"), options, workers=1
    )
    assert result.manifest.image.stored_size_px == 28
    assert result.manifest.counts["val"] == {"NORMAL": 5, "PNEUMONIA": 5}
    local = shards.make_shards(str(tmp_path / "mnist.npz"), str(tmp_path / "ds"), options, workers=1)
    records = read_records(local_shards(local, "val"))
    for record in records:  # PNG is lossless: the stored pixels are the array's
        index = int(record[schema.SOURCE_KEY].decode().rsplit("/", 1)[1])
        assert np.array_equal(record["pixels"][..., 0], arrays["val_images"][index])


def test_csv_source(tiny_demo_root, tmp_path):
    listing = sources.list_kaggle(tiny_demo_root).images
    lines = ["path,label,split"] + [
        f"{tiny_demo_root}/{i.source},{i.label},{'test' if i.split == 'test' else 'train'}" for i in listing
    ]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(sources.SourceError, match="outside the CSV's folder"):
        shards.make_shards(str(tmp_path / "list.csv"), str(tmp_path / "ds"), SMALL, workers=1)
    options = dataclasses.replace(SMALL, allow_outside_paths=True)  # the images are in another folder
    result = shards.make_shards(str(tmp_path / "list.csv"), str(tmp_path / "ds"), options, workers=1)
    assert result.manifest.source["format"] == "csv"
    assert sum(entry.records for entry in result.manifest.splits.values()) == 44


def test_bad_options_are_named():
    with pytest.raises(shards.ShardError, match="option image_format='gif'"):
        shards.ShardOptions(patient_key=TEST_PATIENT_KEY, image_format="gif").validate()
    with pytest.raises(shards.ShardError, match="option val_fraction=1.5"):
        shards.ShardOptions(patient_key=TEST_PATIENT_KEY, val_fraction=1.5).validate()


def test_manifest_json_is_human_readable(tiny_demo_root, tmp_path):
    shards.make_shards(tiny_demo_root, str(tmp_path / "ds"), SMALL, workers=1)
    text = (tmp_path / "ds" / schema.MANIFEST_NAME).read_text()
    assert json.loads(text)["schema_version"] == schema.MANIFEST_SCHEMA_VERSION
    assert "\n" in text
    # The typed manifest writes the JSON it reads, key for key.
    manifest = schema.Manifest.read(str(tmp_path / "ds"))
    assert json.loads(manifest.to_json()) == json.loads(text)


def test_files_make_shards_did_not_write_are_an_error_and_never_deleted(tiny_demo_root, tmp_path):
    destination = tmp_path / "ds"
    (destination / shards.WORK_FOLDER).mkdir(parents=True)
    theirs = {
        "other-dataset.tfrecord": b"someone else's records",
        "notes.txt": b"my notes",
        f"{shards.WORK_FOLDER}/their-state.bin": b"state",
    }
    for name, content in theirs.items():
        (destination / name).write_bytes(content)
    with pytest.raises(shards.ShardError, match="files make_shards did not write .*other-dataset.tfrecord"):
        shards.make_shards(tiny_demo_root, str(destination), SMALL, workers=1)
    result = shards.make_shards(tiny_demo_root, str(destination), SMALL, overwrite=True, workers=1)
    assert sum(entry.records for entry in result.manifest.splits.values()) == 44
    for name, content in theirs.items():
        assert (destination / name).read_bytes() == content
    # A later --overwrite with other options replaces our shards and still leaves theirs alone.
    png = dataclasses.replace(SMALL, image_format="png", min_shards=2)
    shards.make_shards(tiny_demo_root, str(destination), png, overwrite=True, workers=1)
    ours = [n for n in os.listdir(destination) if n.endswith(".tfrecord") and not n.startswith("other")]
    assert len(ours) == 6 and all((destination / n).read_bytes() == c for n, c in theirs.items())


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_a_second_make_shards_into_a_destination_in_use_is_refused(tiny_demo_root, tmp_path, request, where):
    destination = str(tmp_path / "ds") if where == "local" else request.getfixturevalue("bucket") + "/ds"
    lock = storage.join(destination, shards.WORK_FOLDER, shards.LOCK_NAME)
    # A live process of this host holds it (this very one): not stale.
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started_utc": "2026-01-01T00:00:00Z"}
    if where == "local":  # a local lock is the flock on its file
        held = folder_lock.hold_local(lock, destination, json.dumps(holder).encode())
    else:
        storage.create_exclusive(lock, json.dumps(holder).encode())
    with pytest.raises(
        folder_lock.FolderBusy, match=f"being written by another make_shards .*pid {os.getpid()}"
    ):
        shards.make_shards(tiny_demo_root, destination, SMALL, workers=1)
    assert not storage.exists(storage.join(destination, schema.MANIFEST_NAME))
    storage.delete(lock)
    if where == "local":
        os.close(held)
    result = shards.make_shards(tiny_demo_root, destination, SMALL, workers=1)
    assert not storage.exists(lock) and result.shards_written == 12


RACE = """
import json, os, sys, time
sys.path.insert(0, os.getcwd())
from pneumo_dist import folder_lock
destination, record, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))
try:
    with folder_lock.hold(destination, os.path.join(destination, '_work'), 'lock.json'):
        held = [time.time()]
        time.sleep(0.3)
        held.append(time.time())
except folder_lock.FolderBusy:
    held = []
with open(record, "w") as file:
    json.dump(held, file)
"""


def test_of_processes_that_find_the_same_stale_lock_one_at_a_time_holds_it(tmp_path):
    """Before 2026-12-02 two processes that found the same stale lock both held it (5 of 5 trials with
    50 ms between them): the stale lock was deleted unconditionally."""
    destination = tmp_path / "ds"
    lock = destination / shards.WORK_FOLDER / shards.LOCK_NAME
    dead = subprocess.run([sys.executable, "-c", "print(__import__('os').getpid())"], capture_output=True)
    stale = {"host": socket.gethostname(), "pid": int(dead.stdout), "started_utc": "2026-01-01T00:00:00Z"}
    for trial in range(10):
        lock.parent.mkdir(parents=True, exist_ok=True)  # (a run that ends removes the empty work folder)
        lock.write_text(json.dumps(stale))
        start = time.time() + 0.8  # all at once: the window is between reading the stale lock and taking it
        records = [tmp_path / f"held-{trial}-{n}.json" for n in range(4)]
        racers = [
            subprocess.Popen([sys.executable, "-c", RACE, str(destination), str(r), str(start)], cwd=REPO)
            for n, r in enumerate(records)
        ]
        assert all(racer.wait(timeout=60) == 0 for racer in racers)
        intervals = sorted(tuple(json.loads(r.read_text())) for r in records)
        held = [i for i in intervals if i]
        assert held, "nobody took the stale lock"
        for (_, first_end), (second_start, _) in itertools.pairwise(held):
            assert second_start >= first_end, f"two processes held the lock at once: {held}"


def test_two_concurrent_runs_give_one_sound_dataset(tiny_demo_root, tmp_path):
    destination = tmp_path / "ds"
    command = [sys.executable, "jobs/make_shards.py", tiny_demo_root, str(destination), "--size", "32"]
    first = subprocess.Popen(
        [*command, "--min-shards", "16", "--workers", "1"], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    lock = destination / shards.WORK_FOLDER / shards.LOCK_NAME
    deadline = time.monotonic() + 60
    while not lock.exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first run ended before the test"
        time.sleep(0.005)
    first.send_signal(signal.SIGSTOP)  # paused mid-run, deterministically, while it holds the lock
    try:
        second = subprocess.run(
            [*command, "--format", "png", "--overwrite"], cwd=REPO, capture_output=True, text=True
        )
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 0
    assert second.returncode == 2 and "being written by another make_shards" in second.stderr
    assert second.stderr.count("\n") == 1, second.stderr
    manifest = schema.Manifest.read(str(destination))
    assert manifest.image.format == "jpeg"
    for split in manifest.splits.values():
        for shard in split.shards:
            assert storage.local_sha256(str(destination / shard.path)) == shard.sha256


def test_a_damaged_sidecar_means_an_unfinished_shard(tiny_demo_root, tmp_path):
    destination = tmp_path / "ds"
    (destination / "train-00002-of-00004.tfrecord").mkdir(parents=True)  # the first run fails there
    with pytest.raises(storage.StorageError):
        shards.make_shards(tiny_demo_root, str(destination), SMALL, workers=1)
    (destination / "train-00002-of-00004.tfrecord").rmdir()
    sidecar = destination / shards.WORK_FOLDER / "train-00000-of-00004.tfrecord.json"
    assert sidecar.exists()
    sidecar.write_bytes(b"")  # as a crash of the disk can leave it
    resumed = shards.make_shards(tiny_demo_root, str(destination), SMALL, workers=1)
    assert resumed.shards_written + resumed.shards_reused == 12 and resumed.shards_reused >= 1
    fresh = shards.make_shards(tiny_demo_root, str(tmp_path / "fresh"), SMALL, workers=1)
    assert resumed.manifest.splits == fresh.manifest.splits


def test_the_same_image_in_two_splits_is_listed_and_strict_refuses_it(demo_copy, tmp_path):
    train_image = sorted((demo_copy / "train" / "NORMAL").iterdir())[0]
    copy = demo_copy / "test" / "NORMAL" / "IM-9999-0001.jpeg"  # another patient id, the same bytes
    shutil.copyfile(train_image, copy)
    result = shards.make_shards(str(demo_copy), str(tmp_path / "ds"), SMALL, workers=1)
    (group,) = result.manifest.duplicates
    assert group.sha256 == hashlib.sha256(copy.read_bytes()).hexdigest()
    assert {f.source for f in group.sources} == {
        str(train_image.relative_to(demo_copy)),
        "test/NORMAL/IM-9999-0001.jpeg",
    }
    job = [sys.executable, "jobs/make_shards.py", str(demo_copy), str(tmp_path / "job"), "--size", "32"]
    run = subprocess.run(job, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "warning: 1 images are in more than one split" in run.stdout
    strict = dataclasses.replace(SMALL, strict=True)
    with pytest.raises(shards.ShardError, match="1 images appear in more than one split.*IM-9999-0001"):
        shards.make_shards(str(demo_copy), str(tmp_path / "strict"), strict, workers=1)
    assert not (tmp_path / "strict" / schema.MANIFEST_NAME).exists()


def test_a_changed_image_of_a_csv_source_changes_the_dataset(demo_copy, tmp_path):
    listing = sources.list_kaggle(str(demo_copy)).images
    lines = ["path,label,split"] + [f"{i.source},{i.label},{i.split}" for i in listing]
    (demo_copy / "list.csv").write_text("\n".join(lines) + "\n")
    destination = str(tmp_path / "ds")
    shards.make_shards(str(demo_copy / "list.csv"), destination, SMALL, workers=1)
    assert shards.make_shards(str(demo_copy / "list.csv"), destination, SMALL, workers=1).unchanged
    image = demo_copy / listing[0].source
    other = demo_copy / listing[-1].source
    image.write_bytes(other.read_bytes())  # new content; the CSV itself is unchanged
    with pytest.raises(shards.ShardError, match="already holds a dataset made from other inputs"):
        shards.make_shards(str(demo_copy / "list.csv"), destination, SMALL, workers=1)


def test_shards_are_readable_as_every_file_and_a_killed_runs_temporaries_go_with_the_next_run(
    tiny_demo_root, tmp_path
):
    destination = tmp_path / "ds"
    destination.mkdir()
    killed = destination / ".train-00001-of-00004.tfrecord.k1ll3d.tmp"  # a killed run's (no cleanup)
    theirs = destination / ".notes.tmp"
    killed.write_bytes(b"half a shard")
    theirs.write_text("not ours")
    old_umask = os.umask(0o022)
    try:  # (--overwrite: the run's own check refuses a folder with files it did not write, as these are)
        shards.make_shards(tiny_demo_root, str(destination), SMALL, overwrite=True, workers=1)
    finally:
        os.umask(old_umask)
    assert not killed.exists() and theirs.read_text() == "not ours"
    modes = {p.name: p.stat().st_mode & 0o777 for p in destination.iterdir() if p.is_file()}
    assert set(modes.values()) == {0o644}, modes  # shards were 0600 before 2026-12-02, the rest 0644


def test_killing_make_shards_ends_its_worker_processes(tmp_path):
    import psutil

    source = tmp_path / "source"
    write_demo_dataset(
        str(source), DemoSpec(images_per_class=(("train", 60),), min_side_px=200, max_side_px=300)
    )
    command = [sys.executable, "jobs/make_shards.py", str(source), str(tmp_path / "ds"), "--workers", "2"]
    main = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(psutil.Process(main.pid).children()) < 2:
        assert main.poll() is None and time.monotonic() < deadline, "make_shards ended before the test"
        time.sleep(0.05)
    workers = psutil.Process(main.pid).children()
    main.kill()  # SIGKILL: no cleanup of its own runs
    main.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers still running after their make_shards was killed: {alive}"
