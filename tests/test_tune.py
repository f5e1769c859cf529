"""The search and multi-worker training on a real local Ray: jobs/tune.py as users run it.

Small on purpose (32 px, a couple of hundred demo images, a few steps per epoch) but real: Ray starts,
Ray Train workers run TensorFlow under MultiWorkerMirroredStrategy, ASHA stops trials. Each Ray test
costs minutes on 2 cores: one test proves several things where they share a search.
"""

import contextlib
import csv
import glob
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from pneumo_dist import config as config_lib

from .conftest import FROM_SCRATCH_OVERRIDES, REPO, free_port

# A hang (ray-project/ray#54305) must fail the test, not stall CI.
SEARCH_TIMEOUT_S = 900


def write_config(path: Path, shards: str, storage_uri: str, **tune) -> str:
    """A run config as a user writes it, from the test overrides plus a tune section."""
    config = config_lib.load_config(
        None,
        [
            *FROM_SCRATCH_OVERRIDES,
            f"data.manifest_uri={shards}",
            "data.deterministic=true",
            "train.deterministic_ops=true",
            "train.max_steps_per_epoch=4",
            "train.early_stopping_patience=0",
            f"tune.storage_uri={storage_uri}",
        ],
    ).to_dict()
    config["tune"].update(tune)
    path.write_text(yaml.safe_dump(config))
    config_lib.load_config(str(path))  # the file is valid
    return str(path)


# "local": a private in-process Ray, never another Ray that happens to run on this machine.
PRIVATE_RAY = ("--address", "local")


