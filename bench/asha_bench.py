"""What a search spends for its answer: the same search run to the end (FIFO), under ASHA with random
sampling, and under ASHA with Optuna's TPE, at the same number of trials and epochs on real data. Prints
each one's trial-epochs, best validation AUC and the best AUC reached as trial-epochs are spent, the
ratios to the full budget, each trial's validation AUC per epoch (what ASHA compared at its rungs), and
the per-trial start-up and export overhead (issue 14's goal: <= 20 s), for trials that built their
model and for those that reused their process's build.

    python bench/asha_bench.py [--manifest data/mnist-shards] [--samples 18] [--epochs 9] [--max-steps 20]
    python bench/asha_bench.py --replay outputs/asha-bench/fifo-random-<time>   # no training
    python bench/asha_bench.py --arms "ASHA + random,ASHA + Optuna" --full FULL_BUDGET_FOLDER
    python bench/asha_bench.py --overheads EXPERIMENT_FOLDER   # a finished search's per-trial overhead

After the full budget, ASHA is replayed on its learning curves (Ray's own ASHAScheduler deciding, the
trials started in order, `--concurrency` at a time, every epoch equally long) for several grace periods
and reduction factors, in the order the trials ran and over 200 random orders, and synchronous
successive halving beside it: what each setting would have spent and found on exactly these trials,
without the run-to-run noise of training them again. `--replay` does only that, for a finished
full-budget experiment folder. `--full` takes such a folder as the full-budget arm instead of training
it again (run with the same --samples, --epochs and --max-steps: training is deterministic, so the
ASHA arms' trials repeat its curves for the epochs they run).

Default data: PneumoniaMNIST from ../shared/data at its native 28 px (sharded on first use), trained
from scratch on the CPU with configs/mnist.yaml and its tune settings (the shipped defaults unless
--grace / --reduction are given). Goal (issue 14): ASHA within 0.005 of the full budget's best
validation AUC with <= 1/3 of its trial-epochs.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from pathlib import Path

from pneumo_dist import config as config_lib
from pneumo_dist import ray_setup, run_folder, shards, storage, tune

REPO = Path(__file__).resolve().parents[1]
SHARED_NPZ = REPO.parent / "shared" / "data" / "pneumoniamnist_trainval.npz"
SPACE = {
    "train.learning_rate": {"loguniform": [1e-4, 3e-3]},
    "model.dropout": {"uniform": [0.1, 0.5]},
    "model.dense_units": {"choice": [64, 128, 256]},
}
ARMS = {  # name: (scheduler, search algorithm)
    "full budget": ("fifo", "random"),
    "ASHA + random": ("asha", "random"),
    "ASHA + Optuna": ("asha", "optuna"),
}


def main() -> None:
    """Longer than a screen: the flags, the two searches run alike, and the report, in that order."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", default=str(REPO / "data" / "mnist-shards"))
    parser.add_argument("--samples", type=int, default=18)
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--max-steps", type=int, default=20, help="cap steps per epoch (0: whole epochs)")
    parser.add_argument("--grace", type=int, help="tune.grace_period (default: the config's)")
    parser.add_argument("--reduction", type=int, help="tune.reduction_factor (default: the config's)")
    parser.add_argument("--arms", default=",".join(ARMS), help="which searches, comma-separated")
    parser.add_argument("--storage", default=str(REPO / "outputs" / "asha-bench"))
    parser.add_argument("--replay", help="a full-budget experiment folder: replay ASHA on it, train nothing")
    parser.add_argument("--full", help="a finished full-budget experiment folder: the full-budget arm")
    parser.add_argument("--overheads", help="a finished experiment folder: print its per-trial overhead")
    parser.add_argument("--concurrency", type=int, default=2, help="trials at a time in the replay")
    args = parser.parse_args()
    if args.overheads:
        print_overheads(args.overheads)
        return
    if args.replay:
        print_replays(experiment_curves(args.replay), args.concurrency)
        return
    figures, curves = {}, {}
    if args.full:
        curves["full budget"] = experiment_curves(args.full)
        figures["full budget"] = curve_figures(curves["full budget"], seconds=None, phases={})
    if not os.path.exists(os.path.join(args.manifest, "manifest.json")):
        options = shards.ShardOptions(keep_val=True, image_format="png")
        shards.make_shards(str(SHARED_NPZ), args.manifest, options)

    in_process = ray_setup.connect_ray() == "in-process"
    for name in args.arms.split(","):
        scheduler, search_alg = ARMS[name]
        overrides = [
            f"data.manifest_uri={args.manifest}",
            f"train.epochs={args.epochs}",
            f"train.max_steps_per_epoch={args.max_steps}",
            "train.early_stopping_patience=0",
            f"tune.num_samples={args.samples}",
            f"tune.scheduler={scheduler}",
            f"tune.search_alg={search_alg}",
            "tune.evaluate_test=false",
            f"tune.storage_uri={args.storage}",
            f"tune.name={scheduler}-{search_alg}-{int(time.time())}",
            f"tune.search_space={SPACE}",
        ]
        overrides += [f"tune.grace_period={args.grace}"] if args.grace else []
        overrides += [f"tune.reduction_factor={args.reduction}"] if args.reduction else []
        config = config_lib.load_config(str(REPO / "configs" / "mnist.yaml"), overrides)
        start = time.perf_counter()
        result = tune.run_search(config, in_process=in_process)
        curves[name] = {t.trial_id: trial_aucs(t) for t in result.trials}
        phases = {p: [t.phases[p] for t in result.trials if p in t.phases] for p in tune.PHASES}
        figures[name] = curve_figures(curves[name], time.perf_counter() - start, phases)
        figures[name]["experiment"] = os.path.dirname(result.table_uri)
        print(
            f"\n{name}: {config.tune.scheduler}, grace {config.tune.grace_period}, "
            f"reduction {config.tune.reduction_factor}, {search_alg} sampling"
        )
        print(tune.trials_csv(result.trials))
        for trial in result.trials:
            aucs = " ".join(f"{auc:.3f}" for auc in trial_aucs(trial))
            print(f"  {trial.trial_id} val auc by epoch: {aucs}")

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, CPU only; {time.strftime('%Y-%m-%d')}")
    print(f"{args.samples} trials x {args.epochs} epochs ({args.max_steps or 'all'} steps each), seed 0")
    full = figures.get("full budget")
    for name, f in figures.items():
        seconds = f"{f['seconds']:.0f} s" if f["seconds"] is not None else f"from {args.full}"
        line = f"  {name}: {f['trial_epochs']} trial-epochs, best val AUC {f['best_auc']:.4f}, {seconds}"
        if full and name != "full budget":
            line += (
                f"; trial-epochs / full {f['trial_epochs'] / full['trial_epochs']:.2f} (goal <= 0.33), "
                f"full - best {full['best_auc'] - f['best_auc']:+.4f} (goal <= 0.005)"
            )
        print(line)
        print("    best val AUC after n trial-epochs: " + ", ".join(f"{n}: {a:.4f}" for n, a in f["curve"]))
        means = {p: statistics.mean(v) for p, v in f["phases"].items() if v}
        if not means:
            continue
        print(
            "    mean of each phase over the trials that have it (s): "
            + ", ".join(f"{p} {s:.1f}" for p, s in means.items())
        )
        print_overheads(f["experiment"])
    if "full budget" in curves:
        print_replays(curves["full budget"], args.concurrency)


