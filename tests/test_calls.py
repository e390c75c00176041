"""Label, confidence and novelty from probabilities and embeddings: boundaries and an independent computation."""

import math

import numpy as np
import pytest

from scl.runtime.calls import COLUMNS, CallRules, as_values, call_cells, columns_for, present
from scl.runtime.conformal import Calibration, set_size_summary
from scl.runtime.errors import GeneOverlapError
from scl.runtime.genes import align_genes, default_min_overlap
from scl.runtime.session import Prediction


def unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


CENTROIDS = unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])


def test_novelty_is_judged_against_the_cells_own_label_and_its_limit():
    # cell 0: label 0, 60 degrees from its centroid (distance 0.5): beyond its own limit (0.25); its runner-up's
    # (class 1, 0.9) would call it known
    # cell 1: label 2, on its centroid (distance 0); exactly at its limit of 0: not beyond it
    emb = np.array([[0.5, math.sqrt(3) / 2, 0], [0, 0, 1]], dtype=np.float32)
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)
    limits = np.array([0.25, 0.9, 0.0], dtype=np.float32)
    calls = call_cells(Prediction(probs, emb), CENTROIDS, CallRules(novelty_limits=limits))
    assert list(calls["label"]) == [0, 2] and list(calls["second_label"]) == [1, 0]
    expected = 1 - np.sum(emb * CENTROIDS[[0, 2]], axis=1)
    np.testing.assert_allclose(calls["novelty"], expected, atol=1e-6)
    assert list(calls["novel"]) == [True, False]  # 0.5 > 0.25 (own limit, not the runner-up's 0.9); 0 is not beyond 0
    unassigned = call_cells(Prediction(probs, emb), CENTROIDS, CallRules(novelty_limits=limits, unassign_novel=True))
    assert list(unassigned["label"]) == [-1, 2]


def test_min_confidence_keeps_a_cell_exactly_at_the_threshold():
    probs = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.4, 0.3, 0.3]], dtype=np.float32)
    emb = CENTROIDS[[0, 1, 0]]
    calls = call_cells(Prediction(probs, emb), CENTROIDS, CallRules(min_confidence=0.5))
    assert list(calls["label"]) == [0, 1, -1]
    assert "novel" not in call_cells(Prediction(probs, emb), CENTROIDS)  # no limits, no calibration: no novel column


def test_min_genes_threshold_is_inclusive_and_scales_with_the_model():
    model = [f"G{i}" for i in range(2000)]
    assert default_min_overlap(2000) == math.ceil(2000 * 5000 / 28231) == 355
    assert default_min_overlap(28231) == 5000 and default_min_overlap(60000) == 5000
    align_genes(model[:355], model)  # exactly the default minimum: accepted
    with pytest.raises(GeneOverlapError, match="only 354 of the model's 2000 genes.*at least 355"):
        align_genes(model[:354], model)
    align_genes(model[:10], model, min_overlap=10)
    with pytest.raises(GeneOverlapError, match="only 9 of"):
        align_genes(model[:9], model, min_overlap=10)


def test_cells_expressing_too_few_of_the_models_genes_are_unassigned():
    from scl.runtime.calls import default_min_cell_genes

    probs = np.array([[0.9, 0.05, 0.05]] * 3, dtype=np.float32)
    calls = call_cells(Prediction(probs, CENTROIDS[[0, 0, 0]]), CENTROIDS, CallRules(min_cell_genes=200), genes_detected=np.array([199, 200, 5000]))
    assert list(calls["label"]) == [-1, 0, 0] and list(calls["genes_detected"]) == [199, 200, 5000]
    assert list(as_values(COLUMNS[-1], calls["unassigned_reason"], [])) == ["few_genes", "", ""]
    assert default_min_cell_genes(28231) == 200 and default_min_cell_genes(8000) == 57 and default_min_cell_genes(2000) == 20


def test_each_unassigned_cell_gets_the_first_reason_that_applies():
    probs = np.array([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3], [0.4, 0.3, 0.3], [0.9, 0.05, 0.05], [0.9, 0.05, 0.05]], dtype=np.float32)
    far = CENTROIDS[[1, 1, 0, 1, 0]]  # cells 0, 1 and 3 sit on another class's centroid: novel for label 0
    rules = CallRules(min_confidence=0.5, novelty_limits=np.full(3, 0.5, np.float32), unassign_novel=True, min_cell_genes=10)
    calls = call_cells(Prediction(probs, far), CENTROIDS, rules, genes_detected=np.array([5, 50, 50, 50, 50]))
    assert list(as_values(COLUMNS[-1], calls["unassigned_reason"], [])) == ["few_genes", "low_confidence", "low_confidence", "novel", ""]
    assert list(calls["label"]) == [-1, -1, -1, -1, 0]


def classifier_outputs(n: int, rng, n_classes: int = 4):
    """Cells from one fixed noisy classifier: true labels, softmax probabilities and novelty distances, exchangeable."""
    labels = rng.integers(0, n_classes, n)
    logits = rng.normal(0, 1.0, (n, n_classes))
    logits[np.arange(n), labels] += 1.5  # right most of the time, not always
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs.astype(np.float32), rng.gamma(2.0, 0.05, n)


