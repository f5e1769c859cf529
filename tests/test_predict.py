import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumo_dist import evaluate, images, predict, schema, storage
from pneumo_dist.predict import DetectorError, PneumoniaDetector

from .conftest import REPO, TF_STARTUP


@pytest.fixture(scope="module")
def export(trained) -> str:
    return str(Path(trained[2]) / "export")


@pytest.fixture(scope="module")
def detector(export) -> PneumoniaDetector:
    return PneumoniaDetector.load(export)


@pytest.fixture(scope="module")
def source_root(learnable_shards) -> Path:
    return Path(learnable_shards).parent / "source"


def test_detector_probabilities_equal_the_evaluators(detector, learnable_shards, source_root):
    config = evaluate.split_data_config(detector, learnable_shards, batch_size=16)
    from pneumo_dist import data

    scores = evaluate.score_split(detector, config, data.open_dataset(config), "test")
    predictions = detector.predict_batch([source_root / s for s in scores.sources], batch_size=7)
    ours = np.array([p.probability for p in predictions])
    np.testing.assert_allclose(ours, scores.probabilities, rtol=0, atol=1e-6)
    assert len(set(np.round(ours, 4))) > 10  # a model that says the same for everything proves nothing


def test_every_input_kind_gives_the_same_answer(detector, source_root):
    path = next((source_root / "test" / "PNEUMONIA").iterdir())
    content = path.read_bytes()
    pil = Image.open(io.BytesIO(content))
    pil.load()
    answers = [
        detector.predict(path),
        detector.predict(str(path)),
        detector.predict(content),
        detector.predict(pil),
        detector.predict(np.asarray(pil.convert("L"))),
        detector.predict(np.asarray(pil.convert("RGB"))),
    ]
    assert len({round(a.probability, 6) for a in answers}) == 1, [a.probability for a in answers]


def test_a_prediction_names_label_threshold_and_model_version(detector, export, source_root):
    path = next((source_root / "test" / "NORMAL").iterdir())
    prediction = detector.predict(path)
    assert prediction.threshold == json.loads(Path(export, "export.json").read_text())["threshold"]
    assert prediction.label == schema.CLASS_NAMES[int(prediction.probability >= prediction.threshold)]
    assert re.fullmatch(r"[0-9a-f]{12}", prediction.model_version)
    assert prediction.source == str(path)
    given = PneumoniaDetector(detector.model, detector.info, export, detector.version, threshold=1.0)
    assert given.predict(path).label == "NORMAL" and given.threshold_source == "given"


def test_probabilities_are_calibrated_on_validation_and_each_policys_threshold_can_be_chosen(
    detector, export, source_root
):
    info = detector.info
    assert info.calibration is not None and info.threshold_policy == "sensitivity"
    assert set(info.operating_points) == {"sensitivity", "youden"}
    assert info.threshold == info.operating_points["sensitivity"] == detector.threshold
    paths = sorted((source_root / "test" / "PNEUMONIA").iterdir())[:4]
    pixels = np.stack([detector.prepare(path) for path in paths])
    as_trained = detector.model(pixels.astype(np.float32), training=False).numpy()[:, 0]
    np.testing.assert_allclose(detector.probabilities(pixels), info.calibration.apply(as_trained), atol=1e-6)
    chosen = json.loads(Path(export, "threshold.json").read_text())
    assert chosen["policy"] == "sensitivity" and chosen["operating_points"] == info.operating_points

    deployed = PneumoniaDetector.load(export, prevalence=0.3)  # (a model load costs ~20 s here: once)
    assert deployed.threshold == pytest.approx(info.threshold_for_prevalence(0.3))
    assert deployed.policy == "prevalence" and deployed.operating_points["prevalence"] == deployed.threshold
    assert predict.operating_point(info, None, "youden", None) == (info.operating_points["youden"], "youden")
    assert predict.operating_point(info, 0.25, None, None) == (0.25, None)  # given: no policy chose it
    for choice, message in (
        ({"policy": "prevalence"}, "no prevalence threshold .*give the deployment's prevalence"),
        ({"threshold": 0.5, "policy": "youden"}, "not both"),
        ({"prevalence": 1.5}, "prevalence must be in"),
        ({"threshold": 1.5}, "threshold must be in 0..1"),
    ):
        with pytest.raises(DetectorError, match=message):
            PneumoniaDetector.load(export, **choice)


