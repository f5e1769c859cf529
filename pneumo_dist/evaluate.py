"""The evaluation report of an exported model on one split: scores, metrics with bootstrap intervals,
calibration, plots, Grad-CAM examples, as JSON + CSV + PNG + one self-contained HTML page.

jobs/evaluate.py is the command line; each step here is a function of arrays, the I/O is at the end.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from pneumo_dist import data, explain, schema, storage
from pneumo_dist import metrics as metrics_lib
from pneumo_dist import sources as sources_lib
from pneumo_dist.config import DataConfig
from pneumo_dist.errors import PneumoDistError
from pneumo_dist.predict import PneumoniaDetector


class EvaluationError(PneumoDistError):
    """A user's input to the evaluation is wrong; the message names it."""


CASES = ("true_positive", "false_positive", "false_negative", "true_negative")
PLOTS = ("roc.png", "pr.png", "confusion.png", "reliability.png", "gradcam.png")
POLICY_COLUMNS = ("sensitivity", "specificity", "accuracy", "precision")
SUBGROUP_METRICS = ("sensitivity", "specificity", "auc")


@dataclass(frozen=True)
class Scores:
    labels: np.ndarray  # 0 NORMAL, 1 PNEUMONIA
    probabilities: np.ndarray  # P(PNEUMONIA)
    sources: list[str]  # each record's source path, in the split's order
    # Each record's data.RECORD_ATTRIBUTES (subtype, sex, age_band, ...): name -> values, "" unknown.
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
    attributes = {name: [] for name in data.RECORD_ATTRIBUTES}
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


