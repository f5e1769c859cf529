"""The evaluation of an exported model on one split: scores, metrics with bootstrap intervals,
calibration, subgroups, ensemble members, robustness, Grad-CAM examples, written as JSON + CSV + PNG +
one self-contained HTML page (the figures' types: evaluation_summary.py; the page and the plots:
report.py).

jobs/evaluate.py is the command line; each step here is a function of arrays, the I/O is at the end.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np

from pneumo_dist import data, decode, explain, report, schema, storage
from pneumo_dist import metrics as metrics_lib
from pneumo_dist import sources as sources_lib
from pneumo_dist.config import DataConfig
from pneumo_dist.errors import PneumoDistError
from pneumo_dist.evaluation_summary import (
    CalibrationFigures,
    Evaluation,
    GroupFigures,
    MemberFigures,
    ModelSummary,
    OperatingPoint,
    SplitSummary,
)
from pneumo_dist.export import Member
from pneumo_dist.metrics import Estimate
from pneumo_dist.predict import PneumoniaDetector
from pneumo_dist.report import CASES, PLOTS, SUBGROUP_METRICS  # noqa: F401 - PLOTS: the report's files


class EvaluationError(PneumoDistError):
    """A user's input to the evaluation is wrong; the message names it."""


@dataclass(frozen=True)
class Scores:
    labels: np.ndarray  # 0 NORMAL, 1 PNEUMONIA
    probabilities: np.ndarray  # P(PNEUMONIA)
    sources: list[str]  # each record's source path, in the split's order
    # Each record's decode.RECORD_ATTRIBUTES (subtype, sex, age_band, ...): name -> values, "" unknown.
    attributes: dict[str, list[str]] = field(default_factory=dict)
    # An ensemble export's members' own P(PNEUMONIA), (N, k), uncalibrated; None: one model, or TTA.
    members: np.ndarray | None = None


def _attribute(name: str):
    return lambda scores, index: scores.attributes[name][index] if name in scores.attributes else ""


# The attributes evaluation reports figures by, each record's value from its record attributes and
# source name (a value of "" is left out; an attribute with fewer than two values is not reported).
SUBGROUPS = {
    "subtype": _attribute("subtype"),
    "acquisition": lambda scores, index: sources_lib.acquisition_group(
        os.path.basename(scores.sources[index])
    ),
    "sex": _attribute("sex"),
    "age_band": _attribute("age_band"),
    "site": _attribute("site"),
    "scanner": _attribute("scanner"),
}


def split_data_config(detector: PneumoniaDetector, manifest_uri: str, batch_size: int) -> DataConfig:
    # A gs:// dataset is staged (downloaded once, verified); TensorFlow's own gs:// reader is not ours.
    read_mode = "stage" if storage.is_gcs(manifest_uri) else "stream"
    return DataConfig(
        manifest_uri=manifest_uri,
        image_size_px=detector.image_size_px,
        equalize=detector.info.preprocessing.equalize,
        border_crop=detector.info.preprocessing.border_crop,
        global_batch_size=batch_size,
        cache="none",
        read_mode=read_mode,
    )


def score_split(
    detector: PneumoniaDetector,
    data_config: DataConfig,
    dataset: data.Dataset,
    split: str,
    tta_views: int = 1,
    on_batch=None,
) -> Scores:
    """Every record of `split`, once, in order. `on_batch(done, total)` reports progress."""
    dataset.shards(split)  # a missing split raises here, naming the splits there are
    total = dataset.records(split)
    labels, probabilities, sources, members = [], [], [], []
    attributes = {name: [] for name in decode.RECORD_ATTRIBUTES}
    for batch in data.eval_dataset(data_config, dataset, split, with_source=True):
        if tta_views == 1:
            scored, by_member = detector.probabilities_and_members(batch["image"])
            probabilities.append(scored)
            members += [] if by_member is None else [by_member]
        else:  # members are reported without TTA only
            probabilities.append(detector.probabilities(batch["image"], tta_views))
        labels.append(batch["label"].numpy())
        sources += [s.decode() for s in batch["source"].numpy()]
        for name, values in attributes.items():
            values += [value.decode() for value in batch[name].numpy()]
        if on_batch:
            on_batch(len(sources), total)
    labels = np.concatenate(labels).astype(np.int64)
    members = np.concatenate(members) if members else None
    return Scores(labels, np.concatenate(probabilities), sources, attributes, members)


