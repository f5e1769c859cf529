"""The evaluation report's page and plots, made from evaluate.run_evaluation's summary: for a clinician
(a plain summary on top, metric names and a glossary, captions saying how to read each plot) and for an
engineer (every figure with its interval). No I/O here: evaluate.write_report writes the files."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import os

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from pneumo_dist import metrics as metrics_lib
from pneumo_dist import schema
from pneumo_dist.evaluation_summary import Evaluation, SplitSummary

CASES = ("true_positive", "false_positive", "false_negative", "true_negative")
PLOTS = ("roc.png", "pr.png", "confusion.png", "reliability.png", "gradcam.png")
POLICY_COLUMNS = ("sensitivity", "specificity", "accuracy", "precision")
SUBGROUP_METRICS = ("sensitivity", "specificity", "auc")


def plot_roc(labels: np.ndarray, probabilities: np.ndarray, summary: Evaluation) -> bytes:
    fpr, tpr, _ = roc_curve(labels, probabilities)
    figure = Figure(figsize=(5, 5))
    axes = figure.subplots()
    axes.plot(fpr, tpr, label=f"ROC, AUC {summary.at_half.metrics['auc']}")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    _mark_operating_points(axes, summary, lambda m: (1 - m["specificity"].value, m["sensitivity"].value))
    _finish(axes, "1 - specificity (false positive rate)", "sensitivity", "ROC")
    return _png(figure)


def plot_precision_recall(labels: np.ndarray, probabilities: np.ndarray, summary: Evaluation) -> bytes:
    precision, recall, _ = precision_recall_curve(labels, probabilities)
    figure = Figure(figsize=(5, 5))
    axes = figure.subplots()
    axes.plot(recall, precision, label=f"PR, AP {summary.at_half.metrics['pr_auc'].value:.3f}")
    axes.axhline(np.mean(labels), color="grey", linestyle=":", linewidth=1, label="prevalence")
    _mark_operating_points(axes, summary, lambda m: (m["sensitivity"].value, m["precision"].value))
    _finish(axes, "recall (sensitivity)", "precision", "Precision-recall")
    return _png(figure)


def plot_confusion(summary: Evaluation) -> bytes:
    figure = Figure(figsize=(9, 4))
    panels = figure.subplots(1, 2)
    for axes, point in zip(panels, (summary.at_half, summary.at_threshold), strict=True):
        counts = point.confusion
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
        axes.set_title(f"threshold {point.threshold:.3f}")
    figure.tight_layout()
    return _png(figure)


def plot_reliability(summary: Evaluation) -> bytes:
    """The reliability curve above, the images per bin as bars below: counts never cover the points."""
    rows = summary.calibration.bins
    bins = [b for b in rows if b["count"]]
    figure = Figure(figsize=(5, 6))
    curve, counts = figure.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    curve.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfectly calibrated")
    curve.plot(
        [b["mean_probability"] for b in bins],
        [b["positive_fraction"] for b in bins],
        "o-",
        label=f"model, ECE {summary.calibration.ece:.3f}",
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


def _mark_operating_points(axes, summary: Evaluation, where) -> None:
    """The model at 0.5 (a large open circle) and at its operating threshold (a small filled square),
    each at `where(metrics) -> (x, y)`: both stay visible where they coincide."""
    styles = [
        (
            summary.at_half,
            "",
            {"marker": "o", "markersize": 13, "markerfacecolor": "none", "markeredgewidth": 2},
        ),
        (summary.at_threshold, " (operating)", {"marker": "s", "markersize": 6}),
    ]
    for point, suffix, style in styles:
        x, y = where(point.metrics)
        axes.plot(x, y, linestyle="none", label=f"threshold {point.threshold:.3f}{suffix}", **style)


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


def html_page(summary: Evaluation, plots: dict[str, bytes]) -> bytes:
    """One file with everything in it (the PNGs inlined, so it can be mailed or attached): a plain
    summary, the figures with intervals, subgroups, ensemble members, robustness, plots with captions
    and a glossary."""
    model, dataset, bootstrap = summary.model, summary.data, summary.bootstrap
    fields = {**dataclasses.asdict(model), **dataclasses.asdict(dataset), "created_utc": summary.created_utc}
    escaped = {key: html.escape(str(value)) for key, value in fields.items()}
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
Data <code>{escaped["manifest_uri"]}</code>: {dataset.count} images, {dataset.positives} PNEUMONIA,
{dataset.negatives} NORMAL. Test-time augmentation: {summary.tta_views} view(s). Intervals: 95%,
{bootstrap["method"]} bootstrap, {bootstrap["resamples"]} resamples.</p>
<h2>Figures</h2>
{_metrics_table(summary)}
{_policy_table(summary)}
{_calibration_text(summary)}
{_member_table(summary)}
{_subgroup_table(summary)}
{_robustness_section(summary.robustness)}
{_drift_text(summary.drift)}
<h2>Plots</h2>
<div class=plots>{images}</div>
{_glossary()}
<p class=small>Generated {escaped["created_utc"]} by pneumo-dist; every number in metrics.json, per-image
scores in predictions.csv.</p></body></html>
""".encode()


