"""Majority voting, CellTypist's most used option: each cluster of cells takes its most frequent label.

Per-cell calls are noisy at the edges between types; a cluster of similar cells is more often of one type.
Clusters come from the user (an obs column such as 'leiden', or one id per cell) or from an automatic
over-clustering of the scl embedding. CellTypist's automatic path is a full scanpy neighbours + Leiden run (users
report hours, and 100 GB at 1.5 million cells). Here it is scikit-learn's MiniBatchKMeans on the 128-dimensional
L2-normalised embedding: centres fitted on at most FIT_CELLS cells, then every cell assigned to its nearest, so
memory is the sample plus the centres and time grows linearly with the cells (benchmarks/voting_scale.py measures it;
scl-annotate keeps the embedding it votes over in a temporary file). scikit-learn is the optional extra `scl[voting]`.
"""

from __future__ import annotations

import math

import numpy as np

from .bounds import SHARE_OF_CELLS, check_setting
from .errors import SclError

MIN_SHARE = 0.5  # below this share of its top label a cluster is 'heterogeneous' (CellTypist's min_prop defaults to 0)
HETEROGENEOUS = "heterogeneous"
UNCLUSTERED = "unclustered"  # majority_label of a cell whose cluster id is missing (NaN): it takes no part in the vote


# Above this many cells the centres are fitted on a uniform sample of them (at least 500 cells per centre at the
# most centres, 1,000), and every cell is then assigned to its nearest: memory is the sample, not the embedding.
FIT_CELLS = 500_000
PREDICT_CHUNK = 100_000


def n_clusters_for(n_cells: int) -> int:
    """sqrt(n) clusters, 10 to 1,000: over-clusters of ~50 cells at 2,800 cells, ~300 at 100k, ~1,000 at 1M, so every
    type present in some numbers gets clusters of its own, as Leiden at CellTypist's high resolutions does."""
    return int(min(1000, max(10, math.ceil(math.sqrt(n_cells)))))


def over_cluster(embedding: np.ndarray, n_clusters: int | None = None, seed: int = 0) -> np.ndarray:
    """Cluster ids (as strings) from MiniBatchKMeans on the embedding.

    Examples
    --------
    >>> clusters = scl.over_cluster(result.embedding)
    """
    try:
        from sklearn.cluster import MiniBatchKMeans
    except ImportError:
        raise SclError("automatic over-clustering needs scikit-learn: pip install 'scl[voting]'; "
                       "or give clusters of your own (an obs column such as 'leiden').", "over_clustering") from None
    n = len(embedding)
    k = min(n, n_clusters or n_clusters_for(n))
    model = MiniBatchKMeans(n_clusters=k, batch_size=4096, n_init=1, random_state=seed, max_no_improvement=20)
    if n <= FIT_CELLS:
        labels = model.fit_predict(np.ascontiguousarray(embedding, dtype=np.float32))
    else:  # centres from a uniform sample, then every cell to its nearest centre, a chunk at a time (embedding may be on disk)
        model.fit(np.ascontiguousarray(embedding[np.sort(np.random.default_rng(seed).choice(n, FIT_CELLS, replace=False))], dtype=np.float32))
        labels = np.concatenate([model.predict(np.ascontiguousarray(embedding[i : i + PREDICT_CHUNK], dtype=np.float32)) for i in range(0, n, PREDICT_CHUNK)])
    names = np.array([str(i) for i in range(k)], dtype=object)
    return names[labels]  # one string object per cluster, shared by its cells


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
    clusters = np.asarray(clusters, dtype=object)
    if clusters.ndim != 1 or len(clusters) != len(labels):
        raise SclError(f"{clusters.size} cluster ids for {len(labels)} cells; give one per cell.", "over_clustering")
    check_min_share(min_share)
    clustered = ~missing(clusters)
    cluster_names, cluster_index = np.unique(clusters[clustered].astype(str), return_inverse=True)
    label_names, label_index = np.unique(np.asarray(labels, dtype=str)[clustered], return_inverse=True)
    table = np.zeros((len(cluster_names), len(label_names)), dtype=np.int64)
    np.add.at(table, (cluster_index, label_index), 1)
    top = table.argmax(axis=1)
    share = table[np.arange(len(top)), top] / np.maximum(table.sum(axis=1), 1)
    majority = np.where(share >= min_share, label_names[top], HETEROGENEOUS).astype(object)
    votes = {"cluster": np.full(len(labels), "", dtype=object), "majority_label": np.full(len(labels), UNCLUSTERED, dtype=object),
             "majority_share": np.full(len(labels), np.nan, dtype=np.float32)}  # cells without a cluster do not vote
    votes["cluster"][clustered] = cluster_names[cluster_index]
    votes["majority_label"][clustered] = majority[cluster_index]
    votes["majority_share"][clustered] = share[cluster_index]
    return votes


