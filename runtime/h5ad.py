"""Read cells from an .h5ad file with h5py, one block of rows at a time.

Elements are read by their `encoding-type` attribute, the way anndata writes them
(https://anndata.readthedocs.io/en/latest/fileformat-prose.html). X is never read whole
when it is CSR or dense; a CSC matrix is converted in memory only below a size limit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np
from scipy import sparse

from .errors import SclError

MATRIX_CHOICES = ("auto", "X", "layers/counts", "raw/X")
AUTO_MATRICES = ("layers/counts", "raw/X", "X")  # what "auto" takes, the first present: raw counts first, where the data keeps them
DEFAULT_CSC_LIMIT_BYTES = 2 * 1024**3
SPAN_READ_FACTOR = 4  # a view's block is read as one span when the span holds under 4 rows per row wanted


@dataclass
class SparseRows:
    """A block of CSR rows: the three arrays of scipy's csr_matrix, with indptr starting at 0."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def of(cls, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, start: int, stop: int) -> SparseRows:
        """Rows start:stop of a CSR matrix's three arrays, as views."""
        lo, hi = indptr[start], indptr[stop]
        return cls(data[lo:hi], indices[lo:hi], indptr[start : stop + 1] - lo)

    def check(self, n_cols: int, where: str) -> None:
        """Refuse a block whose CSR arrays contradict each other (a corrupt or hand-made file), before any use."""
        indptr, n = self.indptr, len(self.indices)
        decreasing = (np.diff(indptr) < 0).any()
        if len(self.data) != n or indptr[0] != 0 or indptr[-1] != n or decreasing:
            problem = "indptr decreases" if decreasing else f"indptr ends at {indptr[-1]} but the block holds {n} values"
            raise SclError(f"{where}: the sparse matrix is corrupt ({problem}); write it again with anndata (adata.write_h5ad).")
        if n and (self.indices.min() < 0 or self.indices.max() >= n_cols):
            raise SclError(f"{where}: the sparse matrix is corrupt (gene index {int(self.indices.max())} or {int(self.indices.min())} outside 0-{n_cols - 1}); "
                           "write it again with anndata (adata.write_h5ad).")


    def to_scipy(self, n_cols: int) -> sparse.csr_matrix:
        return sparse.csr_matrix((self.data, self.indices, self.indptr), shape=(self.n_rows, n_cols), copy=False)

    @classmethod
    def from_scipy(cls, rows: sparse.csr_matrix) -> SparseRows:
        return cls(rows.data, rows.indices, rows.indptr)

    def summed(self, n_cols: int) -> SparseRows:
        """The block with repeated (cell, gene) entries added up, as scipy's sum_duplicates does (a checked block).
        Normalising them one by one would take log1p of each part, and genes_detected would count a gene twice."""
        rows = self.to_scipy(n_cols)
        if rows.has_canonical_format:  # sorted, no repeats: what anndata writes; one C pass to know
            return self
        rows = rows.copy()  # never change a caller's arrays
        rows.sum_duplicates()
        return SparseRows.from_scipy(rows)


def wanted_matrix(layer: str | None, use_raw: bool | None) -> str:
    """scanpy's layer / use_raw as a --matrix value: 'layers/<layer>', 'raw/X', 'X' (use_raw=False) or 'auto'."""
    if layer is not None and use_raw:
        raise SclError("layer and use_raw both given; choose one.", "layer", "use_raw")
    return f"layers/{layer}" if layer is not None else "raw/X" if use_raw else "X" if use_raw is False else "auto"


def chosen_matrix(wanted: str, present) -> str | None:
    """The matrix to annotate, for files and AnnData alike: `wanted` itself, or for 'auto' the first of AUTO_MATRICES;
    None where the data lacks it. `present(name)` says whether the data holds a matrix."""
    if wanted == "auto":
        return next((name for name in AUTO_MATRICES if present(name)), None)
    return wanted if present(wanted) else None


def row_ranges(n_rows: int, size: int):
    """(start, stop) of each block of `size` rows."""
    for start in range(0, n_rows, size):
        yield start, min(start + size, n_rows)


def csc_to_csr(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple) -> SparseRows:
    """Column-major arrays to row blocks, in memory (about three times the nonzeros)."""
    cols = np.repeat(np.arange(shape[1], dtype=np.int64), np.diff(indptr))
    order = np.argsort(indices, kind="stable")
    counts = np.bincount(indices, minlength=shape[0])
    return SparseRows(data[order], cols[order], np.concatenate([[0], np.cumsum(counts)]))


