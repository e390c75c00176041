"""Split conformal prediction on a model's calibration cells: prediction sets and novelty p-values.

scl-train keeps calibration cells that no stage trained on (train/calibrate.py) and stores, per class, their sorted
scores; the runtime turns them into thresholds for whatever alpha the user asks. The guarantee is the usual one for
split conformal: for a new cell exchangeable with the calibration cells (same kind of data, same lab and protocol),
P(true type in the set) >= 1 - alpha, and P(novelty p <= alpha) <= alpha for a cell of a known type.

Score: LAC (least ambiguous set-valued classifier; Sadinle, Lei & Wasserman 2019), s = 1 - p(true class), class-
conditional (Mondrian): class k enters a cell's set when 1 - p_k is within the (1 - alpha) quantile of the scores of
the calibration cells whose true type is k. LAC gives the smallest sets on average; the class-conditional form keeps
the promise for every cell type, a rare one included, where a marginal threshold would let the common types carry the
coverage while rare ones fall short. APS and RAPS adapt set size to difficulty but gave larger sets in the literature
for a handful of classes; RAPS targets hundreds of classes. A class with too few calibration cells for alpha (fewer
than (1 - alpha) / alpha: 19 at 0.05) uses the threshold of all calibration cells pooled, and says so.

Novelty p-value: a cell predicted k at cosine distance d from k's centroid gets p = (1 + #{calibration cells predicted
k at distance >= d}) / (n_k + 1); the calibration cells are grouped by predicted label because new cells are (their
true type is unknown). Groups too small for p to reach 0.01 (fewer than 99 cells: n_k + 1 < 1 / 0.01) use all
calibration cells pooled, whatever alpha is asked, so that a cell's p-value is one number: alpha only decides which
p-values count as novel. (Choosing the group by the alpha asked made one cell's p move by up to 0.62 between alphas.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

SCORE = "lac"
SET_SEPARATOR = "|"
OWN_GROUP_LEVEL = 0.01  # a predicted class is its own novelty reference when its p-values can reach this (99+ cells)


def rank_for(n: int, alpha: float) -> int:
    """The 1-based rank of the conformal quantile among n calibration scores; n + 1 or more means 'no finite threshold'."""
    return math.ceil((n + 1) * (1 - alpha))


def conformal_quantile(sorted_scores: np.ndarray, alpha: float) -> float:
    r = rank_for(len(sorted_scores), alpha)
    return float(sorted_scores[r - 1]) if r <= len(sorted_scores) else math.inf


def lac_scores(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1 - probability of each cell's true (or given) class, in float64 on both sides of the comparison."""
    return 1.0 - probabilities[np.arange(len(labels)), labels].astype(np.float64)


@dataclass
class Calibration:
    """What a model keeps of its calibration cells: per class, sorted LAC scores (by true type) and sorted novelty
    distances (by predicted type), plus the temperature already applied to its probabilities."""

    class_scores: list[np.ndarray]
    class_distances: list[np.ndarray]
    temperature: float = 1.0
    optimistic: bool = False  # the calibration cells were in the base model's training data
    source: str = ""

    @classmethod
    def fit(cls, probabilities: np.ndarray, labels: np.ndarray, distances: np.ndarray, n_classes: int, **kwargs) -> Calibration:
        """From calibration cells: their (calibrated) probabilities, true class indices and novelty distances."""
        scores = lac_scores(probabilities, labels)
        predicted = probabilities.argmax(axis=1)
        return cls([np.sort(scores[labels == k]) for k in range(n_classes)],
                   [np.sort(distances[predicted == k].astype(np.float64)) for k in range(n_classes)], **kwargs)

    @property
    def cells(self) -> int:
        return int(sum(len(s) for s in self.class_scores))

    @cached_property
    def pooled_scores(self) -> np.ndarray:
        return np.sort(np.concatenate(self.class_scores))

    @cached_property
    def pooled_distances(self) -> np.ndarray:
        return np.sort(np.concatenate(self.class_distances))

    def thresholds(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """Per class, the largest LAC score admitted at alpha, and whether it comes from all cells pooled."""
        pooled = np.array([rank_for(len(s), alpha) > len(s) for s in self.class_scores])
        q = np.array([conformal_quantile(self.pooled_scores if p else s, alpha) for s, p in zip(self.class_scores, pooled)])
        return q, pooled

    def prediction_sets(self, probabilities: np.ndarray, alpha: float) -> np.ndarray:
        """bool [cells, classes]: the classes in each cell's set."""
        q, _ = self.thresholds(alpha)
        return 1.0 - probabilities.astype(np.float64) <= q[None, :]

    def novelty_reference(self, k: int) -> np.ndarray:
        """The calibration distances a cell predicted k is judged against: its class's, or all pooled for a small class."""
        own = self.class_distances[k]
        return own if self.group_is_enough(len(own), OWN_GROUP_LEVEL) else self.pooled_distances

    def smallest_novelty_p(self) -> float:
        """The largest of the classes' smallest reachable p-values: an alpha below it cannot flag every class's cells."""
        return max(1 / (len(self.novelty_reference(k)) + 1) for k in range(len(self.class_distances)))

    def novelty_p(self, distances: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        """Each cell's conformal p-value of its distance to its predicted class's centroid."""
        p = np.empty(len(distances), dtype=np.float32)
        for k in np.unique(predicted):
            reference = self.novelty_reference(k)
            cells = predicted == k
            at_least = len(reference) - np.searchsorted(reference, distances[cells].astype(np.float64), side="left")
            p[cells] = (1 + at_least) / (len(reference) + 1)
        return p

    @staticmethod
    def group_is_enough(n: int, alpha: float) -> bool:
        return (n + 1) * alpha >= 1

    def to_metadata(self) -> dict:
        return {"score": SCORE, "temperature": round(float(self.temperature), 6), "cells": self.cells, "optimistic": bool(self.optimistic),
                "from": self.source, "class_scores": [np.round(s, 7).tolist() for s in self.class_scores],
                "class_distances": [np.round(d, 7).tolist() for d in self.class_distances]}

    @classmethod
    def from_metadata(cls, values: dict) -> Calibration:
        return cls([np.asarray(s, dtype=np.float64) for s in values["class_scores"]], [np.asarray(d, dtype=np.float64) for d in values["class_distances"]],
                   float(values["temperature"]), bool(values.get("optimistic", False)), str(values.get("from", "")))


def set_names(in_set: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> np.ndarray:
    """Each cell's set as one string, most probable class first ('' for an empty set)."""
    order = np.argsort(-probabilities, axis=1, kind="stable")
    names = np.array(classes, dtype=object)
    return np.array([SET_SEPARATOR.join(names[o[m[o]]]) for o, m in zip(order, in_set)], dtype=object)


def set_size_summary(set_sizes: np.ndarray, n_classes: int) -> dict:
    """Mean set size and how often sets are empty, single, or hold every class. A calibration that admits every class
    covers trivially; `degenerate` says so (most sets holding every class, or a mean size above 80% of the classes)."""
    sizes = np.asarray(set_sizes)
    if not len(sizes):
        return {"cells": 0, "mean_set_size": None, "empty": 0.0, "single": 0.0, "every_class": 0.0, "degenerate": False}
    full = float(np.mean(sizes == n_classes))
    mean = float(sizes.mean())
    return {"cells": int(len(sizes)), "mean_set_size": round(mean, 4), "empty": round(float(np.mean(sizes == 0)), 4),
            "single": round(float(np.mean(sizes == 1)), 4), "every_class": round(full, 4),
            "degenerate": bool(n_classes > 2 and (full > 0.5 or mean > 0.8 * n_classes))}