def trial_aucs(trial: tune.TrialSummary) -> list[float]:
    return state_aucs(trial.output_uri)


def state_aucs(trial_uri: str) -> list[float]:
    return [record["val_auc"] for record in state_history(trial_uri)]


def state_history(trial_uri: str) -> list[dict]:
    return run_folder.RunState.from_json(storage.read_bytes(run_folder.state_uri(trial_uri))).history


def experiment_overheads(experiment: str) -> list[tuple[str, bool, float]]:
    """Each trial's start-up and export seconds, measured alike for every trial: its PHASES from
    trials.csv, with "compile" taken as its first epoch's seconds minus the median of the search's later
    epochs. (trials.csv compares a trial's first epoch with its own later ones, so a trial ASHA stopped
    after one epoch has no compile there: averaging that column over the trials that have it counts the
    built trials, and leaving it out counts nothing.) -> [(trial id, reused a build, seconds)]"""
    table = storage.read_bytes(storage.join(experiment, "trials.csv")).decode().splitlines()
    rows = {row["trial_id"]: row for row in csv.DictReader(table)}
    histories = {tid: state_history(storage.join(experiment, tune.TRIALS_FOLDER, tid)) for tid in rows}
    typical = statistics.median(r["seconds"] for history in histories.values() for r in history[1:])
    overheads = []
    for trial_id, row in rows.items():
        other = sum(float(row[p]) for p in tune.PHASES if p != "compile_s" and row[p])
        compile_s = max(0.0, histories[trial_id][0]["seconds"] - typical)
        overheads.append((trial_id, row.get("reused_build") == "True", other + compile_s))
    return overheads


