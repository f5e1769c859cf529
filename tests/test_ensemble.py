"""Ensembles as one export (ensemble.py): train.py --ensemble, the members' mean logit in
PneumoniaDetector and in the SavedModel, calibration and thresholds on the ensemble's validation scores,
the members in evaluate's report, resuming, and what cannot be combined."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pneumo_dist import config as config_lib
from pneumo_dist import data, distribute, ensemble, evaluate, explain, metrics
from pneumo_dist import export as export_lib
from pneumo_dist.predict import PneumoniaDetector

from .conftest import FROM_SCRATCH_OVERRIDES, REPO

# One worker runs them all: the trained ensemble (a module fixture) is made once, not once per worker.
pytestmark = pytest.mark.xdist_group("ensemble")


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


@pytest.fixture(scope="module")
def trained_ensemble(learnable_shards, tmp_path_factory):
    """Two seeds of a short recipe, exported as one ensemble with its SavedModel: (config, Exported,
    the members each seen by on_member)."""
    output = str(tmp_path_factory.mktemp("ensemble") / "out")
    config = config_lib.load_config(
        None,
        [
            *FROM_SCRATCH_OVERRIDES,
            f"data.manifest_uri={learnable_shards}",
            f"train.output_uri={output}",
            "train.epochs=2",
            "train.max_steps_per_epoch=6",
            "train.early_stopping_patience=0",
            "train.serving_export=true",
            "train.seed=3",
        ],
    )
    seen = []
    exported = ensemble.train_ensemble(
        config, 2, distribute.choose_strategy(local=True), on_member=lambda i, m: seen.append(m)
    )
    return config, exported, seen


def val_pixels(detector: PneumoniaDetector, shards: str) -> tuple[np.ndarray, np.ndarray]:
    split_config = evaluate.split_data_config(detector, shards, batch_size=64)
    batches = list(data.eval_dataset(split_config, data.open_dataset(split_config), "val"))
    return (
        np.concatenate([b["image"].numpy() for b in batches]),
        np.concatenate([b["label"].numpy() for b in batches]).astype(np.int64),
    )


def test_the_ensemble_is_one_export_whose_probability_is_its_members_mean_logit(
    trained_ensemble, learnable_shards
):
    config, exported, seen = trained_ensemble
    assert [m.train.seed for m in seen] == [3, 4]
    assert exported.uri == str(Path(config.train.output_uri) / "export")
    detector = PneumoniaDetector.load(exported.uri)
    members = [PneumoniaDetector.load(m.train.output_uri + "/export") for m in seen]
    assert [m.source for m in detector.info.members] == [m.uri for m in members]
    assert [m.model_version for m in detector.info.members] == [m.version for m in members]
    pixels, labels = val_pixels(detector, learnable_shards)
    raw = [m.model(tf.cast(pixels, tf.float32)).numpy()[:, 0] for m in members]
    expected = 1.0 / (1.0 + np.exp(-np.mean([logit(p) for p in raw], axis=0)))
    uncalibrated = detector.model(tf.cast(pixels, tf.float32)).numpy()[:, 0]
    np.testing.assert_allclose(uncalibrated, expected, rtol=1e-4, atol=1e-6)
    # The two members differ (seeds): the mean is not one of them.
    assert np.abs(raw[0] - raw[1]).max() > 1e-3
    # PneumoniaDetector applies the calibration fitted on the ensemble's own validation scores. Members
    # trained for 12 steps rank near chance (ensemble validation AUC 0.47 and 0.575 in two runs, 2026-12-06),
    # so Platt's slope can come out <= 0, and then the export holds none (metrics.fit_platt): either way
    # the export must be what the fit on the mean logit gives.
    calibration, fitted = detector.calibration, metrics.fit_platt(labels, expected)
    assert (calibration is None) == (fitted is None)
    probabilities = detector.probabilities(pixels)
    if calibration is None:
        np.testing.assert_allclose(probabilities, expected, rtol=1e-4, atol=1e-6)
    else:
        assert (calibration.slope, calibration.intercept) == pytest.approx(fitted, rel=1e-3, abs=1e-4)
        np.testing.assert_allclose(probabilities, calibration.apply(expected), rtol=1e-4, atol=1e-6)
    # Every threshold policy was chosen on those calibrated ensemble scores.
    target = config.train.target_sensitivity
    assert detector.threshold == pytest.approx(
        metrics.threshold_for_sensitivity(labels, probabilities, target), abs=1e-5
    )
    assert detector.operating_points["youden"] == pytest.approx(
        metrics.threshold_youden(labels, probabilities), abs=1e-5
    )
    figures = json.loads((Path(exported.uri) / "metrics.json").read_text())
    assert [m["model_version"] for m in figures["members"]] == [m.version for m in members]
    assert figures["members"][0]["val_auc"] == pytest.approx(metrics.roc_auc(labels, raw[0]), abs=1e-6)
    # Grad-CAM of the ensemble: the members' maps summed, one map per image.
    maps = explain.grad_cam(detector.model, pixels[:2], class_index=1)
    assert maps.shape == (2, *pixels.shape[1:3]) and maps.min() >= 0.0 and maps.max() <= 1.0


SERVE = """
import json, sys
import tensorflow as tf
signature = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
batch = tf.constant([open(path, "rb").read() for path in sys.argv[2:]])
print(json.dumps(signature(image_bytes=batch)["probability"].numpy().tolist()))
"""


def test_the_ensembles_saved_model_serves_its_probability(trained_ensemble, tmp_path):
    _, exported, _ = trained_ensemble
    detector = PneumoniaDetector.load(exported.uri)
    assert detector.info.serving_model == "saved_model"
    rng = np.random.default_rng(0)
    files = []
    for index in range(3):
        path = tmp_path / f"x{index}.png"
        tf.io.write_file(str(path), tf.io.encode_png(rng.integers(0, 256, (40, 40, 1), dtype=np.uint8)))
        files.append(path)
    result = subprocess.run(
        [sys.executable, "-c", SERVE, str(Path(exported.uri) / "saved_model"), *map(str, files)],
        capture_output=True,
        text=True,
        cwd=REPO.parent,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    served = np.ravel(json.loads(result.stdout.strip().splitlines()[-1]))
    local = [p.probability for p in detector.predict_batch(files)]
    np.testing.assert_allclose(served, local, atol=1e-4)


def test_evaluation_reports_the_ensemble_and_each_member(trained_ensemble, learnable_shards, tmp_path):
    _, exported, seen = trained_ensemble
    detector = PneumoniaDetector.load(exported.uri)
    summary = evaluate.run_evaluation(
        detector, learnable_shards, "test", str(tmp_path / "report"), resamples=200, gradcam_per_case=0
    )
    assert len(summary.members) == 2
    split_config = evaluate.split_data_config(detector, learnable_shards, batch_size=64)
    batches = list(data.eval_dataset(split_config, data.open_dataset(split_config), "test"))
    pixels = np.concatenate([b["image"].numpy() for b in batches])
    labels = np.concatenate([b["label"].numpy() for b in batches])
    for row, member_config in zip(summary.members, seen, strict=True):
        member = PneumoniaDetector.load(member_config.train.output_uri + "/export")
        # A member's own ranking (calibration does not change an AUC).
        auc = metrics.roc_auc(labels, member.probabilities(pixels))
        assert row.auc.value == pytest.approx(auc, abs=1e-6)
        assert row.member.source == member.uri and row.member.model_version == member.version
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<h2>Ensemble</h2>" in page and seen[1].train.output_uri in page


def test_a_resumed_ensemble_trains_nothing_finished_and_a_new_one_refuses_the_folder(trained_ensemble):
    config, exported, _ = trained_ensemble
    epochs = []
    quick = dataclasses.replace(config, train=dataclasses.replace(config.train, serving_export=False))
    again = ensemble.train_ensemble(quick, 2, resume=True, on_epoch=epochs.append)
    assert epochs == [] and again.uri == exported.uri
    with pytest.raises(ensemble.EnsembleError, match="already holds an export: pass --resume"):
        ensemble.train_ensemble(config, 2)


def test_models_that_read_images_otherwise_are_not_combined(trained_ensemble, small_export, tmp_path):
    config, exported, seen = trained_ensemble
    member = seen[0].train.output_uri + "/export"
    with pytest.raises(ensemble.EnsembleError, match="reads images otherwise than"):
        ensemble.export_ensemble([member, small_export], config, str(tmp_path / "mixed"))
    with pytest.raises(ensemble.EnsembleError, match="is an ensemble itself"):
        ensemble.export_ensemble([member, exported.uri], config, str(tmp_path / "nested"))
    with pytest.raises(ensemble.EnsembleError, match="at least 2"):
        ensemble.export_ensemble([member], config, str(tmp_path / "one"))
    assert not (tmp_path / "mixed").exists() and not (tmp_path / "nested").exists()
    assert export_lib.read(exported.uri).members  # untouched
