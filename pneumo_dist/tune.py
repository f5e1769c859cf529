"""Ray at the edge: multi-worker training on Ray Train and the Ray Tune search with ASHA.

Each trial is a Tune function (`run_trial`) whose reports, one per epoch, ASHA uses to stop weak trials.
A trial of one worker trains in that function's own process, which holds the worker's CPUs and GPUs:
Ray Train would add a controller and a worker group to start (~35 s a trial on 2 cores, BENCHMARKS.md)
for nothing to coordinate. A trial of several workers is, the way Ray documents Tune + Train V2, a
light Tune function (no CPU) that fits a `TensorflowTrainer`; its workers run `train.train` under
MultiWorkerMirroredStrategy and their rank-0 reports reach Tune through `TuneReportCallback`.
Checkpoints live in each trial's own output folder (train.py), so a trial whose worker died (Ray
Train's FailureConfig, or Tune's for a one-worker trial) or whose search was interrupted (`--resume`)
restarts from its last complete checkpoint.

The driver of a multi-worker trial asks for no CPU on purpose: with Tune's default of one CPU per
trial, two concurrent trials on a 2-CPU machine hold both CPUs and their workers never start
(WorkerGroupStartupTimeoutError, retried for ever). The hang of ray-project/ray#54305 (a stopped trial's
placement group never released) is fixed in the Ray we require (PR #58515); tests/test_tune.py runs
ASHA searches that stop trials.

Past ~500 lines on purpose: the search's driver and its trials (the Ray Train wiring, the results
read back) are one protocol; split, each half would be read with the other open.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pneumo_dist import config as config_lib
from pneumo_dist import console, export, ray_setup, run_folder, storage
from pneumo_dist.errors import PneumoDistError
from pneumo_dist.evaluation_summary import Evaluation
from pneumo_dist.run_folder import RunState

TRIALS_FOLDER = "trials"
TRAIN_RUNS_FOLDER = "ray-train"  # Ray Train's own records of each trial's run
# What the function (run_trial) of a multi-worker trial reserves: no CPU (it only waits for its Ray Train
# run; even a hundredth of a CPU per trial leaves 1.96 of 2 CPUs, where a second 1-CPU worker group no
# longer fits), and a little memory, as Ray wants a resource to place it by.
DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 2**20}
# How long Tune waits for a finished or stopped trial's thread to end before it gives the process to the
# next trial (Ray's TUNE_FUNCTION_THREAD_TIMEOUT_S, 2 s by default): past it, Tune fails the next trial
# ("Could not re-use actor"), seen here with two searches sharing 2 cores.
TRIAL_THREAD_EXIT_S = 120
# Config values that may be local paths, relative to where the job was started.
LOCAL_PATH_KEYS = (
    ("data", "manifest_uri"),
    ("data", "stage_dir"),
    ("data", "cache_dir"),
    ("model", "weights"),
)
METRIC = "val_auc"
# Where a trial's time goes besides training epochs, in seconds, from its Tune reports: Ray starting the
# trial's workers (from the trial driver's start), importing TensorFlow, the distribution strategy, data
# + model + optimizer set-up, tracing and compiling the step (the first epoch's training time minus the
# median of the others'), and exporting the best model. `overhead` is their sum.
PHASES = ("start_s", "import_s", "strategy_s", "setup_s", "compile_s", "export_s")


class SearchError(PneumoDistError):
    """The search cannot run as configured."""


@dataclass(frozen=True)
class TrialSummary:
    trial_id: str
    config: dict  # the sampled values, by `section.key`
    best_val_auc: float
    epochs_run: int
    stopped_by_asha: bool
    status: str  # TERMINATED, ERROR
    output_uri: str
    phases: dict  # seconds of start-up and export (PHASES); a phase the trial never reached is absent
    reused_build: bool = False  # trained with the model and step its process built for an earlier trial


@dataclass(frozen=True)
class SearchResult:
    trials: list[TrialSummary]
    best: TrialSummary | None
    best_export_uri: str | None
    test_metrics: Evaluation | None  # evaluate.run_evaluation's figures for the best trial on the test split
    table_uri: str


def experiment_uri(config: config_lib.RunConfig) -> str:
    uri = config.tune.storage_uri.rstrip("/")
    return storage.join(uri if storage.is_gcs(uri) else os.path.abspath(uri), config.tune.name)


def run_search(
    config: config_lib.RunConfig, resume: bool = False, verbose: bool = False, in_process: bool = False
) -> SearchResult:
    """Run (or, with `resume`, continue) the search; then tabulate, export and test the best trial.
    Unless `verbose`, Tune's periodic status tables give way to one line per trial-epoch. `in_process`:
    Ray runs in this process (ray_setup.connect_ray), so its resources are all there will be."""
    import ray

    check_storage(config.tune.storage_uri, sum(1 for node in ray.nodes() if node.get("Alive")))
    experiment = experiment_uri(config)
    trial_root = storage.join(experiment, TRIALS_FOLDER)
    setup = {
        "base": base_for_workers(config),
        "trial_root": trial_root,
        "train_runs": storage.join(experiment, TRAIN_RUNS_FOLDER),
    }
    concurrency = trial_concurrency(config.tune, ray.cluster_resources() if in_process else None)
    tuner = _tuner(config, setup, experiment, resume, verbose, concurrency)
    if not verbose:
        # Tune's legacy reporter at verbosity 0 prints nothing; the new one still prints a start box.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    grid = tuner.fit()
    trials = [_summarize(result, config, trial_root) for result in grid]
    table_uri = storage.join(experiment, "trials.csv")
    storage.write_bytes(table_uri, trials_csv(trials).encode())
    finished = [t for t in trials if storage.exists(run_folder.export_info_uri(t.output_uri))]
    best = max(finished, key=lambda t: t.best_val_auc, default=None)
    best_export = test_metrics = None
    if best is not None:
        best_export = storage.join(experiment, "best")
        test_metrics = _export_best(config, setup, finished, best, best_export, verbose)
    return SearchResult(trials, best, best_export, test_metrics, table_uri)


def _tuner(
    config: config_lib.RunConfig, setup: dict, experiment: str, resume: bool, verbose: bool, concurrency
):
    """The Tune experiment at `experiment`: a new one, or (`resume`) the interrupted one restored."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    cfg = config.tune
    storage_root = storage.parent(experiment)
    filesystem = storage.pyarrow_filesystem(storage_root)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), trial_resources(cfg))
    if resume:
        if not tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
            raise SearchError(f"--resume: no search to resume at {experiment}")
        return tune.Tuner.restore(
            experiment,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=filesystem,
        )
    return tune.Tuner(
        trainable,
        param_space={"sampled": to_tune_space(cfg.search_space)},
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            num_samples=cfg.num_samples,
            scheduler=ASHAScheduler(
                time_attr="epoch",
                max_t=config.train.epochs,
                grace_period=min(cfg.grace_period, config.train.epochs),  # Ray asserts it; warned of
                reduction_factor=cfg.reduction_factor,
            )
            if cfg.scheduler == "asha"
            else FIFOScheduler(),
            search_alg=search_algorithm(cfg, concurrency),
            # A one-worker trial trains in its Tune function: the next trial of the process reuses
            # its built model and traced step when only REUSABLE values differ (build.Built).
            reuse_actors=cfg.workers_per_trial == 1,
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=storage_root,
            storage_filesystem=filesystem,
            # A worker's death is Ray Train's to handle (run_trial); Tune restarts a trial whose
            # driver failed (e.g. its node was lost), from the trial's last checkpoint too.
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            verbose=1 if verbose else 0,
            callbacks=[] if verbose else [console_reporter(config.train.epochs)],
        ),
    )


