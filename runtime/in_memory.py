"""Cells already in memory (AnnData, numpy, scipy sparse, pandas) or lazy (dask arrays, as anndata's read_lazy gives),
served in blocks like a file.

The same interface as H5adFile and TextMatrix (var_names, var_columns, cell_ids, blocks), so in-memory data goes
through the same checks, alignment and normalisation as files. Nothing is made dense whole: blocks of CSR rows are
views into the caller's arrays; a CSC matrix is converted to CSR once (a copy the size of the matrix); a dask array is
computed one row chunk at a time (on a dask.distributed cluster, on_dask.py runs the chunks there instead).
Neither anndata, pandas nor dask is imported unless the caller's data is of their types.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import sparse

from .errors import SclError
from .h5ad import SparseRows, chosen_matrix, row_ranges, wanted_matrix

log = logging.getLogger("scl")


def _type_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


def is_anndata(obj) -> bool:
    return _type_name(obj).startswith("anndata.") and hasattr(obj, "obs_names")


def is_dataframe(obj) -> bool:
    return _type_name(obj).startswith("pandas.") and hasattr(obj, "columns")


def is_dask_array(obj) -> bool:
    return _type_name(obj).startswith("dask.array") and hasattr(obj, "chunks")


class MemoryMatrix:
    """Rows of an in-memory matrix with its gene names and cell ids."""

    def __init__(self, x, genes, cell_ids=None, var_columns: dict | None = None, name: str = "matrix"):
        self.is_dask = is_dask_array(x)
        if self.is_dask:  # read chunk by chunk (blocks); every gene of a cell must be in one chunk
            if x.ndim == 2 and x.numblocks[1] > 1:
                log.warning("%s: a dask array chunked along genes (%d chunks) is rechunked to whole rows (x.rechunk({1: -1})); "
                            "chunk it so once to save this step.", name, x.numblocks[1])
                x = x.rechunk({1: -1})
        elif sparse.issparse(x):
            x = x.tocsr() if x.format != "csr" else x  # CSC and others: one conversion, the size of the matrix
        else:
            x = np.asarray(x)  # np.matrix too: its rows would stay 2-D matrices
        if x.dtype.kind not in "biuf":
            raise SclError(f"{name}: values of type {x.dtype} are not numbers; give counts (integers) or log1p(CP10k) as a numeric matrix.")
        if x.ndim != 2:
            raise SclError(f"{name}: expected a 2-D matrix of cells x genes, got {x.ndim} dimension(s).")
        if genes is None:
            raise SclError(f"{name}: a bare matrix carries no gene names; pass genes=[...] with one symbol or Ensembl ID per column.", "genes")
        self.var_names = np.asarray([str(g) for g in genes], dtype=object)
        if len(self.var_names) != x.shape[1]:
            raise SclError(f"{name}: {x.shape[1]} columns but {len(self.var_names)} gene names; give one name per column (cells as rows).", "genes")
        if cell_ids is None:
            cell_ids = np.arange(x.shape[0]).astype(str)
        self.cell_ids = np.asarray(cell_ids, dtype=object).astype(str).astype(object)
        if len(self.cell_ids) != x.shape[0]:
            raise SclError(f"{name}: {x.shape[0]} rows but {len(self.cell_ids)} cell ids; give one id per row.", "cell_ids")
        self.x = x
        self.var_columns = var_columns or {}
        self.matrix_name = name
        self.n_cells = x.shape[0]

    def var_column(self, key: str) -> np.ndarray:
        if key not in self.var_columns:
            raise SclError(f"var has no column {key!r}; choose one of: {', '.join(sorted(self.var_columns)) or '(none)'}.", "gene_column")
        return np.asarray(self.var_columns[key]).astype(str).astype(object)

    def blocks(self, size: int):
        """(cell ids, rows) per block of `size` cells: SparseRows views for sparse data, arrays for dense; a dask
        array's row chunks computed one at a time."""
        if not self.is_dask:
            yield from _blocks_of(self.x, self.cell_ids, size)
            return
        at = 0
        for i in range(self.x.numblocks[0]):
            chunk = self.x.blocks[i].compute()
            chunk = chunk.tocsr() if sparse.issparse(chunk) else np.asarray(chunk)
            yield from _blocks_of(chunk, self.cell_ids[at : at + chunk.shape[0]], size)
            at += chunk.shape[0]

    def close(self) -> None:
        pass


