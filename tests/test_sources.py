import shutil
from collections import Counter, defaultdict

import numpy as np
import pytest

from pneumo_dist import sources, storage


@pytest.mark.parametrize(
    "name, patient, subtype",
    [
        ("person1_bacteria_1.jpeg", "person1", "bacteria"),
        ("person1_virus_6.jpeg", "person1", "virus"),
        ("person124_virus_246.jpeg", "person124", "virus"),
        ("IM-0115-0001.jpeg", "IM-0115", ""),
        ("NORMAL2-IM-0372-0001.jpeg", "NORMAL2-IM-0372", ""),
        ("NORMAL2-IM-0587-0001-0002.jpeg", "NORMAL2-IM-0587", ""),
        ("scan.png", None, ""),
    ],
)
def test_patient_and_subtype_from_kaggle_names(name, patient, subtype):
    assert sources.patient_and_subtype(name) == (patient, subtype)


def split_images(images, val_fraction=0.15, keep_val=False, seed=0):
    return sources.assign_splits(images, val_fraction, keep_val, seed)[0]


def assert_no_patient_in_two_splits(images):
    splits_of = defaultdict(set)
    for image in images:
        splits_of[image.patient_id].add(image.split)
    shared = {p: s for p, s in splits_of.items() if len(s) > 1}
    assert not shared, f"patients in two splits: {list(shared.items())[:5]}"


def test_kaggle_listing_reads_layout_labels_and_patients(tiny_demo_root):
    listing = sources.list_kaggle(tiny_demo_root)
    counts = Counter((image.split, image.label) for image in listing.images)
    assert counts == {
        ("train", 0): 14,
        ("train", 1): 14,
        ("val", 0): 2,
        ("val", 1): 2,
        ("test", 0): 6,
        ("test", 1): 6,
    }
    assert all(image.patient_id and image.size_bytes > 0 for image in listing.images)
    assert {image.subtype for image in listing.images if image.label == 1} <= {"bacteria", "virus"}
    assert not listing.skipped and not listing.notes


def test_no_patient_in_two_splits(tiny_demo_root):
    images = split_images(sources.list_kaggle(tiny_demo_root).images, val_fraction=0.3)
    assert {image.split for image in images} == {"train", "val", "test"}
    assert_no_patient_in_two_splits([image for image in images if image.split != "test"])


def test_split_is_seeded_and_deterministic(tiny_demo_root):
    images = sources.list_kaggle(tiny_demo_root).images
    assert split_images(images, seed=1) == split_images(list(reversed(images)), seed=1)
    assert split_images(images, seed=1) != split_images(images, seed=2)


def test_test_split_is_never_touched(tiny_demo_root):
    images = sources.list_kaggle(tiny_demo_root).images
    before = {image.source for image in images if image.split == "test"}
    after = {image.source for image in split_images(images, val_fraction=0.5) if image.split == "test"}
    assert before == after


def test_source_val_is_merged_unless_kept(tiny_demo_root):
    images = sources.list_kaggle(tiny_demo_root).images
    source_val = {image.source for image in images if image.split == "val"}
    kept, notes = sources.assign_splits(images, 0.15, keep_val=True, seed=0)
    assert {image.source for image in kept if image.split == "val"} == source_val
    assert "kept the source's own val split (4 images)" in notes
    merged, notes = sources.assign_splits(images, 0.0, keep_val=False, seed=0)
    assert not [image for image in merged if image.split == "val"]
    assert "merged the source's val split (4 images) into train" in notes


def test_unknown_class_folder_is_an_error(demo_copy):
    (demo_copy / "train" / "COVID").mkdir()
    (demo_copy / "train" / "COVID" / "x.jpeg").write_bytes(b"x")
    with pytest.raises(sources.SourceError, match=r"unknown class folder .*train/COVID"):
        sources.list_kaggle(str(demo_copy))


def test_empty_class_is_an_error_naming_split_and_class(demo_copy):
    shutil.rmtree(demo_copy / "test" / "NORMAL")
    with pytest.raises(sources.SourceError, match="the test split has no NORMAL images"):
        sources.list_kaggle(str(demo_copy))