def test_loads_from_gcs_and_from_the_model_file_path(detector, export, bucket, source_root):
    storage.copy_tree(export, f"{bucket}/run/export")
    path = next((source_root / "test" / "PNEUMONIA").iterdir())
    # (Each load costs ~20 s of ResNet50 here; export.folder_of's other forms: tests/test_export.py.)
    for uri in (f"{bucket}/run/export", str(Path(export) / "model.keras")):
        loaded = PneumoniaDetector.load(uri)
        assert loaded.version == detector.version
        assert loaded.predict(path).probability == pytest.approx(detector.predict(path).probability, abs=1e-6)


def test_test_time_augmentation_is_reproducible_and_changes_the_scores(detector, source_root):
    paths = sorted((source_root / "test" / "PNEUMONIA").iterdir())[:4]
    plain = [p.probability for p in detector.predict_batch(paths)]
    once = [p.probability for p in detector.predict_batch(paths, tta_views=4)]
    again = [p.probability for p in detector.predict_batch(paths, tta_views=4)]
    assert once == again
    assert not np.allclose(plain, once)


def gradient_png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8), (64, 1))).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    "bad, reason",
    [
        (b"this is a text file", "not a readable image"),
        (gradient_png()[:-40], "truncated or corrupt"),
        (b"", "empty file"),
        (np.zeros((64, 64), np.float32), "expected a uint8"),
        (12345, "cannot read a int"),
    ],
    ids=["text", "truncated", "empty", "float-array", "number"],
)
def test_bad_input_raises_a_clear_error(detector, bad, reason):
    with pytest.raises(images.BadImage, match=reason):
        detector.predict(bad)


def test_predict_batch_can_report_bad_inputs_and_score_the_rest(detector, source_root):
    good = sorted((source_root / "test" / "NORMAL").iterdir())[:3]
    inputs = [good[0], b"not an image", good[1], good[2]]
    with pytest.raises(images.BadImage, match="not a readable image"):
        detector.predict_batch(inputs)
    results = detector.predict_batch(inputs, batch_size=2, bad_inputs="report")
    assert [r.source for r in results] == [str(good[0]), "<12 bytes>", str(good[1]), str(good[2])]
    bad = results[1]
    assert "not a readable image" in bad.error and bad.label is None and bad.probability is None
    scored = [r.probability for r in results if not r.error]
    # Batches of 2 and of 3: oneDNN picks its kernels by batch shape, which moves the 7th decimal
    # (2.4e-6 seen in CI); a mixed-up or shifted image would move the first ones.
    assert scored == pytest.approx([r.probability for r in detector.predict_batch(good)], abs=1e-5)
    with pytest.raises(ValueError, match="bad_inputs"):
        detector.predict_batch(good, bad_inputs="skip")