def member_report(
    scores: Scores, members: list[Member], resamples: int = 2000, seed: int = 0
) -> list[MemberFigures]:
    """Each ensemble member's own figures on the split (its uncalibrated scores; AUC with its 95%
    interval, ECE), beside the ensemble's: what averaging bought. `members`: the export's Members."""
    if scores.members is None:
        return []
    rows = []
    for member, column in zip(members, scores.members.T, strict=True):
        interval = metrics_lib.bootstrap_intervals(scores.labels, column, [0.5], resamples, seed=seed)[0]
        figures = metrics_lib.binary_metrics(scores.labels, column)
        rows.append(
            MemberFigures(
                member,
                auc=Estimate(figures["auc"], tuple(interval["auc"])),
                ece=Estimate(figures["ece"], tuple(interval["ece"])),
            )
        )
    return rows


def split_images(
    data_config: DataConfig, dataset: data.Dataset, split: str, indices: list[int]
) -> dict[int, np.ndarray]:
    """The prepared pixels of the records at `indices` (positions in the split's order)."""
    wanted, found = set(indices), {}
    position = 0
    for batch in data.eval_dataset(data_config, dataset, split):
        for image in batch["image"].numpy():
            if position in wanted:
                found[position] = image
            position += 1
        if len(found) == len(wanted):
            break
    return found


def operating_points(
    scores: Scores,
    thresholds: list[float],
    resamples: int = 2000,
    seed: int = 0,
) -> list[OperatingPoint]:
    """Point estimates with 95% intervals at each of `thresholds`."""
    intervals = metrics_lib.bootstrap_intervals(
        scores.labels, scores.probabilities, thresholds, resamples, seed=seed
    )

    points = []
    for value, interval in zip(thresholds, intervals, strict=True):
        point = metrics_lib.binary_metrics(scores.labels, scores.probabilities, value)
        estimates = {m: Estimate(point[m], tuple(interval[m])) for m in metrics_lib.INTERVAL_METRICS}
        confusion = {
            k: point[k] for k in ("true_positives", "false_positives", "true_negatives", "false_negatives")
        }
        points.append(OperatingPoint(value, estimates, confusion))
    return points


def subgroup_report(
    scores: Scores, threshold: float, resamples: int = 2000, seed: int = 0
) -> dict[str, dict[str, GroupFigures]]:
    """Per SUBGROUPS attribute and value, at the operating threshold: the counts, and sensitivity,
    specificity and AUC with 95% intervals where the group has the classes they need (a group of one
    class has no AUC; "person" images are all PNEUMONIA). -> {attribute: {value: figures}}"""
    report = {}
    for attribute, value_of in SUBGROUPS.items():
        members: dict[str, list[int]] = {}
        for index in range(len(scores.labels)):
            if value := value_of(scores, index):
                members.setdefault(value, []).append(index)
        if len(members) < 2:
            continue
        report[attribute] = {}
        for value, indices in sorted(members.items()):
            labels, probabilities = scores.labels[indices], scores.probabilities[indices]
            point = metrics_lib.binary_metrics(labels, probabilities, threshold)
            (interval,) = metrics_lib.bootstrap_intervals(
                labels, probabilities, [threshold], resamples, seed=seed
            )
            report[attribute][value] = GroupFigures(
                count=len(indices),
                positives=int(labels.sum()),
                negatives=int(len(labels) - labels.sum()),
                metrics={m: Estimate(point[m], tuple(interval[m])) for m in SUBGROUP_METRICS},
            )
    return report


def headline(point: OperatingPoint, separator: str = ", ") -> str:
    """ "auc 0.991 [0.976, 1.000], accuracy ..." for one operating point."""
    return separator.join(
        f"{m} {point.metrics[m]}" for m in ("auc", "accuracy", "sensitivity", "specificity")
    )


def confident_cases(scores: Scores, threshold: float, per_case: int) -> dict[str, list[int]]:
    """The record indices of the `per_case` most confident true/false positives/negatives."""
    positive = scores.labels == 1
    predicted = scores.probabilities >= threshold
    order = np.argsort(-scores.probabilities, kind="stable")  # most PNEUMONIA first
    members = {
        "true_positive": positive & predicted,
        "false_positive": ~positive & predicted,
        "false_negative": positive & ~predicted,
        "true_negative": ~positive & ~predicted,
    }
    cases = {}
    for case, mask in members.items():
        ranked = [int(i) for i in order if mask[i]]
        cases[case] = ranked[:per_case] if case.endswith("positive") else ranked[::-1][:per_case]
    return cases


