"""One entry point for every input, a file or cells in memory: cells aligned to a model's genes, in blocks.

    source = ExpressionSource("pbmc.h5ad", model_genes, ReadOptions())        # or a MemoryMatrix (in_memory.py)
    for cell_ids, x in source.blocks(normalise=True):   # x: float32 [cells, model genes]
        ...

The annotator splits the two steps: raw_blocks() reads (in one thread), dense() checks and aligns (in several).

Training, scl-annotate, scl-serve and the Python API all read through here, so they see identical numbers.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import ClassVar

import h5py
import numpy as np
from scipy import sparse

from .bounds import AT_LEAST_ONE, NOT_NEGATIVE_WHOLE, Bounds, check_bounds, check_choice
from .errors import SclError
from .genes import GeneAlignment, _row_sums, align_genes, aligned_dense, aligned_sparse, looks_like_ensembl, to_symbols
from .h5ad import DEFAULT_CSC_LIMIT_BYTES, H5adFile, SparseRows, open_h5ad, open_zarr
from .in_memory import MemoryMatrix
from .normalize import INPUT_KINDS, check_kind, check_values, detect_input_kind
from .tenx import TenxH5, TenxMtx, is_tenx_h5, mtx_files
from .text_matrix import TextMatrix, is_text_matrix


@dataclass
class ReadOptions:
    matrix: str = "auto"  # h5ad: auto, X, layers/counts or raw/X (auto: raw counts where the file has them)
    gene_column: str | None = None  # a var column of symbols or Ensembl IDs; None: the var index
    input_kind: str = "auto"  # auto, counts or lognorm (log1p of counts per 1e4)
    genes_as_rows: bool = False  # text files with one gene per line
    min_genes: int | None = None  # None: SCimilarity's 5,000 of 28,231, scaled to the model's size
    csc_limit_bytes: int = DEFAULT_CSC_LIMIT_BYTES
    batch_size: int = 256  # cells per block (measured fastest on 2 cores; scl-annotate --batch-size)
    cell_names: np.ndarray | None = None  # h5ad: only these cells (obs names), in this order, as a backed AnnData view holds them
    rows: tuple[int, int] | None = None  # h5ad/zarr: only cells start..stop-1 (one dask task's share of a file)
    check_kind: bool = False  # input_kind was judged elsewhere (on the input's first block): check it on every block here too

    BOUNDS: ClassVar[dict[str, Bounds]] = {"batch_size": AT_LEAST_ONE, "min_genes": NOT_NEGATIVE_WHOLE, "csc_limit_bytes": AT_LEAST_ONE}

    def __post_init__(self):
        check_bounds(self, self.BOUNDS)
        check_choice(self, "input_kind", INPUT_KINDS)


def open_matrix(path: str, options: ReadOptions) -> H5adFile | TextMatrix | TenxH5 | TenxMtx:
    """The reader for the file's layout: by name for text, by content for the rest."""
    if is_text_matrix(path):
        return TextMatrix(path, options.genes_as_rows)
    mtx = mtx_files(path)
    if mtx is not None:
        return TenxMtx(path, mtx, options.csc_limit_bytes)
    if os.path.isdir(path):
        if not _is_zarr(path):
            raise SclError(f"{path}: a folder without matrix.mtx, so neither a 10x MTX folder (matrix.mtx, features.tsv, barcodes.tsv, "
                           "each optionally .gz) nor a zarr store; name an .h5ad, a 10x .h5 or a CSV/TSV file, or convert the data to .h5ad with anndata.")
        return H5adFile(path, options.matrix, options.csc_limit_bytes, options.cell_names, file=open_zarr(path), rows=options.rows)
    file = open_h5ad(path)
    try:
        if is_tenx_h5(file):
            return TenxH5(path, file)
        if isinstance(file.get("matrix"), h5py.Dataset) and "row_attrs" in file:
            raise SclError(f"{path}: a loom file, which scl does not read; convert it once to .h5ad: "
                           f"python -c \"import anndata; anndata.read_loom('{path}').write_h5ad('{_stem(path)}.h5ad')\".")
        return H5adFile(path, options.matrix, options.csc_limit_bytes, options.cell_names, file=file, rows=options.rows)
    except BaseException:
        file.close()
        raise


def _stem(path: str) -> str:
    return os.path.splitext(os.path.normpath(path))[0]


