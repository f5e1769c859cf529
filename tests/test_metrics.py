import numpy as np
import pytest
from sklearn import metrics as skm

from pneumo_dist import metrics


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    probabilities = np.clip(labels * 0.3 + rng.uniform(0, 0.7, 400), 0, 1)
    return labels, probabilities


def test_metrics_equal_scikit_learn(scores):
    labels, probabilities = scores
    ours = metrics.binary_metrics(labels, probabilities, threshold=0.5)
    predicted = probabilities >= 0.5
    assert ours["auc"] == pytest.approx(skm.roc_auc_score(labels, probabilities))
    assert ours["pr_auc"] == pytest.approx(skm.average_precision_score(labels, probabilities))
    assert ours["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted))
    assert ours["sensitivity"] == pytest.approx(skm.recall_score(labels, predicted))
    assert ours["specificity"] == pytest.approx(skm.recall_score(labels, predicted, pos_label=0))
    assert ours["precision"] == pytest.approx(skm.precision_score(labels, predicted))
    assert ours["f1"] == pytest.approx(skm.f1_score(labels, predicted))
    assert ours["loss"] == pytest.approx(skm.log_loss(labels, probabilities))


@pytest.mark.parametrize("decimals", [1, 2, 3])
def test_areas_equal_scikit_learn_with_tied_scores(scores, decimals):
    labels, probabilities = scores
    tied = np.round(probabilities, decimals)
    ours = metrics.binary_metrics(labels, tied)
    assert ours["auc"] == pytest.approx(skm.roc_auc_score(labels, tied), abs=1e-12)
    assert ours["pr_auc"] == pytest.approx(skm.average_precision_score(labels, tied), abs=1e-12)


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 1.0])
def test_threshold_reaches_the_target_sensitivity_and_no_higher_threshold_does(scores, target):
    labels, probabilities = scores
    threshold = metrics.threshold_for_sensitivity(labels, probabilities, target)
    assert metrics.binary_metrics(labels, probabilities, threshold)["sensitivity"] >= target
    assert metrics.binary_metrics(labels, probabilities, threshold + 1e-6)["sensitivity"] < target


def test_one_class_gives_nan_auc_not_an_exception():
    assert np.isnan(metrics.binary_metrics(np.ones(5), np.full(5, 0.7))["auc"])


def test_confusion_counts_equal_scikit_learn(scores):
    labels, probabilities = scores
    ours = metrics.binary_metrics(labels, probabilities, threshold=0.6)
    true_neg, false_pos, false_neg, true_pos = skm.confusion_matrix(labels, probabilities >= 0.6).ravel()
    assert (ours["true_negatives"], ours["false_positives"]) == (true_neg, false_pos)
    assert (ours["false_negatives"], ours["true_positives"]) == (false_neg, true_pos)


