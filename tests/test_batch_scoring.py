"""Batch scoring on Ray Data (jobs/predict.py --ray) from the GCS emulator, on a real local Ray.

The model is a small stock-Keras one in a real export folder: what is under test is the distributed
machinery (listing, preparation on CPU tasks, model actors, parts, restarts), which must give exactly
the single-process PneumoniaDetector's answers whatever the model."""

import hashlib
import io
import json
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pneumo_dist import batch_scoring, storage
from pneumo_dist.demo import DemoSpec, write_demo_dataset
from pneumo_dist.errors import PneumoDistError
from pneumo_dist.predict import PneumoniaDetector

from .conftest import REPO


@pytest.fixture(scope="module")
def archive(gcs_emulator, tmp_path_factory) -> tuple[str, list[str]]:
    """200 demo X-rays and two bad files under gs://BUCKET/archive/ -> (prefix, their URIs)."""
    from google.cloud import storage as gcs

    root = tmp_path_factory.mktemp("archive")
    spec = DemoSpec(images_per_class=(("a", 50), ("b", 50)), min_side_px=40, max_side_px=90)
    write_demo_dataset(str(root), spec)
    (root / "a" / "broken.jpeg").write_bytes(b"not an image")
    (root / "b" / "empty.png").write_bytes(b"")
    bucket = f"archive-{hashlib.sha256(str(root).encode()).hexdigest()[:10]}"
    gcs.Client().create_bucket(bucket)
    prefix = f"gs://{bucket}/archive"
    uris = []
    for path in sorted(root.rglob("*.*")):
        uri = f"{prefix}/{path.relative_to(root)}"
        storage.write_bytes(uri, path.read_bytes())
        uris.append(uri)
    return prefix, sorted(uris)


def predict_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "predict.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def read_parts(out: str) -> dict[str, dict]:
    rows = {}
    for info in storage.list_files(out):
        if info.uri.endswith(".parquet"):
            for row in pq.read_table(io.BytesIO(storage.read_bytes(info.uri))).to_pylist():
                rows[row["path"]] = row
    return rows


def test_two_actors_score_a_bucket_as_the_single_process_path_and_a_restart_skips_finished_parts(
    small_export, archive
):
    prefix, uris = archive
    out = prefix.rsplit("/", 1)[0] + "/scores"
    ray = ["--ray", "--address", "local", "--actors", "2", "--cpus-per-actor", "0.5", "--part-size", "50"]
    first = predict_job(prefix, "--model", small_export, "--out", out, *ray)
    assert first.returncode == 1, first.stderr[-3000:]  # two bad files: reported, not fatal
    assert f"{len(uris)} images on Ray" in first.stdout and "2 error" in first.stdout
    rows = read_parts(out)
    assert sorted(rows) == uris  # every image once, nothing else
    detector = PneumoniaDetector.load(small_export)
    expected = {p.source: p for p in detector.predict_batch(uris, bad_inputs="report")}
    for uri, row in rows.items():
        if expected[uri].error:
            assert row["error"] and row["probability"] is None and row["label"] is None
            continue
        assert row["probability"] == pytest.approx(expected[uri].probability, abs=1e-6)
        assert row["label"] == expected[uri].label and row["threshold"] == pytest.approx(0.7)
        assert row["model_version"] == detector.version
        content = storage.read_bytes(uri)
        assert row["sha256"] == hashlib.sha256(content).hexdigest()
        assert (row["width"], row["height"]) == Image.open(io.BytesIO(content)).size
    assert len({round(r["probability"], 5) for r in rows.values() if r["probability"]}) > 20
    assert sum(r["error"] is not None for r in rows.values()) == 2

    # A run that died after some parts: the same command writes only the missing ones.
    parts = {f.uri: f.version for f in storage.list_files(out) if f.uri.endswith(".parquet")}
    assert len(parts) == -(-len(uris) // 50)
    lost = storage.join(out, batch_scoring.PART_NAME.format(1))
    storage.delete(lost)
    again = predict_job(prefix, "--model", small_export, "--out", out, *ray)
    assert "finished parts skipped" in again.stdout, again.stderr[-3000:]
    now = {f.uri: f.version for f in storage.list_files(out) if f.uri.endswith(".parquet")}
    assert set(now) == set(parts) and all(now[u] == parts[u] for u in parts if u != lost)
    assert read_parts(out) == rows

    # Other inputs into the same folder are refused before Ray starts, and nothing is written.
    other = predict_job(prefix, "--model", small_export, "--out", out, *ray[:-1], "40")
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr[-3000:]
    assert "holds the output of another scoring job" in other.stderr.strip().splitlines()[-1]
    assert json.loads(storage.read_bytes(storage.join(out, batch_scoring.JOB_FILE)))["part_size"] == 50


def test_a_bad_threshold_or_model_fails_before_ray_starts_and_writes_nothing(small_export, tmp_path):
    out = str(tmp_path / "scores")
    paths = [str(tmp_path / "x.jpeg")]
    bad = batch_scoring.OperatingPoint(threshold=2.0)
    with pytest.raises(PneumoDistError, match="threshold must be in 0..1"):
        batch_scoring.score(paths, small_export, out, bad, address="never-reached")
    with pytest.raises(PneumoDistError, match="no export.json"):
        batch_scoring.score(paths, str(tmp_path), out, address="never-reached")
    assert not (tmp_path / "scores").exists()


def test_a_restart_with_another_model_in_the_same_folder_is_refused_before_ray_starts(small_export, tmp_path):
    """Before 2026-12-02 such a restart wrote 300 rows of one model and 880 of another into one output."""
    folder = tmp_path / "export"
    shutil.copytree(small_export, folder)
    out, paths = str(tmp_path / "scores"), [str(tmp_path / "x.jpeg")]
    with pytest.raises(PneumoDistError, match="never-reached"):  # claimed, then Ray cannot be joined
        batch_scoring.score(paths, str(folder), out, address="never-reached")
    job = json.loads((tmp_path / "scores" / batch_scoring.JOB_FILE).read_text())
    assert job["model_version"] == PneumoniaDetector.load(str(folder)).version and job["threshold"] == 0.7
    with open(folder / "model.keras", "ab") as model:  # another model file in the same folder
        model.write(b"\0")
    with pytest.raises(PneumoDistError, match=f"holds scores of model {job['model_version']}"):
        batch_scoring.score(paths, str(folder), out, address="never-reached")
