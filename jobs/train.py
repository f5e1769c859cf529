"""Train ResNet50 on a pneumo-dist dataset with one config; validate, checkpoint, export.

    python jobs/train.py --config configs/demo.yaml [--set section.key=value ...] [--local] [--resume]
                         [--ensemble K]

Without --local it uses every local GPU (MirroredStrategy), or the cluster TF_CONFIG describes.
"""

from __future__ import annotations

import argparse
import sys

import pneumo_dist  # noqa: F401 - selects tf-keras before TensorFlow loads
from pneumo_dist import config as config_lib
from pneumo_dist import console
from pneumo_dist.errors import PneumoDistError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    config_lib.add_config_arguments(parser, example="train.epochs=3")
    parser.add_argument("--local", action="store_true", help="debug mode: one process, one device, no Ray")
    parser.add_argument("--max-steps", type=int, help="at most this many training steps per epoch")
    parser.add_argument("--epochs", type=int, help="shortcut for --set train.epochs=N")
    parser.add_argument("--resume", action="store_true", help="continue from the output's last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in the output folder")
    parser.add_argument(
        "--ensemble",
        type=int,
        default=1,
        metavar="K",
        help="train K models (seeds train.seed .. train.seed+K-1, one after another, in OUTPUT/members/) "
        "and export them as one model whose output is their mean logit",
    )
    console.add_verbose_argument(parser)
    args = parser.parse_args(argv)
    if args.ensemble < 1:
        parser.error("--ensemble must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    progress = Progress()
    try:
        return run(args, progress)
    except PneumoDistError as error:
        progress.close()
        print(f"train: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # A checkpoint is complete once its state.json names it (written last), so whatever the
        # interrupted epoch left is ignored by --resume.
        progress.close()
        print(f"\ntrain: {progress.interrupted(args.resume)}", file=sys.stderr)
        return console.INTERRUPTED


class Progress:
    """The console of a run: a live bar per epoch (steps, rate, ETA, loss), a line per finished epoch."""

    def __init__(self):
        self.bar = None
        self.epoch = None  # the epoch under way (0-based, counted over resumes)
        self.checkpointed = None  # the last epoch this process finished: its checkpoint is written

    def interrupted(self, resumed: bool) -> str:
        """What Ctrl-C left and how to go on, in one line."""
        if self.checkpointed is not None:
            return (
                f"interrupted after epoch {self.checkpointed + 1}; its checkpoint is kept; "
                "rerun with --resume to continue"
            )
        if resumed:
            return (
                "interrupted before an epoch ended; rerun with --resume to continue from the same checkpoint"
            )
        if self.epoch is None:
            return "interrupted before training started; rerun the command (with --overwrite)"
        where = f"in epoch {self.epoch + 1}, before any checkpoint"
        return f"interrupted {where}; rerun with --overwrite to start again"

    def on_step(self, epoch: int, step: int, steps: int, loss: float) -> None:
        from tqdm import tqdm

        if step == 0:  # the epoch starts: its bar's clock too, so that the rate is the real one
            self.close()
            self.epoch = epoch
            self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}", unit="step", leave=False, disable=None)
            return
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{loss:.4f}")

    def on_epoch(self, record: dict) -> None:
        self.close()
        self.checkpointed = record["epoch"]
        print(
            f"epoch {record['epoch'] + 1:3d}  loss {record['train_loss']:.4f}  "
            f"val auc {record['val_auc']:.4f}  acc {record['val_accuracy']:.3f}  "
            f"sens {record['val_sensitivity']:.3f}  spec {record['val_specificity']:.3f}  "
            f"{record['images_per_s']:.0f} img/s  lr {record['learning_rate']:.2e}",
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(args: argparse.Namespace, progress: Progress) -> int:
    overrides = list(args.set)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps_per_epoch={args.max_steps}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    # Validated before TensorFlow is even imported: a typo costs a second, not a cluster start.
    config = config_lib.load_config(args.config, overrides)
    console.load_tensorflow(args.verbose)

    from pneumo_dist import distribute, train

    distribute.configure_process(config.train)  # before TensorFlow's first op
    strategy = distribute.choose_strategy(local=args.local, train_cfg=config.train)
    if args.ensemble > 1:
        return _train_ensemble(args, config, strategy, progress)
    result = train.train(
        config,
        strategy,
        resume=args.resume,
        on_step=progress.on_step,
        on_epoch=progress.on_epoch,
        overwrite=args.overwrite,
    )
    metrics = result.val_metrics
    print(
        f"\nbest epoch {result.best_epoch + 1} of {result.epochs_run}"
        f"{' (stopped early)' if result.stopped_early else ''}: validation AUC {result.best_val_auc:.4f}\n"
        f"threshold {result.threshold:.4f} for sensitivity >= {config.train.target_sensitivity}: "
        f"validation sensitivity {metrics['sensitivity']:.3f}, specificity {metrics['specificity']:.3f}, "
        f"accuracy {metrics['accuracy']:.3f}\n"
        f"exported to {result.export_uri} (validation figures; evaluate the test split with evaluate.py)"
    )
    print(next_command(result.export_uri, config.data.manifest_uri))
    return 0


def next_command(export_uri: str, manifest_uri: str) -> str:
    from pneumo_dist import schema

    splits = schema.Manifest.read(schema.manifest_uri_of(manifest_uri)).splits
    split = "test" if "test" in splits else "val"  # (a data set made with --keep-val has no test split)
    return f"next: python jobs/evaluate.py {export_uri} --data {manifest_uri} --split {split}"


def _train_ensemble(args, config, strategy, progress: Progress) -> int:
    from pneumo_dist import ensemble

    def on_member(index: int, member) -> None:
        print(f"\nmember {index + 1} of {args.ensemble}: seed {member.train.seed}, {member.train.output_uri}")

    exported = ensemble.train_ensemble(
        config,
        args.ensemble,
        strategy,
        resume=args.resume,
        overwrite=args.overwrite,
        on_member=on_member,
        on_step=progress.on_step,
        on_epoch=progress.on_epoch,
    )
    metrics = exported.val_metrics
    print(
        f"\nensemble of {args.ensemble}: validation AUC {metrics['auc']:.4f}; "
        f"threshold {exported.threshold:.4f}: validation sensitivity {metrics['sensitivity']:.3f}, "
        f"specificity {metrics['specificity']:.3f}\n"
        f"exported to {exported.uri} (validation figures; evaluate the test split with evaluate.py)"
    )
    print(next_command(exported.uri, config.data.manifest_uri))
    return 0


if __name__ == "__main__":
    sys.exit(main())