def _is_zarr(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, n)) for n in (".zgroup", "zarr.json"))


class ExpressionSource:
    """Cells of a file (path) or in memory (a MemoryMatrix), checked and aligned to `model_genes` block by block."""

    def __init__(self, path_or_matrix: str | os.PathLike | MemoryMatrix, model_genes, options: ReadOptions | None = None):
        self.options = options or ReadOptions()
        if isinstance(path_or_matrix, MemoryMatrix):
            self.path, self.matrix, self.is_file = path_or_matrix.matrix_name, path_or_matrix, False
        else:
            self.path, self.is_file = str(path_or_matrix), True
            self.matrix = open_matrix(self.path, self.options)
        try:
            self._setup(model_genes)
        except Exception:
            self.matrix.close()
            raise

    def _setup(self, model_genes) -> None:
        opts = self.options
        names = self.matrix.var_names
        self.gene_source = "var index"
        if opts.gene_column:
            names, self.gene_source = self.matrix.var_column(opts.gene_column), f"var[{opts.gene_column!r}]"
        elif "feature_name" in self.matrix.var_columns and looks_like_ensembl(names):
            names, self.gene_source = self.matrix.var_column("feature_name"), "var['feature_name'] (the index holds IDs)"
        self.gene_symbols, self.ensembl_mapped = to_symbols(names)
        if self.ensembl_mapped:
            self.gene_source += f", {self.ensembl_mapped} Ensembl IDs mapped to symbols (GENCODE v44)"
        self.n_cells = getattr(self.matrix, "n_cells", None)
        if self.n_cells is None and self.matrix.cell_ids is not None:
            self.n_cells = len(self.matrix.cell_ids)
        if self.n_cells is not None and self.is_file:  # outputs are keyed by id; in memory, results go back by position
            refuse_duplicate_ids(getattr(self.matrix, "id_chunks", lambda: [self.matrix.cell_ids]), self.path)
        stream = self._raw_blocks()
        first = next(stream, None)
        if first is None:
            raise SclError(f"{self.path}: the file holds no cells.")
        first = (first[0], self._checked(first[1]))
        self._peeked = (first, stream)  # the first block is read and checked once: to judge the input, then to annotate
        check_values(first[1], self.path, first[0])
        self._values_checked = first[1]
        self.kind_checked = opts.input_kind == "auto" or opts.check_kind  # a kind judged on the first block is checked on every block
        if opts.input_kind == "auto":
            self.input_kind, self.kind_evidence = detect_input_kind(first[1], self.path)
        else:
            self.input_kind, self.kind_evidence = opts.input_kind, "judged on the input's first block" if opts.check_kind else "as stated by the caller"
        self.alignment: GeneAlignment = align_genes(
            self.gene_symbols, model_genes, opts.min_genes, sum_duplicates=self.input_kind == "counts", source=self.path
        )

    @property
    def cell_ids(self) -> np.ndarray | None:
        """Every cell's id (read whole from an .h5ad when asked: the blocks carry their own); None for text files,
        whose ids come with their rows."""
        return self.matrix.cell_ids

    @property
    def matrix_name(self) -> str:
        return self.matrix.matrix_name

    def _raw_blocks(self):
        return self.matrix.blocks(self.options.batch_size)

    def raw_blocks(self):
        """(cell ids, the block as stored): dense rows or SparseRows (consistent, repeats summed), values not yet
        checked, not aligned."""
        seen = set() if self.n_cells is None else None
        first, rest = self._peeked if self._peeked is not None else (None, self._raw_blocks())
        self._peeked = None
        stream = itertools.chain([first] if first else [], ((ids, self._checked(raw)) for ids, raw in rest))
        for ids, raw in stream:
            if seen is not None:
                _refuse_duplicate_ids(ids, self.path, seen)
            yield ids, raw

    def _checked(self, raw):
        """A sparse block's arrays checked against each other, its repeated entries summed; dense blocks as they are."""
        if not isinstance(raw, SparseRows):
            return raw
        raw.check(len(self.gene_symbols), self.path)
        return raw.summed(len(self.gene_symbols))

    def dense(self, raw, normalise: bool = True, buffer: np.ndarray | None = None, cell_ids=None) -> np.ndarray:
        """A block from raw_blocks() checked and aligned: float32 [cells, model genes], log1p(CP10k) when normalise.
        `buffer` (see aligned_dense) is overwritten; `cell_ids` name the cell in an error."""
        self._check(raw, cell_ids if cell_ids is not None else range(raw.shape[0] if isinstance(raw, np.ndarray) else raw.n_rows))
        return aligned_dense(raw, self.alignment, buffer, lognormalise=normalise and self.input_kind == "counts")

    def _check(self, raw, ids) -> None:
        """Values (no NaN, inf or negative) and, where judged, the input kind, naming the first cell that fails."""
        if raw is not self._values_checked:
            check_values(raw, self.path, ids)
        if self.kind_checked:
            check_kind(raw, self.input_kind, ids, self.path)

    def rows_at(self, positions: np.ndarray, span_factor: float) -> sparse.csr_matrix:
        """The cells at `positions` of an .h5ad's obs (any order) as sparse() gives them, read as one span when it
        holds under `span_factor` rows per cell wanted. A cell refused is named by its id (read only then)."""
        return self.sparse(self._checked(self.matrix.rows_at(positions, span_factor)), _IdsAt(self.matrix, positions))

    def sparse(self, raw, cell_ids) -> sparse.csr_matrix:
        """A block from raw_blocks() checked, aligned and normalised: float32 CSR [cells, model genes] holding the
        values dense() gives (what training keeps)."""
        self._check(raw, cell_ids)
        return aligned_sparse(raw, self.alignment, lognormalise=self.input_kind == "counts")

    def genes_detected(self, raw) -> np.ndarray:
        """Per cell of a raw block, how many of the model's genes it expresses (nonzero)."""
        used = self.alignment.model_index >= 0
        if isinstance(raw, np.ndarray):
            return np.count_nonzero(raw[:, used], axis=1).astype(np.int32)
        return _row_sums(used[raw.indices] & (raw.data != 0), raw.indptr).astype(np.int32)

    def block_buffer(self) -> np.ndarray:
        """Room for one dense block, for dense(buffer=...)."""
        return np.empty(self.options.batch_size * self.alignment.n_model_genes, np.float32)

    def blocks(self, normalise: bool = True):
        """(cell ids, float32 [cells, model genes]); log1p(CP10k) when normalise, else as stored (aligned)."""
        for ids, raw in self.raw_blocks():
            yield ids, self.dense(raw, normalise, cell_ids=ids)

    def describe(self) -> dict:
        return {
            "path": self.path,
            "matrix": self.matrix_name,
            "genes_from": self.gene_source,
            "input_kind": self.input_kind,
            "input_kind_evidence": self.kind_evidence,
            "cells": self.n_cells,
            "genes": self.alignment.report(),
        }

    def close(self) -> None:
        self.matrix.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _IdsAt:
    """The ids of the cells at some positions of a file, each read when asked (only an error message asks)."""

    def __init__(self, matrix: H5adFile, positions: np.ndarray):
        self.matrix, self.positions = matrix, positions

    def __getitem__(self, i: int) -> str:
        at = int(self.positions[i])
        return str(self.matrix.ids(at, at + 1)[0])


def refuse_duplicate_ids(chunks, path: str) -> None:
    """Every id of a file unique, in 16 bytes a cell: `chunks()` gives the ids a chunk at a time (called twice at most);
    a 64-bit hash of each is sorted, and only ids whose hashes meet are compared by name. Holding the ids of 10^7 cells
    as strings, or sorting them, takes gigabytes."""
    hashes = np.concatenate([np.fromiter(map(hash, chunk), dtype=np.int64, count=len(chunk)) for chunk in chunks()] or [np.zeros(0, np.int64)])
    hashes.sort()
    met = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    if met:
        seen: set = set()
        _refuse_duplicates([i for chunk in chunks() for i in chunk if hash(i) in met and (i in seen or seen.add(i))], path)


def _refuse_duplicate_ids(ids, path: str, seen: set) -> None:
    _refuse_duplicates([i for i in ids if i in seen or seen.add(i)], path)


def _refuse_duplicates(dups: list, path: str) -> None:
    if len(dups):
        raise SclError(
            f"{path}: cell id {str(dups[0])!r} occurs more than once ({len(dups)} duplicated); "
            "make the ids unique (adata.obs_names_make_unique(), or fix the first column) and save again."
        )
