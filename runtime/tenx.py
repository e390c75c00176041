"""Read cells from 10x Genomics outputs: the feature-barcode matrix .h5 and the MTX folder.

Cell Ranger's .h5 (v3 and later: group `matrix` with `features`; v2: one group per genome with `genes` and
`gene_names`) stores genes x cells by column, which is cells x genes by row: it streams block by block like a CSR
.h5ad. The MTX folder (matrix.mtx, features.tsv or genes.tsv, barcodes.tsv, each optionally .gz) is text without an
index, so it is read whole, once, below the same memory limit as a CSC .h5ad. Features that are not gene expression
(antibody capture, CRISPR guides) keep their type in their name ("Antibody Capture:CD4"), so they never match a gene.
https://www.10xgenomics.com/support/software/cell-ranger/latest/analysis/outputs/cr-outputs-h5-matrices
"""

from __future__ import annotations

import gzip
import os

import h5py
import numpy as np

from .errors import SclError
from .h5ad import SparseRows, row_ranges

GENE_EXPRESSION = "Gene Expression"
MTX_NAMES = ("matrix.mtx", "matrix.mtx.gz")


def is_tenx_h5(file: h5py.File) -> bool:
    return _tenx_group(file) is not None


def _tenx_group(file: h5py.File) -> h5py.Group | None:
    if isinstance(file.get("matrix"), h5py.Group) and "barcodes" in file["matrix"]:
        return file["matrix"]
    genomes = [g for g in file.values() if isinstance(g, h5py.Group) and {"barcodes", "gene_names", "indptr"} <= set(g)]
    return genomes[0] if len(genomes) == 1 else None


def _names(values: np.ndarray) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def _feature_names(names: np.ndarray, types: np.ndarray | None) -> np.ndarray:
    if types is None:
        return names
    return np.array([n if t == GENE_EXPRESSION else f"{t}:{n}" for n, t in zip(names, types)], dtype=object)


class TenxH5:
    """A Cell Ranger feature-barcode matrix .h5, read by cells."""

    matrix_name = "10x feature-barcode matrix"

    def __init__(self, path: str, file: h5py.File):
        self.path, self.file = path, file
        group = _tenx_group(file)
        if "features" in group:  # v3+
            features = group["features"]
            types = _names(features["feature_type"][()]) if "feature_type" in features else None
            self.var_names = _feature_names(_names(features["name"][()]), types)
            self.var_columns = {"gene_ids": _names(features["id"][()])} | ({"feature_types": types} if types is not None else {})
        else:  # v2
            self.var_names = _names(group["gene_names"][()])
            self.var_columns = {"gene_ids": _names(group["genes"][()])}
        self.cell_ids = _names(group["barcodes"][()])
        self.data, self.indices = group["data"], group["indices"]
        self.indptr = group["indptr"][()].astype(np.int64)
        n_genes, n_cells = (int(n) for n in group["shape"][()])
        if (n_genes, n_cells) != (len(self.var_names), len(self.cell_ids)) or len(self.indptr) != n_cells + 1:
            raise SclError(f"{path}: the 10x matrix is {n_genes} x {n_cells} but names {len(self.var_names)} features and "
                           f"{len(self.cell_ids)} barcodes; the file is damaged: copy it again from Cell Ranger's output.")

    def var_column(self, key: str) -> np.ndarray:
        if key not in self.var_columns:
            raise SclError(f"{self.path}: the 10x features have no column {key!r}; choose one of: {', '.join(self.var_columns)}.", "gene_column")
        return self.var_columns[key]

    def blocks(self, size: int):
        for start, stop in row_ranges(len(self.cell_ids), size):
            lo, hi = int(self.indptr[start]), max(int(self.indptr[stop]), int(self.indptr[start]))
            yield self.cell_ids[start:stop], SparseRows(self.data[lo:hi], self.indices[lo:hi], self.indptr[start:stop + 1] - lo)

    def close(self) -> None:
        self.file.close()