def _export_best(
    config: config_lib.RunConfig,
    setup: dict,
    finished: list[TrialSummary],
    best: TrialSummary,
    best_export: str,
    verbose: bool,
) -> Evaluation | None:
    """The best trial's export (or the ensemble of the tune.ensemble_top best) to `best_export`, with its
    serving model and its test report when asked for; -> the test figures, or None."""
    cfg = config.tune
    # The driver's first TensorFlow: its start-up lines held back unless `verbose`.
    console.load_tensorflow(verbose)
    members = ensemble_members(finished, best, cfg.ensemble_top)
    if len(members) > 1:
        from pneumo_dist import ensemble

        # The best trial's config: its threshold policies and the data whose validation split it saw.
        best_config = trial_config(setup["base"], best.config, best.output_uri)
        uris = [storage.join(t.output_uri, export.FOLDER) for t in members]
        print(f"ensemble of the {len(members)} best trials: {', '.join(t.trial_id for t in members)}")
        ensemble.export_ensemble(uris, best_config, best_export)
    else:
        storage.copy_tree(storage.join(best.output_uri, export.FOLDER), best_export)
    if not (config.train.serving_export or cfg.evaluate_test):
        return None
    from pneumo_dist import exporter, predict

    detector = predict.PneumoniaDetector.load(best_export)
    if config.train.serving_export:
        exporter.add_serving_model(detector)
    return report_on_test(detector, config) if cfg.evaluate_test else None