def open_h5ad(path: str) -> h5py.File:
    if not os.path.exists(path):
        raise SclError(f"{path}: no such file; check the path.")
    if os.path.getsize(path) == 0:
        raise SclError(f"{path}: the file is empty (0 bytes); write the AnnData again with adata.write_h5ad().")
    if not h5py.is_hdf5(path):
        raise SclError(f"{path}: not an HDF5 file, so neither an .h5ad nor a 10x .h5; scl reads those, 10x MTX folders (matrix.mtx with "
                       "features.tsv and barcodes.tsv) and CSV/TSV text named .csv, .tsv or .txt (optionally .gz).")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise SclError(
            f"{path}: the HDF5 file cannot be opened ({str(err).splitlines()[0]}); "
            "it is probably truncated or still being written: copy or write it again."
        ) from None


def open_zarr(path: str):
    """An anndata zarr store, read through the same code as an .h5ad: the two encodings are one layout."""
    try:
        import zarr
    except ImportError:
        raise SclError(f"{path}: an anndata zarr store; reading it needs the zarr package (pip install 'scl[zarr]'), or convert it once "
                       f"to .h5ad: python -c \"import anndata; anndata.read_zarr('{path}').write_h5ad('{path.rstrip('/')}.h5ad')\".") from None
    try:
        return zarr.open_group(path, mode="r")
    except Exception as err:  # zarr raises several kinds for a store it cannot read
        raise SclError(f"{path}: the zarr store cannot be opened ({str(err).splitlines()[0]}); copy or write it again.") from None


def is_array(elem) -> bool:
    """A dataset (h5py) or array (zarr), not a group."""
    return hasattr(elem, "shape") and hasattr(elem, "dtype")


def filename(elem) -> str:
    """The file or store an element lives in, for messages."""
    if hasattr(elem, "file"):
        return elem.file.filename
    return str(getattr(elem.store, "path", None) or getattr(elem.store, "root", "the zarr store"))


def _decode(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "SOTU":
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)
    return values


def read_array(elem, rows: slice = slice(None)) -> np.ndarray:
    """One column or index of a dataframe (its `rows` only), whatever its encoding."""
    kind = elem.attrs.get("encoding-type", "array")
    if kind == "categorical":
        categories = read_array(elem["categories"])
        codes = elem["codes"][rows]
        out = np.empty(len(codes), dtype=object)
        out[codes >= 0] = categories[codes[codes >= 0]]
        return out
    if kind in ("nullable-integer", "nullable-boolean", "nullable-string-array"):
        values = _decode(elem["values"][rows]).astype(object)
        values[elem["mask"][rows]] = None
        return values
    if isinstance(elem, h5py.Dataset) and h5py.check_string_dtype(elem.dtype) is not None:
        return np.array(elem.asstr()[rows], dtype=object)
    if is_array(elem):
        return _decode(elem[rows])
    raise SclError(f"{filename(elem)}: {elem.name} has encoding {kind!r}, which scl cannot read as a column.")


def array_length(elem) -> int:
    """How many values a column or index holds, read from its shape."""
    kind = elem.attrs.get("encoding-type", "array")
    inner = {"categorical": "codes", "nullable-integer": "values", "nullable-boolean": "values", "nullable-string-array": "values"}.get(kind)
    return int((elem[inner] if inner else elem).shape[0])


def dataframe_parts(group) -> tuple[object, dict, int]:
    """An anndata dataframe (obs, var) unread: its index element, its columns and its length."""
    if is_array(group):
        raise SclError(
            f"{filename(group)}: {group.name} uses the pre-0.7 anndata layout; "
            "read and save it once with a current anndata (ad.read_h5ad(f).write_h5ad(f2))."
        )
    index_name = group.attrs.get("_index", "_index")
    columns = {k: group[k] for k in group.keys() if k != index_name and k != "__categories"}
    return group[index_name], columns, array_length(group[index_name])


def read_index(elem, rows: slice = slice(None)) -> np.ndarray:
    """Names from a dataframe's index (its `rows` only), as str objects."""
    return read_array(elem, rows).astype(str).astype(object)