def _warnings(dataset: SplitSummary) -> str:
    warning = ""
    if dataset.split != "test":
        warning = (
            f"<p class=warn>These are <b>{html.escape(dataset.split)}</b> figures. Validation figures "
            "flatter on chest X-rays (the test images differ from the training pool): judge a model on the "
            "test split.</p>"
        )
    if not dataset.preprocessing_matches_training:
        warning += (
            "<p class=warn>These shards were stored at another size or encoding than the training "
            "shards: the model sees slightly different pixels than in training.</p>"
        )
    return warning


def _plain_summary(summary: Evaluation) -> str:
    """At the operating threshold, in counts of 100: what a clinician asks first."""
    point = summary.at_threshold.metrics
    sens, spec, auc = point["sensitivity"], point["specificity"], point["auc"]

    def per_100(figure: metrics_lib.Estimate, complement: bool = False) -> str:
        value, (low, high) = figure.value, figure.ci95
        if complement:
            value, low, high = 1 - value, 1 - high, 1 - low
        return f"<b>{round(100 * value)}</b> (95% interval {round(100 * low)}-{round(100 * high)})"

    return (
        "<div class=summary><p>At its operating threshold "
        f"({summary.model.threshold:.3f}), on this split: of 100 images with pneumonia, the model "
        f"finds {per_100(sens)}; of 100 images without pneumonia, it flags {per_100(spec, True)} as "
        f"pneumonia. Its ranking (AUC) is {auc.value:.3f} ({auc.ci95[0]:.3f}-{auc.ci95[1]:.3f}). "
        "These are figures on the images of this split; on images from another hospital or machine they "
        "can be lower (see Robustness, where measured).</p></div>"
    )


def _metrics_table(summary: Evaluation) -> str:
    """The figures at 0.5 and at the operating threshold; one column when the two thresholds agree."""
    points = [summary.at_threshold]
    if abs(summary.at_half.threshold - summary.at_threshold.threshold) > 1e-9:
        points.insert(0, summary.at_half)
    heads = "".join(
        f"<th>threshold {p.threshold:.3f}{' (operating)' if p is summary.at_threshold else ''}</th>"
        for p in points
    )
    rows = "".join(
        f"<tr><th title='{html.escape(GLOSSARY[m][1])}'>{GLOSSARY[m][0]}</th>"
        + "".join(_figure_cell(p.metrics[m]) for p in points)
        + "</tr>"
        for m in metrics_lib.INTERVAL_METRICS
    )
    return f"<table><tr><th></th>{heads}</tr>{rows}</table>"