def ensemble_members(finished: list[TrialSummary], best: TrialSummary, top: int) -> list[TrialSummary]:
    """The `top` best finished trials whose exports read images as the best one's does (one ensemble
    has one input), best first; fewer when fewer qualify."""
    wanted = export.read(storage.join(best.output_uri, export.FOLDER)).preprocessing
    ranked = sorted(finished, key=lambda t: -t.best_val_auc)
    same = [
        t for t in ranked if export.read(storage.join(t.output_uri, export.FOLDER)).preprocessing == wanted
    ]
    return same[:top]


def console_reporter(epochs: int):
    """A Tune callback printing one line per finished trial-epoch and per trial end, with full
    parameter names, and a failed trial's error (the end of its traceback) on stderr. (Built here:
    this module imports Ray only when it runs a search.)"""
    from ray import tune

    class ConsoleReporter(tune.Callback):
        def __init__(self):
            self.epochs = epochs

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if METRIC not in result:
                return
            print(
                f"trial {trial.trial_id}  epoch {int(result.get('epoch', 0))}/{self.epochs}  "
                f"val auc {result[METRIC]:.4f}  loss {result.get('train_loss', float('nan')):.4f}  "
                f"{result.get('seconds', 0):.0f} s  {_sampled_text(trial.config)}",
                flush=True,
            )

        def on_trial_complete(self, iteration, trials, trial, **info):
            epochs = int((trial.last_result or {}).get("epoch", 0))
            end = "finished" if epochs >= self.epochs else "stopped (ASHA or early stopping)"
            print(f"trial {trial.trial_id}  {end} after {epochs} epochs", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            error = ""
            if trial.error_file and os.path.exists(trial.error_file):
                with open(trial.error_file) as file:
                    error = "".join(file.readlines()[-15:])
            print(f"trial {trial.trial_id}  FAILED\n{error}", file=sys.stderr, flush=True)

    return ConsoleReporter()


def _sampled_text(trial_config: dict) -> str:
    sampled = trial_config.get("sampled", {})
    return "  ".join(f"{key}={_short(value)}" for key, value in sorted(sampled.items()))


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def search_algorithm(cfg: config_lib.TuneConfig, concurrency: int | None):
    """How the trials' values are drawn (`tune.search_alg`), seeded by `tune.seed`, at most `concurrency`
    trials at a time. (The limit goes here: Tune ignores TuneConfig.max_concurrent_trials for a
    BasicVariantGenerator.) Optuna's TPE learns from every result Tune passes it, those of trials ASHA
    stopped included; its first 10 trials are random (Optuna's default start-up)."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if cfg.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=cfg.seed)
        return ConcurrencyLimiter(searcher, concurrency) if concurrency else searcher
    return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrency or 0)


def trial_concurrency(cfg: config_lib.TuneConfig, fixed_resources: dict | None) -> int | None:
    """How many trials run at once: `tune.max_concurrent_trials`; else, on a Ray that cannot grow (started
    in this process, `fixed_resources`), as many as its CPUs and GPUs hold; else no cap. On a cluster every
    trial's driver then starts and its worker group asks Ray for its resources, so the autoscaler sees the
    demand and adds nodes, and trials train as resources appear (a cap computed from what is up at start
    would be 1 on cluster/gpu.yaml, which starts without GPU workers)."""
    if cfg.max_concurrent_trials:
        return cfg.max_concurrent_trials
    if fixed_resources is None:
        return None
    fits = [fixed_resources.get("CPU", 0) // (cfg.cpus_per_worker * cfg.workers_per_trial)]
    if cfg.gpus_per_worker:
        fits.append(fixed_resources.get("GPU", 0) // (cfg.gpus_per_worker * cfg.workers_per_trial))
    return max(1, int(min(fits)))


def check_storage(storage_uri: str, nodes: int) -> None:
    """A local tune.storage_uri keeps each trial's checkpoints on the node that wrote them: on a cluster
    of several nodes a restarted trial would not find them, and the results would be scattered."""
    if nodes > 1 and not storage.is_gcs(storage_uri):
        raise SearchError(
            f"tune.storage_uri={storage_uri} is a local folder, but the Ray cluster has {nodes} nodes: "
            "checkpoints and results would stay on whichever node wrote them; use a gs:// URI"
        )


def to_tune_space(search_space: dict) -> dict:
    from ray import tune

    make = {
        "choice": tune.choice,
        "grid": tune.grid_search,
        "uniform": lambda bounds: tune.uniform(*bounds),
        "loguniform": lambda bounds: tune.loguniform(*bounds),
        "randint": lambda bounds: tune.randint(*bounds),
    }
    return {key: make[kind](values) for key, spec in search_space.items() for kind, values in spec.items()}


def trial_config(base: dict, sampled: dict, output_uri: str) -> config_lib.RunConfig:
    raw = json.loads(json.dumps(base))
    for key, value in sampled.items():
        section, _, name = key.partition(".")
        raw[section][name] = value.item() if isinstance(value, np.generic) else value
    raw["train"]["output_uri"] = output_uri
    raw["train"]["serving_export"] = False  # the search's best export gets it (run_search)
    raw["tune"]["search_space"] = {}
    return config_lib.config_from_dict(raw, source="trial config")


def trial_resources(cfg: config_lib.TuneConfig) -> dict:
    """What Tune reserves for a trial's function: a one-worker trial trains there, so the worker's
    CPUs and GPUs; a multi-worker trial's function only waits for its Ray Train run (DRIVER_RESOURCES)."""
    if cfg.workers_per_trial > 1:
        return DRIVER_RESOURCES
    return {"CPU": cfg.cpus_per_worker, "GPU": cfg.gpus_per_worker}


def run_trial(params: dict, setup: dict) -> None:
    """One trial, as Tune runs it. One worker: it trains here and reports to Tune (ASHA) itself; Tune
    restarts it after a failure (tune.max_failures), from its last checkpoint. Several workers: a Ray
    Train run of `train_loop_per_worker` on the trial's workers, whose rank-0 reports reach Tune through
    TuneReportCallback; a worker that dies restarts the worker group (Ray Train's FailureConfig), which
    resumes from the trial's last checkpoint."""
    from ray import train as ray_train
    from ray import tune
    from ray.train.tensorflow import TensorflowTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = setup["base"]["tune"]
    trial_id = tune.get_context().get_trial_id()
    loop_config = {
        "driver_started": time.time(),
        "base": setup["base"],
        "sampled": params["sampled"],
        "output": storage.join(setup["trial_root"], trial_id),
    }
    if cfg["workers_per_trial"] == 1:
        # Read by Ray in this process when Tune gives it to the next trial (reuse_actors).
        os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(TRIAL_THREAD_EXIT_S))
        train_trial(loop_config, report=tune.report, rank=0, reuse=True)
    else:
        trainer = TensorflowTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            tensorflow_config=ray_setup.gpu_sharing_tensorflow_config(),
            scaling_config=ray_train.ScalingConfig(
                num_workers=cfg["workers_per_trial"],
                use_gpu=cfg["gpus_per_worker"] > 0,
                resources_per_worker={"CPU": cfg["cpus_per_worker"], "GPU": cfg["gpus_per_worker"]},
            ),
            run_config=ray_train.RunConfig(
                # A run of its own per attempt: a restarted trial (--resume) must not find the records of
                # its interrupted run, which Ray Train would take as a run to restore, not to train.
                name=f"{trial_id}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=setup["train_runs"],
                storage_filesystem=storage.pyarrow_filesystem(setup["train_runs"]),
                failure_config=ray_train.FailureConfig(max_failures=cfg["max_failures"]),
                callbacks=[TuneReportCallback()],
            ),
        )
        trainer.fit()
    # Training ends with a finished state (all epochs, or early stopping): anything else is a run that was
    # cut short (an interrupted search), which must stay unfinished for --resume, not count as done.
    state = RunState.read(storage.join(setup["trial_root"], trial_id))
    if not (state and state.finished):
        raise SearchError(f"trial {trial_id}: its training ended before it finished")


