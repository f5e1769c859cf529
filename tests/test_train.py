import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from pneumo_dist import config as config_lib
from pneumo_dist import data, distribute, metrics, storage, train
from pneumo_dist.run_folder import RunState

from .conftest import FROM_SCRATCH_OVERRIDES, REPO, TF_STARTUP

FROM_SCRATCH = FROM_SCRATCH_OVERRIDES


def make_config(shards: str, output: str, *overrides: str):
    return config_lib.load_config(
        None, [*FROM_SCRATCH, f"data.manifest_uri={shards}", f"train.output_uri={output}", *overrides]
    )


def test_training_learns_the_demo_signal(trained):
    _, result, _, epochs_seen = trained
    assert len(epochs_seen) == result.epochs_run == 12
    # 40 validation images: chance's AUC has a standard deviation of 0.09, so 0.8 is over 3 of them above
    # it; the runs measured 0.885-0.99 (conftest.trained).
    assert result.best_val_auc > 0.8, [round(r["val_auc"], 3) for r in epochs_seen]
    assert epochs_seen[-1]["train_loss"] < epochs_seen[0]["train_loss"]


def test_export_holds_model_metrics_config_and_threshold(trained):
    config, result, output, _ = trained
    export = Path(output) / "export"
    manifest = json.loads((export / "export.json").read_text())
    expected = {"model.keras", "metrics.json", "config.yaml", "threshold.json", "saved_model"}
    assert set(manifest["files"]) == expected and manifest["serving_model"] == "saved_model"
    threshold = json.loads((export / "threshold.json").read_text())
    assert threshold["threshold"] == result.threshold and threshold["val_sensitivity"] >= 0.95
    assert config_lib.load_config(str(export / "config.yaml")) == config
    metrics = json.loads((export / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["at_0.5"]["auc"] == pytest.approx(result.best_val_auc)


def test_exported_model_reloads_and_gives_the_validation_predictions(trained):
    config, result, output, _ = trained
    detector = tf_keras.models.load_model(Path(output) / "export" / "model.keras")
    dataset = data.open_dataset(config.data)
    labels, probabilities = [], []
    for batch in data.eval_dataset(config.data, dataset, "val"):
        probabilities.append(detector(np.asarray(batch["image"], np.float32))[:, 0].numpy())
        labels.append(batch["label"].numpy())
    from pneumo_dist import metrics

    auc = metrics.binary_metrics(np.concatenate(labels), np.concatenate(probabilities))["auc"]
    assert auc == pytest.approx(result.best_val_auc, abs=1e-6)


def test_checkpoints_keep_the_last_two_and_the_best(trained):
    _, result, output, _ = trained
    names = sorted(os.listdir(Path(output) / "checkpoints"))
    last = result.epochs_run - 1  # the checkpoint after epoch e is ckpt-e
    kept = [f"ckpt-{e}{suffix}" for e in (last - 1, last) for suffix in (".index", ".data-00000-of-00001")]
    assert names == sorted(["best.weights.h5", "state.json", *kept])
    state = json.loads((Path(output) / "checkpoints" / "state.json").read_text())
    assert state["checkpoint"] == f"ckpt-{last}" and state["finished"]
    assert state["best_epoch"] == result.best_epoch


def test_resume_on_gcs_continues_at_the_saved_epoch_and_optimizer_step(learnable_shards, bucket, system_temp):
    output = storage.join(bucket, "runs", "resumed")
    quick = "train.max_steps_per_epoch=3"
    first = train.train(
        make_config(learnable_shards, output, "train.epochs=2", quick), distribute.choose_strategy(local=True)
    )
    assert [r["step"] for r in first.history] == [3, 6]
    assert storage.exists(storage.join(output, "checkpoints", "state.json"))
    seen = []
    resumed = train.train(
        make_config(learnable_shards, output, "train.epochs=3", quick),
        distribute.choose_strategy(local=True),
        resume=True,
        on_epoch=seen.append,
    )
    assert [r["epoch"] for r in seen] == [2]  # only the new epoch ran
    assert seen[0]["step"] == 9  # the optimizer's step was restored
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2]
    assert storage.exists(storage.join(output, "export", "export.json"))
    assert storage.list_files(storage.join(output, "tensorboard"))  # event files uploaded
    # The local working copy of a gs:// run (a ResNet50 checkpoint: ~1 GB at full size) is gone.
    assert not list(system_temp.glob("pneumo-train-*"))


def test_weight_averaging_validates_and_exports_the_averaged_weights(learnable_shards, tmp_path):
    output = tmp_path / "run"
    config = make_config(
        learnable_shards,
        str(output),
        "train.epochs=2",
        "train.max_steps_per_epoch=3",
        "train.early_stopping_patience=0",
        "train.ema_decay=0.5",
        "train.serving_export=false",
        "data.equalize=histogram",
        "data.border_crop=0.125",
    )
    with train.scratch_folder() as scratch:
        run = train._Run(config, distribute.choose_strategy(local=True), scratch)
        weights, averaged = run.classifier.weights, run.built.averaged
        assert len(averaged) == len(weights) > 300  # BatchNorm's statistics too
        before = [a.numpy() for a in averaged]
        for start, weight in zip(before, weights, strict=True):
            np.testing.assert_array_equal(start, weight.numpy())
        run.built.train_loops[False] = loop = run._make_train_loop()
        loop(iter(run.train_batches), tf.constant(1, tf.int32))
        decay = 2 / 11  # min(0.5, (1 + step) / (10 + step)) after the first step
        for start, weight, average in zip(before, weights, averaged, strict=True):
            expected = decay * start + (1 - decay) * weight.numpy()
            np.testing.assert_allclose(average.numpy(), expected, rtol=1e-5, atol=1e-6)
        own, means = [w.numpy() for w in weights], [a.numpy() for a in averaged]
        assert not all(np.array_equal(m, w) for m, w in zip(means, own, strict=True))
        with run._averaged_weights():
            for weight, mean in zip(weights, means, strict=True):
                np.testing.assert_array_equal(weight.numpy(), mean)
        for weight, value in zip(weights, own, strict=True):
            np.testing.assert_array_equal(weight.numpy(), value)
        result = run.fit(resume=False, on_step=None, on_epoch=None)
    # The export is the best averaged weights, reading images as training read its records (border cut,
    # equalised): scored by evaluate.py's way, it has the AUC validation gave it, which the raw weights
    # would not have; PneumoniaDetector gives each source image the evaluator's probability.
    from pneumo_dist import evaluate
    from pneumo_dist.predict import PneumoniaDetector

    detector = PneumoniaDetector.load(result.export_uri)
    preprocessing = detector.info.preprocessing
    assert (preprocessing.equalize, preprocessing.border_crop) == ("histogram", 0.125)
    split_config = evaluate.split_data_config(detector, learnable_shards, batch_size=16)
    scores = evaluate.score_split(detector, split_config, data.open_dataset(split_config), "val")
    auc = metrics.binary_metrics(scores.labels, scores.probabilities)["auc"]
    assert auc == pytest.approx(result.best_val_auc, abs=1e-6)
    source = Path(learnable_shards).parent / "source"
    predicted = [p.probability for p in detector.predict_batch([source / s for s in scores.sources])]
    np.testing.assert_allclose(predicted, scores.probabilities, rtol=0, atol=1e-6)
    # A model whose scores differ from image to image (after 6 steps its AUC may be near 0.5: 0.5025 was
    # seen), so that the equalities above compare rankings, not constants.
    assert np.std(scores.probabilities) > 1e-4


def test_a_mixed_examples_loss_is_the_same_mix_of_its_two_images_weighted_losses():
    labels, probabilities = np.array([1.0, 0.0, 0.0, 1.0]), np.array([0.9, 0.2, 0.6, 0.3])
    lam, class_weights = np.array([0.7, 0.1, 1.0, 0.5]), (0.5, 2.0)  # NORMAL, PNEUMONIA

    def loss(label, p):
        return -class_weights[int(label)] * (label * np.log(p) + (1 - label) * np.log(1 - p))

    as_tensors = [tf.constant(x, tf.float32) for x in (labels, probabilities)]
    plain = train.example_losses(*as_tensors, class_weights).numpy()
    np.testing.assert_allclose(
        plain, [loss(y, p) for y, p in zip(labels, probabilities, strict=True)], rtol=1e-5
    )
    mixed = train.example_losses(*as_tensors, class_weights, lam=tf.constant(lam, tf.float32)).numpy()
    expected = [
        lam[i] * loss(labels[i], probabilities[i]) + (1 - lam[i]) * loss(labels[3 - i], probabilities[i])
        for i in range(4)
    ]
    np.testing.assert_allclose(mixed, expected, rtol=1e-5)


def test_a_run_removes_the_scratch_folders_of_dead_processes_only(system_temp):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    orphan = system_temp / f"pneumo-train-{host}-{dead.pid}-abc"
    live = system_temp / f"pneumo-train-{host}-{os.getpid()}-def"
    elsewhere = system_temp / f"pneumo-train-another-host-{dead.pid}-ghi"  # not ours to judge
    for folder in (orphan, live, elsewhere):
        (folder / "checkpoints").mkdir(parents=True)
    with train.scratch_folder() as scratch:
        assert Path(scratch).name.startswith(f"pneumo-train-{host}-{os.getpid()}-")
        assert not orphan.exists() and live.exists() and elsewhere.exists()
    assert not Path(scratch).exists()


def test_overwrite_replaces_a_run_and_a_kill_while_saving_best_weights_leaves_no_truncated_file(
    learnable_shards, tmp_path, monkeypatch
):
    real_save = tf_keras.Model.save_weights

    def killed_mid_save(model, path, *args, **kwargs):
        real_save(model, path, *args, **kwargs)
        with open(path, "r+b") as file:  # what a SIGKILL halfway through the write leaves
            file.truncate(0)
        raise KeyboardInterrupt

    monkeypatch.setattr(tf_keras.Model, "save_weights", killed_mid_save)
    output = tmp_path / "run"
    # An earlier run's files, replaced by --overwrite; a file of the user's beside them stays.
    for name in ("config.yaml", "checkpoints/state.json", "export/export.json", "notes.txt"):
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).write_text("earlier")
    config = make_config(learnable_shards, str(output), "train.epochs=1", "train.max_steps_per_epoch=2")
    with pytest.raises(train.TrainingError, match="already holds a run"):
        train.train(config, distribute.choose_strategy(local=True))
    with pytest.raises(KeyboardInterrupt):  # the first epoch always improves on "nothing yet"
        train.train(config, distribute.choose_strategy(local=True), overwrite=True)
    assert list((output / "checkpoints").iterdir()) == []  # a later resume starts clean, not from 0 bytes
    assert not (output / "export").exists() and (output / "notes.txt").read_text() == "earlier"


