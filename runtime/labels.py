"""From probabilities and embeddings to what users read: label, confidence, runner-up, novelty."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .session import Prediction

UNASSIGNED = "unassigned"


@dataclass
class CellCalls:
    label: np.ndarray  # class index, or -1 for unassigned
    confidence: np.ndarray
    second_label: np.ndarray
    second_probability: np.ndarray
    novelty: np.ndarray  # cosine distance to the predicted class's training centroid


def call_cells(pred: Prediction, centroids: np.ndarray, min_confidence: float = 0.0) -> CellCalls:
    probs = pred.probabilities
    order = np.argsort(-probs, axis=1, kind="stable")  # ties go to the earlier class
    best = order[:, 0]
    second = order[:, 1] if probs.shape[1] > 1 else best
    rows = np.arange(len(probs))
    confidence = probs[rows, best]
    novelty = 1.0 - np.sum(pred.embedding * centroids[best], axis=1)
    label = np.where(confidence >= min_confidence, best, -1)
    return CellCalls(label, confidence, second, probs[rows, second], novelty.astype(np.float32))


def label_names(classes: list[str], index: np.ndarray) -> np.ndarray:
    names = np.array(list(classes) + [UNASSIGNED], dtype=object)
    return names[index]  # -1 picks UNASSIGNED
