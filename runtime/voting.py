"""Majority voting, CellTypist's most used option: each cluster of cells takes its most frequent label.

Per-cell calls are noisy at the edges between types; a cluster of similar cells is more often of one type.
Clusters come from the user (an obs column such as 'leiden', or one id per cell) or from an automatic
over-clustering of the scl embedding. CellTypist's automatic path is a full scanpy neighbours + Leiden run (users
report hours, and 100 GB at 1.5 million cells). Here it is scikit-learn's MiniBatchKMeans on the 128-dimensional
L2-normalised embedding: memory is the embedding plus the centres, and time grows linearly with the cells
(benchmarks/voting.py measures 100k and 1M). scikit-learn is the optional extra `scl[voting]`.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import SclError

MIN_SHARE = 0.5  # below this share of its top label a cluster is 'heterogeneous' (CellTypist's min_prop defaults to 0)
HETEROGENEOUS = "heterogeneous"


def n_clusters_for(n_cells: int) -> int:
    """sqrt(n) clusters, 10 to 1,000: over-clusters of ~50 cells at 2,800 cells, ~300 at 100k, ~1,000 at 1M, so every
    type present in some numbers gets clusters of its own, as Leiden at CellTypist's high resolutions does."""
    return int(min(1000, max(10, math.ceil(math.sqrt(n_cells)))))


def over_cluster(embedding: np.ndarray, n_clusters: int | None = None, seed: int = 0) -> np.ndarray:
    """Cluster ids (as strings) from MiniBatchKMeans on the embedding.

    Examples
    --------
    >>> clusters = scl.voting.over_cluster(result.embedding)
    """
    try:
        from sklearn.cluster import MiniBatchKMeans
    except ImportError:
        raise SclError("automatic over-clustering needs scikit-learn: pip install 'scl[voting]'; "
                       "or give clusters of your own (an obs column such as 'leiden').", "over_clustering") from None
    n = len(embedding)
    k = min(n, n_clusters or n_clusters_for(n))
    model = MiniBatchKMeans(n_clusters=k, batch_size=4096, n_init=1, random_state=seed, max_no_improvement=20)
    labels = model.fit_predict(np.ascontiguousarray(embedding, dtype=np.float32))
    return labels.astype(str).astype(object)


def majority_vote(labels: np.ndarray, clusters, min_share: float = MIN_SHARE) -> dict[str, np.ndarray]:
    """Per cell: its cluster, the cluster's most frequent label (or 'heterogeneous') and that label's share.

    Parameters
    ----------
    labels
        Each cell's label (names).
    clusters
        Each cell's cluster id.
    min_share
        Clusters whose most frequent label holds a smaller share are labelled 'heterogeneous'.

    Examples
    --------
    >>> votes = scl.majority_vote(result.predicted_labels, adata.obs["leiden"])
    >>> votes["majority_label"][:3]
    """
    clusters = np.asarray(clusters)
    if len(clusters) != len(labels):
        raise SclError(f"{len(clusters)} cluster ids for {len(labels)} cells; give one per cell.", "over_clustering")
    if not 0 <= min_share <= 1:
        raise SclError(f"min_share {min_share!r}: give a share between 0 and 1.", "min_share")
    cluster_names, cluster_index = np.unique(clusters.astype(str), return_inverse=True)
    label_names, label_index = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    table = np.zeros((len(cluster_names), len(label_names)), dtype=np.int64)
    np.add.at(table, (cluster_index, label_index), 1)
    top = table.argmax(axis=1)
    share = table[np.arange(len(top)), top] / table.sum(axis=1)
    majority = np.where(share >= min_share, label_names[top], HETEROGENEOUS).astype(object)
    return {"cluster": cluster_names[cluster_index].astype(object), "majority_label": majority[cluster_index],
            "majority_share": share[cluster_index].astype(np.float32)}


def summary(votes: dict, over_clustering, min_share: float) -> dict:
    """What the run's report says about the votes."""
    given = over_clustering if isinstance(over_clustering, str) else "given per cell" if over_clustering is not None else "automatic (MiniBatchKMeans on the embedding)"
    return {"clusters_from": given, "clusters": len(np.unique(votes["cluster"])), "min_share": min_share,
            "heterogeneous_cells": int((votes["majority_label"] == HETEROGENEOUS).sum())}


def given_clusters(over_clustering, data, source) -> np.ndarray | None:
    """One cluster id per cell from an obs column name (AnnData or .h5ad file) or a sequence; None when not given."""
    if over_clustering is None:
        return None
    if not isinstance(over_clustering, str):
        return np.asarray(over_clustering)
    obs = getattr(data, "obs", None)
    columns = list(map(str, obs.columns)) if obs is not None else list(getattr(source.matrix, "obs_columns", None) or [])
    if obs is not None or hasattr(source.matrix, "obs_column"):
        if over_clustering not in columns:
            raise SclError(f"{source.path}: obs has no column {over_clustering!r}; choose one of: {', '.join(sorted(columns)) or '(none)'}.", "over_clustering")
        return obs[over_clustering].to_numpy() if obs is not None else source.matrix.obs_column(over_clustering)
    raise SclError(f"clusters by column name need an AnnData or .h5ad input; {source.path} has no obs.", "over_clustering")