def run_tune(*args: str, timeout: float = SEARCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "jobs/tune.py", *PRIVATE_RAY, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_tune(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "jobs/tune.py", *PRIVATE_RAY, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_file(process: subprocess.Popen, folder: Path, pattern: str) -> Path:
    """The first file under `folder` matching `pattern`, once `process` has written it."""
    deadline = time.monotonic() + SEARCH_TIMEOUT_S
    while not (found := list(folder.glob(pattern))):
        assert process.poll() is None, (
            f"the run ended before {pattern} appeared: {process.stdout.read()[-3000:]}"
        )
        assert time.monotonic() < deadline, f"no {pattern} after {SEARCH_TIMEOUT_S} s"
        time.sleep(0.5)
    return found[0]


def read_table(path: Path) -> list[dict]:
    with open(path) as file:
        return list(csv.DictReader(file))


SPACE = {"train.learning_rate": {"loguniform": [1e-4, 3e-3]}, "model.dropout": {"uniform": [0.1, 0.5]}}


def test_asha_search_stops_trials_early_finishes_and_exports_the_best(learnable_shards, tmp_path):
    config = write_config(
        tmp_path / "search.yaml",
        learnable_shards,
        str(tmp_path / "tune"),
        num_samples=4,
        # One trial at a time: trials reach ASHA's rung in the order they were drawn (seeded), one after
        # another in one reused process, so every run of this test sees the same curves (here ASHA stops
        # 3 of 4). Two at a time raced: twice in CI the epoch-1 AUCs arrived as 0.655, 0.665, 0.6875,
        # 0.7575, each above the cut of those before it, and ASHA (rightly) stopped none.
        max_concurrent_trials=1,
        grace_period=1,
        reduction_factor=4,
        search_space=SPACE,
        name="asha",
    )
    result = run_tune("--config", config, "--set", "train.epochs=3", "--set", "train.serving_export=true")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = read_table(tmp_path / "tune" / "asha" / "trials.csv")
    assert len(table) == 4 and {row["status"] for row in table} == {"TERMINATED"}
    stopped = [row for row in table if row["stopped_by_asha"] == "True"]
    assert stopped and all(int(row["epochs_run"]) < 3 for row in stopped)
    # The trials that started after others had ended trained in their processes, with what they built.
    assert any(row["reused_build"] == "True" for row in table)
    best = tmp_path / "tune" / "asha" / "best"
    info = json.loads((best / "export.json").read_text())
    assert info["model"] == "model.keras"
    # The serving SavedModel: the best export's only (a trial's export would pay for one in vain).
    assert info["serving_model"] == "saved_model" and (best / "saved_model" / "saved_model.pb").is_file()
    assert not glob.glob(str(tmp_path / "tune" / "asha" / "trials" / "*" / "export" / "saved_model"))
    figures = json.loads((best / "report" / "metrics.json").read_text())
    assert figures["data"]["split"] == "test" and figures["model"]["threshold_source"] == "validation"
    assert (best / "report" / "report.html").stat().st_size > 10_000
    assert "test split at the validation threshold (95% intervals): auc" in result.stdout
    assert "best trial" in result.stdout


def test_a_search_of_seeds_exports_its_best_trials_as_one_ensemble(learnable_shards, tmp_path):
    # K seeds of one recipe trained in parallel (a grid over train.seed), best/ their ensemble.
    config = write_config(
        tmp_path / "seeds.yaml",
        learnable_shards,
        str(tmp_path / "tune"),
        num_samples=1,
        scheduler="fifo",
        search_space={"train.seed": {"grid": [0, 1]}},
        ensemble_top=2,
        evaluate_test=False,
        name="seeds",
    )
    result = run_tune("--config", config, "--set", "train.epochs=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = read_table(tmp_path / "tune" / "seeds" / "trials.csv")
    assert sorted(row["train.seed"] for row in table) == ["0", "1"]
    best = tmp_path / "tune" / "seeds" / "best"
    info = json.loads((best / "export.json").read_text())
    trials = tmp_path / "tune" / "seeds" / "trials"
    expected = {str(trials / row["trial_id"] / "export") for row in table}
    assert {member["source"] for member in info["members"]} == expected
    assert "ensemble of the 2 best trials" in result.stdout


def train_worker_pids(driver_pid: int) -> list[int]:
    """Ray Train workers of the in-process Ray that `driver_pid` started (its descendants only)."""
    import psutil

    pids = []
    for child in psutil.Process(driver_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):  # it may have exited meanwhile
            if "RayTrainWorker" in " ".join(child.cmdline()):
                pids.append(child.pid)
    return pids


def test_two_workers_agree_and_a_killed_one_restarts_the_trial_from_its_checkpoint(
    learnable_shards, tmp_path
):
    config = write_config(
        tmp_path / "fail.yaml",
        learnable_shards,
        str(tmp_path / "tune"),
        num_samples=1,
        workers_per_trial=2,
        max_failures=1,
        search_space={},
        name="fail",
        evaluate_test=False,
    )
    # With the weights' moving average: each worker keeps its own copy, checkpointed and restored.
    # XLA on: the split step (distribute.step_kind), as on a GPU cluster (XLA has no deterministic ops).
    overrides = ("train.epochs=2", "train.ema_decay=0.9", "train.xla=on", "train.deterministic_ops=false")
    process = start_tune("--config", config, *[arg for o in overrides for arg in ("--set", o)])
    trials = tmp_path / "tune" / "fail" / "trials"
    wait_for_file(process, trials, "*/checkpoints/state.json")  # the first epoch is checkpointed
    victims = train_worker_pids(process.pid)
    assert victims, "no Ray Train worker process found"
    os.kill(victims[-1], signal.SIGKILL)
    output, _ = process.communicate(timeout=SEARCH_TIMEOUT_S)
    assert process.returncode == 0, output[-4000:]
    (trial,) = trials.iterdir()
    state = json.loads((trial / "checkpoints" / "state.json").read_text())
    assert [epoch["epoch"] for epoch in state["history"]] == [0, 1]
    # Resumed from the checkpoint, not restarted from scratch (which would also end with epochs 0-1):
    # each restarted worker's own history (workers/rank-N.json, rewritten by the new processes) begins
    # after epoch 0, with the optimizer's step carried on from the checkpoint (4 steps per epoch).
    views = [json.loads(p.read_text()) for p in sorted((trial / "workers").iterdir())]
    assert [view["rank"] for view in views] == [0, 1]
    for view in views:
        first = view["history"][0]
        assert first["epoch"] >= 1 and first["step"] == 4 * (first["epoch"] + 1), view["history"]
    # MultiWorkerMirroredStrategy: both workers saw the same validation metrics, epoch by epoch.
    metrics = [[{k: v for k, v in e.items() if k.startswith("val_")} for e in v["history"]] for v in views]
    assert metrics[0] and metrics[0] == metrics[1]
    assert (trial / "export" / "export.json").exists()
    # The restarted workers removed the killed one's local working folder.
    assert not glob.glob(f"{tempfile.gettempdir()}/pneumo-train-{socket.gethostname()}-{victims[-1]}-*")


def test_two_ray_train_worker_processes_end_with_one_processs_weights(learnable_shards, tmp_path):
    from pneumo_dist import distribute

    from .test_step import SAME_WEIGHTS_ATOL, run_step_check

    one, one_weights = run_step_check("one", learnable_shards, tmp_path / "one")
    completed = subprocess.run(
        [sys.executable, "tests/step_check.py", "ray", learnable_shards, str(tmp_path / "ray")],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "TF_XLA_FLAGS"},
        capture_output=True,
        text=True,
        timeout=SEARCH_TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    for rank in (0, 1):
        folder = tmp_path / "ray" / f"rank-{rank}"
        info = json.loads((folder / "info.json").read_text())
        # MultiWorkerMirroredStrategy, one replica per process, the split step with XLA, in packs.
        assert info["step_kind"] == distribute.STEP_SPLIT and info["traces"] == 1
        assert info["describe"].startswith("train: CollectiveAllReduceStrategy, 2 replicas, all-reduce RING")
        announced = int(re.search(r"in (\d+) packs of ~4 MiB", info["describe"]).group(1))
        assert announced > 1 and announced in info["packs"]
        with np.load(folder / "weights.npz") as weights:
            for reference, name in zip(one_weights, weights.files, strict=True):
                np.testing.assert_allclose(weights[name][0], reference[0], rtol=0, atol=SAME_WEIGHTS_ATOL)


def test_an_interrupted_search_resumes(learnable_shards, tmp_path):
    config = write_config(
        tmp_path / "resume.yaml",
        learnable_shards,
        str(tmp_path / "tune"),
        num_samples=2,
        max_concurrent_trials=1,  # the second trial is still to run when the first has finished
        grace_period=2,
        search_space=SPACE,
        name="resume",
        evaluate_test=False,
    )
    process = start_tune("--config", config, "--set", "train.epochs=2")
    trials = tmp_path / "tune" / "resume" / "trials"
    finished = wait_for_file(process, trials, "*/export/export.json")  # one trial finished
    finished_at = finished.stat().st_mtime
    process.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state and stops
    process.communicate(timeout=300)
    resumed = run_tune("--config", config, "--set", "train.epochs=2", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    table = read_table(tmp_path / "tune" / "resume" / "trials.csv")
    assert len(table) == 2 and {row["status"] for row in table} == {"TERMINATED"}
    assert {row["epochs_run"] for row in table} == {"2"}
    assert finished.stat().st_mtime == finished_at  # the finished trial was not run again


def test_resume_without_a_search_says_so(tmp_path, learnable_shards):
    config = write_config(tmp_path / "c.yaml", learnable_shards, str(tmp_path / "none"), name="missing")
    warm_up = ("--set", "tune.grace_period=1", "--set", "train.warmup_epochs=1")
    result = run_tune("--config", config, "--resume", *warm_up, timeout=300)
    assert result.returncode == 2 and "--resume: no search to resume" in result.stderr
    assert "tune: warning: tune.grace_period (1) is not above the warm-up" in result.stderr


def test_a_bad_search_space_fails_before_ray_starts(tmp_path, learnable_shards):
    config = write_config(tmp_path / "c.yaml", learnable_shards, str(tmp_path / "x"))
    result = run_tune(
        "--config", config, "--set", "tune.search_space={model.dropout: {uniform: [0.2, 1.5]}}", timeout=120
    )
    assert result.returncode == 2
    assert "tune.search_space['model.dropout'] can draw 1.5, which is invalid" in result.stderr
    assert "Ray" not in result.stdout


@pytest.fixture
def cluster_env(tmp_path) -> dict:
    """The environment of the cluster's nodes and its clients, as cluster/*.yaml and the Dockerfile set
    it: token authentication, with a token of this test's own."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


@dataclass
class LocalCluster:
    address: str  # the dashboard's, for `ray job submit`
    add_node: Callable[[], None]  # another node of 1 CPU joins


@pytest.fixture
def local_ray_cluster(cluster_env):
    """A real Ray head of 1 CPU started with `ray start`, on its own ports and temp dir, which can grow by
    nodes of 1 CPU; stopped by those alone."""
    import psutil

    temp_dir = Path("/tmp") / f"rt{os.getpid()}{free_port()}"  # short: Ray's socket paths have a length limit
    # A joined node's own: nodes sharing one would delete each other's copies of a job's working dir.
    node_temp_dir = Path(f"{temp_dir}n")
    port, dashboard_port = free_port(), free_port()
    command = [
        "ray",
        "start",
        "--head",
        f"--port={port}",
        f"--dashboard-port={dashboard_port}",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=1",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",  # Ray's default, 52365, may be taken
        "--disable-usage-stats",
    ]

    def add_node() -> None:
        node = [
            "ray",
            "start",
            f"--address=127.0.0.1:{port}",
            "--num-cpus=1",
            f"--temp-dir={node_temp_dir}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--disable-usage-stats",
        ]
        subprocess.run(node, check=True, capture_output=True, timeout=180, env=cluster_env)

    try:
        subprocess.run(command, check=True, capture_output=True, timeout=180, env=cluster_env)
        address = f"http://127.0.0.1:{dashboard_port}"
        # The job agent comes up some seconds after `ray start` returns ("No available agent to submit job").
        deadline = time.monotonic() + 120
        while subprocess.run(
            ["ray", "job", "submit", "--address", address, "--", "true"],
            capture_output=True,
            timeout=120,
            env=cluster_env,
        ).returncode:
            assert time.monotonic() < deadline, "the Ray head never accepted a job"
            time.sleep(2)
        yield LocalCluster(address, add_node)
    finally:
        # Stop exactly this cluster, also when it failed to come up: the processes whose command line
        # names one of its temp dirs, and their children (the agents rename themselves
        # "ray::DashboardAgent").
        cmdlines = psutil.process_iter(["cmdline"])
        ours = {p for p in cmdlines if str(temp_dir) in " ".join(p.info["cmdline"] or [])}
        for process in list(ours):
            with contextlib.suppress(psutil.Error):
                ours.update(process.children(recursive=True))
        for process in ours:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(ours, timeout=10)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(node_temp_dir, ignore_errors=True)


def training_intervals(experiment: Path) -> list[tuple[float, float]]:
    """Each trial's (its workers started, its last report), in seconds since the epoch, from Tune's
    result.json: a report's timestamp minus the trial's running time is when its driver started, and the
    first report's start_s is how long the workers took to start after that."""
    intervals = []
    for results in experiment.glob("run_trial_*/result.json"):
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        driver_started = rows[0]["timestamp"] - rows[0]["time_total_s"]
        intervals.append((driver_started + rows[0]["start_s"], rows[-1]["timestamp"]))
    return intervals


def test_ray_job_submit_runs_the_search_on_a_cluster_that_grows(
    learnable_shards, tmp_path, local_ray_cluster, cluster_env
):
    # Without the cluster's token, or with another one, nobody can submit a job (i.e. run code).
    no_token = {k: v for k, v in cluster_env.items() if not k.startswith("RAY_AUTH_TOKEN")}
    for env in (no_token, no_token | {"RAY_AUTH_TOKEN": secrets.token_hex(32)}):
        refused = subprocess.run(
            [
                "ray",
                "job",
                "submit",
                "--address",
                local_ray_cluster.address,
                "--",
                "touch",
                str(tmp_path / "ran"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env | {"HOME": str(tmp_path)},  # no ~/.ray/auth_token to fall back on
        )
        assert refused.returncode != 0 and "AuthenticationError" in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "ran").exists()
    config = write_config(
        tmp_path / "job.yaml",
        learnable_shards,
        str(tmp_path / "tune"),
        num_samples=2,
        search_space=SPACE,
        name="job",
        evaluate_test=False,
    )
    job = subprocess.Popen(
        [
            "ray",
            "job",
            "submit",
            "--address",
            local_ray_cluster.address,
            "--working-dir",
            str(REPO),
            "--",
            "python",
            "jobs/tune.py",
            "--config",
            config,
            "--set",
            "train.epochs=2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cluster_env,
    )
    # The head holds one trial's worker; once that trial trains, a node joins: the other trial, queued
    # for its CPU (not held back by a concurrency limit computed at start), trains there meanwhile.
    experiment = tmp_path / "tune" / "job"
    wait_for_file(job, experiment / "trials", "*/config.yaml")
    local_ray_cluster.add_node()
    output, _ = job.communicate(timeout=SEARCH_TIMEOUT_S)
    assert job.returncode == 0, output[-5000:]
    assert "succeeded" in output.lower()
    assert "tune: Ray cluster" in output  # joined the cluster instead of starting its own
    assert len(read_table(experiment / "trials.csv")) == 2
    (_, first_end), (second_start, _) = sorted(training_intervals(experiment))
    assert second_start < first_end, "the second trial waited for the first instead of the new node"


def test_a_trial_gets_its_sampled_values_and_absolute_local_paths(monkeypatch, tmp_path):
    from pneumo_dist import tune

    monkeypatch.chdir(tmp_path)
    config = config_lib.load_config(
        None, ["data.manifest_uri=data/shards", "model.weights=w/notop.h5", "data.stage_dir=gs://b/stage"]
    )
    sampled = {"train.learning_rate": np.float64(0.002), "model.dense_units": np.int64(64)}
    trial = tune.trial_config(tune.base_for_workers(config), sampled, "gs://b/tune/trials/t1")
    # A Ray worker runs in another folder: local paths arrive absolute, gs:// ones as they were.
    assert trial.data.manifest_uri == str(tmp_path / "data" / "shards")
    assert trial.model.weights == str(tmp_path / "w" / "notop.h5")
    assert trial.data.stage_dir == "gs://b/stage" and trial.data.cache_dir == ""
    assert trial.train.learning_rate == 0.002 and trial.model.dense_units == 64
    assert trial.train.output_uri == "gs://b/tune/trials/t1" and trial.tune.search_space == {}
    imagenet = config_lib.load_config(None, ["model.weights=imagenet"])
    assert tune.trial_config(tune.base_for_workers(imagenet), {}, "out").model.weights == "imagenet"


def test_a_local_storage_folder_is_refused_on_a_cluster_of_several_nodes():
    from pneumo_dist import tune

    tune.check_storage("outputs/tune", nodes=1)
    tune.check_storage("gs://bucket/tune", nodes=3)
    with pytest.raises(
        tune.SearchError, match=r"tune.storage_uri=outputs/tune is a local folder, but .* 3 nodes"
    ):
        tune.check_storage("outputs/tune", nodes=3)


def test_trials_run_as_many_at_once_as_fit_on_a_fixed_ray_and_queue_on_a_cluster():
    from pneumo_dist import tune

    def cfg(**values):
        return config_lib.load_config(None, [f"tune.{k}={v}" for k, v in values.items()]).tune

    assert tune.trial_concurrency(cfg(), {"CPU": 2.0}) == 2  # in-process: what this machine holds
    assert tune.trial_concurrency(cfg(workers_per_trial=2), {"CPU": 2.0}) == 1
    assert tune.trial_concurrency(cfg(gpus_per_worker=1), {"CPU": 16.0, "GPU": 4.0}) == 4
    assert tune.trial_concurrency(cfg(cpus_per_worker=4), {"CPU": 2.0}) == 1  # queued, not zero
    assert tune.trial_concurrency(cfg(), None) is None  # a cluster: the autoscaler sees every trial
    assert tune.trial_concurrency(cfg(max_concurrent_trials=3), None) == 3
    assert tune.trial_concurrency(cfg(max_concurrent_trials=3), {"CPU": 8.0}) == 3


def test_the_search_algorithm_is_seeded_and_carries_the_concurrency_limit():
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from pneumo_dist import tune

    random = tune.search_algorithm(config_lib.load_config(None, ["tune.seed=7"]).tune, 2)
    # (Tune ignores TuneConfig.max_concurrent_trials for a BasicVariantGenerator: the limit is its own.)
    assert isinstance(random, BasicVariantGenerator) and random.max_concurrent == 2
    assert tune.search_algorithm(config_lib.load_config(None, []).tune, None).max_concurrent == 0
    optuna = config_lib.load_config(None, ["tune.search_alg=optuna", "tune.seed=7"]).tune
    limited = tune.search_algorithm(optuna, 2)
    assert isinstance(limited, ConcurrencyLimiter) and limited.max_concurrent == 2
    assert isinstance(limited.searcher, OptunaSearch) and limited.searcher._seed == 7
    assert isinstance(tune.search_algorithm(optuna, None), OptunaSearch)


def test_a_trials_phases_come_from_its_reports():
    from pneumo_dist import tune

    history = [
        {"epoch": 1, "seconds": 30.0, "start_s": 9.0, "import_s": 4.0, "strategy_s": 0.5, "setup_s": 6.0},
        {"epoch": 2, "seconds": 10.0},
        {"epoch": 3, "seconds": 12.0, "export_s": 3.0},
    ]
    phases = tune.trial_phases(history)
    assert phases == {
        "start_s": 9.0,
        "import_s": 4.0,
        "strategy_s": 0.5,
        "setup_s": 6.0,
        "compile_s": 19.0,  # 30 - median(10, 12)
        "export_s": 3.0,
    }
    assert tune.trial_phases(history[:1]) == {k: history[0][k] for k in tune.PHASES[:4]}
    assert tune.trial_phases([]) == {}


def test_the_search_benchmark_counts_every_trials_compile_against_the_searchs_typical_epoch(
    tmp_path, monkeypatch
):
    """A trial ASHA stopped after one epoch has no compile_s in trials.csv; the benchmark's overhead
    still counts its first epoch's excess over the search's median later epoch."""
    from pneumo_dist import run_folder, tune

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import asha_bench

    trials = {  # trial id: (reused a build, phases in trials.csv, seconds of each epoch)
        "a": (False, {"setup_s": 5.0, "export_s": 3.0}, [40.0]),
        "b": (True, {"setup_s": 1.0, "compile_s": 2.0, "export_s": 3.0}, [12.0, 10.0, 10.0]),
        "c": (False, {"setup_s": 5.0, "compile_s": 19.5, "export_s": 3.0}, [30.0, 10.0, 11.0]),
    }
    for trial_id, (_, _, seconds) in trials.items():
        state = Path(run_folder.state_uri(str(tmp_path / tune.TRIALS_FOLDER / trial_id)))
        state.parent.mkdir(parents=True)
        state.write_text(json.dumps({"history": [{"seconds": s, "val_auc": 0.5} for s in seconds]}))
    with open(tmp_path / "trials.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["trial_id", "reused_build", *tune.PHASES])
        for trial_id, (reused, phases, _) in trials.items():
            writer.writerow([trial_id, reused, *(phases.get(p, "") for p in tune.PHASES)])
    assert asha_bench.experiment_overheads(str(tmp_path)) == [
        ("a", False, 5.0 + 3.0 + (40.0 - 10.0)),  # the median of 10, 10, 10, 11
        ("b", True, 1.0 + 3.0 + 2.0),
        ("c", False, 5.0 + 3.0 + 20.0),
    ]