class Matrix:
    """Rows of X, a layer or raw/X, in blocks."""

    def __init__(self, elem, name: str, csc_limit_bytes: int):
        self.name, self.elem, self.where = name, elem, filename(elem)
        if is_array(elem):
            self.format = "dense"
            self.shape = tuple(elem.shape)
            self.dtype = elem.dtype
            return
        self.format = elem.attrs.get("encoding-type", elem.attrs.get("h5sparse_format", ""))
        self.format = {"csr": "csr_matrix", "csc": "csc_matrix"}.get(self.format, self.format)
        if self.format not in ("csr_matrix", "csc_matrix"):
            raise SclError(f"{self.where}: {name} has encoding {self.format!r}; scl reads dense, CSR and CSC matrices.")
        self.shape = tuple(int(s) for s in elem.attrs.get("shape", elem.attrs.get("h5sparse_shape")))
        self.dtype = elem["data"].dtype
        self._csr_in_memory = None
        if self.format == "csc_matrix":
            self._csr_in_memory = self._csc_to_csr(csc_limit_bytes)

    def _csc_to_csr(self, limit: int) -> SparseRows:
        data, indices, indptr = self.elem["data"], self.elem["indices"], self.elem["indptr"]
        needed = 3 * data.size * (data.dtype.itemsize + 8)  # data, row and column ids, and a sort order
        if needed > limit:
            raise SclError(
                f"{self.where}: {self.name} is stored by genes (CSC) and reading it by cells needs "
                f"about {needed / 1024**3:.1f} GiB, above the {limit / 1024**3:.1f} GiB limit; save it as CSR once "
                "(adata.X = adata.X.tocsr(); adata.write_h5ad(...)) or raise the limit.", "csc_memory_limit"
            )
        return csc_to_csr(data[...], indices[...], indptr[...], self.shape)

    def rows_at(self, positions: np.ndarray, span_factor: float = SPAN_READ_FACTOR) -> np.ndarray | SparseRows:
        """The rows at `positions` (any order), in that order. Read in file order: the whole span when it holds under
        `span_factor` rows per row wanted, else each run of consecutive rows (a view of a few cells spread over a large file)."""
        order = np.argsort(positions, kind="stable")
        wanted = positions[order]
        if wanted[-1] - wanted[0] < span_factor * len(wanted):
            block, at = self.rows(int(wanted[0]), int(wanted[-1]) + 1), wanted - wanted[0]
        else:
            starts = np.flatnonzero(np.diff(wanted, prepend=-2) != 1)
            stops = np.append(starts[1:], len(wanted))
            parts = [self.rows(int(wanted[a]), int(wanted[b - 1]) + 1) for a, b in zip(starts, stops)]
            block, at = self._stack(parts), np.arange(len(wanted))
        picked = np.empty_like(at)
        picked[order] = at  # the row of `block` each asked position is
        return self._take(block, picked)

    def _stack(self, parts):
        if self.format == "dense":
            return np.concatenate(parts)
        for part in parts:
            part.check(self.shape[1], self.where)
        return SparseRows.from_scipy(sparse.vstack([p.to_scipy(self.shape[1]) for p in parts], format="csr"))

    def _take(self, block, rows: np.ndarray):
        if self.format == "dense":
            return block[rows]
        block.check(self.shape[1], self.where)
        return SparseRows.from_scipy(block.to_scipy(self.shape[1])[rows])

    def rows(self, start: int, stop: int) -> np.ndarray | SparseRows:
        if self.format == "dense":
            return self.elem[start:stop]
        if self._csr_in_memory is not None:
            src = self._csr_in_memory
            return SparseRows.of(src.data, src.indices, src.indptr, start, stop)
        indptr = self.elem["indptr"][start : stop + 1].astype(np.int64)
        lo, hi = int(indptr[0]), max(int(indptr[-1]), int(indptr[0]))  # a decreasing indptr is refused by SparseRows.check
        return SparseRows(self.elem["data"][lo:hi], self.elem["indices"][lo:hi], indptr - lo)


