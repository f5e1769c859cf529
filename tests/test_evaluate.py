import numpy as np
import pytest
from sklearn import metrics as skm

from pneumo_dist import evaluate


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    probabilities = np.clip(labels * 0.3 + rng.uniform(0, 0.7, 400), 0, 1)
    return labels, probabilities


def test_metrics_equal_scikit_learn(scores):
    labels, probabilities = scores
    ours = evaluate.binary_metrics(labels, probabilities, threshold=0.5)
    predicted = probabilities >= 0.5
    assert ours["auc"] == pytest.approx(skm.roc_auc_score(labels, probabilities))
    assert ours["pr_auc"] == pytest.approx(skm.average_precision_score(labels, probabilities))
    assert ours["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted))
    assert ours["sensitivity"] == pytest.approx(skm.recall_score(labels, predicted))
    assert ours["specificity"] == pytest.approx(skm.recall_score(labels, predicted, pos_label=0))
    assert ours["precision"] == pytest.approx(skm.precision_score(labels, predicted))
    assert ours["f1"] == pytest.approx(skm.f1_score(labels, predicted))
    assert ours["loss"] == pytest.approx(skm.log_loss(labels, probabilities))


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 1.0])
def test_threshold_reaches_the_target_sensitivity_and_no_higher_threshold_does(scores, target):
    labels, probabilities = scores
    threshold = evaluate.threshold_for_sensitivity(labels, probabilities, target)
    assert evaluate.binary_metrics(labels, probabilities, threshold)["sensitivity"] >= target
    assert evaluate.binary_metrics(labels, probabilities, threshold + 1e-6)["sensitivity"] < target


def test_one_class_gives_nan_auc_not_an_exception():
    assert np.isnan(evaluate.binary_metrics(np.ones(5), np.full(5, 0.7))["auc"])