def member_report(scores: Scores, members: list, resamples: int = 2000, seed: int = 0) -> list[dict]:
    """Each ensemble member's own figures on the split (its uncalibrated scores; AUC with its 95%
    interval, ECE), beside the ensemble's: what averaging bought. `members`: the export's Members."""
    if scores.members is None:
        return []
    rows = []
    for member, column in zip(members, scores.members.T, strict=True):
        interval = metrics_lib.bootstrap_intervals(scores.labels, column, [0.5], resamples, seed=seed)[0]
        figures = metrics_lib.binary_metrics(scores.labels, column)
        rows.append(
            dataclasses.asdict(member)
            | {
                "auc": {"value": figures["auc"], "ci95": interval["auc"]},
                "ece": {"value": figures["ece"], "ci95": interval["ece"]},
            }
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


def metrics_report(
    scores: Scores,
    threshold: float,
    resamples: int = 2000,
    seed: int = 0,
    policies: dict[str, float] | None = None,
) -> dict:
    """Point estimates with 95% intervals at 0.5, at the operating threshold and at each threshold
    policy's threshold (`policies`: name -> threshold, chosen on validation), plus calibration."""
    policies = policies or {}
    thresholds = [0.5, threshold, *policies.values()]
    intervals = metrics_lib.bootstrap_intervals(
        scores.labels, scores.probabilities, thresholds, resamples, seed=seed
    )

    def operating_point(value: float, interval: dict) -> dict:
        point = metrics_lib.binary_metrics(scores.labels, scores.probabilities, value)
        return {
            "threshold": value,
            "metrics": {
                m: {"value": point[m], "ci95": list(interval[m])} for m in metrics_lib.INTERVAL_METRICS
            },
            "confusion": {
                k: point[k]
                for k in ("true_positives", "false_positives", "true_negatives", "false_negatives")
            },
        }

    points = [operating_point(value, interval) for value, interval in zip(thresholds, intervals, strict=True)]
    report = {
        "at_0.5": points[0],
        "at_threshold": points[1],
        "policies": dict(zip(policies, points[2:], strict=True)),
    }
    report["calibration"] = {
        "ece": metrics_lib.expected_calibration_error(scores.labels, scores.probabilities),
        "bins": metrics_lib.reliability_bins(scores.labels, scores.probabilities),
    }
    report["bootstrap"] = {"resamples": resamples, "seed": seed, "method": "class-stratified percentile"}
    return report


def subgroup_report(scores: Scores, threshold: float, resamples: int = 2000, seed: int = 0) -> dict:
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
            report[attribute][value] = {
                "count": len(indices),
                "positives": int(labels.sum()),
                "negatives": int(len(labels) - labels.sum()),
                **{m: {"value": point[m], "ci95": list(interval[m])} for m in SUBGROUP_METRICS},
            }
    return report


def headline(operating_point: dict, separator: str = ", ") -> str:
    """ "auc 0.991 [0.976, 1.000], accuracy ..." for one operating point of metrics_report."""
    metrics = operating_point["metrics"]
    return separator.join(
        f"{m} {metrics[m]['value']:.3f} [{metrics[m]['ci95'][0]:.3f}, {metrics[m]['ci95'][1]:.3f}]"
        for m in ("auc", "accuracy", "sensitivity", "specificity")
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


def plot_roc(scores: Scores, report: dict) -> bytes:
    fpr, tpr, _ = roc_curve(scores.labels, scores.probabilities)
    auc = report["at_0.5"]["metrics"]["auc"]
    figure = Figure(figsize=(5, 5))
    axes = figure.subplots()
    axes.plot(fpr, tpr, label=f"ROC, AUC {auc['value']:.3f} [{auc['ci95'][0]:.3f}, {auc['ci95'][1]:.3f}]")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    _mark_operating_points(axes, report, lambda m: (1 - m["specificity"]["value"], m["sensitivity"]["value"]))
    _finish(axes, "1 - specificity (false positive rate)", "sensitivity", "ROC")
    return _png(figure)


def plot_precision_recall(scores: Scores, report: dict) -> bytes:
    precision, recall, _ = precision_recall_curve(scores.labels, scores.probabilities)
    pr_auc = report["at_0.5"]["metrics"]["pr_auc"]
    figure = Figure(figsize=(5, 5))
    axes = figure.subplots()
    axes.plot(recall, precision, label=f"PR, AP {pr_auc['value']:.3f}")
    axes.axhline(scores.labels.mean(), color="grey", linestyle=":", linewidth=1, label="prevalence")
    _mark_operating_points(axes, report, lambda m: (m["sensitivity"]["value"], m["precision"]["value"]))
    _finish(axes, "recall (sensitivity)", "precision", "Precision-recall")
    return _png(figure)


def plot_confusion(report: dict) -> bytes:
    figure = Figure(figsize=(9, 4))
    panels = figure.subplots(1, 2)
    for axes, name in zip(panels, ("at_0.5", "at_threshold"), strict=True):
        counts = report[name]["confusion"]
        matrix = np.array(
            [
                [counts["true_negatives"], counts["false_positives"]],
                [counts["false_negatives"], counts["true_positives"]],
            ]
        )
        axes.imshow(matrix, cmap="Blues")
        for (row, column), count in np.ndenumerate(matrix):
            color = "white" if count > matrix.max() / 2 else "black"
            axes.text(column, row, str(count), ha="center", va="center", color=color, fontsize=14)
        axes.set_xticks([0, 1], [f"pred {c}" for c in schema.CLASS_NAMES])
        axes.set_yticks([0, 1], [f"true {c}" for c in schema.CLASS_NAMES])
        axes.set_title(f"threshold {report[name]['threshold']:.3f}")
    figure.tight_layout()
    return _png(figure)


def plot_reliability(report: dict) -> bytes:
    """The reliability curve above, the images per bin as bars below: counts never cover the points."""
    rows = report["calibration"]["bins"]
    bins = [b for b in rows if b["count"]]
    figure = Figure(figsize=(5, 6))
    curve, counts = figure.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    curve.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfectly calibrated")
    curve.plot(
        [b["mean_probability"] for b in bins],
        [b["positive_fraction"] for b in bins],
        "o-",
        label=f"model, ECE {report['calibration']['ece']:.3f}",
    )
    curve.set_ylabel("share with PNEUMONIA")
    curve.set_title("Reliability")
    curve.set_ylim(-0.01, 1.01)
    curve.legend(loc="upper left", fontsize=8)
    curve.grid(alpha=0.3)
    width = rows[0]["high"] - rows[0]["low"]
    counts.bar(
        [b["low"] + width / 2 for b in rows], [b["count"] for b in rows], width=0.9 * width, color="#8fb3e8"
    )
    for b in bins:
        counts.annotate(
            str(b["count"]), (b["low"] + width / 2, b["count"]), ha="center", va="bottom", fontsize=7
        )
    counts.set_xlabel("stated P(PNEUMONIA)")
    counts.set_ylabel("images")
    counts.set_xlim(-0.01, 1.01)
    counts.set_ylim(0, max(b["count"] for b in rows) * 1.3 + 1)
    figure.tight_layout()
    return _png(figure)


def plot_grad_cam(examples: dict[str, list[tuple[np.ndarray, np.ndarray, float, str]]]) -> bytes:
    """examples: case -> [(pixels (S, S, 1), map (S, S), probability, source)]."""
    columns = max([len(rows) for rows in examples.values()] + [1])
    figure = Figure(figsize=(2.8 * columns + 0.8, 3.1 * len(CASES)))
    grid = figure.subplots(len(CASES), columns, squeeze=False)
    shown = None
    for row, case in enumerate(CASES):
        for column in range(columns):
            axes = grid[row][column]
            axes.axis("off")
            if column >= len(examples.get(case, [])):
                continue
            pixels, heat, probability, source = examples[case][column]
            axes.imshow(pixels[..., 0], cmap="gray", vmin=0, vmax=255)
            shown = axes.imshow(heat, cmap="jet", alpha=0.35, vmin=0, vmax=1)
            name = os.path.basename(source)
            name = name if len(name) <= 22 else "..." + name[-19:]
            axes.set_title(f"{case.replace('_', ' ')}\np = {probability:.3f}\n{name}", fontsize=9)
    if shown is not None:  # the scale of the overlay's colours, drawn opaque
        scale = ScalarMappable(norm=Normalize(0, 1), cmap="jet")
        bar = figure.colorbar(scale, ax=grid.ravel().tolist(), shrink=0.5, pad=0.02)
        bar.set_label("evidence for the decision (relative)")
        bar.set_ticks([0, 0.5, 1], labels=["none", "", "strongest"])
    return _png(figure)


def _mark_operating_points(axes, report: dict, point) -> None:
    """The model at 0.5 (a large open circle) and at its operating threshold (a small filled square),
    each at `point(metrics) -> (x, y)`: both stay visible where they coincide."""
    styles = {
        "at_0.5": {"marker": "o", "markersize": 13, "markerfacecolor": "none", "markeredgewidth": 2},
        "at_threshold": {"marker": "s", "markersize": 6},
    }
    for name, style in styles.items():
        x, y = point(report[name]["metrics"])
        suffix = " (operating)" if name == "at_threshold" else ""
        axes.plot(x, y, linestyle="none", label=f"threshold {report[name]['threshold']:.3f}{suffix}", **style)


def _finish(axes, xlabel: str, ylabel: str, title: str) -> None:
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(alpha=0.3)


def _png(figure: Figure) -> bytes:
    # A Figure made without pyplot draws with Agg and is freed with its last reference: no display, no
    # global backend switch, nothing to close.
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=110)
    return out.getvalue()


# --- files ----------------------------------------------------------------------------------------------


def predictions_csv(scores: Scores, threshold: float) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["source", "label", "probability", "predicted"])
    for source, label, probability in zip(scores.sources, scores.labels, scores.probabilities, strict=True):
        predicted = schema.CLASS_NAMES[int(probability >= threshold)]
        writer.writerow([source, schema.CLASS_NAMES[label], f"{probability:.6f}", predicted])
    return out.getvalue().encode()


