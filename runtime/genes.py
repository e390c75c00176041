"""Gene identifiers to symbols, and the alignment of an input's genes to a model's gene order.

Matching rules (documented in the README):
- Symbols match exactly; an input gene with no exact match then matches ignoring case, which fixes
  'C10orf10' against 'C10ORF10' and similar. HGNC symbols are unique ignoring case (SCimilarity's
  28,231 are), so this never joins two different genes of one species.
- Ensembl gene IDs (ENSG00000141510, with or without a '.version') are mapped to symbols with the
  GENCODE v44 table shipped in this package.
- Several input columns with one symbol: their counts are summed (they are reads of one gene);
  for log-normalised input the first column is kept, as sums of logs mean nothing.
"""

from __future__ import annotations

import gzip
import math
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from importlib import resources

import numpy as np
from scipy import sparse

from .errors import GeneOverlapError
from .normalize import TARGET_SUM, lognorm

ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d{11}(\.\d+)?$")
SCIMILARITY_GENES = 28231
SCIMILARITY_MIN_OVERLAP = 5000


@lru_cache(maxsize=1)
def ensembl_to_symbol() -> dict[str, str]:
    text = resources.files("scl.runtime").joinpath("data/gencode_v44_gene_id2name.csv.gz").read_bytes()
    rows = (line.split(",", 1) for line in gzip.decompress(text).decode().splitlines() if line)
    return {gene_id: symbol for gene_id, symbol in rows}


def looks_like_ensembl(names) -> bool:
    sample = list(names[:1000])
    return bool(sample) and sum(bool(ENSEMBL_ID.match(str(n))) for n in sample) > len(sample) / 2


def to_symbols(names: np.ndarray) -> tuple[np.ndarray, int]:
    """Map Ensembl IDs to symbols where the names are mostly Ensembl IDs; returns (names, how many mapped)."""
    if not looks_like_ensembl(names):
        return names, 0
    table = ensembl_to_symbol()
    out = np.array([table.get(str(n).split(".")[0], str(n)) for n in names], dtype=object)
    return out, int(sum(o != n for o, n in zip(out, names)))


def default_min_overlap(n_model_genes: int) -> int:
    """SCimilarity refuses under 5,000 of its 28,231 genes; the same share for smaller gene orders."""
    return min(SCIMILARITY_MIN_OVERLAP, math.ceil(n_model_genes * SCIMILARITY_MIN_OVERLAP / SCIMILARITY_GENES))


@dataclass
class GeneAlignment:
    """Where each input column goes in the model's gene order (-1: unused)."""

    model_index: np.ndarray
    n_model_genes: int
    matched: int
    matched_ignoring_case: int
    duplicate_input_genes: int
    missing_model_genes: list = field(repr=False)
    unused_input_genes: list = field(repr=False)
    has_duplicates: bool = False  # several input columns feed one model gene (their values are summed)

    @cached_property
    def all_input_genes_used(self) -> bool:
        return bool((self.model_index >= 0).all())

    @cached_property
    def spare_column(self) -> int | None:
        """A model gene no input gene feeds: unused input genes are written there, and it is zeroed after."""
        if self.all_input_genes_used or not self.missing_model_genes:
            return None
        fed = np.zeros(self.n_model_genes, dtype=bool)
        fed[self.model_index[self.model_index >= 0]] = True
        return int(np.flatnonzero(~fed)[0])

    @cached_property
    def scatter_columns(self) -> np.ndarray:
        """model_index as int32, with unused input genes sent to the spare column when there is one."""
        cols = self.model_index.astype(np.int32)
        if self.spare_column is not None:
            cols[cols < 0] = self.spare_column
        return cols

    def report(self, examples: int = 20) -> dict:
        return {
            "model_genes": self.n_model_genes,
            "input_genes": len(self.model_index),
            "matched": self.matched,
            "matched_ignoring_case": self.matched_ignoring_case,
            "duplicate_input_genes": self.duplicate_input_genes,
            "model_genes_missing": len(self.missing_model_genes),
            "input_genes_unused": len(self.unused_input_genes),
            "examples_missing": self.missing_model_genes[:examples],
            "examples_unused": self.unused_input_genes[:examples],
        }


class GeneIndex:
    """A model's gene order with its lookup tables, built once (a server aligns every request against it)."""

    def __init__(self, genes):
        self.genes = np.array([str(g) for g in genes], dtype=object)
        self.exact = {g: i for i, g in enumerate(self.genes)}
        self.folded = {g.upper(): i for i, g in enumerate(self.genes)}

    def __len__(self) -> int:
        return len(self.genes)

    def find(self, gene: str) -> tuple[int | None, bool]:
        """(position of `gene` in the model's order or None, whether it matched only ignoring case)."""
        target = self.exact.get(gene)
        if target is not None:
            return target, False
        target = self.folded.get(gene.upper())
        return target, target is not None


def align_genes(
    input_genes,
    model_genes,
    min_overlap: int | None = None,
    sum_duplicates: bool = True,
    source: str = "input",
) -> GeneAlignment:
    index = model_genes if isinstance(model_genes, GeneIndex) else GeneIndex(model_genes)
    model_index = np.full(len(input_genes), -1, dtype=np.int64)
    ignoring_case = duplicates = 0
    taken = set()
    for col, gene in enumerate(map(str, input_genes)):
        target, by_case = index.find(gene)
        ignoring_case += by_case
        if target is None:
            continue
        if target in taken:
            duplicates += 1
            if not sum_duplicates:
                continue
        taken.add(target)
        model_index[col] = target
    matched = len(taken)
    if min_overlap is None:
        min_overlap = default_min_overlap(len(index))
    if matched < min_overlap:
        example = ", ".join(map(str, input_genes[:3]))
        raise GeneOverlapError(
            f"{source}: only {matched} of the model's {len(index)} genes are in the input "
            f"({len(input_genes)} genes, e.g. {example}); at least {min_overlap} are needed: use gene symbols "
            "or Ensembl IDs (from a var column where the index holds something else), or lower the minimum.", "gene_column", "min_genes"
        )
    is_missing = np.ones(len(index), dtype=bool)
    is_missing[list(taken)] = False
    missing = index.genes[is_missing].tolist()
    unused = np.asarray(input_genes, dtype=object)[model_index < 0].astype(str).tolist()
    return GeneAlignment(model_index, len(index), matched, ignoring_case, duplicates, missing, unused, duplicates > 0 and sum_duplicates)


