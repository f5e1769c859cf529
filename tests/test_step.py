"""The training step as a GPU would run it, checked on CPU: what XLA compiles, how often the host
waits for the device, the collectives' options, the batch arithmetic."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from pneumo_dist import build, data, distribute, optimizer, train
from pneumo_dist import config as config_lib

from .conftest import FROM_SCRATCH_OVERRIDES, REPO


def make_run(shards: str, tmp_path, *overrides: str) -> train._Run:
    config = config_lib.load_config(
        None,
        [
            *FROM_SCRATCH_OVERRIDES,
            f"data.manifest_uri={shards}",
            f"train.output_uri={tmp_path / 'out'}",
            "data.deterministic=true",
            *overrides,
        ],
    )
    return train._Run(config, tf.distribute.get_strategy(), str(tmp_path / "scratch"))


def step_hlo(run: train._Run) -> str:
    """The training step's HLO, named without the uid TensorFlow gives each traced function."""
    run._make_train_loop()
    batch = next(iter(run.train_batches))
    return re.sub(
        r"replica_step_\d+__",
        "replica_step__",
        run.replica_step.experimental_get_compiler_ir(batch)(stage="hlo"),
    )


def test_one_xla_program_per_step_holds_augmentation_forward_backward_and_update(learnable_shards, tmp_path):
    # Mixup and the weights' moving average (train.ema_decay) are in the program too.
    overrides = (
        "train.xla=on",
        "train.optimizer=adam",
        "augment.mixup=0.4",
        "train.ema_decay=0.99",
        "train.learning_rate=0.001",
        "model.dropout=0.1",
    )
    run = make_run(learnable_shards, tmp_path, *overrides)
    assert run.step_kind == distribute.STEP_ONE_PROGRAM
    hlo = step_hlo(run)
    assert hlo.count("\nENTRY ") == 1  # one program: the function compiled whole, nothing left outside
    entry = hlo[hlo.index("\nENTRY ") + 1 :].split("\n", 1)[0]
    # Raw uint8 records go in: the augmentation (its warp is gathers, its rotation a cosine) is inside.
    assert re.search(r"arg0[.\d]*: u8\[16,32,32,1\]", entry), entry[:200]
    ops = re.findall(r"= \S+ ([a-z][\w-]*)\(", hlo)
    assert ops.count("gather") >= 4 and "cosine" in ops and "convolution" in ops
    # Adam's update of every trainable variable (one square root each), not one program per variable.
    assert ops.count("sqrt") >= len(run.classifier.trainable_variables) > 100
    # Mixup's Beta draws (logs of uniforms) and the average's update of every weight, BatchNorm's too.
    assert "log" in ops and "reverse" in ops
    assert entry.count("f32[") >= len(run.classifier.trainable_variables) + len(run.built.averaged)
    # A trial with another learning rate and dropout rate compiles the same program (both are variables
    # read as the step runs): what XLA's persistent cache needs to serve it on a GPU instead of compiling
    # again (its key hashes the HLO module: tensorflow/compiler/jit/device_executable_persistor.h).
    other = make_run(
        learnable_shards, tmp_path / "other", *overrides[:4], "train.learning_rate=0.003", "model.dropout=0.4"
    )
    assert step_hlo(other) == hlo


def test_the_host_reads_the_loss_once_per_loop_and_the_loop_length_changes_nothing(
    learnable_shards, tmp_path, monkeypatch
):
    calls, loops = [], []
    make_loop = train._Run._make_train_loop

    def counted(self):
        loops.append(make_loop(self))

        def call(iterator, steps):
            calls.append(int(steps))
            return loops[-1](iterator, steps)

        return call

    monkeypatch.setattr(train._Run, "_make_train_loop", counted)
    run = make_run(
        learnable_shards,
        tmp_path,
        "train.epochs=1",
        "train.max_steps_per_epoch=6",
        "train.steps_per_loop=4",
        "train.deterministic_ops=true",
        "model.dropout=0.0",  # Keras' dropout draws from a generator that the checkpoint does not rewind
    )
    # Six fixed batches: a new iterator of the training data would draw another order.
    iterator = iter(run.train_batches)
    batches = [next(iterator) for _ in range(6)]
    run.train_batches = tf.data.Dataset.from_tensor_slices(
        {key: tf.stack([batch[key] for batch in batches]) for key in batches[0]}
    )
    initial = run.checkpoint.write(str(tmp_path / "initial"))
    history = []
    run.fit(resume=False, on_step=None, on_epoch=history.append)
    assert calls == [4, 2] and run.host_reads == 2
    looped = [v.numpy() for v in run.classifier.variables]
    # The same 6 steps from the same state and data, one per call: the same loss and weights.
    run.checkpoint.read(initial).assert_consumed()
    iterator = iter(run.train_batches)
    single = [float(loops[0](iterator, tf.constant(1))) for _ in range(6)]
    assert sum(single) / 6 == pytest.approx(history[0]["train_loss"], rel=1e-5)
    for after_loops, after_single in zip(looped, run.classifier.variables, strict=True):
        np.testing.assert_allclose(after_single.numpy(), after_loops, rtol=1e-4, atol=1e-6)