def print_overheads(experiment: str) -> None:
    overheads = experiment_overheads(experiment)
    groups = {
        "all": [s for _, _, s in overheads],
        "built": [s for _, reused, s in overheads if not reused],
        "reused a build": [s for _, reused, s in overheads if reused],
    }
    print(
        "    per-trial overhead (start-up, first-epoch compile vs the search's median epoch, export), "
        "mean (range) s: "
        + "; ".join(
            f"{name} ({len(s)}) {statistics.mean(s):.1f} ({min(s):.1f}-{max(s):.1f})"
            for name, s in groups.items()
            if s
        )
    )


def experiment_curves(experiment: str) -> dict[str, list[float]]:
    """{trial id: validation AUC per epoch} of every trial of a finished search."""
    trials = Path(experiment) / tune.TRIALS_FOLDER
    return {path.name: state_aucs(str(path)) for path in sorted(trials.iterdir()) if path.is_dir()}


def replay_asha(curves: dict[str, list[float]], grace: int, rf: int, concurrency: int, order=None):
    """ASHA on recorded learning curves: Ray's ASHAScheduler decides after each epoch, as in a search
    whose trials start in id order (or `order`), `concurrency` at a time, every epoch equally long (a trial
    ASHA stops frees its slot at once). -> (trial-epochs run, best validation AUC seen)."""
    import heapq
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    epochs = max(len(aucs) for aucs in curves.values())
    scheduler = ASHAScheduler(
        time_attr="epoch", metric="auc", mode="max", max_t=epochs, grace_period=grace, reduction_factor=rf
    )
    waiting = list(order or sorted(curves))
    running: list[tuple[int, str, int]] = []  # (time the epoch ends, trial id, epoch)
    spent, best, now = 0, float("-inf"), 0

    def start(trial_id: str, at: int) -> None:
        scheduler.on_trial_add(None, SimpleNamespace(trial_id=trial_id))
        heapq.heappush(running, (at + 1, trial_id, 1))

    while waiting and len(running) < concurrency:
        start(waiting.pop(0), now)
    while running:
        now, trial_id, epoch = heapq.heappop(running)
        auc = curves[trial_id][epoch - 1]
        spent, best = spent + 1, max(best, auc)
        trial = SimpleNamespace(trial_id=trial_id)
        result = {"epoch": epoch, "auc": auc}
        decision = scheduler.on_trial_result(None, trial, result)
        if decision == TrialScheduler.CONTINUE and epoch < len(curves[trial_id]):
            heapq.heappush(running, (now + 1, trial_id, epoch + 1))
        else:  # stopped, or ran its epochs: Tune tells the scheduler either way
            scheduler.on_trial_complete(None, trial, result)
            if waiting:
                start(waiting.pop(0), now)
    return spent, best


