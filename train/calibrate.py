"""Calibration on cells no stage trained on: temperature scaling, then split conformal (runtime/conformal.py).

The temperature T (probabilities = softmax(logits / T)) minimises the negative log-likelihood of the calibration
cells (Guo et al. 2017); it never changes a cell's label. The conformal scores are then taken from the calibrated
probabilities of the same cells: T is one number fitted on hundreds of cells, so it barely uses them up.

What the report states about coverage, set size, novelty and calibration error is cross-fitted: each fold of the
calibration cells is judged by a calibration fitted on the other folds, so none of those numbers is measured on the
cells it was fitted to (measured that way, coverage is 1 - alpha by construction and says nothing).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.model_selection import StratifiedKFold

from scl.runtime.conformal import Calibration, set_size_summary

ALPHAS = (0.05, 0.1)  # reported by scl-train; the runtime takes any alpha
BINS = 15  # equal-width confidence bins for the expected calibration error (Guo et al. 2017)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the calibration cells' negative log-likelihood (searched over 0.05 to 20)."""
    logits = logits.astype(np.float64)
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return -log_softmax(logits / np.exp(log_t), axis=1)[rows, labels].mean()

    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = BINS) -> dict:
    """Per confidence bin: mean confidence, accuracy and cells; and the expected calibration error over them."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    rows = [{"confidence": float(confidence[which == b].mean()), "accuracy": float(correct[which == b].mean()), "cells": int((which == b).sum())}
            for b in range(bins) if (which == b).any()]
    ece = sum(r["cells"] * abs(r["accuracy"] - r["confidence"]) for r in rows) / max(len(labels), 1)
    return {"ece": round(float(ece), 4), "bins": rows}


def calibrate(logits: np.ndarray, labels: np.ndarray, distances: np.ndarray, n_classes: int, **about) -> Calibration:
    """Temperature, then the conformal scores of the calibrated probabilities. `distances`: each cell's cosine distance
    to its predicted class's centroid (the label never changes with T, so neither do they)."""
    temperature = fit_temperature(logits, labels)
    return Calibration.fit(softmax(logits / temperature, axis=1), labels, distances, n_classes, temperature=temperature, **about)


def cross_fitted(logits: np.ndarray, labels: np.ndarray, distances: np.ndarray, n_classes: int, seed: int = 0, folds: int = 5) -> dict:
    """Calibration error, coverage, set size and novel share on the calibration cells, each fold judged by the others."""
    after = np.zeros_like(logits, dtype=np.float64)
    in_set = {a: np.zeros(logits.shape, dtype=bool) for a in ALPHAS}
    novel = {a: np.zeros(len(labels), dtype=bool) for a in ALPHAS}
    smallest = np.bincount(labels, minlength=n_classes)
    k = int(min(folds, smallest[smallest > 0].min())) if len(labels) else 0
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed) if k >= 2 else None
    if splitter is None:  # a class with a single calibration cell: no stratified folds; say nothing rather than something fitted
        return {"cells": int(len(labels)), "folds": 0}
    for fit, judge in splitter.split(np.zeros(len(labels)), labels):
        calibration = calibrate(logits[fit], labels[fit], distances[fit], n_classes)
        after[judge] = softmax(logits[judge] / calibration.temperature, axis=1)
        for a in ALPHAS:
            in_set[a][judge] = calibration.prediction_sets(after[judge], a)
            novel[a][judge] = calibration.novelty_p(distances[judge], after[judge].argmax(axis=1)) <= a
    out = {"cells": int(len(labels)), "folds": k, "ece_before": reliability(softmax(logits, axis=1), labels),
           "ece_after": reliability(after, labels), "alphas": {}}
    rows = np.arange(len(labels))
    for a in ALPHAS:
        covered = in_set[a][rows, labels]
        per_class = {int(c): float(covered[labels == c].mean()) for c in np.unique(labels)}
        out["alphas"][str(a)] = {"coverage": round(float(covered.mean()), 4), "lowest_class_coverage": round(min(per_class.values()), 4),
                                 **set_size_summary(in_set[a].sum(axis=1), n_classes), "novel_share": round(float(novel[a].mean()), 4)}
    return out


def novel_share(calibration: Calibration, probabilities: np.ndarray, distances: np.ndarray, alpha: float) -> float:
    """The share of cells (with calibrated probabilities) whose novelty p-value is at most alpha."""
    if not len(distances):
        return 0.0
    return round(float(np.mean(calibration.novelty_p(distances, probabilities.argmax(axis=1)) <= alpha)), 4)