def test_missing_val_and_test_are_noted_and_missing_train_is_an_error(demo_copy):
    shutil.rmtree(demo_copy / "val")
    shutil.rmtree(demo_copy / "test")
    notes = sources.list_kaggle(str(demo_copy)).notes
    assert notes == ["the source has no val split", "the source has no test split"]
    shutil.rmtree(demo_copy / "train")
    with pytest.raises(sources.SourceError, match="no such folder"):
        sources.list_kaggle(str(demo_copy))


def test_class_folders_without_split_folders_are_an_error(demo_copy):
    with pytest.raises(sources.SourceError, match="holds class folders .* directly"):
        sources.list_kaggle(str(demo_copy / "train"))


def test_system_and_stray_files_are_skipped_with_reasons(demo_copy):
    (demo_copy / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\0")
    (demo_copy / "train" / "PNEUMONIA" / "Thumbs.db").write_bytes(b"\0")
    (demo_copy / "train" / "NORMAL" / "notes.txt").write_text("hi")
    (demo_copy / "train" / "loose.jpeg").write_bytes(b"\0")
    (demo_copy / "__MACOSX").mkdir()
    (demo_copy / "__MACOSX" / "._x.jpeg").write_bytes(b"\0")
    reasons = {s.source: s.reason for s in sources.list_kaggle(str(demo_copy)).skipped}
    assert reasons == {
        "train/NORMAL/.DS_Store": "system file, not an image",
        "train/PNEUMONIA/Thumbs.db": "system file, not an image",
        "__MACOSX/._x.jpeg": "system file, not an image",
        "train/NORMAL/notes.txt": sources.NOT_AN_IMAGE,
        "train/loose.jpeg": "not inside a class folder (NORMAL, PNEUMONIA)",
    }


def test_kaggle_listing_on_gcs_matches_local(tiny_demo_root, bucket):
    storage.copy_tree(tiny_demo_root, storage.join(bucket, "xr"))
    local = sources.list_kaggle(tiny_demo_root).images
    remote = sources.list_kaggle(storage.join(bucket, "xr")).images
    assert [(i.source, i.label, i.patient_id, i.size_bytes) for i in local] == [
        (i.source, i.label, i.patient_id, i.size_bytes) for i in remote
    ]


def write_npz(path, splits=("train", "val", "test"), n=10):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in splits:
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    np.savez(path, **arrays)


def test_npz_listing_with_a_missing_split(tmp_path):
    write_npz(tmp_path / "p.npz", splits=("train", "val"))
    listing = sources.list_npz(str(tmp_path / "p.npz"), "p.npz")
    assert len(listing.images) == 20
    assert listing.images[3].source == "p.npz:train/3"
    assert "the source has no test split" in listing.notes


def test_npz_with_mismatched_labels_is_an_error(tmp_path):
    np.savez(
        tmp_path / "bad.npz", train_images=np.zeros((5, 28, 28), np.uint8), train_labels=np.zeros((4, 1))
    )
    with pytest.raises(sources.SourceError, match="'train_images' has 5 rows but 'train_labels' has 4"):
        sources.list_npz(str(tmp_path / "bad.npz"), "bad.npz")


def test_csv_listing_resolves_relative_paths_and_optional_columns(tmp_path):
    for name in ("a/person1_virus_1.jpeg", "a/x.png", "b/y.png", "b/z.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * len(name))
    (tmp_path / "list.csv").write_text(
        "path,label,patient_id,split\n"
        "a/person1_virus_1.jpeg,PNEUMONIA,,train\n"
        "a/x.png,normal,p7,\n"
        "b/y.png,1,p8,test\n"
        f"{tmp_path}/b/../b/z.png,0,p9,test\n"
    )
    images = sources.list_csv(str(tmp_path / "list.csv")).images
    assert [(i.uri, i.label, i.patient_id, i.split, i.subtype, i.size_bytes) for i in images] == [
        (str(tmp_path / "a/person1_virus_1.jpeg"), 1, "person1", "train", "virus", 22),
        (str(tmp_path / "a/x.png"), 0, "p7", "train", "", 7),
        (str(tmp_path / "b/y.png"), 1, "p8", "test", "", 7),
        (str(tmp_path / "b/z.png"), 0, "p9", "test", "", 7),
    ]


@pytest.mark.parametrize(
    "path", ["../outside.png", "/etc/outside.png", "a/../../outside.png", "gs://other/x.png"]
)
def test_a_csv_row_outside_the_csv_folder_is_refused_unless_allowed(tmp_path, path):
    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "n.png").write_bytes(b"n")
    (folder / "p.png").write_bytes(b"p")
    (folder / "list.csv").write_text(f"path,label\nn.png,0\np.png,1\n{path},0\n")
    with pytest.raises(sources.SourceError, match=r"line 4: .*is outside the CSV's folder .*--allow-outside"):
        sources.list_csv(str(folder / "list.csv"))
    if not path.startswith("gs://"):
        listing = sources.list_csv(str(folder / "list.csv"), allow_outside_paths=True)
        assert listing.skipped == [sources.Skipped(path, "no such file")]


def test_csv_rows_naming_a_folder_or_a_missing_file_are_skipped_with_reasons(tmp_path):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "n.png").write_bytes(b"n")
    (tmp_path / "p.png").write_bytes(b"p")
    (tmp_path / "list.csv").write_text("path,label\nn.png,0\np.png,1\nfolder.png,0\nmissing.png,1\n")
    listing = sources.list_csv(str(tmp_path / "list.csv"))
    assert {(s.source, s.reason) for s in listing.skipped} == {
        ("folder.png", "a folder, not a file"),
        ("missing.png", "no such file"),
    }