def _blocks_of(x, cell_ids, size: int):
    for start, stop in row_ranges(x.shape[0], size):
        rows = x[start:stop] if isinstance(x, np.ndarray) else SparseRows.of(x.data, x.indices, x.indptr, start, stop)
        yield cell_ids[start:stop], rows


def choose_anndata_matrix(adata, layer: str | None, use_raw: bool | None):
    """(matrix, var dataframe, name): the counts as files' --matrix auto picks them (h5ad.chosen_matrix), or the
    layer / raw asked for."""
    def present(name: str) -> bool:
        if name == "raw/X":
            return adata.raw is not None
        return name.removeprefix("layers/") in adata.layers if name.startswith("layers/") else True

    wanted = wanted_matrix(layer, use_raw)
    name = chosen_matrix(wanted, present)
    if name is None and wanted == "raw/X":
        raise SclError("adata.raw is None; annotate X or a layer instead.", "use_raw", "layer")
    if name is None:
        raise SclError(f"adata has no layer {layer!r}; choose one of: {', '.join(adata.layers) or '(none)'}.", "layer")
    if name == "raw/X":
        return adata.raw.X, adata.raw.var, "raw.X"
    if name.startswith("layers/"):
        key = name.removeprefix("layers/")
        return adata.layers[key], adata.var, f"layers[{key!r}]"
    return adata.X, adata.var, "X"


def from_anndata(adata, layer: str | None = None, use_raw: bool | None = None) -> MemoryMatrix:
    x, var, name = choose_anndata_matrix(adata, layer, use_raw)
    if x is None:
        raise SclError(f"adata.{name} is empty (None); put the counts in X, a layer or raw.", "layer")
    columns = {c: var[c].to_numpy() for c in var.columns}
    return MemoryMatrix(x, var.index, adata.obs_names, columns, name)


def from_dataframe(frame) -> MemoryMatrix:
    """Cells as rows, genes as columns (CellTypist's layout for tables)."""
    import pandas as pd  # already imported by whoever made the frame

    if len(frame.columns) and all(isinstance(t, pd.SparseDtype) for t in frame.dtypes):
        x = frame.sparse.to_coo().tocsr()
    else:
        numeric = [pd.api.types.is_numeric_dtype(t) and not pd.api.types.is_bool_dtype(t) for t in frame.dtypes]
        if not all(numeric):
            column = frame.columns[numeric.index(False)]
            raise SclError(f"DataFrame: column {column!r} holds {frame.dtypes.iloc[numeric.index(False)]} values, not numbers; cells are rows and "
                           "genes columns, so move cell metadata into the index (frame.set_index(...)) or drop it.")
        x = frame.to_numpy(dtype=np.float32, na_value=np.nan)  # nullable Int64 too: a missing value becomes NaN, refused by cell
    return MemoryMatrix(x, frame.columns, frame.index, name="DataFrame")


def memory_matrix(x, genes=None, cell_ids=None, layer=None, use_raw=None) -> MemoryMatrix:
    """Any supported in-memory object as a MemoryMatrix."""
    if is_anndata(x):
        return from_anndata(x, layer, use_raw)
    if layer is not None or use_raw is not None:
        raise SclError("layer and use_raw apply to AnnData objects.", "layer", "use_raw")
    if is_dataframe(x):
        if genes is not None:
            raise SclError("a DataFrame's columns are its genes; leave genes out.", "genes")
        return from_dataframe(x)
    if not (sparse.issparse(x) or isinstance(x, np.ndarray) or is_dask_array(x) or hasattr(x, "__array__")):
        raise SclError(f"cannot annotate a {type(x).__name__}; give an AnnData, a numpy array, a scipy sparse matrix or a pandas DataFrame.")
    return MemoryMatrix(x, genes, cell_ids, name=type(x).__name__)
