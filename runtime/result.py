"""What `Annotator.annotate` returns: the calls, embedding and probabilities of every cell, and the run's report;
ResultSink, the pipeline's sink that gathers them, and BlockCollector, which fills each array in place."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field

import numpy as np

from . import voting
from .calls import ALL_COLUMNS, REASON_CATEGORIES, VOTING_COLUMNS, Column, as_values, label_names
from .errors import SclError


def obs_name(key_added: str, column: Column) -> str:
    return f"{key_added}_{column.name}"


def check_key_added(key_added) -> None:
    if not isinstance(key_added, str) or not key_added:
        raise SclError(f"key_added {key_added!r}: give a non-empty string such as 'scl'.", "key_added")


def embedding_key(key_added: str) -> str:
    return f"X_{key_added}"


def probabilities_key(key_added: str) -> str:
    return f"{key_added}_probabilities"


@dataclass
class AnnotationResult:
    """Calls for every cell, in input order.

    Attributes
    ----------
    cell_ids
        One id per cell (AnnData obs_names, DataFrame index, or "0", "1", ... for bare matrices).
    calls
        Column name -> values, for each of `columns` (see `scl.COLUMNS`); labels as class indices (-1: unassigned).
    embedding
        float32 [cells, latent], L2-normalised: use it as `sc.pp.neighbors(adata, use_rep="X_scl")` does.
    probabilities
        float32 [cells, classes], columns in the order of `classes`.
    classes
        The model's cell types.
    report
        The run's summary: input, gene matching, model, label counts, novelty, timing (scl-annotate's --report).

    Examples
    --------
    >>> result = scl.Annotator("model.onnx").annotate(adata)
    >>> result.to_frame()["label"].value_counts()
    >>> annotated = result.to_adata(adata)      # obs scl_label, ..., obsm X_scl, uns scl
    """

    cell_ids: np.ndarray
    calls: dict
    embedding: np.ndarray
    probabilities: np.ndarray
    classes: list[str]
    columns: list[Column]
    report: dict = field(default_factory=dict)

    @classmethod
    def from_arrays(cls, arrays: dict, classes: list[str], columns: list[Column]) -> AnnotationResult:
        """From BlockCollector.arrays(): cell_ids, embedding, probabilities and one entry per column."""
        calls = {c.name: arrays[c.name] for c in columns}
        return cls(arrays["cell_ids"], calls, arrays["embedding"], arrays["probabilities"], classes, columns)

    @property
    def predicted_labels(self) -> np.ndarray:
        """Each cell's label as a name ('unassigned' where refused); an encoder-only model's: its neighbours' (knn_label)."""
        if "label" not in self.calls:
            return np.asarray(self.calls["knn_label"], dtype=object)
        return label_names(self.classes, self.calls["label"])

    def add_votes(self, clusters: np.ndarray | None, min_share: float = voting.MIN_SHARE) -> None:
        """Majority voting over `clusters` (one id per cell), or over an automatic over-clustering of the embedding."""
        self.add_columns(list(VOTING_COLUMNS), voting.vote(self.predicted_labels, self.embedding, clusters, min_share))

    def add_columns(self, columns: list[Column], values: dict) -> None:
        self.calls.update({c.name: values[c.name] for c in columns})
        self.columns = [c for c in self.columns if c not in columns] + list(columns)

    def values(self, column: Column) -> np.ndarray:
        """A column as users read it: names for labels."""
        return as_values(column, self.calls[column.name], self.classes)

    def to_frame(self, probabilities: bool = False):
        """A pandas DataFrame, one row per cell (index: cell ids), one column per output column.

        Examples
        --------
        >>> result.to_frame(probabilities=True).head()
        """
        import pandas as pd

        frame = pd.DataFrame({c.name: self._series_values(c, pd) for c in self.columns}, index=pd.Index(self.cell_ids, name="cell_id"))
        if probabilities:
            frame = frame.join(pd.DataFrame(self.probabilities, index=frame.index, columns=[f"p_{c}" for c in self.classes]))
        return frame

    def _order_in(self, adata) -> np.ndarray:
        """Positions of adata's cells in the result: by name where the names are the result's (in any order)."""
        ids = np.asarray(self.cell_ids, dtype=str)
        names = np.asarray(adata.obs_names, dtype=str)
        if adata.n_obs == len(ids) and (names == ids).all():
            return np.arange(len(ids))
        position = {name: i for i, name in enumerate(ids)}
        order = np.array([position.get(name, -1) for name in names], dtype=np.int64)
        if adata.n_obs != len(ids) or (order < 0).any() or len(position) != len(ids):
            missing = names[order < 0][:1].tolist() if (order < 0).any() else []
            raise SclError(f"the result holds {len(ids):,} cells but the AnnData {adata.n_obs:,}"
                           f"{f', among them {missing[0]!r} that the result lacks' if missing else ''}; "
                           "write it into the AnnData it came from (its cells in any order).")
        return order

    def _series_values(self, column: Column, pd, order: np.ndarray | None = None):
        values = self.values(column)
        if order is not None:
            values = values[order]
        if column.kind == "label":
            return pd.Categorical(values, categories=list(self.classes) + ["unassigned"])
        if column.kind == "reason":
            return pd.Categorical(values, categories=list(REASON_CATEGORIES))
        if column.kind in ("category", "text"):
            return pd.Categorical(values.astype(str))
        return values

    def to_adata(self, adata=None, key_added: str = "scl"):
        """Write the results into `adata` (in place) or, without one, into a new AnnData with no X.

        obs f"{key_added}_label", ... (one per column), obsm f"X_{key_added}" (embedding) and
        f"{key_added}_probabilities", uns[key_added] (the report): what scl-annotate writes to .h5ad files.

        Examples
        --------
        >>> result.to_adata(adata)
        >>> sc.pl.umap(adata, color="scl_label")
        """
        import anndata
        import pandas as pd

        check_key_added(key_added)
        if adata is None:
            adata = anndata.AnnData(obs=pd.DataFrame(index=pd.Index(self.cell_ids.astype(str))))
        order = self._order_in(adata)
        previous = [obs_name(key_added, c) for c in ALL_COLUMNS if obs_name(key_added, c) in adata.obs]
        if previous:  # a second run under one key replaces every column of the first
            adata.obs = _without(adata.obs, previous)
        for column in self.columns:
            adata.obs[obs_name(key_added, column)] = self._series_values(column, pd, order)
        adata.obsm[embedding_key(key_added)] = self.embedding[order]
        adata.obsm[probabilities_key(key_added)] = self.probabilities[order]
        adata.uns[key_added] = {"report_json": json.dumps(self.report), "model": self.report.get("model", {}).get("path", ""),
                                "provider": self.report.get("model", {}).get("provider", "")}
        return adata

    def __repr__(self) -> str:
        counts = self.report.get("labels") or {}
        top = ", ".join(f"{k} {v}" for k, v in list(counts.items())[:5])
        return f"AnnotationResult({len(self.cell_ids)} cells, {len(self.classes)} classes; {top})"


