"""From probabilities and embeddings to what users read: label, confidence, runner-up, novelty.

Novelty is the cosine distance from a cell's embedding to its label's training centroid. A cell of a type the
model never saw still gets one of the known labels, often with confidence 1, but sits far from that centroid.
Models exported by this scl carry a limit per class (see train/novelty.py); cells beyond it are counted as
novel, and labelled unassigned when asked (scl-annotate --max-novelty).
"""

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
    novel: np.ndarray  # beyond the predicted class's novelty limit (all False without limits)


def cosine_distance(embedding: np.ndarray, unit_centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return (1.0 - np.sum(embedding * unit_centroids[labels], axis=1)).astype(np.float32)


def call_cells(pred: Prediction, unit_centroids: np.ndarray, min_confidence: float = 0.0,
               novelty_limits: np.ndarray | None = None, unassign_novel: bool = False) -> CellCalls:
    probs = pred.probabilities
    order = np.argsort(-probs, axis=1, kind="stable")  # ties go to the earlier class
    best = order[:, 0]
    second = order[:, 1] if probs.shape[1] > 1 else best
    rows = np.arange(len(probs))
    confidence = probs[rows, best]
    novelty = cosine_distance(pred.embedding, unit_centroids, best)
    novel = novelty > novelty_limits[best] if novelty_limits is not None else np.zeros(len(best), dtype=bool)
    keep = (confidence >= min_confidence) & ~(novel & unassign_novel)
    return CellCalls(np.where(keep, best, -1), confidence, second, probs[rows, second], novelty, novel)


def label_names(classes: list[str], index: np.ndarray) -> np.ndarray:
    names = np.array(list(classes) + [UNASSIGNED], dtype=object)
    return names[index]  # -1 picks UNASSIGNED