def test_csv_labels_and_splits_ignore_case_and_spaces_and_nothing_else(tmp_path):
    for name in ("n.png", "p.png", "q.png", "m.png"):
        (tmp_path / name).write_bytes(b"x")
    rows = "n.png, normal ,Train\np.png,Pneumonia ,TEST\nq.png,1,\nm.png,NORMAL,test\n"
    (tmp_path / "list.csv").write_text("path,label,split\n" + rows)
    listing = sources.list_csv(str(tmp_path / "list.csv"))
    assert [(i.source.rsplit("/", 1)[-1], i.label, i.split) for i in listing.images] == [
        ("n.png", 0, "train"),
        ("p.png", 1, "test"),
        ("q.png", 1, "train"),
        ("m.png", 0, "test"),
    ]
    labels = ("PNEUMONIA", " pneumonia", "0", "COVID", "pneumonia-viral")
    assert [sources.parse_label(text) for text in labels] == [1, 1, 0, None, None]


@pytest.mark.parametrize(
    "body, message",
    [
        ("file,label\na.png,0\n", "header must name path and label"),
        ("path,label\na.png,0\nb.png,COVID\n", "line 3: label 'COVID' is not one of"),
        ("path,label,split\na.png,0,holdout\n", "line 2: split 'holdout' is not one of"),
        ("path,label\na.png,0\na.png,1\n", "line 3: a.png is listed twice"),
    ],
)
def test_bad_csv_rows_are_errors_naming_the_line(tmp_path, body, message):
    (tmp_path / "list.csv").write_text(body)
    with pytest.raises(sources.SourceError, match=message):
        sources.list_csv(str(tmp_path / "list.csv"))


def test_real_kaggle_names_all_parse_and_no_patient_leaks(shared_kaggle_train):
    listing = sources.list_kaggle(str(shared_kaggle_train))
    assert len(listing.images) == 5216
    assert listing.notes == ["the source has no val split", "the source has no test split"]
    images, _ = sources.assign_splits(listing.images, 0.15, keep_val=False, seed=0)
    assert_no_patient_in_two_splits(images)
    val = Counter(image.label for image in images if image.split == "val")
    train = Counter(image.label for image in images if image.split == "train")
    for label in (0, 1):  # stratified: each class is carved at close to 15 %
        assert 0.14 < val[label] / (val[label] + train[label]) < 0.17


def test_real_mnist_npz_lists_train_and_val(shared_mnist_npz):
    listing = sources.list_npz(str(shared_mnist_npz), shared_mnist_npz.name)
    counts = Counter((image.split, image.label) for image in listing.images)
    assert counts == {("train", 0): 1214, ("train", 1): 3494, ("val", 0): 135, ("val", 1): 389}