def _policy_table(summary: Evaluation) -> str:
    """Each threshold policy's figures; policies with the same threshold share a row."""
    groups: dict[float, list[str]] = {}
    for name, point in summary.policies.items():
        groups.setdefault(round(point.threshold, 9), []).append(name)
    if not groups:
        return ""
    operating = round(summary.model.threshold, 9)
    rows = ""
    for threshold, names in groups.items():
        point = summary.policies[names[0]]
        label = " = ".join(html.escape(n) for n in names) + (" (operating)" if threshold == operating else "")
        cells = "".join(_figure_cell(point.metrics[m]) for m in POLICY_COLUMNS)
        rows += f"<tr><th>{label}</th><td>{point.threshold:.4f}</td>{cells}</tr>"
    heads = "".join(f"<th>{GLOSSARY[m][0]}</th>" for m in POLICY_COLUMNS)
    return (
        "<p>Thresholds of each policy, chosen on the validation split (sensitivity: the highest reaching the "
        "target sensitivity there; youden: the largest sensitivity + specificity - 1; prevalence: the fewest "
        "expected errors at the deployment's prevalence):</p><table><tr><th>policy</th><th>threshold</th>"
        f"{heads}</tr>{rows}</table>"
    )


def _calibration_text(summary: Evaluation) -> str:
    model, calibration = summary.model, summary.calibration
    source = "chosen on the validation split for sensitivity &ge; " + html.escape(
        str(model.target_sensitivity)
    )
    if model.threshold_source != "validation":
        source = "given by the user"
    elif model.threshold_policy not in (None, "sensitivity"):
        source = f"chosen on the validation split by the {html.escape(str(model.threshold_policy))} policy"
    if model.calibration:
        fitted = model.calibration
        method = html.escape(fitted.get("method", "platt"))
        calibrated = (
            f"Probabilities calibrated on the validation split ({method}: "
            f"slope {fitted['slope']:.3f}, intercept {fitted['intercept']:.3f}): calibrated on images like "
            "the training pool's, they can be overconfident on images that differ."
        )
    else:
        calibrated = "Probabilities as the model gives them (not calibrated)."
    return (
        f"<p>Operating threshold {model.threshold:.4f}, {source}. {calibrated} Expected calibration error "
        f"on this split ({len(calibration.bins)} bins): {calibration.ece:.4f}. Grad-CAM maps show the "
        "evidence for the predicted class at the operating threshold.</p>"
    )


def _member_table(summary: Evaluation) -> str:
    rows = "".join(
        f"<tr><th>{index}</th><td><code>{html.escape(row.member.source)}</code></td>"
        f"<td>{html.escape(row.member.model_version)}</td>"
        + _figure_cell(row.auc)
        + _figure_cell(row.ece)
        + "</tr>"
        for index, row in enumerate(summary.members)
    )
    if not rows:
        return ""
    return (
        "<h2>Ensemble</h2><p>The model's probability is the sigmoid of its members' mean logit. Each member "
        f"alone on this split (its own scores, uncalibrated; the ensemble's AUC is "
        f"{summary.at_threshold.metrics['auc'].value:.3f}):</p><table><tr><th>member</th>"
        f"<th>trained as</th><th>version</th><th>AUC</th><th>ECE</th></tr>{rows}</table>"
    )


def _subgroup_table(summary: Evaluation) -> str:
    subgroups = summary.subgroups
    rows = "".join(
        f"<tr><th>{html.escape(attribute)} = {html.escape(value)}</th><td>{group.count} "
        f"({group.positives} / {group.negatives})</td>"
        + "".join(_figure_cell(group.metrics[m]) for m in SUBGROUP_METRICS)
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
        + "".join(
            _figure_cell(metrics_lib.Estimate(**figures[m]))
            for m in ("auc", "sensitivity", "specificity", "ece")
        )
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


def _figure_cell(figure: metrics_lib.Estimate) -> str:
    value, (low, high) = figure.value, figure.ci95
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
