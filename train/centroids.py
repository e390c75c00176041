"""Per-class embedding centroids: what scl-annotate measures each cell's novelty against.

A cell's novelty is the cosine distance from its embedding to its label's training centroid (runtime/calls.py). A cell
of a type the model never saw still gets a known label, often with confidence 1, but lies far from that centroid. How
far is too far is judged against the calibration cells (train/calibrate.py, runtime/conformal.py); models exported
before calibration carried a per-class limit instead (the 99th percentile of training and held-out cells' distances).
"""

from __future__ import annotations

import numpy as np


def class_centroids(z: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    return np.stack([z[y == i].mean(axis=0) for i in range(n_classes)])


def unit(centroids: np.ndarray) -> np.ndarray:
    return centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
