"""Dask arrays out: `Annotator.annotate(dask_backed_data, lazy=True)` returns a LazyAnnotation whose embedding,
probabilities and call columns are dask arrays over one task per row chunk. Nothing runs until they are computed;
computing several together (`dask.compute(lazy.embedding, lazy.labels)`) runs each chunk once, on the active
dask.distributed cluster or dask's own scheduler, and `da.to_zarr(lazy.embedding, ...)` writes an atlas's
embedding without it ever being whole in one process.

Each task is on_dask.annotate_cells, the task the eager path runs on a cluster: one Annotator per worker process,
the values and the judged input kind checked on every chunk (a NaN stops the compute naming its cell). What needs
every cell (majority voting, the run's report) is not lazy: `compute()` runs the eager path and returns the
AnnotationResult.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .calls import label_names
from .errors import SclError


@dataclass
class LazyAnnotation:
    """Calls, embedding and probabilities of every cell as dask arrays, in input order.

    Examples
    --------
    >>> lazy = annotator.annotate(ad.experimental.read_lazy("atlas.h5ad"), lazy=True)
    >>> labels, confidence = dask.compute(lazy.labels, lazy.calls["confidence"])
    >>> lazy.embedding.to_zarr("atlas_embedding.zarr")
    """

    cell_ids: np.ndarray
    calls: dict  # column name -> dask array (labels as class indices, -1 unassigned)
    embedding: object  # dask array float32 [cells, latent]
    probabilities: object  # dask array float32 [cells, classes]
    classes: list[str]
    _eager: Callable

    @property
    def labels(self):
        """Each cell's label name (a dask array of str objects; 'unassigned' for label -1)."""
        return self.calls["label"].map_blocks(label_names_of, classes=tuple(self.classes), dtype=object)

    def compute(self):
        """The AnnotationResult of the eager path (every cell in memory here; majority voting and the report too)."""
        return self._eager()


def label_names_of(codes: np.ndarray, classes: tuple) -> np.ndarray:
    return label_names(list(classes), codes)


def lazy_annotation(annotator, source, options, eager: Callable) -> LazyAnnotation:
    """The LazyAnnotation of `source`, an ExpressionSource over a dask array (as Annotator.annotate opens it)."""
    import dask
    import dask.array as da

    from .on_dask import annotate_cells, make_job
    from .pipeline import Pipeline

    x = getattr(source.matrix, "x", None)
    if not getattr(source.matrix, "is_dask", False):
        raise SclError("lazy=True needs dask-backed data (a dask array, or an AnnData from anndata.experimental.read_lazy); "
                       "annotate other data eagerly (lazy=False).", "lazy")
    if options.voting_wanted:
        raise SclError("majority voting needs every cell at once, which a lazy result never holds: call .compute() on the lazy "
                       "result with majority_voting, or annotate eagerly.", "majority_voting")
    job = dask.delayed(make_job(annotator, options, source), pure=True)
    sample = Pipeline(annotator, options, source.alignment.matched).annotate_block(source, *next(source.raw_blocks()))  # dtypes, widths
    bounds = np.cumsum((0,) + x.chunks[0])
    ids = source.cell_ids
    parts = [dask.delayed(annotate_cells, pure=True)(job, x.blocks[i], int(bounds[i]), int(bounds[i + 1]), ids[bounds[i] : bounds[i + 1]])
             for i in range(x.numblocks[0])]
    sizes = np.diff(bounds)

    def stacked(take: Callable, like: np.ndarray):
        pieces = [da.from_delayed(dask.delayed(take, pure=True)(p), (int(n), *like.shape[1:]), like.dtype) for p, n in zip(parts, sizes)]
        return da.concatenate(pieces, axis=0)

    calls = {name: stacked(_call(name), values) for name, values in sample.calls.items()}
    return LazyAnnotation(ids, calls, stacked(_embedding, sample.embedding), stacked(_probabilities, sample.probabilities),
                          list(annotator.classes), eager)


def _embedding(block):
    return block.embedding


def _probabilities(block):
    return block.probabilities


def _call(name: str):
    return functools.partial(_column, name=name)


def _column(block, name: str):
    return block.calls[name]
