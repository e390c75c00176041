"""Novelty limits: how far from its centroid each class's own training and held-out cells reach.

scl-annotate's novelty is the cosine distance from a cell's embedding to its label's training centroid
(runtime/calls.py). A cell of a type the model never saw still gets a known label, often with confidence 1,
but lies far from that centroid. A class's limit is the larger of the 99th percentiles of its training cells'
and its held-out cells' distances: training cells alone sit tighter than new cells of the same type (on the
demo, 6.7% of held-out cells lay beyond limits from training cells). scl-train reports the share of cells
beyond the limits, for the forgetting data (other types: ideally nearly all) too, and scl-export stores them.
"""

from __future__ import annotations

import numpy as np

from scl.runtime.calls import cosine_distance

QUANTILE = 0.99


def class_centroids(z: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    return np.stack([z[y == i].mean(axis=0) for i in range(n_classes)])


def unit(centroids: np.ndarray) -> np.ndarray:
    return centroids / np.linalg.norm(centroids, axis=1, keepdims=True)


def novelty_limits(centroids: np.ndarray, *labelled: tuple[np.ndarray, np.ndarray], quantile: float = QUANTILE) -> np.ndarray:
    """Per class, the largest quantile of its cells' distances to its centroid over the (z, y) sets given."""
    limits = np.zeros(len(centroids), dtype=np.float32)
    for z, y in labelled:
        distance = cosine_distance(z, unit(centroids), y)
        for i in np.unique(y):
            limits[i] = max(limits[i], np.quantile(distance[y == i], quantile))
    return limits


def share_beyond(z: np.ndarray, predicted: np.ndarray, centroids: np.ndarray, limits: np.ndarray) -> float:
    """The share of cells farther from their predicted class's centroid than its limit."""
    return round(float(np.mean(cosine_distance(z, unit(centroids), predicted) > limits[predicted])), 4) if len(z) else 0.0