def test_resume_without_a_checkpoint_says_so(learnable_shards, tmp_path):
    config = make_config(learnable_shards, str(tmp_path / "empty"), "train.epochs=1")
    with pytest.raises(train.TrainingError, match="--resume: no checkpoint in .*empty/checkpoints"):
        train.train(config, distribute.choose_strategy(local=True), resume=True)


def test_resume_from_a_damaged_state_says_so_in_one_line(learnable_shards, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "state.json").write_text('["not", "a", "state"]')
    config = make_config(learnable_shards, str(tmp_path / "run"), "train.epochs=1")
    with pytest.raises(train.TrainingError, match="--resume: .*run/checkpoints/state.json is damaged"):
        train.train(config, distribute.choose_strategy(local=True), resume=True)


def test_the_run_state_file_keeps_its_keys_and_reads_back(tmp_path):
    state = RunState(next_epoch=3, best_auc=0.9, best_epoch=1, history=[{"epoch": 0}], checkpoint="ckpt-2")
    assert set(json.loads(state.to_json())) == {
        "next_epoch",
        "best_auc",
        "best_epoch",
        "epochs_since_best",
        "stopped_early",
        "finished",
        "history",
        "checkpoint",
    }  # the file's keys, as runs before the type wrote them
    assert RunState.read(str(tmp_path)) is None  # no complete checkpoint yet
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "state.json").write_bytes(state.to_json())
    assert RunState.read(str(tmp_path)) == state