def train_loop_per_worker(loop_config: dict) -> None:
    """What every Ray Train worker of a multi-worker trial runs."""
    from ray import train as ray_train

    train_trial(loop_config, report=ray_train.report, rank=ray_train.get_context().get_world_rank())


def train_trial(loop_config: dict, report: Callable[[dict], None], rank: int, reuse: bool = False) -> None:
    """Our training loop for one trial, handing each epoch's metrics to `report` (Tune's or Ray
    Train's). The first report also carries where the trial's start-up time went (PHASES). `reuse`:
    train.train's, for trials that run one after another in one process."""
    entered = time.time()
    from pneumo_dist import data, distribute
    from pneumo_dist import train as train_lib

    imported = time.time()

    output = loop_config["output"]
    config = trial_config(loop_config["base"], loop_config["sampled"], output)
    # A restarted trial (a worker died) finds its own last complete checkpoint.
    state = RunState.read(output)
    resume = state is not None
    history: list[dict] = []

    def on_epoch(record: dict) -> None:
        # Each worker's own view of the validation metrics (the same on every worker, by design), written
        # before the report: Tune may end the workers as soon as it has the last one.
        history.append(record)
        view = json.dumps({"rank": rank, "history": history}).encode()
        storage.write_bytes(storage.join(output, "workers", f"rank-{rank}.json"), view)
        metrics = _reportable(record)
        if len(history) == 1:
            metrics.update(start_s=entered - loop_config["driver_started"], import_s=imported - entered)
            metrics.update(strategy_s=strategy_ready - imported)
        report({**metrics, "epoch": record["epoch"] + 1})

    if state and state.finished and storage.exists(run_folder.export_info_uri(output)):
        # The trial had finished when the search was interrupted, before Tune recorded its results
        # (--resume then starts it again): report its epochs again, train and export nothing.
        for record in state.history:
            report({**_reportable(record), "epoch": record["epoch"] + 1})
        return
    # Without a complete checkpoint, whatever is in the trial's own folder is an earlier attempt of this
    # very trial: replace it.
    # Before TensorFlow's first op: thread pools of this worker's CPUs, and of the node's GPUs (all
    # visible to every worker: ray_setup.gpu_sharing_tensorflow_config) only those Ray gave this one.
    own_gpus = distribute.own_gpu_indices(os.environ.get("CUDA_VISIBLE_DEVICES"), ray_setup.ray_gpu_ids())
    distribute.configure_process(config.train, threads=data.host_threads(), gpu_indices=own_gpus)
    strategy = distribute.choose_strategy(train_cfg=config.train)
    strategy_ready = time.time()
    train_lib.train(config, strategy, resume=resume, on_epoch=on_epoch, overwrite=True, reuse=reuse)


