"""The export folder's description (export.py): written last, read back typed, each fact once."""

import json

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
    info_path.write_text(json.dumps(raw | {"model": "../../elsewhere.keras"}))
    with pytest.raises(storage.UnsafeName):
        export.read(folder).model_uri(folder)