class H5adFile:
    """An .h5ad (or an anndata zarr store, `file` a zarr group) opened for reading cells: which matrix, its gene
    names, its cell ids."""

    def __init__(self, path: str, matrix: str = "auto", csc_limit_bytes: int = DEFAULT_CSC_LIMIT_BYTES, cell_names=None,
                 file=None, rows: tuple[int, int] | None = None):
        self.path = path
        self.file = file if file is not None else open_h5ad(path)
        self.is_hdf5 = isinstance(self.file, h5py.File)
        try:
            self.matrix_name = self._choose_matrix(matrix)
            self.matrix = Matrix(self.file[self.matrix_name], self.matrix_name, csc_limit_bytes)
            if rows is not None and (cell_names is not None or not 0 <= rows[0] < rows[1] <= self.matrix.shape[0]):
                raise SclError(f"{path}: rows {rows[0]}..{rows[1]} of {self.matrix.shape[0]:,} cells cannot be read; "
                               "give 0 <= start < stop <= cells, without a view.")
            # cell ids are read a block at a time (ids()): the whole index of 10^7 cells is gigabytes of strings
            self.rows = slice(None) if rows is None else slice(*rows)
            self.obs_index, self.obs_columns, n_obs = dataframe_parts(self.file["obs"])
            var_group = self.file["raw/var"] if self.matrix_name == "raw/X" else self.file["var"]
            var_index, self.var_columns, n_var = dataframe_parts(var_group)
            self.var_names = read_index(var_index)
        except KeyError as err:
            self.close()
            raise SclError(f"{path}: the file lacks {err.args[0]}; is it an AnnData .h5ad or zarr store (or a 10x .h5)?") from None
        except Exception:
            self.close()
            raise
        if self.matrix.shape != (n_obs, n_var):
            self.close()
            raise SclError(
                f"{path}: {self.matrix_name} is {self.matrix.shape[0]} x {self.matrix.shape[1]} but obs/var "
                f"hold {n_obs} x {n_var}; the file is inconsistent: write it again with anndata."
            )
        self.first_row = 0 if rows is None else rows[0]
        self.positions = None if cell_names is None else self._positions(np.asarray(cell_names, dtype=str))
        self.n_cells = len(self.positions) if self.positions is not None else (rows[1] - rows[0] if rows else n_obs)

    @property
    def cell_ids(self) -> np.ndarray:
        """Every cell's id (read now, whole: prefer ids() a block at a time)."""
        return self.ids(0, self.n_cells)

    def ids(self, start: int, stop: int) -> np.ndarray:
        """The ids of cells start..stop-1 (of the range or view opened)."""
        if self.positions is not None:
            return self._view_ids[start:stop]
        if self.is_hdf5 and not self.file:
            raise SclError(f"{self.path}: the file is closed; read its cell ids while it is open (inside `with annotator.open(...)`).")
        return read_index(self.obs_index, slice(self.first_row + start, self.first_row + stop))

    def id_chunks(self, size: int = 1_000_000):
        """Every cell's id, `size` at a time."""
        for start, stop in row_ranges(self.n_cells, size):
            yield self.ids(start, stop)

    def _positions(self, names: np.ndarray) -> np.ndarray:
        """Where the named cells (a backed view's obs names: in memory already) are in the file's obs."""
        ids = read_index(self.obs_index).astype(str)
        order = np.argsort(ids, kind="stable")
        at = np.searchsorted(ids, names, sorter=order).clip(max=len(ids) - 1)
        found = ids[order[at]] == names
        if not len(names):
            self.close()
            raise SclError(f"{self.path}: the view holds no cells; nothing to annotate.")
        if not found.all():
            self.close()
            raise SclError(f"{self.path}: the view names {names[~found][0]!r}, which the file's obs lacks; annotate a view of this file.")
        self._view_ids = ids[order[at]].astype(object)
        return order[at]

    def _choose_matrix(self, wanted: str) -> str:
        name = chosen_matrix(wanted, lambda name: name in self.file)
        if name is None and wanted == "auto":
            raise SclError(f"{self.path}: the file has no X, layers/counts or raw/X; nothing to annotate.")
        if name is None:
            present = [name for name in MATRIX_CHOICES[1:] if name in self.file]
            layers = [f"layers/{k}" for k in self.file.get("layers", {})]
            raise SclError(
                f"{self.path}: there is no {wanted} in the file; choose one of {', '.join(present + layers) or 'nothing'}.", "matrix"
            )
        return name

    def blocks(self, size: int):
        """(cell ids, rows) per block of `size` cells: dense arrays or SparseRows, as stored."""
        for start, stop in row_ranges(self.n_cells, size):
            at = self.first_row
            rows = self.matrix.rows(at + start, at + stop) if self.positions is None else self.matrix.rows_at(self.positions[start:stop])
            yield self.ids(start, stop), rows

    def rows_at(self, positions: np.ndarray, span_factor: float = SPAN_READ_FACTOR) -> np.ndarray | SparseRows:
        """The cells at `positions` (rows of the whole file's obs, any order), as stored: what streamed training reads."""
        return self.matrix.rows_at(np.asarray(positions, dtype=np.int64), span_factor)

    def obs_column(self, key: str) -> np.ndarray:
        if key not in self.obs_columns:
            raise SclError(
                f"{self.path}: obs has no column {key!r}; choose one of: {', '.join(sorted(self.obs_columns)) or '(none)'}."
            )
        values = read_array(self.obs_columns[key], self.rows)
        return values if self.positions is None else values[self.positions]

    def var_column(self, key: str) -> np.ndarray:
        if key not in self.var_columns:
            where = "raw/var" if self.matrix_name == "raw/X" else "var"
            raise SclError(
                f"{self.path}: {where} has no column {key!r}; choose one of: {', '.join(sorted(self.var_columns)) or '(none)'}.", "gene_column"
            )
        return read_array(self.var_columns[key]).astype(str).astype(object)

    def close(self) -> None:
        if self.is_hdf5:  # a zarr group holds no open file
            self.file.close()