def mtx_files(path: str) -> tuple[str, str] | None:
    """(folder, prefix) of the 10x MTX files `path` names: a folder holding matrix.mtx(.gz), or the matrix file
    itself, also with GEO's per-sample prefix (GSM1_matrix.mtx.gz beside GSM1_barcodes.tsv.gz); None otherwise."""
    if os.path.isdir(path):
        return (path, "") if any(os.path.isfile(os.path.join(path, n)) for n in MTX_NAMES) else None
    name = os.path.basename(path)
    for suffix in MTX_NAMES:
        if name.endswith(suffix) and os.path.isfile(path):
            return os.path.dirname(path) or ".", name[: -len(suffix)]
    return None


def _first(folder: str, prefix: str, names: tuple[str, ...]) -> str:
    for name in names:
        for candidate in (prefix + name, prefix + name + ".gz"):
            if os.path.isfile(os.path.join(folder, candidate)):
                return os.path.join(folder, candidate)
    wanted = " or ".join(prefix + n for n in names)
    raise SclError(f"{folder}: a 10x MTX folder needs {wanted} (optionally .gz) beside {prefix}matrix.mtx; it has "
                   f"{', '.join(sorted(os.listdir(folder))[:8]) or 'nothing'}.")


def _tsv_rows(path: str) -> list[list[str]]:
    with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as fh:
        return [line.rstrip("\r\n").split("\t") for line in fh if line.strip()]


def _unreadable(matrix: str, err: Exception) -> SclError:
    return SclError(f"{matrix}: not a readable Matrix Market file ({str(err).splitlines()[0] or type(err).__name__}); it is truncated "
                    "or damaged: copy it again from Cell Ranger's output.")


class TenxMtx:
    """A 10x MTX folder, read whole into cells x genes rows."""

    matrix_name = "10x MTX"

    def __init__(self, path: str, files: tuple[str, str], csc_limit_bytes: int):
        from scipy import io, sparse

        self.path, (folder, prefix) = path, files
        matrix = _first(folder, prefix, ("matrix.mtx",))
        features = _tsv_rows(_first(folder, prefix, ("features.tsv", "genes.tsv")))
        self.cell_ids = np.array([r[0] for r in _tsv_rows(_first(folder, prefix, ("barcodes.tsv",)))], dtype=object)
        names = np.array([r[1] if len(r) > 1 else r[0] for r in features], dtype=object)
        types = np.array([r[2] for r in features], dtype=object) if all(len(r) > 2 for r in features) else None
        self.var_names = _feature_names(names, types)
        self.var_columns = {"gene_ids": np.array([r[0] for r in features], dtype=object)}
        try:
            rows, cols, entries = io.mminfo(matrix)[:3]
        except (ValueError, EOFError, OSError) as err:
            raise _unreadable(matrix, err) from None
        needed = 3 * entries * 16
        if needed > csc_limit_bytes:
            raise SclError(f"{folder}: the MTX matrix holds {entries:,} values and reading it needs about {needed / 1024**3:.1f} GiB, above the "
                           f"{csc_limit_bytes / 1024**3:.1f} GiB limit; convert it once to .h5ad (scanpy.read_10x_mtx(folder).write_h5ad(...)) or raise the limit.",
                           "csc_memory_limit")
        if (rows, cols) != (len(names), len(self.cell_ids)):
            raise SclError(f"{folder}: matrix.mtx is {rows} x {cols} but the folder names {len(names)} features and {len(self.cell_ids)} "
                           "barcodes; the files do not belong together.")
        try:
            csr = sparse.csr_matrix(io.mmread(matrix).T)
        except (ValueError, EOFError, OSError) as err:
            raise _unreadable(matrix, err) from None
        self._rows = SparseRows(csr.data, csr.indices, csr.indptr)

    def var_column(self, key: str) -> np.ndarray:
        if key not in self.var_columns:
            raise SclError(f"{self.path}: the 10x features have no column {key!r}; choose gene_ids.", "gene_column")
        return self.var_columns[key]

    def blocks(self, size: int):
        rows = self._rows
        for start, stop in row_ranges(len(self.cell_ids), size):
            yield self.cell_ids[start:stop], SparseRows.of(rows.data, rows.indices, rows.indptr, start, stop)

    def close(self) -> None:
        pass
