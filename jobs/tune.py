"""Ray Tune search over the config's search space, with ASHA early stopping; a trial of one worker
trains in its Tune function, a trial of several is a Ray Train run (MultiWorkerMirroredStrategy).

    python jobs/tune.py --config configs/demo.yaml [--set section.key=value ...] [--resume]
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/tune.py --config FILE

It joins the Ray cluster it runs on (a submitted job, or RAY_ADDRESS), else starts Ray in-process.
"""

from __future__ import annotations

import argparse
import os
import sys

import pneumo_dist  # noqa: F401 - selects tf-keras before TensorFlow loads
from pneumo_dist import config as config_lib
from pneumo_dist.errors import PneumoDistError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tune.py", description=__doc__.split("\n\n")[0])
    config_lib.add_config_arguments(parser, example="tune.num_samples=16")
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted search (Tuner.restore)"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="everything: Tune's status tables, Ray's and every worker's output (TensorFlow's included)",
    )
    parser.add_argument(
        "--cluster-config",
        metavar="FILE",
        help="the Ray cluster config (cluster/gpu.yaml) to check the trials' resources against before "
        "Ray starts; default: the head's ~/ray_bootstrap_config.yaml when there is one",
    )
    parser.add_argument(
        "--address",
        help="Ray address; default: the cluster this runs on, else in-process; 'local': a private Ray",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return run(args)
    except PneumoDistError as error:  # the test report on the best model included
        print(f"tune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Tune has saved the experiment's state; finished trials keep their exports
        print("\ntune: interrupted; rerun with --resume to continue the search", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    # Validated (search space included) before Ray starts: a typo costs a second, not a cluster.
    config = config_lib.load_config(args.config, args.set)
    for warning in config.warnings():
        print(f"tune: warning: {warning}", file=sys.stderr)
    from pneumo_dist import cluster

    found = cluster.find(args.cluster_config)
    if found is not None:
        cluster.check(config, found)

    from pneumo_dist import ray_setup, storage, tune

    where = ray_setup.connect_ray(args.address, verbose=args.verbose)
    cfg = config.tune
    scheduler = (
        f"ASHA (grace {cfg.grace_period}, reduction {cfg.reduction_factor})"
        if cfg.scheduler == "asha"
        else "no early stopping"
    )
    print(
        f"tune: Ray {where}; search {tune.experiment_uri(config)}: {cfg.num_samples} trials x "
        f"{config.train.epochs} epochs, {scheduler}"
        + ("" if args.verbose else "; workers' logs in Ray's log folder (--verbose shows them)"),
        flush=True,
    )
    result = tune.run_search(config, args.resume, args.verbose, in_process=where == "in-process")
    print("\ntrials (best first):")
    print(tune.trials_csv(result.trials), end="")
    print(f"table: {result.table_uri}")
    if result.best is None:
        print("tune: no trial finished, nothing exported", file=sys.stderr)
        return 1
    print(
        f"best trial {result.best.trial_id}: validation AUC {result.best.best_val_auc:.4f}, "
        f"exported to {result.best_export_uri}"
    )
    if result.test_metrics:
        from pneumo_dist import evaluate

        figures = evaluate.headline(result.test_metrics.at_threshold)
        print(f"test split at the validation threshold (95% intervals): {figures}")
        print(f"report: {storage.join(result.best_export_uri, 'report', 'report.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