def report_on_test(detector, config: config_lib.RunConfig) -> Evaluation | None:
    """evaluate.py's report of an exported model (a PneumoniaDetector) on the test split, written to
    EXPORT/report/; returns its figures (evaluate.run_evaluation), or None when the dataset has no test
    split."""
    from pneumo_dist import evaluate, schema

    manifest_uri = schema.manifest_uri_of(config.data.manifest_uri)
    if "test" not in schema.Manifest.read(manifest_uri).splits:
        return None
    return evaluate.run_evaluation(detector, manifest_uri, "test", storage.join(detector.uri, "report"))


def trials_csv(trials: list[TrialSummary]) -> str:
    keys = sorted({key for trial in trials for key in trial.config})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "trial_id",
            *keys,
            "best_val_auc",
            "epochs_run",
            "stopped_by_asha",
            "status",
            "reused_build",
            "overhead_s",
            *PHASES,
        ]
    )
    for t in sorted(trials, key=lambda t: -t.best_val_auc):
        writer.writerow(
            [
                t.trial_id,
                *(t.config.get(k, "") for k in keys),
                f"{t.best_val_auc:.4f}",
                t.epochs_run,
                t.stopped_by_asha,
                t.status,
                t.reused_build,
                f"{sum(t.phases.values()):.1f}",
                *(f"{t.phases[p]:.1f}" if p in t.phases else "" for p in PHASES),
            ]
        )
    return out.getvalue()