def test_a_dataset_without_validation_is_refused(tiny_demo_root, tmp_path):
    from pneumo_dist import shards

    shards.make_shards(
        tiny_demo_root,
        str(tmp_path / "noval"),
        shards.ShardOptions(stored_size_px=32, val_fraction=0),
        workers=1,
    )
    config = make_config(str(tmp_path / "noval"), str(tmp_path / "out"), "train.epochs=1")
    with pytest.raises(train.TrainingError, match="has no val split"):
        train.train(config, distribute.choose_strategy(local=True))


def run_job(*args):
    return subprocess.run(
        [sys.executable, "jobs/train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def test_train_job_local_debug_run_then_refuses_to_replace_it(learnable_shards, tmp_path):
    args = (
        "--config",
        "configs/demo.yaml",
        "--local",
        "--max-steps",
        "2",
        "--epochs",
        "2",  # a second epoch's progress bar too (a disabled bar, off a terminal, once crashed it)
        "--set",
        f"data.manifest_uri={learnable_shards}",
        "--set",
        f"train.output_uri={tmp_path / 'o'}",
        "--set",
        "data.image_size_px=32",
    )
    result = run_job(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch   2" in result.stdout and "exported to" in result.stdout
    assert not TF_STARTUP.search(result.stdout + result.stderr), result.stderr[-3000:]
    assert (
        f"next: python jobs/evaluate.py {tmp_path / 'o' / 'export'} --data {learnable_shards}"
        in result.stdout
    )
    assert (tmp_path / "o" / "export" / "export.json").exists()
    # The same command again must not delete that run: an error, and the run is still whole.
    again = run_job(*args)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines()[-1] == (
        f"train: error: {tmp_path / 'o'} already holds a run (config.yaml, checkpoints, export, "
        "tensorboard): pass --resume to continue it, --overwrite to replace it, or choose another "
        "train.output_uri"
    )
    assert (tmp_path / "o" / "export" / "export.json").exists()


def test_train_job_rejects_a_bad_config_before_loading_tensorflow():
    code = (
        "import sys; sys.argv = ['train.py', '--config', 'configs/demo.yaml', '--set', 'train.lr=1'];"
        "sys.path.insert(0, 'jobs'); import train as job; rc = job.main();"
        "print(rc, 'tensorflow' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert "train: error: the defaults" not in result.stderr and "unknown key train.lr" in result.stderr


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_learns_with_xla_and_exports_a_float32_model(learnable_shards, tmp_path, precision):
    # What train.precision: auto gives a GPU, with the weights' average and random erasing on (and
    # float16's loss scaling), forced on the CPU with XLA on.
    output = str(tmp_path / "out")
    config = make_config(
        learnable_shards,
        output,
        f"train.precision={precision}",
        "train.xla=on",
        "train.epochs=12",
        "train.early_stopping_patience=0",
        "train.ema_decay=0.9",
        "augment.erasing=0.1",
        "train.serving_export=true",
    )
    history = []
    result = train.train(config, distribute.choose_strategy(local=True), on_epoch=history.append)
    # Learning, not a stalled or overflowing step (that stays near 0.5). The threads' reduction order
    # differs from run to run: at 8 epochs float16 reached 0.70-0.94 over five runs (its dynamic loss
    # scale skips its first 7 steps, 32768 -> 256), bfloat16 0.87-0.955 over three; at 12 epochs float16
    # reached 0.91-0.99 over four (2026-12-06).
    assert result.best_val_auc > 0.75, [round(r["val_auc"], 3) for r in history]
    detector = tf_keras.models.load_model(Path(output) / "export" / "model.keras", compile=False)
    assert {w.dtype for w in detector.weights} == {tf.float32}
    assert {layer.compute_dtype for layer in detector.get_layer("pneumo_resnet50").layers} == {"float32"}
    # The float32 export scores the validation split as the reduced-precision model did, nearly.
    from pneumo_dist import evaluate
    from pneumo_dist.predict import PneumoniaDetector

    exported = PneumoniaDetector.load(result.export_uri)
    split_config = evaluate.split_data_config(exported, learnable_shards, batch_size=16)
    scores = evaluate.score_split(exported, split_config, data.open_dataset(split_config), "val")
    auc = metrics.binary_metrics(scores.labels, scores.probabilities)["auc"]
    assert auc == pytest.approx(result.best_val_auc, abs=0.02)
    assert (Path(output) / "export" / "saved_model" / "saved_model.pb").exists()


def test_ctrl_c_ends_training_in_one_line_with_exit_130_and_resume_goes_on(learnable_shards, tmp_path):
    output = tmp_path / "o"
    args = [
        "--config",
        "configs/demo.yaml",
        "--local",
        "--max-steps",
        "2",
        "--set",
        f"data.manifest_uri={learnable_shards}",
        "--set",
        f"train.output_uri={output}",
        "--set",
        "data.image_size_px=32",
        "--set",
        "train.early_stopping_patience=0",  # only the signal ends it (in CI a stop at epoch 3 beat it once)
    ]
    process = subprocess.Popen(
        [sys.executable, "jobs/train.py", *args, "--epochs", "50"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a shell: pytest-xdist's workers ignore SIGINT, and a child inherits that (Python then
        # leaves it ignored: 50 epochs ran to the end in CI).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in process.stdout:  # the first epoch is checkpointed
        if line.startswith("epoch   1"):
            break
    process.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(
        r"train: interrupted after epoch (\d+); its checkpoint is kept; rerun with --resume to continue", last
    )
    assert match, last
    done = int(match.group(1))
    state = json.loads((output / "checkpoints" / "state.json").read_text())
    assert state["next_epoch"] == done and not (output / "export").exists()
    resumed = run_job(*args, "--epochs", str(done + 1), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"train: resuming {output} after epoch {done}" in resumed.stdout
    assert f"epoch {done + 1:3d}" in resumed.stdout and "exported to" in resumed.stdout
