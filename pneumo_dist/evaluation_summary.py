"""The evaluation's typed summary: what evaluate.py computes, report.py presents, jobs/evaluate.py and
jobs/tune.py print, and the report's metrics.json holds (Evaluation.to_dict is its layout).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from pneumo_dist.export import Member
from pneumo_dist.metrics import Estimate


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    metrics: dict[str, Estimate]  # metrics.INTERVAL_METRICS
    confusion: dict[str, int]  # true_positives, false_positives, true_negatives, false_negatives


@dataclass(frozen=True)
class GroupFigures:
    """One subgroup's figures at the operating threshold."""

    count: int
    positives: int
    negatives: int
    metrics: dict[str, Estimate]  # SUBGROUP_METRICS

    def to_dict(self) -> dict:
        return {"count": self.count, "positives": self.positives, "negatives": self.negatives} | {
            name: dataclasses.asdict(figure) for name, figure in self.metrics.items()
        }


@dataclass(frozen=True)
class MemberFigures:
    """An ensemble member alone on the split (its own uncalibrated scores)."""

    member: Member
    auc: Estimate
    ece: Estimate

    def to_dict(self) -> dict:
        return dataclasses.asdict(self.member) | {
            "auc": dataclasses.asdict(self.auc),
            "ece": dataclasses.asdict(self.ece),
        }


@dataclass(frozen=True)
class ModelSummary:
    uri: str
    version: str
    image_size_px: int
    threshold: float
    threshold_source: str  # "validation", or "user" for a threshold given on the command line
    threshold_policy: str | None
    calibration: dict | None  # the export's Calibration as a dict; None: probabilities as the model gives
    target_sensitivity: float | str  # "unknown" for an export that does not record it


@dataclass(frozen=True)
class SplitSummary:
    manifest_uri: str
    split: str
    count: int
    positives: int
    negatives: int
    # False: these shards were stored differently from the training ones (size or encoding), so the model
    # sees slightly different pixels than a PneumoniaDetector.predict of the sources.
    preprocessing_matches_training: bool


@dataclass(frozen=True)
class CalibrationFigures:
    ece: float
    bins: list[dict]  # metrics.reliability_bins


@dataclass
class Evaluation:
    """Everything run_evaluation measured; `to_dict` is metrics.json's layout."""

    model: ModelSummary
    data: SplitSummary
    tta_views: int
    created_utc: str
    at_half: OperatingPoint  # at threshold 0.5 ("at_0.5" in metrics.json)
    at_threshold: OperatingPoint  # at the operating threshold
    policies: dict[str, OperatingPoint]  # at each threshold policy's threshold (chosen on validation)
    calibration: CalibrationFigures
    bootstrap: dict  # resamples, seed, method
    subgroups: dict[str, dict[str, GroupFigures]] = field(default_factory=dict)  # attribute -> value ->
    members: list[MemberFigures] = field(default_factory=list)  # an ensemble's, each alone
    robustness: dict | None = None  # shift.ShiftRun's report, when the shift benchmark ran
    drift: dict | None = None  # metrics.population_stability against a scored batch, and its scores_uri
    gradcam: dict[str, list[str]] | None = None  # case -> the sources shown in gradcam.png

    def to_dict(self) -> dict:
        written = {
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "tta_views": self.tta_views,
            "created_utc": self.created_utc,
            "at_0.5": dataclasses.asdict(self.at_half),
            "at_threshold": dataclasses.asdict(self.at_threshold),
            "policies": {name: dataclasses.asdict(p) for name, p in self.policies.items()},
            "calibration": dataclasses.asdict(self.calibration),
            "bootstrap": self.bootstrap,
            "subgroups": {
                a: {v: g.to_dict() for v, g in groups.items()} for a, groups in self.subgroups.items()
            },
            "members": [m.to_dict() for m in self.members],
        }
        for name in ("robustness", "drift", "gradcam"):
            if getattr(self, name) is not None:
                written[name] = getattr(self, name)
        return _json_safe(written)


def _json_safe(value):
    """NaN (e.g. precision when nothing is predicted positive) -> null: strict JSON has no NaN."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value