def test_a_decompression_bomb_and_a_missing_file_are_refused(detector, tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("L", (8000, 7000)).save(bomb)  # 56 MP in about 60 kB
    with pytest.raises(images.BadImage, match=f"{bomb}: decompression bomb refused"):
        detector.predict(bomb)
    with pytest.raises(images.BadImage, match="no such file"):
        detector.predict(tmp_path / "missing.jpeg")


def test_a_wrong_model_uri_says_what_is_wrong(export, tmp_path, bucket):
    with pytest.raises(DetectorError, match="no export.json in .*not a pneumo-dist export"):
        PneumoniaDetector.load(str(tmp_path / "nowhere"))
    with pytest.raises(DetectorError, match="no export.json"):
        PneumoniaDetector.load(f"{bucket}/nothing-here")
    broken = tmp_path / "broken"
    shutil.copytree(export, broken)
    (broken / "model.keras").write_bytes(b"not a keras archive")
    with pytest.raises(DetectorError, match="could not be loaded as a Keras model"):
        PneumoniaDetector.load(str(broken))
    (broken / "model.keras").unlink()
    with pytest.raises(DetectorError, match="model.keras is missing"):
        PneumoniaDetector.load(str(broken))
    manifest = json.loads((broken / "export.json").read_text())
    del manifest["preprocessing"]
    (broken / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(DetectorError, match="lacks preprocessing"):
        PneumoniaDetector.load(str(broken))


def test_predict_job_writes_a_row_per_image_and_reports_bad_ones(export, source_root, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(source_root / "test" / "NORMAL", folder)
    (folder / "broken.jpeg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image, and not taken for one")
    from .test_dicom import make_dicom

    first = sorted(folder.glob("*.jpeg"))[0]
    (folder / "1.2.826.0.1.3680043.8").write_bytes(make_dicom(np.asarray(Image.open(first).convert("L"))))
    out = tmp_path / "predictions.csv"
    command = [
        sys.executable,
        str(REPO / "jobs" / "predict.py"),
        str(folder),
        "--model",
        export,
        "--out",
        str(out),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "broken.jpeg: not a readable image" in run.stderr
    assert not TF_STARTUP.search(run.stdout + run.stderr), run.stderr[-2000:]
    assert "next: compare these scores with validation's: python jobs/evaluate.py" in run.stdout
    import csv

    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(list(folder.iterdir())) - 1  # all but notes.txt; the DICOM file is in
    (dicom,) = [r for r in rows if r["path"].endswith("1.2.826.0.1.3680043.8")]
    (jpeg,) = [r for r in rows if r["path"] == str(first)]
    assert float(dicom["probability"]) == pytest.approx(float(jpeg["probability"]), abs=1e-3)
    broken = [r for r in rows if r["path"].endswith("broken.jpeg")]
    assert broken[0]["error"] and not broken[0]["label"]
    good = [r for r in rows if not r["error"]]
    assert all(r["label"] in schema.CLASS_NAMES and 0 <= float(r["probability"]) <= 1 for r in good)
    # The same command again does not write over the CSV; --overwrite does.
    written = out.read_bytes()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and out.read_bytes() == written
    assert (
        again.stderr.strip().splitlines()[-1]
        == f"predict: error: {out} exists: give --overwrite to replace it, or another --out"
    )
    assert subprocess.run([*command, "--overwrite"], capture_output=True, timeout=300).returncode == 1


def test_predict_job_with_a_wrong_model_exits_2_with_one_line(tmp_path, source_root):
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "predict.py"),
            str(source_root / "test"),
            "--model",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("predict: error: no export.json")


def test_a_run_folder_given_as_the_model_names_the_export_inside_it(
    tmp_path, small_export, source_root, learnable_shards
):
    run_folder = tmp_path / "outputs" / "demo"
    shutil.copytree(small_export, run_folder / "export")
    commands = {
        "predict": [str(source_root / "test"), "--model", str(run_folder)],
        "evaluate": [str(run_folder), "--data", learnable_shards],
    }
    for job, args in commands.items():
        result = subprocess.run(
            [sys.executable, str(REPO / "jobs" / f"{job}.py"), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2, result.stderr[-2000:]
        expected = (
            f"{job}: error: {run_folder} is a run's folder, not an export: its export is {run_folder}/export"
        )
        assert result.stderr.strip().splitlines() == [expected]  # and no TensorFlow line before it


@pytest.mark.parametrize("name", ["/ABS/victim/.bashrc", "../victim/.bashrc", "sub/../../x.keras"])
def test_a_bucket_export_cannot_choose_where_its_model_is_written(export, bucket, tmp_path, name):
    victim = tmp_path / "victim" / ".bashrc"
    victim.parent.mkdir()
    victim.write_text("mine")
    remote = f"{bucket}/runs/export"
    storage.copy_tree(export, remote)
    target = name.replace("/ABS/victim", str(victim.parent))
    if name.startswith("/"):  # the object that would be downloaded over the victim
        storage.write_bytes(storage.join(remote, target), b"attacker's bytes")
    manifest = json.loads(storage.read_bytes(f"{remote}/export.json")) | {"model": target}
    storage.write_bytes(f"{remote}/export.json", json.dumps(manifest).encode())
    with pytest.raises(storage.UnsafeName, match="export.json names .*expected a plain relative name"):
        PneumoniaDetector.load(remote)
    assert victim.read_text() == "mine"


def tiny_model_with_code(marker: Path):
    """A Keras model whose Lambda layer creates `marker` when it runs: code execution, made visible."""
    import tf_keras

    inputs = tf_keras.Input((4,))
    # Built from source so that the path is a constant in the function's code, not a closure.
    touch = eval(f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]")  # noqa: S307
    touched = tf_keras.layers.Lambda(touch)(inputs)
    return tf_keras.Model(inputs, tf_keras.layers.Dense(1)(touched))


def test_only_keras_archives_load_and_never_run_code(export, tmp_path):
    marker = tmp_path / "code-ran"
    folder = tmp_path / "export"
    shutil.copytree(export, folder)
    model = tiny_model_with_code(marker)
    marker.unlink()  # building the model ran it once, here
    model.save(folder / "model.h5")
    manifest = json.loads((folder / "export.json").read_text())
    (folder / "export.json").write_text(json.dumps(manifest | {"model": "model.h5"}))
    with pytest.raises(DetectorError, match="model 'model.h5': only .keras models are loaded"):
        PneumoniaDetector.load(str(folder))
    model.save(folder / "lambda.keras")
    (folder / "export.json").write_text(json.dumps(manifest | {"model": "lambda.keras"}))
    with pytest.raises(DetectorError, match="holds a Lambda layer"):
        PneumoniaDetector.load(str(folder))
    assert not marker.exists()


def test_a_keras_archive_naming_code_outside_keras_is_refused(export, tmp_path):
    import zipfile

    folder = tmp_path / "export"
    shutil.copytree(export, folder)
    original = folder / "model.keras"
    with zipfile.ZipFile(original) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(entries["config.json"])
    config["config"]["layers"][-1]["module"] = "subprocess"  # tf-keras would import any module named
    entries["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(original, "w") as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    with pytest.raises(DetectorError, match=r"refers to code outside Keras \(subprocess\."):
        PneumoniaDetector.load(str(folder))


def test_zero_test_time_augmentation_views_are_refused(detector, source_root, tmp_path):
    image = sorted((source_root / "test" / "NORMAL").iterdir())[0]
    with pytest.raises(ValueError, match="tta_views must be an integer >= 1"):
        detector.predict(image, tta_views=0)
    with pytest.raises(ValueError, match="tta_views must be an integer >= 1"):
        detector.probabilities(np.zeros((1, 32, 32, 1), np.uint8), tta_views=0)
    run = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "predict.py"), str(image), "--model", "x", "--tta", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2 and "--tta must be >= 1" in run.stderr


def test_test_time_augmentation_keeps_only_what_it_names_even_a_new_augmentation_that_defaults_on():
    import dataclasses

    from pneumo_dist import predict
    from pneumo_dist.config import AugmentConfig

    kept = {name: getattr(predict.TTA_AUGMENT, name) for name in predict.TTA_KEEPS}
    assert kept == predict.TTA_KEEPS and predict.TTA_AUGMENT.enabled
    others = [
        f.name for f in dataclasses.fields(AugmentConfig) if f.name not in (*predict.TTA_KEEPS, "enabled")
    ]
    assert all(not getattr(predict.TTA_AUGMENT, name) for name in others)
    # A field added later with a non-zero default (before 2026-12-02 it would have entered TTA).
    Later = dataclasses.make_dataclass(
        "Later", [("cutout", float, dataclasses.field(default=0.3))], bases=(AugmentConfig,), frozen=True
    )
    assert Later().cutout == 0.3 and predict.tta_augment(Later).cutout == 0.0
    assert predict.tta_augment(Later).rotation_deg == predict.TTA_KEEPS["rotation_deg"]
