"""The jobs as a user runs them: real processes, real exit codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import REPO


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env or os.environ
    )


def test_make_shards_help_lists_sources_and_options():
    result = run("jobs/make_shards.py", "--help")
    assert result.returncode == 0
    for text in ("SRC", "DST", "demo", "--overwrite", "--strict", "--val-fraction", "--keep-val"):
        assert text in result.stdout


def test_make_shards_demo_end_to_end_then_no_op(tmp_path):
    destination = tmp_path / "shards"
    first = run("jobs/make_shards.py", "demo", str(destination), "--size", "32")
    assert first.returncode == 0, first.stderr
    assert "wrote" in first.stdout and "train" in first.stdout
    manifest = json.loads((destination / "manifest.json").read_text())
    assert manifest["counts"]["test"] == {"NORMAL": 40, "PNEUMONIA": 40}
    second = run("jobs/make_shards.py", "demo", str(destination), "--size", "32")
    assert second.returncode == 0 and "nothing to do" in second.stdout


def test_user_errors_exit_2_with_one_line_naming_the_problem(tmp_path):
    missing = run("jobs/make_shards.py", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith(f"make_shards: error: {tmp_path / 'nowhere'}")
    assert "Traceback" not in missing.stderr
    bad_option = run("jobs/make_shards.py", "demo", str(tmp_path / "out"), "--jpeg-quality", "0")
    assert bad_option.returncode == 2 and "option jpeg_quality=0" in bad_option.stderr
    short_key = run(
        "jobs/make_shards.py",
        "demo",
        str(tmp_path / "out"),
        env={**os.environ, "PNEUMO_DIST_PATIENT_KEY": "s3cr3t"},
    )
    assert short_key.returncode == 2 and "patient key must be at least 32" in short_key.stderr
    assert "s3cr3t" not in short_key.stderr  # a key is never echoed
    usage = run("jobs/make_shards.py")
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_every_job_turns_a_users_mistake_into_one_line_and_exit_2(tmp_path):
    nowhere = str(tmp_path / "nowhere")
    (tmp_path / "broken.yaml").write_text("data: {manifest_uri: [\n")
    (tmp_path / "list.yaml").write_text("data: [1, 2]\n")
    cases = {  # arguments: what the one line must name
        ("jobs/train.py", "--config", nowhere): nowhere,
        ("jobs/tune.py", "--config", nowhere): nowhere,
        ("jobs/train.py", "--config", str(tmp_path / "broken.yaml")): "is not valid YAML",
        ("jobs/tune.py", "--config", str(tmp_path / "list.yaml")): "section 'data' must be a mapping",
        ("jobs/train.py", "--local", "--set", f"data.manifest_uri={nowhere}"): nowhere,
        ("jobs/evaluate.py", nowhere, "--data", nowhere): nowhere,
        ("jobs/predict.py", "README.md", "--model", nowhere): nowhere,
    }
    # Started together: most of the time is TensorFlow's import, and CI has two cores.
    running = {
        args: subprocess.Popen(
            [sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for args in cases
    }
    for args, process in running.items():
        _, stderr = process.communicate(timeout=300)
        job = Path(args[0]).stem
        assert process.returncode == 2, (args, stderr[-2000:])
        assert "Traceback" not in stderr, (args, stderr[-2000:])
        last = stderr.strip().splitlines()[-1]
        assert last.startswith(f"{job}: error: ") and cases[args] in last, (args, last)


def test_tf_keras_is_the_keras_after_importing_pneumo_dist():
    code = (
        "import pneumo_dist, tensorflow as tf, tf_keras; assert tf.keras.Model is tf_keras.Model; print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    result = run("-c", code, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    refused = run("-c", "import pneumo_dist", env=env | {"TF_USE_LEGACY_KERAS": "0"})
    assert refused.returncode != 0 and "pneumo-dist needs tf-keras" in refused.stderr


def test_hostile_sources_and_destinations_are_one_line_and_exit_2(tmp_path):
    """Each of these ended in a traceback before 2026-12-02."""
    import numpy as np

    (tmp_path / "a-file").write_text("")
    np.savez(tmp_path / "objects.npz", train_images=np.array([object()], dtype=object), train_labels=[0])
    (tmp_path / "loop" / "train" / "NORMAL").mkdir(parents=True)
    (tmp_path / "loop" / "train" / "NORMAL" / "up").symlink_to("..")
    cases = {
        ("demo", str(tmp_path / "a-file")): "a-file/_work/lock.json: Not a directory",
        (str(tmp_path / "objects.npz"), str(tmp_path / "o1")): "Object arrays cannot be loaded",
        (str(tmp_path / "loop"), str(tmp_path / "o2")): "NORMAL/up is a symbolic link loop",
        ("demo", "/proc/pneumo-dist-test"): "cannot write /proc/pneumo-dist-test",
    }
    for args, expected in cases.items():
        result = run("jobs/make_shards.py", *args, "--workers", "1")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], (args, result.stderr)
    assert (tmp_path / "a-file").read_text() == ""  # nothing of ours written over it


def test_an_xla_cache_folder_that_cannot_be_made_or_others_may_write_is_refused(tmp_path, demo_shards):
    (tmp_path / "a-file").write_text("")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # as a folder someone else made first at the default path would be
    for cache, expected in (
        (tmp_path / "a-file" / "cache", "cannot create it (Not a directory)"),
        (shared, "writable by others (mode 777)"),
    ):
        result = run(
            "jobs/train.py",
            "--local",
            "--set",
            f"data.manifest_uri={demo_shards}",
            "--set",
            f"train.xla_cache_dir={cache}",
            "--set",
            f"train.output_uri={tmp_path / 'out'}",
        )
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1].startswith(f"train: error: train.xla_cache_dir={cache}")
        assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_patient_key_is_made_private_on_first_use_and_no_output_holds_it(tmp_path):
    """Before 2026-12-02 the manifest held the HMAC salt (derived from the inputs by default): with it,
    guessing record numbers re-identified 12 of 12 DICOM records in 8.8 s."""
    from pneumo_dist import pseudonyms

    env = {k: v for k, v in os.environ.items() if k != "PNEUMO_DIST_PATIENT_KEY"} | {"HOME": str(tmp_path)}
    first = run("jobs/make_shards.py", "demo", str(tmp_path / "a"), "--size", "32", env=env)
    assert first.returncode == 0, first.stderr
    key_file = tmp_path / ".config" / "pneumo-dist" / "patient-key"
    assert "created a patient key" in first.stderr and key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_text().strip()
    assert len(key) == 64
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["options"]["patient_key_fingerprint"] == pseudonyms.key_fingerprint(key)
    written = b"".join(p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert key.encode() not in written and key not in first.stdout + first.stderr
    again = run("jobs/make_shards.py", "demo", str(tmp_path / "b"), "--size", "32", env=env)
    assert again.returncode == 0 and "created" not in again.stderr
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["options"] == manifest["options"]
    key_file.chmod(0o644)
    exposed = run("jobs/make_shards.py", "demo", str(tmp_path / "c"), env=env)
    assert exposed.returncode == 2 and "may be read by others (mode 644): chmod 600 it" in exposed.stderr


def test_deterministic_ops_with_xla_is_one_line_before_training(tmp_path, demo_shards):
    """It failed at the first step before 2026-12-02: XLA has no deterministic max-pool gradient."""
    result = run(
        "jobs/train.py",
        "--local",
        "--set",
        f"data.manifest_uri={demo_shards}",
        "--set",
        "train.xla=on",
        "--set",
        "train.deterministic_ops=true",
        "--set",
        f"train.output_uri={tmp_path / 'out'}",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "train: error: train.deterministic_ops needs train.xla: off (XLA has no deterministic gradient of "
        "ResNet50's max pooling)"
    )