def test_multi_worker_collectives_are_nccl_in_packs_on_gpus_and_the_ring_on_cpus():
    implementation = tf.distribute.experimental.CommunicationImplementation
    gpu = distribute.communication_options(gpus=True, pack_mb=32)
    assert gpu.implementation == implementation.NCCL and gpu.bytes_per_pack == 32 * 2**20
    cpu = distribute.communication_options(gpus=False, pack_mb=0)
    assert cpu.implementation == implementation.RING and cpu.bytes_per_pack == 0
    assert config_lib.TrainConfig().all_reduce_pack_mb == 32


def test_several_replicas_take_the_split_step_on_gpus_and_cpus_alike():
    class Extended:
        def __init__(self, devices):
            self.worker_devices = devices

    class Strategy:
        def __init__(self, devices):
            self.extended, self.num_replicas_in_sync = Extended(devices), len(devices)

    gpus = Strategy(["/job:worker/replica:0/task:0/device:GPU:0", "/job:worker/task:1/device:GPU:0"])
    cpus = Strategy(["/job:worker/task:0/device:CPU:0", "/job:worker/task:1/device:CPU:0"])
    assert distribute.step_kind(gpus, xla=True) == distribute.STEP_SPLIT
    assert distribute.step_kind(cpus, xla=True) == distribute.STEP_SPLIT
    assert distribute.step_kind(tf.distribute.get_strategy(), xla=True) == distribute.STEP_ONE_PROGRAM
    assert distribute.step_kind(gpus, xla=False) == distribute.STEP_NO_XLA