# --- plots ----------------------------------------------------------------------------------------------


def predictions_csv(scores: Scores, threshold: float) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["source", "label", "probability", "predicted"])
    for source, label, probability in zip(scores.sources, scores.labels, scores.probabilities, strict=True):
        predicted = schema.CLASS_NAMES[int(probability >= threshold)]
        writer.writerow([source, schema.CLASS_NAMES[label], f"{probability:.6f}", predicted])
    return out.getvalue().encode()


def write_report(out_uri: str, summary: Evaluation, plots: dict[str, bytes], predictions: bytes) -> None:
    """Write every file to a local folder or gs:// prefix; report.html last, so that its presence
    means the report is complete."""
    files = {
        **plots,
        "predictions.csv": predictions,
        "metrics.json": json.dumps(summary.to_dict(), indent=1).encode(),
    }
    for name, content in files.items():
        storage.write_bytes(storage.join(out_uri, name), content)
    storage.write_bytes(storage.join(out_uri, "report.html"), report.html_page(summary, plots))


# --- the whole evaluation -------------------------------------------------------------------------------


def read_scores(uri: str) -> np.ndarray:
    """The probabilities of a scored batch: predict.py's CSV, or --ray's Parquet part or folder of parts
    (local or gs://); rows without a probability (bad images) are left out."""
    import pyarrow.csv
    import pyarrow.parquet

    uri = uri.rstrip("/")
    if uri.endswith((".csv", ".parquet")):
        files = [uri]
    else:
        files = [f.uri for f in storage.list_files(uri) if f.uri.endswith(".parquet")]
        if not files:
            raise EvaluationError(f"--drift {uri}: no predictions CSV and no Parquet parts there")
    values = []
    for file in files:
        try:
            content = io.BytesIO(storage.read_bytes(file))
            # Single-threaded: these files are small, and an error raised while Arrow's reader threads
            # still ran was followed by an abort at exit (rc 134) once in 6 runs.
            table = (
                pyarrow.csv.read_csv(content, read_options=pyarrow.csv.ReadOptions(use_threads=False))
                if file.endswith(".csv")
                else pyarrow.parquet.read_table(content, use_threads=False)
            )
            column = table.column("probability").to_numpy(zero_copy_only=False)
            values.append(np.asarray(column, dtype=np.float64))
        except (KeyError, ValueError, TypeError, OSError) as error:
            raise EvaluationError(
                f"--drift {file}: not a predictions file with a probability column ({error})"
            ) from None
    probabilities = np.concatenate(values)
    probabilities = probabilities[~np.isnan(probabilities)]  # the rows of bad images
    outside = np.flatnonzero((probabilities < 0.0) | (probabilities > 1.0) | ~np.isfinite(probabilities))
    if len(outside):
        raise EvaluationError(
            f"--drift {uri}: {len(outside)} probabilities outside [0, 1] (e.g. {probabilities[outside[0]]}): "
            "not pneumo-dist predictions"
        )
    if not len(probabilities):
        raise EvaluationError(f"--drift {uri}: no scored image (every row has an error)")
    return probabilities


def summarize(
    detector: PneumoniaDetector,
    manifest_uri: str,
    split: str,
    scores: Scores,
    stored: schema.StoredImage,
    tta_views: int,
    resamples: int,
    seed: int = 0,
) -> Evaluation:
    """The figures of a scored split (no robustness, drift or Grad-CAM: run_evaluation adds those).
    `stored`: how the split's shards store their images; `seed`: the bootstraps'."""
    policies = detector.operating_points
    at_half, at_threshold, *at_policies = operating_points(
        scores, [0.5, detector.threshold, *policies.values()], resamples, seed
    )
    return Evaluation(
        model=ModelSummary(
            uri=detector.uri,
            version=detector.version,
            image_size_px=detector.image_size_px,
            threshold=detector.threshold,
            threshold_source=detector.threshold_source,
            threshold_policy=detector.policy,
            calibration=dataclasses.asdict(detector.calibration) if detector.calibration else None,
            target_sensitivity=detector.info.target_sensitivity or "unknown",
        ),
        data=SplitSummary(
            manifest_uri=manifest_uri,
            split=split,
            count=len(scores.labels),
            positives=int(scores.labels.sum()),
            negatives=int(len(scores.labels) - scores.labels.sum()),
            preprocessing_matches_training=(stored.stored_size_px, stored.format)
            == (detector.stored_size_px, detector.image_format),
        ),
        tta_views=tta_views,
        created_utc=storage.utc_timestamp(),
        at_half=at_half,
        at_threshold=at_threshold,
        policies=dict(zip(policies, at_policies, strict=True)),
        calibration=CalibrationFigures(
            ece=metrics_lib.expected_calibration_error(scores.labels, scores.probabilities),
            bins=metrics_lib.reliability_bins(scores.labels, scores.probabilities),
        ),
        bootstrap={"resamples": resamples, "seed": seed, "method": "class-stratified percentile"},
        subgroups=subgroup_report(scores, detector.threshold, resamples, seed),
        members=member_report(scores, detector.info.members, resamples, seed),
    )