def base_for_workers(config: config_lib.RunConfig) -> dict:
    """The config as the workers get it, local paths made absolute: a Ray worker runs in another folder."""
    raw = json.loads(json.dumps(config.to_dict()))
    for section, key in LOCAL_PATH_KEYS:
        value = raw[section][key]
        if value and not storage.is_gcs(value) and not (section == "model" and value in ("imagenet", "none")):
            raw[section][key] = os.path.abspath(value)
    return raw


def _summarize(result, config: config_lib.RunConfig, trial_root: str) -> TrialSummary:
    frame = result.metrics_dataframe
    history = frame.to_dict("records") if frame is not None and len(frame) else []
    aucs = [row[METRIC] for row in history if METRIC in row and not np.isnan(row[METRIC])]
    epochs_run = int(max((row.get("epoch", 0) for row in history), default=0))
    trial_id = os.path.basename(result.path.rstrip("/")) if result.path else "unknown"
    trial_id = (result.metrics or {}).get("trial_id", trial_id)
    output = storage.join(trial_root, trial_id)
    state = RunState.read(output)
    stopped_early = bool(state and state.stopped_early)
    sampled = result.config.get("sampled", {})
    return TrialSummary(
        trial_id=trial_id,
        config={k: (v.item() if isinstance(v, np.generic) else v) for k, v in sampled.items()},
        best_val_auc=max(aucs, default=float("nan")),
        epochs_run=epochs_run,
        stopped_by_asha=result.error is None and epochs_run < config.train.epochs and not stopped_early,
        status="ERROR" if result.error else "TERMINATED",
        output_uri=output,
        phases=trial_phases(history),
        reused_build=bool(history and history[0].get("reused_build")),
    )


def trial_phases(history: list[dict]) -> dict:
    """PHASES of one trial from its reports (one row per epoch, as Tune keeps them)."""
    if not history:
        return {}
    first, last = history[0], history[-1]
    phases = {key: first[key] for key in PHASES[:4] if _is_number(first.get(key))}
    seconds = [row["seconds"] for row in history if _is_number(row.get("seconds"))]
    if len(seconds) > 1:
        phases["compile_s"] = max(0.0, seconds[0] - statistics.median(seconds[1:]))
    if _is_number(last.get("export_s")):
        phases["export_s"] = last["export_s"]
    return phases


def _reportable(record: dict) -> dict:
    """An epoch's record as Tune takes it: its numbers, a NaN kept (Tune refuses a result without the
    search's metric, and a NaN AUC is the epoch's honest figure)."""
    return {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not np.isnan(value)
