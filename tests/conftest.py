"""Shared fixtures: a real GCS emulator on 127.0.0.1, tiny demo sources, the shared real data."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

# Never let google-auth probe a metadata server off this machine.
os.environ.setdefault("NO_GCE_CHECK", "True")
os.environ.setdefault("GCE_METADATA_HOST", "127.0.0.1:9")
os.environ.setdefault("GCE_METADATA_IP", "127.0.0.1:9")
# The jobs' patient key (jobs/make_shards.py): the tests' own, so that no test makes one in the home folder.
TEST_PATIENT_KEY = "pneumo-dist-tests-patient-key-0123456789abcdef"
os.environ["PNEUMO_DIST_PATIENT_KEY"] = TEST_PATIENT_KEY

from pneumo_dist.demo import DemoSpec, write_demo_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# ResNet50 from scratch at 32 px: mild augmentation, BatchNorm trained (see configs/demo.yaml).
FROM_SCRATCH_OVERRIDES = [
    "data.image_size_px=32",
    "data.global_batch_size=16",
    "data.read_mode=stream",
    "model.weights=none",
    "model.unfreeze=all",
    "model.train_batchnorm=true",
    "model.dense_units=64",
    "augment.rotation_deg=5",
    "augment.shift=0.0",
    "augment.zoom=0.05",
    "augment.shear_deg=2",
    "augment.brightness=0.0",
    "augment.contrast=0.0",
    "augment.gamma=0.0",
    "train.learning_rate=0.001",
    "train.warmup_epochs=0.5",
    "train.serving_export=false",  # ~9 s an export here: tests/test_serving.py checks it on `trained`
]
TINY_DEMO = DemoSpec(
    images_per_class=(("train", 14), ("val", 2), ("test", 6)), min_side_px=40, max_side_px=64
)


# pytest-xdist runs the tests in 2 processes (pyproject's addopts, --dist loadgroup). The Ray tests run
# one after another in one of them: each starts its own Ray, sized for this machine's CPUs. The tests
# on the trained ResNet50 share a process too, so it is trained once.
RAY_TEST_FILES = ("test_tune.py", "test_batch_scoring.py")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.path.name in RAY_TEST_FILES:
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif "trained" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("trained"))


def pytest_report_header(config) -> str:
    temp = tempfile.gettempdir()
    free_gib = shutil.disk_usage(temp).free / 2**30
    return f"free disk in {temp}: {free_gib:.1f} GiB (the Ray tests need about 3 GiB at a time)"


@pytest.fixture
def system_temp(monkeypatch, tmp_path) -> Path:
    """A private stand-in for the system temp folder, to check what code leaves behind in it."""
    folder = tmp_path / "system-temp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
    """A gcp-storage-emulator server for the whole session; yields its URL.

    STORAGE_EMULATOR_HOST is set for this process and so inherited by worker processes.
    """
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gcp_storage_emulator",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--in-memory",
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError as error:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                message = process.stderr.read().decode()
                raise RuntimeError(f"gcp-storage-emulator did not start: {message}") from error
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    yield url
    if previous is None:
        os.environ.pop("STORAGE_EMULATOR_HOST")
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = previous
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def bucket(gcs_emulator) -> str:
    """A fresh, empty bucket on the emulator; yields 'gs://NAME'."""
    from google.cloud import storage as gcs

    name = f"test-{uuid.uuid4().hex[:12]}"
    gcs.Client().create_bucket(name)
    return f"gs://{name}"


@pytest.fixture(scope="session")
def tiny_demo_root(tmp_path_factory) -> str:
    """A small Kaggle-layout demo source (read-only by convention: copy it to modify it)."""
    root = tmp_path_factory.mktemp("demo") / "chest_xray"
    write_demo_dataset(str(root), TINY_DEMO)
    return str(root)


@pytest.fixture
def demo_copy(tiny_demo_root, tmp_path) -> Path:
    """A private, modifiable copy of the tiny demo source."""
    import shutil

    destination = tmp_path / "source"
    shutil.copytree(tiny_demo_root, destination)
    return destination


@pytest.fixture(scope="session")
def shared_kaggle_train() -> Path:
    root = SHARED_DATA / "chest_xray_224"
    if not (root / "train").is_dir():
        pytest.skip("../shared/data/chest_xray_224 is not present")
    return root


@pytest.fixture(scope="session")
def shared_mnist_npz() -> Path:
    path = SHARED_DATA / "pneumoniamnist_trainval.npz"
    if not path.is_file():
        pytest.skip("../shared/data/pneumoniamnist_trainval.npz is not present")
    return path


def _tiny_shards(source: str, destination: Path, min_shards: int) -> str:
    from pneumo_dist import shards

    options = shards.ShardOptions(stored_size_px=32, min_shards=min_shards)
    shards.make_shards(source, str(destination), options, workers=1)
    return str(destination)


@pytest.fixture(scope="session")
def demo_shards(tiny_demo_root, tmp_path_factory) -> str:
    """Tiny demo shards: 32 px, 4 shards per split (train 28-ish, val 5-ish, test 12 records)."""
    return _tiny_shards(tiny_demo_root, tmp_path_factory.mktemp("shards") / "demo", min_shards=4)


@pytest.fixture(scope="session")
def demo_shards_single(tiny_demo_root, tmp_path_factory) -> str:
    """The same images with one shard per split: fewer shards than workers."""
    return _tiny_shards(tiny_demo_root, tmp_path_factory.mktemp("shards") / "single", min_shards=1)


@pytest.fixture(scope="session")
def learnable_shards(tmp_path_factory) -> str:
    """Enough demo images (100 per class, 32 px) for ResNet50 from scratch to learn in a few epochs."""
    from pneumo_dist import shards

    root = tmp_path_factory.mktemp("learnable")
    spec = DemoSpec(images_per_class=(("train", 100), ("test", 20)), min_side_px=48, max_side_px=64)
    write_demo_dataset(str(root / "source"), spec)
    options = shards.ShardOptions(stored_size_px=32, min_shards=4, val_fraction=0.2)
    shards.make_shards(str(root / "source"), str(root / "shards"), options, workers=1)
    return str(root / "shards")


@pytest.fixture(scope="session")
def trained(learnable_shards, tmp_path_factory):
    """ResNet50 trained from scratch for 12 epochs at 32 px on learnable_shards, exported:
    (config, TrainResult, output folder, per-epoch records). At 8 epochs the best validation AUC ranged
    0.80-0.975 over nine runs (2026-12-06; CI failed once at 0.83), at 12 epochs 0.885-0.99 over four."""
    from pneumo_dist import config as config_lib
    from pneumo_dist import distribute, train

    output = str(tmp_path_factory.mktemp("run") / "out")
    config = config_lib.load_config(
        None,
        [
            *FROM_SCRATCH_OVERRIDES,
            f"data.manifest_uri={learnable_shards}",
            f"train.output_uri={output}",
            "train.epochs=12",
            "train.early_stopping_patience=0",
            "train.serving_export=true",
        ],
    )
    epochs_seen = []
    result = train.train(config, distribute.choose_strategy(local=True), on_epoch=epochs_seen.append)
    return config, result, output, epochs_seen


@pytest.fixture(scope="session")
def small_export(tmp_path_factory) -> str:
    """A real export of a small stock-Keras model (32 px, records stored at 48 px as JPEG q95): for
    tests of what is around the model (preparation, batch scoring), where ResNet50 would only cost time."""
    import tf_keras

    from pneumo_dist import export as export_lib

    folder = tmp_path_factory.mktemp("small-export") / "export"
    folder.mkdir()
    tf_keras.utils.set_random_seed(0)
    pixels = tf_keras.Input((32, 32, 1), name="gray_0_255")
    x = tf_keras.layers.Rescaling(1 / 255.0)(pixels)
    x = tf_keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    outputs = tf_keras.layers.Dense(1, activation="sigmoid", bias_initializer="ones")(x)
    tf_keras.Model(pixels, outputs).save(folder / export_lib.MODEL_FILE)
    info = export_lib.ExportInfo(
        files=[export_lib.MODEL_FILE],
        model=export_lib.MODEL_FILE,
        threshold=0.7,
        target_sensitivity=None,
        preprocessing=export_lib.Preprocessing(
            image_size_px=32, stored_size_px=48, image_format="jpeg", jpeg_quality=95
        ),
        created_utc="",
    )
    export_lib.publish(str(folder), str(folder), {}, info)
    return str(folder)


# TensorFlow's and absl's start-up lines (oneDNN, CUDA probing, cuInit, CPU features): no job prints them
# unless --verbose.
TF_STARTUP = re.compile(
    r"^[IWE]\d{4} |absl::InitializeLog|cuda|oneDNN|cpu_feature_guard|rebuild TensorFlow", re.M
)
