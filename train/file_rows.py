"""Cells left in their files until a step needs them: what LabelledCells.x holds when training streams (--stream).

    x = FileRows.of(source, positions)   # an open ExpressionSource and the obs rows of its cells
    x[index]                             # some of those cells, still on disk (a FileRows)
    x[index].toarray()                   # read, checked and aligned: float32 log1p(CP10k) [cells, model genes]

It stands in for the scipy CSR matrix of cells in memory where training uses one (`shape`, row indexing, `toarray`,
`tocsr`), so the training code takes either; the values are those load_labelled holds in memory, bit for bit. A
FileRows holds 10 bytes a cell (which file, which row), never the expression. Rows are read where they cluster in the
file: cells at most GAP rows apart are read as one span.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.sparse as sp

from scl.runtime.errors import SclError
from scl.runtime.expression import ExpressionSource

GAP = 64  # rows: cells this close are read in one span with those between them (one read beats several on HDF5 and disks)


class FileRows:
    def __init__(self, sources: list[ExpressionSource], source: np.ndarray, position: np.ndarray, stamps: list[tuple[int, int]]):
        self.sources, self.source, self.position = sources, source, position
        self.stamps = stamps  # each file's size and modification time when opened

    @staticmethod
    def of(src: ExpressionSource, positions: np.ndarray) -> "FileRows":
        return FileRows([src], np.zeros(len(positions), np.int16), np.asarray(positions, np.int64), [_stamp(src.path)])

    @staticmethod
    def concat(parts: list["FileRows"]) -> "FileRows":
        sources, source, stamps = [], [], []
        for part in parts:
            source.append(part.source + len(sources))
            sources += part.sources
            stamps += part.stamps
        return FileRows(sources, np.concatenate(source).astype(np.int16), np.concatenate([p.position for p in parts]), stamps)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.position), self.sources[0].alignment.n_model_genes

    def __getitem__(self, index) -> "FileRows":
        if isinstance(index, tuple):
            raise TypeError("FileRows takes rows only: read them (tocsr()) before choosing genes")
        return FileRows(self.sources, self.source[index], self.position[index], self.stamps)

    def toarray(self) -> np.ndarray:
        """The cells, read: float32 [cells, model genes], log1p(CP10k), in this object's order."""
        return self.tocsr().toarray()

    def tocsr(self) -> sp.csr_matrix:
        """The cells, read: float32 CSR [cells, model genes], log1p(CP10k), in this object's order. Each file's cells
        are read in file order, one span per cluster of cells under GAP rows apart."""
        parts, placed = [], []
        for s, src in enumerate(self.sources):
            mine = np.flatnonzero(self.source == s)
            order = mine[np.argsort(self.position[mine], kind="stable")]
            positions = self.position[order]
            starts = np.flatnonzero(np.diff(positions, prepend=-GAP - 1) > GAP)
            parts += [src.rows_at(positions[a:b], span_factor=GAP + 1) for a, b in zip(starts, np.append(starts[1:], len(order)))]
            placed.append(order)
        if not parts:
            return sp.csr_matrix(self.shape, dtype=np.float32)
        rows = sp.vstack(parts, format="csr")
        back = np.empty(len(self.position), np.int64)
        back[np.concatenate(placed)] = np.arange(len(self.position))
        return rows[back]

    def refuse_changed_files(self) -> None:
        """One line if a file was rewritten since it was opened (size or modification time): the cells trained on
        would no longer be the file's, nor its digest in the run's record."""
        for src, stamp in zip(self.sources, self.stamps):
            if _stamp(src.path) != stamp:
                raise SclError(f"{src.path}: the file changed while training read it (--stream reads it to the end); nothing was written: "
                               "train again on a file nothing writes to, or copy it first.")

    def close(self) -> None:
        for src in self.sources:
            src.close()


def _stamp(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def stack_rows(parts: list) -> sp.csr_matrix | FileRows:
    """Cells of several LabelledCells one after another, in memory or on disk as they were."""
    if all(isinstance(p, FileRows) for p in parts):
        return FileRows.concat(parts)
    return sp.vstack([p.tocsr() for p in parts]).tocsr()