@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_prediction_sets_cover_a_held_out_split_at_one_minus_alpha(alpha):
    """Calibrate on 3,000 cells, judge on 20,000 more from the same source: coverage within 1.5 points of 1 - alpha,
    for every class too (class-conditional), with sets smaller than all classes."""
    rng = np.random.default_rng(7)
    labels, probs, distances = classifier_outputs(3000, rng)
    calibration = Calibration.fit(probs, labels, distances, 4)
    test_labels, test_probs, test_distances = classifier_outputs(20000, rng)
    in_set = calibration.prediction_sets(test_probs, alpha)
    covered = in_set[np.arange(len(test_labels)), test_labels]
    assert abs(covered.mean() - (1 - alpha)) < 0.015
    for k in range(4):
        assert abs(covered[test_labels == k].mean() - (1 - alpha)) < 0.03
    summary = set_size_summary(in_set.sum(axis=1), 4)
    assert 1 < summary["mean_set_size"] < 3 and not summary["degenerate"]
    novel = calibration.novelty_p(test_distances, test_probs.argmax(axis=1)) <= alpha
    assert abs(novel.mean() - alpha) < 0.015  # cells like the calibration cells are flagged at about alpha


def test_a_degenerate_calibration_is_reported_as_such():
    """A classifier whose true class always gets the least probability: every set must hold every class to cover,
    coverage is then perfect and meaningless, and the set-size report says degenerate."""
    rng = np.random.default_rng(0)
    labels, probs, distances = classifier_outputs(500, rng)
    wrong = probs.copy()
    wrong[np.arange(500), labels] = 0.0  # the true class last
    calibration = Calibration.fit(wrong, labels, distances, 4)
    in_set = calibration.prediction_sets(probs, 0.1)
    assert in_set.all()
    summary = set_size_summary(in_set.sum(axis=1), 4)
    assert summary["degenerate"] and summary["every_class"] == 1.0 and summary["mean_set_size"] == 4


def test_conformal_ranks_ties_and_small_classes():
    # 19 scores 1/64 .. 19/64 (exact in float32): at alpha 0.1 the threshold is the ceil(20 * 0.9) = 18th smallest
    scores = np.arange(1, 20) / 64
    calibration = Calibration([scores, scores], [np.array([0.1, 0.2, 0.3]), np.arange(1, 20) / 10])
    q, pooled = calibration.thresholds(0.1)
    assert q[0] == 18 / 64 and not pooled.any()
    probs = np.array([[46, 18], [45, 19], [32, 32]], dtype=np.float32) / 64
    in_set = calibration.prediction_sets(probs, 0.1)
    assert in_set.tolist() == [[True, False], [False, False], [False, False]]  # a score equal to the threshold is in
    # at alpha 0.01, 19 cells per class are too few (ceil(20 * 0.99) = 20 > 19) and so are the 38 pooled: no finite threshold
    q, pooled = calibration.thresholds(0.01)
    assert pooled.all() and np.isinf(q).all()
    # novelty p = (1 + calibration cells at least as far) / (n + 1); a class of 99 cells is its own reference (p can
    # reach 0.01), one of 98 or fewer is judged among all cells pooled, whatever alpha is asked
    distances = [np.array([0.1, 0.2, 0.3]), np.arange(1, 100) / 50, np.arange(1, 99) / 50]
    novelty = Calibration([scores] * 3, distances)
    p = novelty.novelty_p(np.array([1.9, 1.99, 0.3, 1.99]), np.array([1, 1, 0, 2]))
    assert p[0] == pytest.approx((1 + 5) / 100) and p[1] == pytest.approx(1 / 100)  # 1.9 .. 1.98 of class 1's 99
    assert p[2] == pytest.approx((1 + 1 + 85 + 84) / 201)  # among all 200: 0.3 itself, 0.3 .. 1.98, 0.3 .. 1.96
    assert p[3] == pytest.approx(1 / 201) and novelty.smallest_novelty_p() == pytest.approx(1 / 100)
    calls = call_cells(Prediction(probs, CENTROIDS[[0, 0, 1]]), CENTROIDS[:2], CallRules(calibration=calibration, set_alpha=0.1), ["a", "b"])
    assert list(calls["prediction_set"]) == ["a", "", ""] and list(calls["set_size"]) == [1, 0, 0]
    assert list(calls["label"]) == [0, -1, -1]  # an empty set is unassigned


@pytest.mark.parametrize("limits, calibrated, set_alpha", [(None, False, None), (True, False, None), (None, True, None), (None, True, 0.1),
                                                           (True, True, 0.1), (None, False, 0.1)])
def test_the_declared_columns_are_the_ones_call_cells_gives(limits, calibrated, set_alpha):
    """Outputs are laid out from columns_for(rules) before the first block; each block's calls must fill exactly those."""
    rng = np.random.default_rng(0)
    labels, probs, distances = classifier_outputs(200, rng, 3)
    rules = CallRules(novelty_limits=np.full(3, 0.5, np.float32) if limits else None, set_alpha=set_alpha,
                      calibration=Calibration.fit(probs, labels, distances, 3) if calibrated else None)
    emb = unit(rng.normal(size=(5, 3)))
    calls = call_cells(Prediction(probs[:5], emb), CENTROIDS, rules, ["a", "b", "c"], np.full(5, 300))
    assert [c.name for c in columns_for(rules)] == [c.name for c in present(calls)]