def _without(obs, columns: list[str]):
    """obs less `columns`: a DataFrame, or a lazy AnnData's (anndata's Dataset2D, over an xarray Dataset)."""
    if hasattr(obs, "drop"):
        return obs.drop(columns=columns)
    return type(obs)(obs.ds.drop_vars(columns))


class ResultSink:
    """The in-memory driver's sink (pipeline.py): every block gathered into one AnnotationResult, `result` once closed."""

    output = None

    def __init__(self, n_cells: int | None, classes: list[str], columns: list[Column]):
        self.collector = BlockCollector(n_cells)  # the pipeline's majority voting reads labels and embedding from here
        self.classes, self.columns = classes, list(columns)
        self.votes: tuple[list[Column], dict] | None = None
        self.result: AnnotationResult | None = None

    def write(self, block) -> None:
        self.collector.add({"cell_ids": block.cell_ids, "embedding": block.embedding, "probabilities": block.probabilities, **block.calls})

    def add_columns(self, columns: list[Column], values: dict) -> None:
        self.votes = (columns, values)

    def close(self, report) -> None:
        self.result = AnnotationResult.from_arrays(self.collector.arrays(), self.classes, self.columns)
        if self.votes is not None:
            self.result.add_columns(*self.votes)
        self.result.report = report.to_dict()

    def abort(self) -> None:
        self.collector = None


class BlockCollector:
    """Blocks of per-cell arrays gathered into one array each. With the number of cells known (files with an obs
    index, everything in memory), each array is allocated once and filled in place: concatenating at the end would
    hold every result twice (1 GB for a million cells' embeddings). Keys in `on_disk` are appended to an unnamed
    temporary file instead (TMPDIR; gone when the run ends, however it ends) and come back memory-mapped: a file's
    majority voting needs the embedding of every cell, 512 bytes each, 51 GB at 10^8 cells."""

    def __init__(self, n_cells: int | None, on_disk: tuple[str, ...] = ()):
        self.n_cells = n_cells
        self.filled = 0
        self.parts: dict[str, list | np.ndarray] = {}
        self.on_disk = set(on_disk)
        self.files: dict[str, tuple] = {}  # key -> (file, row shape, dtype)

    def add(self, values: dict[str, np.ndarray]) -> None:
        n = len(next(iter(values.values())))
        for key, value in values.items():
            if key in self.on_disk:
                self._append(key, value)
            elif self.n_cells is None:
                self.parts.setdefault(key, []).append(value)
            else:
                if key not in self.parts:
                    self.parts[key] = np.empty((self.n_cells, *value.shape[1:]), dtype=value.dtype)
                self.parts[key][self.filled : self.filled + n] = value
        self.filled += n

    def _append(self, key: str, value: np.ndarray) -> None:
        if key not in self.files:
            self.files[key] = (tempfile.TemporaryFile(prefix="scl-", suffix=f".{key}"), value.shape[1:], value.dtype)
        try:
            self.files[key][0].write(np.ascontiguousarray(value, dtype=self.files[key][2]).tobytes())
        except OSError as err:
            raise SclError(f"{tempfile.gettempdir()}: cannot write the temporary {key} that majority voting clusters ({err.strerror}; it "
                           f"takes {value[0].nbytes} bytes a cell); free space there or point TMPDIR at a folder with room.") from None

    def arrays(self) -> dict[str, np.ndarray]:
        kept = {k: np.concatenate(v) for k, v in self.parts.items()} if self.n_cells is None else {k: v[: self.filled] for k, v in self.parts.items()}
        for key, (file, shape, dtype) in self.files.items():
            file.flush()
            kept[key] = np.memmap(file, dtype=dtype, mode="r", shape=(self.filled, *shape)) if self.filled else np.empty((0, *shape), dtype)
        return kept

    def close(self) -> None:
        for file, _, _ in self.files.values():
            file.close()