# What each figure means, for the report's glossary and its tables' headings.
GLOSSARY = {
    "sensitivity": ("Sensitivity", "of the images with pneumonia, the share the model calls PNEUMONIA"),
    "specificity": ("Specificity", "of the images without pneumonia, the share the model calls NORMAL"),
    "accuracy": ("Accuracy", "the share of all images called right (depends on how common pneumonia is)"),
    "precision": (
        "Precision",
        "of the images called PNEUMONIA, the share that have it (positive predictive value)",
    ),
    "f1": ("F1", "the harmonic mean of precision and sensitivity"),
    "auc": (
        "AUC",
        "the chance that a random image with pneumonia scores above a random one without: "
        "1 ranks perfectly, 0.5 is chance; it does not depend on the threshold",
    ),
    "pr_auc": ("PR-AUC", "the area under the precision-recall curve (average precision)"),
    "ece": (
        "ECE",
        "expected calibration error: how far the stated probabilities are from the observed "
        "frequencies (0 is perfect; 0.1 means about 10 points off)",
    ),
}
# What a subgroup's attribute is, in words.
SUBGROUP_NAMES = {
    "subtype": "kind of pneumonia (bacterial, viral, or the data set's own class)",
    "acquisition": "batch of images by file name (Kaggle: IM-* and NORMAL2-IM-* are normal X-rays from "
    "different batches, person* the pneumonia X-rays)",
    "sex": "sex, from the CSV or the DICOM header",
    "age_band": "age in ten-year bands",
    "site": "site the image came from",
    "scanner": "scanner model",
}
WIDE_PLOTS = ("confusion.png", "gradcam.png")  # a row of the report's grid each
# What each plot shows and how to read it.
CAPTIONS = {
    "roc.png": "ROC curve: each point is one threshold, sensitivity against the share of normal images "
    "flagged. The closer to the top-left corner, the better; the dotted diagonal is chance. Markers: "
    "the model at threshold 0.5 (open circle) and at its operating threshold (filled square).",
    "pr.png": "Precision-recall curve: of the images called PNEUMONIA, how many have it, as more are "
    "found. The dotted line is the share of pneumonia in this split.",
    "confusion.png": "Counts of images by true class (rows) and predicted class (columns), at 0.5 and at "
    "the operating threshold.",
    "reliability.png": "Calibration: images grouped by their stated probability; for each group the share "
    "that had pneumonia. Points on the diagonal are well calibrated; the bars below count the images "
    "in each group.",
    "gradcam.png": "Grad-CAM: where in each image the evidence for the model's decision lies (red strong, "
    "blue none), for its most confident correct and wrong calls. Evidence outside the lungs (text, "
    "markers, borders) is a warning sign.",
}