def missing(values: np.ndarray) -> np.ndarray:
    """Cluster ids that are no cluster: None, NaN (pandas' missing value in a categorical column) and pandas.NA."""
    return np.array([v is None or (isinstance(v, float) and math.isnan(v)) or type(v).__name__ == "NAType" for v in values], dtype=bool)


def check_min_share(min_share) -> None:
    check_setting("min_share", min_share, SHARE_OF_CELLS, MIN_SHARE)


def vote(labels: np.ndarray, embedding: np.ndarray | None, clusters, min_share: float = MIN_SHARE) -> dict[str, np.ndarray]:
    """majority_vote over `clusters`, or over an automatic over-clustering of `embedding` where none are given."""
    return majority_vote(labels, over_cluster(embedding) if clusters is None else clusters, min_share)


def summary(votes: dict, over_clustering, min_share: float) -> dict:
    """What the run's report says about the votes."""
    given = over_clustering if isinstance(over_clustering, str) else "given per cell" if over_clustering is not None else "automatic (MiniBatchKMeans on the embedding)"
    clustered = votes["majority_label"] != UNCLUSTERED
    return {"clusters_from": given, "clusters": len(np.unique(votes["cluster"][clustered])), "min_share": min_share,
            "heterogeneous_cells": int((votes["majority_label"] == HETEROGENEOUS).sum()), "unclustered_cells": int((~clustered).sum())}


def given_clusters(over_clustering, data, source) -> np.ndarray | None:
    """One cluster id per cell from an obs column name (AnnData or .h5ad file) or a sequence; None when not given."""
    if over_clustering is None:
        return None
    if not isinstance(over_clustering, str):
        return _per_cell(over_clustering, source)
    obs = getattr(data, "obs", None)
    columns = list(map(str, obs.columns)) if obs is not None else list(getattr(source.matrix, "obs_columns", None) or [])
    if obs is not None or hasattr(source.matrix, "obs_column"):
        if over_clustering not in columns:
            raise SclError(f"{source.path}: obs has no column {over_clustering!r}; choose one of: {', '.join(sorted(columns)) or '(none)'}.", "over_clustering")
        return obs[over_clustering].to_numpy() if obs is not None else source.matrix.obs_column(over_clustering)
    raise SclError(f"clusters by column name need an AnnData or .h5ad input; {source.path} has no obs.", "over_clustering")


def _per_cell(clusters, source) -> np.ndarray:
    """One cluster id per cell, in the cells' order: a pandas Series is aligned on its index (the cells' names), as
    pandas aligns; a plain sequence is taken by position."""
    if np.ndim(clusters) != 1:
        raise SclError(f"over_clustering {clusters!r}: give an obs column name or one cluster id per cell.", "over_clustering")
    index = getattr(clusters, "index", None)
    values = np.asarray(getattr(clusters, "to_numpy", lambda: clusters)(), dtype=object)
    ids = source.cell_ids
    if index is None or ids is None or len(index) != len(ids):
        return values
    names = np.asarray(index, dtype=str)
    ids = np.asarray(ids, dtype=str)
    if (names == ids).all():
        return values
    position = {name: i for i, name in enumerate(names)}
    if len(position) == len(names) and all(i in position for i in ids):
        return values[[position[i] for i in ids]]
    if type(index).__name__ == "RangeIndex" and index.start == 0 and index.step == 1:
        return values  # a Series without names of its own: by position
    raise SclError(f"over_clustering: the Series' index does not name the cells (first cell {ids[0]!r}, first index entry {names[0]!r}); "
                   "give a Series indexed by obs names, or its values (.to_numpy()) in the cells' order.", "over_clustering")
