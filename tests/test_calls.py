"""Label, confidence and novelty from probabilities and embeddings: boundaries and an independent computation."""

import math

import numpy as np
import pytest

from scl.runtime.calls import call_cells
from scl.runtime.errors import GeneOverlapError
from scl.runtime.genes import align_genes, default_min_overlap
from scl.runtime.session import Prediction


def unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


CENTROIDS = unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])


def test_novelty_is_judged_against_the_cells_own_label_and_its_limit():
    # cell 0: label 0, 60 degrees from its centroid (distance 0.5); its runner-up's limit (0.9) would call it known
    # cell 1: label 1, on its centroid (distance 0); exactly at a limit of 0: not beyond it
    emb = np.array([[0.5, math.sqrt(3) / 2, 0], [0, 1, 0]], dtype=np.float32)
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], dtype=np.float32)
    limits = np.array([0.25, 0.0, 0.9], dtype=np.float32)
    calls = call_cells(Prediction(probs, emb), CENTROIDS, novelty_limits=limits)
    assert list(calls["label"]) == [0, 1] and list(calls["second_label"]) == [1, 0]
    expected = 1 - np.sum(emb * CENTROIDS[[0, 1]], axis=1)
    np.testing.assert_allclose(calls["novelty"], expected, atol=1e-6)
    assert list(calls["novel"]) == [True, False]  # 0.5 > 0.25 (own limit); 0 is not beyond a limit of 0
    unassigned = call_cells(Prediction(probs, emb), CENTROIDS, novelty_limits=limits, unassign_novel=True)
    assert list(unassigned["label"]) == [-1, 1]


def test_min_confidence_keeps_a_cell_exactly_at_the_threshold():
    probs = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.4, 0.3, 0.3]], dtype=np.float32)
    emb = CENTROIDS[[0, 1, 0]]
    calls = call_cells(Prediction(probs, emb), CENTROIDS, min_confidence=0.5)
    assert list(calls["label"]) == [0, 1, -1]
    assert "novel" not in call_cells(Prediction(probs, emb), CENTROIDS)  # no limits, no novel column


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
    calls = call_cells(Prediction(probs, CENTROIDS[[0, 0, 0]]), CENTROIDS, genes_detected=np.array([199, 200, 5000]), min_cell_genes=200)
    assert list(calls["label"]) == [-1, 0, 0] and list(calls["genes_detected"]) == [199, 200, 5000]
    assert default_min_cell_genes(28231) == 200 and default_min_cell_genes(2000) == 15
