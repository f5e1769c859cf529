"""The export folder's description (export.py): written last, read back typed, each fact once."""

import dataclasses
import json

import numpy as np
import pytest

from pneumo_dist import export, storage

INFO = export.ExportInfo(
    files=["config.yaml", "model.keras", "threshold.json"],
    model="model.keras",
    threshold=0.31,
    target_sensitivity=0.95,
    preprocessing=export.Preprocessing(
        image_size_px=64, stored_size_px=96, image_format="jpeg", jpeg_quality=95
    ),
    created_utc="2026-11-27T10:00:00Z",
)


def local_export(folder) -> str:
    folder.mkdir()
    (folder / "model.keras").write_bytes(b"a model")
    return str(folder)


@pytest.mark.parametrize("remote", [False, True])
def test_publish_writes_the_documents_then_the_description_and_reads_back(tmp_path, bucket, remote):
    local = local_export(tmp_path / "export")
    uri = f"{bucket}/run/export" if remote else local
    export.publish(local, uri, {"config.yaml": "a: 1\n", "threshold.json": "{}"}, INFO)
    assert export.read(uri) == INFO
    assert storage.read_bytes(storage.join(uri, "model.keras")) == b"a model"
    assert storage.read_bytes(storage.join(uri, "config.yaml")) == b"a: 1\n"
    raw = json.loads(storage.read_bytes(storage.join(uri, "export.json")))
    assert "image_size_px" not in raw and raw["preprocessing"]["image_size_px"] == 64  # stored once
    assert INFO.model_uri(uri) == storage.join(uri, "model.keras")
    for given in (uri, f"{uri}/", f"{uri}/export.json", f"{uri}/model.keras"):
        assert export.folder_of(given) == uri


def test_an_incomplete_or_damaged_description_says_what_is_wrong(tmp_path):
    folder = local_export(tmp_path / "export")
    with pytest.raises(export.ExportError, match="no export.json in .*its export did not finish"):
        export.read(folder)
    info_path = tmp_path / "export" / "export.json"
    info_path.write_text("{not json")
    with pytest.raises(export.ExportError, match="export.json is not valid JSON"):
        export.read(folder)
    export.publish(folder, folder, {}, INFO)
    raw = json.loads(info_path.read_text())
    info_path.write_text(json.dumps(raw | {"preprocessing": {"image_size_px": 64}}))
    with pytest.raises(export.ExportError, match="export.json: malformed .*stored_size_px"):
        export.read(folder)
    newer = raw["preprocessing"] | {"equalize": "clahe"}
    info_path.write_text(json.dumps(raw | {"preprocessing": newer}))
    with pytest.raises(export.ExportError, match="unknown preprocessing equalize 'clahe'.*a newer"):
        export.read(folder)
    info_path.write_text(json.dumps(raw | {"model": "../../elsewhere.keras"}))
    with pytest.raises(storage.UnsafeName):
        export.read(folder).model_uri(folder)


def test_calibration_and_every_policys_threshold_read_back(tmp_path):
    folder = local_export(tmp_path / "export")
    info = dataclasses.replace(
        INFO,
        calibration=export.Calibration(slope=0.8, intercept=-0.6),
        operating_points={"sensitivity": 0.31, "youden": 0.52},
        validation_prevalence=0.74,
    )
    export.publish(folder, folder, {}, info)
    assert export.read(folder) == info
    # Calibrated: sigmoid(0.8 * logit(p) - 0.6), the ranking kept.
    p = np.array([0.05, 0.5, 0.9])
    assert info.calibration.apply(p) == pytest.approx(1 / (1 + np.exp(-(0.8 * np.log(p / (1 - p)) - 0.6))))
    # Where PNEUMONIA is as common as on validation, the fewest errors are at 0.5; where rarer, higher.
    assert info.threshold_for_prevalence(0.74) == pytest.approx(0.5)
    rarer = info.threshold_for_prevalence(0.5)
    assert rarer == pytest.approx(0.74) and info.threshold_for_prevalence(0.9) < 0.5
    with pytest.raises(export.ExportError, match="prevalence must be in"):
        info.threshold_for_prevalence(1.0)
    with pytest.raises(export.ExportError, match="no calibrated probabilities"):
        INFO.threshold_for_prevalence(0.5)


def test_an_older_description_reads_with_its_one_threshold_and_a_broken_number_is_refused(tmp_path):
    folder = local_export(tmp_path / "export")
    export.publish(folder, folder, {}, INFO)
    info_path = tmp_path / "export" / "export.json"
    raw = json.loads(info_path.read_text())
    older = {k: v for k, v in raw.items() if k not in ("calibration", "operating_points", "threshold_policy")}
    info_path.write_text(json.dumps(older))
    read = export.read(folder)
    assert (read.threshold, read.calibration, read.operating_points) == (0.31, None, {})
    info_path.write_text(json.dumps(raw | {"calibration": {"slope": "nan", "intercept": 0}}))
    with pytest.raises(export.ExportError, match="not a finite number"):
        export.read(folder)