def aligned_dense(block, alignment: GeneAlignment, buffer: np.ndarray | None = None, lognormalise: bool = False) -> np.ndarray:
    """A block of input rows (dense or SparseRows) as a dense float32 [cells, model genes] matrix.

    With `lognormalise`, log1p(counts per 1e4) over the model's genes. A sparse block is normalised on its
    nonzeros, then spread out by scipy's C++ csr-to-dense (which zeroes the output first), about twice as
    fast as numpy's scatter and a tenth of the values a dense normalisation touches.
    `buffer` (float32, at least cells * genes long) is reused when given: annotating streams millions of
    cells, and writing into warm memory is much cheaper than page-faulting a fresh 100 MB array per block.
    """
    n = block.shape[0] if isinstance(block, np.ndarray) else block.n_rows
    if buffer is None:
        buffer = np.empty(n * alignment.n_model_genes, dtype=np.float32)
    out = buffer[: n * alignment.n_model_genes].reshape(n, alignment.n_model_genes)
    if isinstance(block, np.ndarray):
        _scatter_dense(block, alignment, out)
        return lognorm(out) if lognormalise else out
    aligned_sparse(block, alignment, lognormalise, keep_spare=True).toarray(out=out)
    if alignment.spare_column is not None:
        out[:, alignment.spare_column] = 0
    return out


def aligned_sparse(block, alignment: GeneAlignment, lognormalise: bool = False, keep_spare: bool = False) -> sparse.csr_matrix:
    """A block of input rows as a float32 CSR matrix [cells, model genes], the values aligned_dense gives; dense
    blocks go through aligned_dense. keep_spare leaves the input genes the model does not use in the spare column
    (for aligned_dense, which zeroes it after)."""
    if isinstance(block, np.ndarray):
        return sparse.csr_matrix(aligned_dense(block, alignment, lognormalise=lognormalise))
    rows = _model_rows(block, alignment)
    if lognormalise:
        _lognorm_nonzeros(rows, alignment.spare_column)
    if alignment.spare_column is not None and not keep_spare:  # new arrays: rows may share the input's
        keep = rows.indices != alignment.spare_column
        indptr = np.concatenate([[0], np.cumsum(_row_sums(keep, rows.indptr).astype(np.int64))])
        rows = sparse.csr_matrix((rows.data[keep], rows.indices[keep], indptr), shape=rows.shape)
    return rows


def _scatter_dense(block: np.ndarray, alignment: GeneAlignment, out: np.ndarray) -> None:
    cols = alignment.model_index
    keep = np.flatnonzero(cols >= 0)
    out.fill(0)
    if alignment.has_duplicates:  # several input genes for one model gene: their values are added
        np.add.at(out, (slice(None), cols[keep]), block[:, keep])
    else:
        out[:, cols[keep]] = block[:, keep]


def _model_rows(block, alignment: GeneAlignment) -> sparse.csr_matrix:
    """A sparse block with model columns: float32, duplicate genes summed. Input genes the model does not
    use go to the spare column when there is one (zeroed after; cheaper than dropping them), else are dropped."""
    cols = alignment.scatter_columns.take(block.indices)  # take also refuses indices past the input's genes
    data, indptr = block.data.astype(np.float32, copy=False), block.indptr
    if alignment.spare_column is None and not alignment.all_input_genes_used:
        keep = cols >= 0
        data, cols = data[keep], cols[keep]
        indptr = np.concatenate([[0], np.cumsum(_row_sums(keep, indptr).astype(np.int64))])
    # copy=False shares the input's arrays; summing duplicates works in place, so it gets its own
    rows = sparse.csr_matrix((data, cols, indptr), shape=(block.n_rows, alignment.n_model_genes), copy=alignment.has_duplicates)
    if alignment.has_duplicates:
        rows.sum_duplicates()
    return rows


def _lognorm_nonzeros(rows: sparse.csr_matrix, spare_column: int | None) -> None:
    """log1p(counts per 1e4) of a csr matrix's stored values, into new values (the old may be the input's);
    the spare column's values do not count."""
    data = rows.data
    kept = data if spare_column is None else np.where(rows.indices == spare_column, 0, data)
    totals = _row_sums(kept, rows.indptr)
    scale = np.divide(TARGET_SUM, totals, out=np.zeros(len(totals)), where=totals > 0).astype(np.float32)
    values = np.repeat(scale, np.diff(rows.indptr))
    values *= data
    values += 1
    rows.data = np.log(values, out=values)  # log(1 + x) as the graph computes it; numpy's log is vectorised, its log1p 4x slower


def _row_sums(values: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """float64 sums per CSR row. reduceat is fast but needs starts inside the array (trailing empty rows start
    at its end) and gives an empty row the next value, so both kinds of empty row are set to 0 apart."""
    starts = indptr[:-1]
    inside = starts < len(values)
    sums = np.zeros(len(starts))
    sums[inside] = np.add.reduceat(values, starts[inside], dtype=np.float64)
    sums[indptr[1:] == starts] = 0
    return sums