def grad_cam_examples(
    detector: PneumoniaDetector,
    data_config: DataConfig,
    dataset: data.Dataset,
    split: str,
    scores: Scores,
    per_case: int,
) -> dict[str, list[tuple[np.ndarray, np.ndarray, float, str]]]:
    """The `per_case` most confident images of each case (true/false positive/negative) with their
    Grad-CAM maps: case -> [(pixels, map, probability, source)], report.plot_grad_cam's input."""
    cases = confident_cases(scores, detector.threshold, per_case)
    pixels = split_images(data_config, dataset, split, [i for chosen in cases.values() for i in chosen])
    examples = {case: [] for case in cases}
    for case, chosen in cases.items():
        if not chosen:
            continue
        batch = np.stack([pixels[i] for i in chosen])
        # The evidence for what the model decided: PNEUMONIA for predicted positives, else NORMAL.
        maps = explain.grad_cam(detector.model, batch, class_index=int(case.endswith("positive")))
        examples[case] = [
            (pixels[i], heat, float(scores.probabilities[i]), scores.sources[i])
            for i, heat in zip(chosen, maps, strict=True)
        ]
    return examples


def run_evaluation(
    detector: PneumoniaDetector,
    manifest_uri: str,
    split: str,
    out_uri: str | None,
    tta_views: int = 1,
    resamples: int = 2000,
    gradcam_per_case: int = 3,
    batch_size: int = 64,
    on_batch=None,
    drift_scores: tuple[str, np.ndarray] | None = None,
    shift_seed: int | None = None,
) -> Evaluation:
    """Score `split`, compute the figures and, when out_uri is given, write the report there.
    `drift_scores` (where from, probabilities: read_scores): a scored batch whose distribution of
    probabilities is compared with this split's (metrics.population_stability). `shift_seed`: add the
    shift benchmark (shift.py) of the split, seeded so, as "robustness"."""
    data_config = split_data_config(detector, manifest_uri, batch_size)
    dataset = data.open_dataset(data_config)
    scores = score_split(detector, data_config, dataset, split, tta_views, on_batch)
    summary = summarize(detector, manifest_uri, split, scores, dataset.manifest.image, tta_views, resamples)
    if shift_seed is not None:
        from pneumo_dist import shift

        summary.robustness = shift.score_shifts(
            detector, dataset.manifest_uri, split, shift_seed, min(resamples, 1000)
        ).report
    if drift_scores is not None:
        scores_uri, probabilities = drift_scores
        summary.drift = {"scores_uri": scores_uri} | metrics_lib.population_stability(
            scores.probabilities, probabilities
        )
    if out_uri is None:
        return summary
    plots = {
        "roc.png": report.plot_roc(scores.labels, scores.probabilities, summary),
        "pr.png": report.plot_precision_recall(scores.labels, scores.probabilities, summary),
        "confusion.png": report.plot_confusion(summary),
        "reliability.png": report.plot_reliability(summary),
    }
    if gradcam_per_case > 0:
        examples = grad_cam_examples(detector, data_config, dataset, split, scores, gradcam_per_case)
        summary.gradcam = {case: [source for *_, source in shown] for case, shown in examples.items()}
        plots["gradcam.png"] = report.plot_grad_cam(examples)
    write_report(out_uri, summary, plots, predictions_csv(scores, detector.threshold))
    return summary