def print_replays(curves: dict[str, list[float]], concurrency: int, orders: int = 200) -> None:
    """The replay in the order the trials ran, and over `orders` random orders: async ASHA favours the
    trials that reach a rung first, so one order alone says little about a setting."""
    import random

    full_epochs = sum(len(aucs) for aucs in curves.values())
    full_best = max(max(aucs) for aucs in curves.values())
    shuffled = [random.Random(seed).sample(sorted(curves), len(curves)) for seed in range(orders)]
    print(
        f"\nASHA replayed on the full budget's curves ({len(curves)} trials, {full_epochs} trial-epochs, "
        f"best val AUC {full_best:.4f}; {concurrency} trials at a time). Trial-epochs / full and full - best "
        f"in the order run; over {orders} random orders: mean trial-epochs / full, share of orders within "
        "0.005 of the full budget's best, the largest shortfall:"
    )
    epochs = max(len(aucs) for aucs in curves.values())
    graces = [grace for grace in (1, 2, 3) if grace < epochs]  # (a grace of max_t stops nothing)
    for grace in graces:
        for rf in (2, 3, 4):
            spent, best = replay_asha(curves, grace, rf, concurrency)
            runs = [replay_asha(curves, grace, rf, concurrency, order) for order in shuffled]
            ratios = [n / full_epochs for n, _ in runs]
            gaps = [full_best - b for _, b in runs]
            print(
                f"  grace {grace}, reduction {rf}: {spent / full_epochs:.2f}, {full_best - best:+.4f}; "
                f"random orders {statistics.mean(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}), "
                f"within 0.005 {sum(g <= 0.005 for g in gaps) / len(gaps):.0%}, "
                f"largest shortfall {max(gaps):.4f}"
            )
    print("Synchronous successive halving (pauses and restarts trials at each rung) on the same curves:")
    for grace in graces:
        for rf in (2, 3, 4):
            spent, best = replay_sync_halving(curves, grace, rf)
            print(
                f"  grace {grace}, reduction {rf}: trial-epochs / full {spent / full_epochs:.2f}, "
                f"full - best {full_best - best:+.4f}"
            )


def replay_sync_halving(curves: dict[str, list[float]], grace: int, rf: int) -> tuple[int, float]:
    """Synchronous successive halving on recorded curves: every trial runs `grace` epochs, the best
    1/rf of them continue to grace * rf, and so on to the last epoch (one bracket of Ray's
    HyperBandScheduler, which pauses trials at each rung and restarts them). Order-independent.
    -> (trial-epochs run, best validation AUC seen)."""
    epochs = max(len(aucs) for aucs in curves.values())
    alive, reached, spent, best = sorted(curves), 0, 0, float("-inf")
    rung = grace
    while alive:
        rung = min(rung, epochs)
        for trial_id in alive:
            spent += rung - reached
            best = max(best, *curves[trial_id][reached:rung])
        if rung == epochs:
            break
        keep = max(1, len(alive) // rf)
        alive = sorted(alive, key=lambda t: curves[t][rung - 1], reverse=True)[:keep]
        reached, rung = rung, rung * rf
    return spent, best


def curve_figures(curves: dict[str, list[float]], seconds: float | None, phases: dict) -> dict:
    return {
        "trial_epochs": sum(len(aucs) for aucs in curves.values()),
        "best_auc": max(max(aucs) for aucs in curves.values()),
        "seconds": seconds,
        "curve": best_so_far(curves),
        "phases": phases,
    }


def best_so_far(curves: dict[str, list[float]]) -> list[tuple[int, float]]:
    """The best validation AUC once n trial-epochs are spent, n = 9, 18, 27, ..., counting each trial's
    epochs in the order the trials were created (trial ids): what a search had found by then."""
    epochs = [auc for trial_id in sorted(curves) for auc in curves[trial_id]]
    best, curve = float("-inf"), []
    for n, auc in enumerate(epochs, 1):
        best = max(best, auc)
        if n % 9 == 0 or n == len(epochs):
            curve.append((n, best))
    return curve


if __name__ == "__main__":
    main()