def test_calibration_error_by_hand():
    # Bin 0.1-0.2: two predictions of 0.15, one positive -> |0.15 - 0.5| = 0.35, weight 2/4.
    # Bin 0.9-1.0: 0.95 and 1.0 (the top edge belongs to the last bin), both positive -> 0.025, weight 2/4.
    labels = np.array([0, 1, 1, 1])
    probabilities = np.array([0.15, 0.15, 0.95, 1.0])
    assert metrics.expected_calibration_error(labels, probabilities) == pytest.approx(
        0.5 * 0.35 + 0.5 * 0.025
    )
    bins = metrics.reliability_bins(labels, probabilities)
    assert [b["count"] for b in bins] == [0, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins[9]["mean_probability"] == pytest.approx(0.975) and bins[9]["positive_fraction"] == 1.0


def test_a_calibrated_model_has_a_small_calibration_error():
    rng = np.random.default_rng(1)
    probabilities = rng.uniform(0, 1, 20_000)
    labels = rng.uniform(0, 1, 20_000) < probabilities  # P(positive | p) = p
    assert metrics.expected_calibration_error(labels, probabilities) < 0.02
    assert metrics.expected_calibration_error(labels, np.clip(probabilities * 0.5, 0, 1)) > 0.2


def test_intervals_contain_the_point_estimate(scores):
    labels, probabilities = scores
    for threshold, intervals in zip(
        (0.5, 0.7),
        metrics.bootstrap_intervals(labels, probabilities, [0.5, 0.7], resamples=500),
        strict=True,
    ):
        point = metrics.binary_metrics(labels, probabilities, threshold)
        for name, (low, high) in intervals.items():
            assert low <= point[name] <= high, (threshold, name, low, point[name], high)


def test_intervals_narrow_with_more_data():
    def width(count: int) -> dict:
        rng = np.random.default_rng(2)
        labels = rng.integers(0, 2, count)
        probabilities = np.clip(labels * 0.3 + rng.uniform(0, 0.7, count), 0, 1)
        (intervals,) = metrics.bootstrap_intervals(labels, probabilities, [0.5], resamples=300)
        return {name: high - low for name, (low, high) in intervals.items()}

    small, large = width(100), width(2000)
    for name in metrics.INTERVAL_METRICS:
        assert large[name] < small[name] / 2, name  # ~ 1 / sqrt(20) as wide


def test_bootstrap_is_reproducible_and_keeps_both_classes():
    labels = np.array([1] * 3 + [0] * 47)  # few positives: unstratified resamples would often have none
    probabilities = np.linspace(0, 1, 50)
    first = metrics.bootstrap_intervals(labels, probabilities, [0.5], resamples=200, seed=7)
    again = metrics.bootstrap_intervals(labels, probabilities, [0.5], resamples=200, seed=7)
    np.testing.assert_equal(first, again)
    assert all(np.isfinite(first[0]["auc"]))


def test_youden_threshold_has_the_largest_sensitivity_plus_specificity(scores):
    labels, probabilities = scores
    threshold = metrics.threshold_youden(labels, probabilities)

    def youden(t: float) -> float:
        m = metrics.binary_metrics(labels, probabilities, t)
        return m["sensitivity"] + m["specificity"] - 1

    best = youden(threshold)
    assert all(youden(t) <= best + 1e-12 for t in np.unique(probabilities))
    assert best > 0.3  # the fixture's classes overlap, but not entirely


def test_logistic_calibration_recovers_a_known_miscalibration():
    """Labels drawn from a calibrated model p = sigmoid(z); the model under test says
    sigmoid(2.5 z - 1) (over-confident, and biased towards NORMAL as class weights make it)."""
    rng = np.random.default_rng(0)
    z = rng.normal(0.8, 2.0, 20_000)
    labels = rng.random(len(z)) < 1 / (1 + np.exp(-z))
    miscalibrated = 1 / (1 + np.exp(-(2.5 * z - 1.0)))
    slope, intercept = metrics.fit_platt(labels, miscalibrated)
    assert slope == pytest.approx(1 / 2.5, rel=0.05) and intercept == pytest.approx(1 / 2.5, abs=0.05)
    calibrated = 1 / (1 + np.exp(-(slope * metrics.logit(miscalibrated) + intercept)))
    before = metrics.expected_calibration_error(labels, miscalibrated)
    assert metrics.expected_calibration_error(labels, calibrated) < min(0.01, before / 5)
    assert metrics.binary_metrics(labels, calibrated)["auc"] == pytest.approx(
        metrics.binary_metrics(labels, miscalibrated)["auc"], abs=1e-9
    )  # monotone: the ranking stays


def test_logistic_calibration_stays_finite_on_separated_classes_and_refuses_what_it_cannot_fit():
    slope, intercept = metrics.fit_platt([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert np.isfinite([slope, intercept]).all() and slope > 0
    assert metrics.fit_platt([1, 1, 1], [0.2, 0.5, 0.9]) is None  # one class
    assert metrics.fit_platt([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) is None  # ranks backwards


def test_population_stability_by_hand_and_its_reading():
    rng = np.random.default_rng(0)
    validation = rng.beta(2, 2, 5000)
    assert metrics.population_stability(validation, rng.beta(2, 2, 5000))["verdict"] == "stable"
    shifted = metrics.population_stability(validation, rng.beta(5, 2, 5000))
    assert shifted["psi"] > 0.25 and shifted["verdict"] == "significant shift"
    # By hand: two bins (the median of 0..1 uniform), everything in the upper one: shares 0.5/0.5 vs
    # 1e-4/1 -> (1e-4 - 0.5) ln(1e-4 / 0.5) + (1 - 0.5) ln(1 / 0.5).
    by_hand = (1e-4 - 0.5) * np.log(1e-4 / 0.5) + 0.5 * np.log(2.0)
    result = metrics.population_stability(np.arange(1000) / 1000, np.full(10, 0.9), bins=2)
    assert result["psi"] == pytest.approx(by_hand) and result["actual_shares"] == [0.0, 1.0]


def test_a_capped_platt_fit_never_sharpens_and_keeps_the_likelihoods_balance():
    # A split the model nearly separates, with timid probabilities: Platt sharpens them (slope > 1).
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 200)
    probabilities = np.where(labels == 1, rng.uniform(0.55, 0.8, 400), rng.uniform(0.2, 0.45, 400))
    slope, _ = metrics.fit_platt(labels, probabilities)
    assert slope > 3
    capped_slope, intercept = metrics.fit_platt(labels, probabilities, max_slope=1.0)
    assert capped_slope == 1.0
    # The intercept is the maximum-likelihood one at that slope: calibrated mean = smoothed target mean.
    calibrated = 1 / (1 + np.exp(-(metrics.logit(probabilities) + intercept)))
    target = np.where(labels == 1, 201 / 202, 1 / 202)
    assert calibrated.sum() == pytest.approx(target.sum(), rel=1e-6)
    # An overconfident model's slope (about 1/4 here) is already below the cap: left as fitted.
    z = rng.normal(0, 2, 2000)
    outcomes = (rng.uniform(size=2000) < 1 / (1 + np.exp(-z))).astype(int)
    overconfident = 1 / (1 + np.exp(-4 * z))
    fitted = metrics.fit_platt(outcomes, overconfident)
    assert fitted[0] < 0.5
    assert metrics.fit_platt(outcomes, overconfident, max_slope=1.0) == pytest.approx(fitted)