def test_the_pack_count_is_tensorflows():
    from tensorflow.python.distribute import cross_device_utils

    sizes = [4 * n for n in (9408, 64, 36864, 64, 2359296, 512, 1048576, 2048, 2048 * 256, 256, 256, 1)]
    for pack_mb in (0, 0.5, 1, 4, 32):
        tensors = [tf.zeros([size // 4]) for size in reversed(sizes)]
        expected = len(cross_device_utils.group_by_size(tensors, int(pack_mb * 2**20)))
        assert distribute.count_packs(sizes, pack_mb) == expected, pack_mb


def run_step_check(mode: str, shards: str, out) -> tuple[dict, list[np.ndarray]]:
    """tests/step_check.py in its own process -> (its info.json, the weights of each replica)."""
    # Not this process's XLA flags: configure_process set its own persistent cache folder there.
    env = {k: v for k, v in os.environ.items() if k != "TF_XLA_FLAGS"}
    completed = subprocess.run(
        [sys.executable, "tests/step_check.py", mode, shards, str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    info = json.loads((out / "info.json").read_text())
    with np.load(out / "weights.npz") as weights:
        return info, [weights[name] for name in weights.files]


# Three SGD steps of ResNet50 (learning rate 0.01) move the weights by ~0.2; the sums of two replicas'
# gradients differ from one replica's in float32 rounding only: measured 5.2e-8 at most, 2026-12-02.
SAME_WEIGHTS_ATOL = 1e-6


def test_two_replicas_take_the_split_step_in_packs_and_end_with_one_replicas_weights(
    learnable_shards, tmp_path
):
    one, one_weights = run_step_check("one", learnable_shards, tmp_path / "one")
    two, two_weights = run_step_check("mirrored", learnable_shards, tmp_path / "two")
    assert one["step_kind"] == distribute.STEP_ONE_PROGRAM and one["moved"] > 0.05
    assert two["step_kind"] == distribute.STEP_SPLIT
    # The gradients went through TensorFlow's collectives in the packs the start-up line announces.
    announced = int(re.search(r"in (\d+) packs of ~4 MiB", two["describe"]).group(1))
    assert announced > 1 and announced in two["packs"]
    # One XLA program per replica, none with an all-reduce in it: the split step's compiled part.
    programs = [(tmp_path / "two" / "xla-cache" / name).read_bytes() for name in two["xla_programs"]]
    assert len(programs) == 2
    assert all(b"convolution" in program and b"all-reduce" not in program for program in programs)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    for reference, replicas in zip(one_weights, two_weights, strict=True):
        assert len(replicas) == 2
        for replica in replicas:
            np.testing.assert_allclose(replica, reference[0], rtol=0, atol=SAME_WEIGHTS_ATOL)


def test_batch_per_replica_sets_the_global_batch_and_the_learning_rate_scales_with_it(demo_shards):
    cfg = config_lib.DataConfig(manifest_uri=demo_shards, global_batch_size=64, batch_per_replica=256)
    assert data.resolve_batch(cfg, 8).global_batch_size == 2048
    train_cfg = config_lib.TrainConfig(learning_rate=1e-4, lr_reference_batch=256)
    assert optimizer.scaled_learning_rate(train_cfg, 2048) == pytest.approx(8e-4)
    assert optimizer.scaled_learning_rate(config_lib.TrainConfig(learning_rate=1e-4), 2048) == 1e-4
    with pytest.raises(
        config_lib.ConfigError, match=r"global_batch_size=30: must be a multiple of the 4 replicas"
    ):
        data.resolve_batch(config_lib.DataConfig(global_batch_size=30), 4)


def test_a_global_batch_larger_than_the_train_split_is_an_error_naming_both(demo_shards):
    dataset = data.open_dataset(config_lib.DataConfig(manifest_uri=demo_shards, read_mode="stream"))
    records = dataset.records("train")
    assert data.steps_per_epoch(dataset, records) == 1
    with pytest.raises(
        config_lib.ConfigError, match=rf"global batch \({records + 1}\) is larger than the {records} records"
    ):
        data.steps_per_epoch(dataset, records + 1)


def test_the_gpu_benchmark_runs_its_code_on_the_cpu(learnable_shards, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_bench

    # --smoke: bfloat16 and XLA, the branch a GPU takes, forced on the CPU.
    assert gpu_bench.main(["--smoke", "--shards", learnable_shards]) == 0
    *_, rows, summary = capsys.readouterr().out.strip().splitlines()
    production, full, epoch = json.loads(rows)
    assert production["recipe"] == "production" and production["batch_per_gpu"] == 4
    assert production["synthetic_img_s"] > 0 and production["real_img_s"] > 0
    assert 0 <= production["input_wait_share"] <= 1 and 0 <= production["augmentation_share"] <= 1
    assert full["recipe"] == "full" and full["synthetic_img_s"] > 0
    assert epoch["epoch"]["steps_s"] > 0 and epoch["epoch"]["epoch_s"] > epoch["epoch"]["steps_s"]
    assert summary.startswith("gpu_bench ") and "mixed_bfloat16, XLA on" in summary


def test_a_later_run_in_the_process_reuses_the_traced_step_with_its_own_learning_rate_and_dropout(
    learnable_shards, tmp_path, monkeypatch
):
    """What a search's trials do when Tune reuses the trial's process: the second run traces nothing,
    and trains as a fresh process would with its own learning rate (dropout off: Keras' masks come from
    stateful random ops, see build.Built); its dropout rate is its own too."""

    from pneumo_dist import export

    monkeypatch.setattr(build, "_kept", [])
    strategy = distribute.choose_strategy(local=True)

    def make_config(name: str, *overrides: str) -> config_lib.RunConfig:
        return config_lib.load_config(
            None,
            [
                *FROM_SCRATCH_OVERRIDES,
                f"data.manifest_uri={learnable_shards}",
                f"train.output_uri={tmp_path / name}",
                "data.deterministic=true",
                "train.epochs=2",
                "train.max_steps_per_epoch=2",
                "train.early_stopping_patience=0",
                # What train.precision: auto gives a GPU: the rates are float32 variables beside
                # bfloat16 activations (this failed at the first step before 2026-12-02).
                "train.precision=bfloat16",
                *overrides,
            ],
        )

    def run(name: str, *overrides: str, reuse: bool = True) -> list[dict]:
        history = []
        train.train(make_config(name, *overrides), strategy, on_epoch=history.append, reuse=reuse)
        return history

    # One build (run "alone", as a fresh process would), then another run with another learning rate
    # and the first one's config again, both on that build. (That the learning rate and dropout rate
    # are not fixed in the traced step: test_one_xla_program_per_step_...)
    alone = run("alone", "train.learning_rate=0.003", "model.dropout=0.0")
    (built,) = build._kept
    other = run("other", "train.learning_rate=0.001", "model.dropout=0.0")
    assert other[0]["learning_rate"] != pytest.approx(alone[0]["learning_rate"], rel=1e-3)
    reused = run("b", "train.learning_rate=0.003", "model.dropout=0.0")
    assert build._kept == [built] and built.train_loops[False].experimental_get_tracing_count() == 1
    for epoch_reused, epoch_alone in zip(reused, alone, strict=True):
        assert epoch_reused["learning_rate"] == pytest.approx(epoch_alone["learning_rate"], rel=1e-6)
        assert epoch_reused["train_loss"] == pytest.approx(epoch_alone["train_loss"], rel=1e-4)
        assert epoch_reused["val_auc"] == pytest.approx(epoch_alone["val_auc"], abs=1e-6)

    dropped = run("c", "train.learning_rate=0.003", "model.dropout=0.5")
    assert build._kept == [built]
    assert dropped[0]["train_loss"] != pytest.approx(reused[0]["train_loss"], rel=1e-3)
    # The saved model's config holds the run's rates as numbers (read from the archive: loading
    # ResNet50 costs ~20 s here, and tests/test_model.py loads exported models).
    with zipfile.ZipFile(tmp_path / "c" / export.FOLDER / export.MODEL_FILE) as archive:
        pending, rates = [json.loads(archive.read("config.json"))], {}
    while pending:  # every layer config in the nested models
        item = pending.pop()
        if isinstance(item, dict):
            if item.get("class_name") == "Dropout":
                rates[item["config"]["name"]] = item["config"]["rate"]
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    assert rates == {"dropout_pool": 0.5, "dropout_dense": 0.5}

    # Anything else is another graph, built anew.
    assert build.previous_build(make_config("d", "train.learning_rate=0.01"), strategy) is built
    assert build.previous_build(make_config("d", "model.dense_units=32"), strategy) is None
    assert build.previous_build(make_config("d", "train.epochs=3"), strategy) is None
    shutil.rmtree(os.path.dirname(built.as_built_path))  # the checkpoint keep_for_reuse wrote


def test_a_process_keeps_its_last_few_builds_and_removes_what_an_evicted_one_wrote(monkeypatch):
    monkeypatch.setattr(build, "_kept", [])
    builds = [
        build.Built(
            key=str(n), strategy=None, classifier=None, optimizer=None, schedule=None, dropout_rate=None,
            epoch=None, checkpoint=tf.train.Checkpoint(value=tf.Variable(float(n))), loss_sum=None,
        )
        for n in range(build.KEEP_BUILDS + 1)
    ]  # fmt: skip
    for built in builds[:-1]:
        build.keep_for_reuse(built)
    build.keep_for_reuse(builds[0])  # used again: now the most recent
    build.keep_for_reuse(builds[-1])
    assert build._kept == [*builds[2:-1], builds[0], builds[-1]]
    assert not os.path.exists(os.path.dirname(builds[1].as_built_path))
    assert all(os.path.exists(os.path.dirname(b.as_built_path)) for b in build._kept)
    for built in build._kept:
        shutil.rmtree(os.path.dirname(built.as_built_path))


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_the_fused_adam_update_is_tf_keras_adam(name):
    """One ResourceApplyAdam per variable gives tf-keras' own Adam/AdamW update, step after step, on
    mirrored variables inside a tf.function as in training (and XLA compiles it: the test above)."""
    fused, plain = {
        "adam": (optimizer.FusedAdam, tf_keras.optimizers.Adam),
        "adamw": (optimizer.FusedAdamW, tf_keras.optimizers.AdamW),
    }[name]
    rng = np.random.default_rng(0)
    initial = [rng.normal(size=(8, 4)).astype("float32"), rng.normal(size=4).astype("float32")]
    gradients = [[rng.normal(size=w.shape).astype("float32") for w in initial] for _ in range(4)]

    def run(kind) -> list[np.ndarray]:
        strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
        with strategy.scope():
            variables = [tf.Variable(w) for w in initial]
            kwargs = {"weight_decay": 0.01} if name == "adamw" else {}
            schedule = optimizer.WarmupCosine(0.01, warmup_steps=2, total_steps=4, cosine=True)
            update = kind(schedule, **kwargs)

        @tf.function
        def step(grads):
            strategy.run(lambda g: update.apply_gradients(zip(g, variables, strict=True)), args=(grads,))

        for grads in gradients:
            step([tf.constant(g) for g in grads])
        return [v.numpy() for v in variables]

    fused_values, plain_values = run(fused), run(plain)
    for start, fused_value, plain_value in zip(initial, fused_values, plain_values, strict=True):
        assert not np.allclose(fused_value, start)
        np.testing.assert_allclose(fused_value, plain_value, rtol=1e-5, atol=1e-6)
