import os
import stat
import subprocess
import sys

import pytest

from pneumo_dist import storage


@pytest.fixture(params=["local", "gcs"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("bucket") + "/some/prefix"


def test_write_read_exists_list_delete_round_trip(base):
    uri = storage.join(base, "a", "b.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello")
    storage.write_bytes(storage.join(base, "c.txt"), b"world!")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"hello"
    listed = storage.list_files(base)
    assert [(storage.basename(f.uri), f.size_bytes) for f in listed] == [("b.bin", 5), ("c.txt", 6)]
    storage.delete(uri)
    storage.delete(uri)  # deleting what is gone is not an error
    assert not storage.exists(uri)


def test_read_prefix_reads_the_first_bytes_or_the_whole_shorter_file(base):
    uri = storage.join(base, "file.bin")
    storage.write_bytes(uri, bytes(range(256)) * 4)
    assert storage.read_prefix(uri, 300) == (bytes(range(256)) * 2)[:300]
    assert storage.read_prefix(uri, 5000) == bytes(range(256)) * 4
    with pytest.raises(storage.StorageNotFound, match="nope.bin"):
        storage.read_prefix(storage.join(base, "nope.bin"), 10)


def test_parent_is_the_folder_holding_a_file_or_folder():
    assert storage.parent("gs://bucket/data/manifest.json") == "gs://bucket/data"
    assert storage.parent("gs://bucket/run/export/") == "gs://bucket/run"
    assert storage.parent("/tmp/run/export") == "/tmp/run"
    assert storage.parent("manifest.json") == "."


def test_missing_file_raises_not_found_naming_it(base):
    uri = storage.join(base, "nope.bin")
    with pytest.raises(storage.StorageNotFound, match="nope.bin"):
        storage.read_bytes(uri)


def test_listing_a_missing_folder_is_empty(base):
    assert storage.list_files(storage.join(base, "nothing-here")) == []


def test_delete_tree_removes_only_that_folder(base):
    storage.write_bytes(storage.join(base, "keep.txt"), b"1")
    storage.write_bytes(storage.join(base, "work", "x", "a.txt"), b"2")
    storage.write_bytes(storage.join(base, "work", "b.txt"), b"3")
    storage.delete_tree(storage.join(base, "work"))
    assert [storage.basename(f.uri) for f in storage.list_files(base)] == ["keep.txt"]


def test_parallel_upload_and_download_round_trip(base, tmp_path):
    # 9 MB is above google-cloud-storage's multipart limit, so the resumable upload path runs too.
    payloads = {f"f{i}.bin": os.urandom(1000 + i) for i in range(20)} | {"big.bin": os.urandom(9_000_000)}
    local_in, local_out = tmp_path / "in", tmp_path / "out"
    local_in.mkdir()
    for name, data in payloads.items():
        (local_in / name).write_bytes(data)
    storage.copy_many([(str(local_in / name), storage.join(base, name)) for name in payloads])
    storage.copy_many([(storage.join(base, name), str(local_out / name)) for name in payloads])
    for name, data in payloads.items():
        assert (local_out / name).read_bytes() == data


def test_copy_tree_keeps_relative_paths_both_ways(base, tmp_path):
    source = tmp_path / "tree"
    (source / "a" / "b").mkdir(parents=True)
    (source / "top.txt").write_bytes(b"1")
    (source / "a" / "b" / "deep.txt").write_bytes(b"2")
    storage.copy_tree(str(source), storage.join(base, "copy"))
    storage.copy_tree(storage.join(base, "copy"), str(tmp_path / "back"))
    assert (tmp_path / "back" / "top.txt").read_bytes() == b"1"
    assert (tmp_path / "back" / "a" / "b" / "deep.txt").read_bytes() == b"2"
    assert len(storage.list_files(storage.join(base, "copy"))) == 2


def test_a_working_folder_is_published_fetched_and_pruned_where_it_is_kept(base, tmp_path):
    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    for name in ("ckpt-1.index", "ckpt-2.index", "state.json"):
        (work / name).write_bytes(name.encode())
    (work / "logs" / "events").write_bytes(b"e")
    kept = storage.join(base, "run")
    storage.publish(str(work), kept, ["ckpt-1.index", "ckpt-2.index"])
    storage.publish(str(work / "logs"), storage.join(kept, "logs"))  # a whole folder
    storage.discard(str(work), kept, ["ckpt-1.index"])
    assert sorted(storage.basename(f.uri) for f in storage.list_files(kept)) == ["ckpt-2.index", "events"]
    assert sorted(os.listdir(work)) == ["ckpt-2.index", "logs", "state.json"]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    storage.fetch(kept, str(fresh), ["ckpt-2.index"])
    assert (fresh / "ckpt-2.index").read_bytes() == b"ckpt-2.index"


def test_a_folder_kept_where_it_is_worked_on_is_not_copied_onto_itself(tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    (work / "a").write_bytes(b"1")
    inode = (work / "a").stat().st_ino
    for same in (str(work), str(work) + "/", str(tmp_path / "." / "run")):
        storage.publish(str(work), same, ["a"])
        storage.fetch(same, str(work), ["a"])
        storage.publish(str(work), same)
    assert (work / "a").stat().st_ino == inode  # never rewritten (a copy replaces the file)
    storage.discard(str(work), str(work), ["a"])
    assert os.listdir(work) == []


def test_failed_download_leaves_no_local_file(base, tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(storage.StorageNotFound):
        storage.download(storage.join(base, "missing.bin"), str(target))
    assert list(tmp_path.iterdir()) == []


def test_failed_local_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "artifact.json"
    storage.write_bytes(str(target), b"old")
    with pytest.raises(TypeError):
        storage.write_bytes(str(target), "not bytes")  # fails while writing the temporary file
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact.json"]


def test_written_files_are_readable_by_others_as_the_umask_allows(tmp_path):
    # mkstemp alone would leave every dataset, checkpoint and report readable by its writer only.
    mask = os.umask(0o022)
    os.umask(mask)
    storage.write_bytes(str(tmp_path / "a.json"), b"{}")
    storage.download(str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    for name in ("a.json", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask


def test_missing_bucket_error_names_the_bucket(gcs_emulator):
    with pytest.raises(storage.StorageError, match=r"bucket gs://no-such-bucket-xyz does not exist"):
        storage.read_bytes("gs://no-such-bucket-xyz/a/b")
    with pytest.raises(storage.StorageError, match=r"no-such-bucket-xyz"):
        storage.list_files("gs://no-such-bucket-xyz/a")


def test_uri_without_bucket_is_rejected():
    with pytest.raises(storage.StorageError, match="names no bucket"):
        storage.read_bytes("gs:///x")


def test_missing_credentials_error_names_the_bucket(tmp_path):
    # A fresh process without the emulator: the real GCS code path up to credential discovery.
    env = {k: v for k, v in os.environ.items() if k != "STORAGE_EMULATOR_HOST"}
    env["GOOGLE_APPLICATION_CREDENTIALS"] = str(tmp_path / "no-such-key.json")
    code = "from pneumo_dist import storage\nstorage.read_bytes('gs://my-data-bucket/x')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "StorageError: cannot access gs://my-data-bucket: no Google Cloud credentials" in result.stderr


@pytest.mark.parametrize(
    "name", ["/home/user/.bashrc", "../x.tfrecord", "a/../../x", "gs://other/x", "a\\..\\x", "", "a//b", "."]
)
def test_a_name_read_from_a_file_cannot_leave_its_folder(name):
    with pytest.raises(storage.UnsafeName, match="manifest.json names .*plain relative name"):
        storage.child("/data/ds", name, "manifest.json")
    assert storage.child("/data/ds", "sub/train-00000-of-00001.tfrecord", "m") == (
        "/data/ds/sub/train-00000-of-00001.tfrecord"
    )


def test_delete_tree_removes_links_but_never_what_they_point_to(tmp_path):
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "folder" / "precious.txt").write_text("keep")
    (outside / "file.txt").write_text("keep")
    tree = tmp_path / "run" / "checkpoints"
    tree.mkdir(parents=True)
    (tree / "ckpt-1.index").write_text("ours")
    (tree / "linked-folder").symlink_to(outside / "folder")
    (tree / "linked-file").symlink_to(outside / "file.txt")
    (tmp_path / "run" / "linked-tree").symlink_to(outside)
    storage.delete_tree(str(tree))
    storage.delete_tree(str(tmp_path / "run" / "linked-tree"))  # the link itself goes
    assert not tree.exists() and not (tmp_path / "run" / "linked-tree").exists()
    assert (outside / "folder" / "precious.txt").read_text() == "keep"
    assert (outside / "file.txt").read_text() == "keep"


def test_create_exclusive_lets_exactly_one_writer_in(base):
    uri = storage.join(base, "_work", "lock.json")
    storage.create_exclusive(uri, b"first")
    with pytest.raises(storage.AlreadyExists, match="lock.json already exists"):
        storage.create_exclusive(uri, b"second")
    assert storage.read_bytes(uri) == b"first"
    storage.delete(uri)
    storage.create_exclusive(uri, b"third")
    assert storage.read_bytes(uri) == b"third"


def test_reading_a_folder_is_a_storage_error_naming_it(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(storage.UnreadableFile, match="Is a directory"):
        storage.read_bytes(str(tmp_path / "folder"))