def html_page(summary: dict, plots: dict[str, bytes]) -> bytes:
    """One file with everything in it (the PNGs inlined, so it can be mailed or attached): a plain
    summary, the figures with intervals, subgroups, ensemble members, robustness, plots with captions
    and a glossary."""
    model, dataset = summary["model"], summary["data"]
    fields = {**model, **dataset, "created_utc": summary["created_utc"]}
    escaped = {key: html.escape(str(value)) for key, value in fields.items()}
    bootstrap = summary["bootstrap"]
    images = "".join(
        f"<figure{' class=wide' if name in WIDE_PLOTS else ''}>"
        f"<img src='data:image/png;base64,{base64.b64encode(content).decode()}' alt='{name}'>"
        f"<figcaption>{html.escape(CAPTIONS.get(name, name))}</figcaption></figure>"
        for name, content in plots.items()
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>pneumo-dist evaluation: {escaped["split"]}</title>
<style>{_CSS}</style></head><body>
<h1>Evaluation on the {escaped["split"]} split</h1>
{_warnings(dataset)}
{_plain_summary(summary)}
<p>Model <code>{escaped["uri"]}</code> (version {escaped["version"]}), {escaped["image_size_px"]} px.
Data <code>{escaped["manifest_uri"]}</code>: {dataset["count"]} images, {dataset["positives"]} PNEUMONIA,
{dataset["negatives"]} NORMAL. Test-time augmentation: {summary["tta_views"]} view(s). Intervals: 95%,
{bootstrap["method"]} bootstrap, {bootstrap["resamples"]} resamples.</p>
<h2>Figures</h2>
{_metrics_table(summary)}
{_policy_table(summary)}
{_calibration_text(summary)}
{_member_table(summary)}
{_subgroup_table(summary)}
{_robustness_section(summary.get("robustness"))}
{_drift_text(summary.get("drift"))}
<h2>Plots</h2>
<div class=plots>{images}</div>
{_glossary()}
<p class=small>Generated {escaped["created_utc"]} by pneumo-dist; every number in metrics.json, per-image
scores in predictions.csv.</p></body></html>
""".encode()


def _warnings(dataset: dict) -> str:
    warning = ""
    if dataset["split"] != "test":
        warning = (
            f"<p class=warn>These are <b>{html.escape(dataset['split'])}</b> figures. Validation figures "
            "flatter on chest X-rays (the test images differ from the training pool): judge a model on the "
            "test split.</p>"
        )
    if not dataset["preprocessing_matches_training"]:
        warning += (
            "<p class=warn>These shards were stored at another size or encoding than the training "
            "shards: the model sees slightly different pixels than in training.</p>"
        )
    return warning


def _plain_summary(summary: dict) -> str:
    """At the operating threshold, in counts of 100: what a clinician asks first."""
    point = summary["at_threshold"]["metrics"]
    sens, spec, auc = point["sensitivity"], point["specificity"], point["auc"]

    def per_100(figure: dict, complement: bool = False) -> str:
        value, (low, high) = figure["value"], figure["ci95"]
        if complement:
            value, low, high = 1 - value, 1 - high, 1 - low
        return f"<b>{round(100 * value)}</b> (95% interval {round(100 * low)}-{round(100 * high)})"

    return (
        "<div class=summary><p>At its operating threshold "
        f"({summary['model']['threshold']:.3f}), on this split: of 100 images with pneumonia, the model "
        f"finds {per_100(sens)}; of 100 images without pneumonia, it flags {per_100(spec, True)} as "
        f"pneumonia. Its ranking (AUC) is {auc['value']:.3f} ({auc['ci95'][0]:.3f}-{auc['ci95'][1]:.3f}). "
        "These are figures on the images of this split; on images from another hospital or machine they "
        "can be lower (see Robustness, where measured).</p></div>"
    )


def _metrics_table(summary: dict) -> str:
    """The figures at 0.5 and at the operating threshold; one column when the two thresholds agree."""
    names = ["at_threshold"]
    if abs(summary["at_0.5"]["threshold"] - summary["at_threshold"]["threshold"]) > 1e-9:
        names.insert(0, "at_0.5")
    heads = "".join(
        f"<th>threshold {summary[n]['threshold']:.3f}{' (operating)' if n == 'at_threshold' else ''}</th>"
        for n in names
    )
    rows = "".join(
        f"<tr><th title='{html.escape(GLOSSARY[m][1])}'>{GLOSSARY[m][0]}</th>"
        + "".join(_figure_cell(summary[n]["metrics"][m]) for n in names)
        + "</tr>"
        for m in metrics_lib.INTERVAL_METRICS
    )
    return f"<table><tr><th></th>{heads}</tr>{rows}</table>"


def _policy_table(summary: dict) -> str:
    """Each threshold policy's figures; policies with the same threshold share a row."""
    groups: dict[float, list[str]] = {}
    for name, point in summary["policies"].items():
        groups.setdefault(round(point["threshold"], 9), []).append(name)
    if not groups:
        return ""
    operating = round(summary["model"]["threshold"], 9)
    rows = ""
    for threshold, names in groups.items():
        point = summary["policies"][names[0]]
        label = " = ".join(html.escape(n) for n in names) + (" (operating)" if threshold == operating else "")
        cells = "".join(_figure_cell(point["metrics"][m]) for m in POLICY_COLUMNS)
        rows += f"<tr><th>{label}</th><td>{point['threshold']:.4f}</td>{cells}</tr>"
    heads = "".join(f"<th>{GLOSSARY[m][0]}</th>" for m in POLICY_COLUMNS)
    return (
        "<p>Thresholds of each policy, chosen on the validation split (sensitivity: the highest reaching the "
        "target sensitivity there; youden: the largest sensitivity + specificity - 1; prevalence: the fewest "
        "expected errors at the deployment's prevalence):</p><table><tr><th>policy</th><th>threshold</th>"
        f"{heads}</tr>{rows}</table>"
    )


def _calibration_text(summary: dict) -> str:
    model, calibration = summary["model"], summary["calibration"]
    source = "chosen on the validation split for sensitivity &ge; " + html.escape(
        str(model["target_sensitivity"])
    )
    if model["threshold_source"] != "validation":
        source = "given by the user"
    elif model.get("threshold_policy") not in (None, "sensitivity"):
        source = f"chosen on the validation split by the {html.escape(str(model['threshold_policy']))} policy"
    if model.get("calibration"):
        fitted = model["calibration"]
        method = html.escape(fitted.get("method", "platt"))
        calibrated = (
            f"Probabilities calibrated on the validation split ({method}: "
            f"slope {fitted['slope']:.3f}, intercept {fitted['intercept']:.3f}): calibrated on images like "
            "the training pool's, they can be overconfident on images that differ."
        )
    else:
        calibrated = "Probabilities as the model gives them (not calibrated)."
    return (
        f"<p>Operating threshold {model['threshold']:.4f}, {source}. {calibrated} Expected calibration error "
        f"on this split ({len(calibration['bins'])} bins): {calibration['ece']:.4f}. Grad-CAM maps show the "
        "evidence for the predicted class at the operating threshold.</p>"
    )


def _member_table(summary: dict) -> str:
    rows = "".join(
        f"<tr><th>{index}</th><td><code>{html.escape(member['source'])}</code></td>"
        f"<td>{html.escape(member['model_version'])}</td>"
        + _figure_cell(member["auc"])
        + _figure_cell(member["ece"])
        + "</tr>"
        for index, member in enumerate(summary.get("members", []))
    )
    if not rows:
        return ""
    return (
        "<h2>Ensemble</h2><p>The model's probability is the sigmoid of its members' mean logit. Each member "
        f"alone on this split (its own scores, uncalibrated; the ensemble's AUC is "
        f"{summary['at_threshold']['metrics']['auc']['value']:.3f}):</p><table><tr><th>member</th>"
        f"<th>trained as</th><th>version</th><th>AUC</th><th>ECE</th></tr>{rows}</table>"
    )


def _subgroup_table(summary: dict) -> str:
    subgroups = summary.get("subgroups", {})
    rows = "".join(
        f"<tr><th>{html.escape(attribute)} = {html.escape(value)}</th><td>{group['count']} "
        f"({group['positives']} / {group['negatives']})</td>"
        + "".join(_figure_cell(group[m]) for m in SUBGROUP_METRICS)
        + "</tr>"
        for attribute, groups in subgroups.items()
        for value, group in groups.items()
    )
    if not rows:
        return ""
    explained = "; ".join(
        f"<b>{html.escape(a)}</b>: {html.escape(SUBGROUP_NAMES.get(a, a))}" for a in subgroups
    )
    heads = "".join(f"<th>{GLOSSARY[m][0]}</th>" for m in SUBGROUP_METRICS)
    return (
        "<h2>Subgroups</h2><p>At the operating threshold; an overall figure can hide one group's errors "
        f"(a dash: the group lacks the class the figure needs). {explained}.</p>"
        f"<table><tr><th>group</th><th>images (PNEUMONIA / NORMAL)</th>{heads}</tr>{rows}</table>"
    )


def _drift_text(drift: dict | None) -> str:
    if not drift:
        return ""
    return (
        f"<p{' class=warn' if drift['verdict'] != 'stable' else ''}>Drift: the {drift['actual_count']} "
        f"scored images of <code>{html.escape(drift['scores_uri'])}</code> against this split's "
        f"{drift['expected_count']}: population stability index {drift['psi']:.3f}, "
        f"{html.escape(drift['verdict'])} (below 0.1 stable, above 0.25 a shift to act on).</p>"
    )


def _glossary() -> str:
    terms = "".join(f"<dt>{name}</dt><dd>{html.escape(text)}</dd>" for name, text in GLOSSARY.values())
    return (
        "<h2>Glossary</h2><dl>"
        f"{terms}<dt>Threshold</dt><dd>the probability at or above which an image is called PNEUMONIA</dd>"
        "<dt>95% interval</dt><dd>the range the figure would likely fall in on another sample of images "
        "like these (bootstrap); it does not cover images unlike these</dd></dl>"
    )


def _robustness_section(robustness: dict | None) -> str:
    """The shift benchmark's table, or nothing when it was not run."""
    if not robustness:
        return ""
    rows = "".join(
        f"<tr><th>{html.escape(name.replace('_', ' '))}</th>"
        + "".join(_figure_cell(figures[m]) for m in ("auc", "sensitivity", "specificity", "ece"))
        + "</tr>"
        for name, figures in robustness["shifts"].items()
    )
    summary = robustness["summary"]
    worst = html.escape(summary["worst_specificity_shift"])
    return (
        "<h2>Robustness</h2><p>The same images changed the way images from other X-ray machines and "
        "settings differ (exposure, contrast, sharpness, noise, compression, resolution, positioning, "
        "burnt-in text, a frame, a narrow gray range; seed "
        f"{robustness['seed']}), at the operating threshold. Mean AUC under these changes "
        f"{summary['mean_auc']:.3f} (worst {summary['worst_auc']:.3f}); the lowest specificity, "
        f"{summary['worst_specificity']:.3f}, under <b>{worst}</b>. "
        "A model whose figures fall far here will likely fall on another hospital's images too; "
        "figures that hold here are no proof that they will.</p><table><tr><th>change</th><th>AUC</th>"
        f"<th>Sensitivity</th><th>Specificity</th><th>ECE</th></tr>{rows}</table>"
    )


def _figure_cell(figure: dict) -> str:
    value, (low, high) = figure["value"], figure["ci95"]
    if value is None or not np.isfinite(value):  # e.g. precision with no positive prediction
        return "<td>-</td>"
    return f"<td>{value:.3f} [{low:.3f}, {high:.3f}]</td>"


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:1.5em 2.5em;line-height:1.45;color:#222}"
    " table{border-collapse:collapse;margin:0.6em 0} td,th{padding:3px 12px;text-align:right;"
    "border-bottom:1px solid #e4e4e4} th:first-child{text-align:left} .warn{background:#fff3cd;padding:8px}"
    " .summary{background:#eef5ff;padding:4px 16px;border-left:5px solid #2a6fdb;font-size:1.15em}"
    " .plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:16px}"
    " figure{margin:0} figure.wide{grid-column:1/-1} img{max-width:100%}"
    " figcaption{font-size:0.92em;color:#444}"
    " dt{font-weight:bold;margin-top:6px} dd{margin-left:1.5em} .small{font-size:0.85em;color:#666}"
)


