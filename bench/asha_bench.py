"""ASHA vs the full budget: the same sampled configurations (same seed) searched twice on real data,
once with ASHA early stopping and once run to the end (FIFO). Prints total trial-epochs and the best
validation AUC of each, and their ratios.

    python bench/asha_bench.py [--manifest data/mnist-shards] [--samples 6] [--epochs 6]

Default data: PneumoniaMNIST from ../shared/data at its native 28 px (sharded on first use), trained
from scratch on the CPU with configs/mnist.yaml. Goal (issue 5): ASHA's best AUC within 0.005 of the
full-budget search with <= 1/3 of the trial-epochs.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from pneumo_dist import config as config_lib
from pneumo_dist import shards, tune  # tune pins Ray Train's API; nothing before it imports ray.train

REPO = Path(__file__).resolve().parents[1]
SHARED_NPZ = REPO.parent / "shared" / "data" / "pneumoniamnist_trainval.npz"
SPACE = {
    "train.learning_rate": {"loguniform": [1e-4, 3e-3]},
    "model.dropout": {"uniform": [0.1, 0.5]},
    "model.dense_units": {"choice": [64, 128, 256]},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", default=str(REPO / "data" / "mnist-shards"))
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--max-steps", type=int, default=0, help="cap steps per epoch (quick runs)")
    parser.add_argument("--storage", default=str(REPO / "outputs" / "asha-bench"))
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.manifest, "manifest.json")):
        options = shards.ShardOptions(keep_val=True, image_format="png")
        shards.make_shards(str(SHARED_NPZ), args.manifest, options)

    tune.connect_ray()
    figures = {}
    for scheduler in ("asha", "fifo"):
        config = config_lib.load_config(
            str(REPO / "configs" / "mnist.yaml"),
            [
                f"data.manifest_uri={args.manifest}",
                f"train.epochs={args.epochs}",
                f"train.max_steps_per_epoch={args.max_steps}",
                "train.early_stopping_patience=0",
                f"tune.num_samples={args.samples}",
                f"tune.scheduler={scheduler}",
                "tune.grace_period=1",
                "tune.reduction_factor=3",
                "tune.evaluate_test=false",
                f"tune.storage_uri={args.storage}",
                f"tune.name={scheduler}-{int(time.time())}",
                f"tune.search_space={SPACE}",
            ],
        )
        start = time.perf_counter()
        result = tune.run_search(config)
        figures[scheduler] = {
            "trial_epochs": sum(t.epochs_run for t in result.trials),
            "best_auc": max(t.best_val_auc for t in result.trials),
            "seconds": time.perf_counter() - start,
        }
        print(tune.trials_csv(result.trials))

    asha, fifo = figures["asha"], figures["fifo"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, CPU only")
    print(f"{args.samples} trials x {args.epochs} epochs, same sampled configurations")
    for name, f in figures.items():
        auc, seconds = f["best_auc"], f["seconds"]
        print(f"  {name}: {f['trial_epochs']} trial-epochs, best validation AUC {auc:.4f}, {seconds:.0f} s")
    print(
        f"  ASHA / full budget trial-epochs: {asha['trial_epochs'] / fifo['trial_epochs']:.2f} (goal <= 0.33)"
    )
    print(f"  best AUC difference (full - ASHA): {fifo['best_auc'] - asha['best_auc']:+.4f} (goal <= 0.005)")


if __name__ == "__main__":
    main()