def write_report(out_uri: str, summary: dict, plots: dict[str, bytes], predictions: bytes) -> None:
    """Write every file to a local folder or gs:// prefix; report.html last, so that its presence
    means the report is complete."""
    files = {
        **plots,
        "predictions.csv": predictions,
        "metrics.json": json.dumps(_json_safe(summary), indent=1).encode(),
    }
    for name, content in files.items():
        storage.write_bytes(storage.join(out_uri, name), content)
    storage.write_bytes(storage.join(out_uri, "report.html"), html_page(summary, plots))


def _json_safe(value):
    """NaN (e.g. precision when nothing is predicted positive) -> null: strict JSON has no NaN."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


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
) -> dict:
    """Score `split`, compute the figures and, when out_uri is given, write the report there.
    `drift_scores` (where from, probabilities: read_scores): a scored batch whose distribution of
    probabilities is compared with this split's (metrics.population_stability). `shift_seed`: add the
    shift benchmark (shift.py) of the split, seeded so, as "robustness"."""
    data_config = split_data_config(detector, manifest_uri, batch_size)
    dataset = data.open_dataset(data_config)
    scores = score_split(detector, data_config, dataset, split, tta_views, on_batch)
    stored = dataset.manifest.image
    summary = {
        "model": {
            "uri": detector.uri,
            "version": detector.version,
            "image_size_px": detector.image_size_px,
            "threshold": detector.threshold,
            "threshold_source": detector.threshold_source,
            "threshold_policy": detector.policy,
            "calibration": dataclasses.asdict(detector.calibration) if detector.calibration else None,
            "target_sensitivity": detector.info.target_sensitivity or "unknown",
        },
        "data": {
            "manifest_uri": manifest_uri,
            "split": split,
            "count": len(scores.labels),
            "positives": int(scores.labels.sum()),
            "negatives": int(len(scores.labels) - scores.labels.sum()),
            # False: these shards were stored differently from the training ones (size or encoding), so
            # the model sees slightly different pixels than a PneumoniaDetector.predict of the sources.
            "preprocessing_matches_training": (stored.stored_size_px, stored.format)
            == (detector.stored_size_px, detector.image_format),
        },
        "tta_views": tta_views,
        "created_utc": storage.utc_timestamp(),
    } | metrics_report(scores, detector.threshold, resamples, policies=detector.operating_points)
    summary["subgroups"] = subgroup_report(scores, detector.threshold, resamples)
    summary["members"] = member_report(scores, detector.info.members, resamples)
    if shift_seed is not None:
        from pneumo_dist import shift

        summary["robustness"] = shift.score_shifts(
            detector, dataset.manifest_uri, split, shift_seed, min(resamples, 1000)
        ).report
    if drift_scores is not None:
        scores_uri, probabilities = drift_scores
        summary["drift"] = {"scores_uri": scores_uri} | metrics_lib.population_stability(
            scores.probabilities, probabilities
        )
    if out_uri is None:
        return summary
    plots = {
        "roc.png": plot_roc(scores, summary),
        "pr.png": plot_precision_recall(scores, summary),
        "confusion.png": plot_confusion(summary),
        "reliability.png": plot_reliability(summary),
    }
    if gradcam_per_case > 0:
        cases = confident_cases(scores, detector.threshold, gradcam_per_case)
        pixels = split_images(data_config, dataset, split, [i for chosen in cases.values() for i in chosen])
        examples = {}
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
        summary["gradcam"] = {case: [scores.sources[i] for i in chosen] for case, chosen in cases.items()}
        plots["gradcam.png"] = plot_grad_cam(examples)
    write_report(out_uri, summary, plots, predictions_csv(scores, detector.threshold))
    return summary
