"""Read cells from a CSV or TSV file (optionally gzipped), streamed in blocks of rows.

Cells as rows: a header of gene symbols after one empty or named corner cell, then a cell id and
its values per line (CellTypist's layout). Genes as rows (genes_as_rows) cannot be streamed by
cell; the file is read once into sparse memory and served by cell from there.

What spreadsheets and R write is read as well: the separator the header uses (',' tab ';'), quoted names and
numbers, a separator ending every line, CRLF line ends, and decimal commas in ';'-separated files.
"""

from __future__ import annotations

import gzip
import io
import os

import numpy as np

from .errors import SclError
from .h5ad import SparseRows, csc_to_csr, row_ranges

TEXT_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")


def is_text_matrix(path: str) -> bool:
    return path.lower().endswith(TEXT_SUFFIXES)


SEPARATORS = (",", "\t", ";")


def _separator(header: str, expected: str) -> str:
    """The separator the header uses: the one its name promises, else the first of , tab ; it holds (Excel in many
    locales writes ';' into a .csv, and tab-separated files are often named .csv)."""
    for sep in (expected, *SEPARATORS):
        if sep in header:
            return sep
    return expected


def _unquote(field: str) -> str:
    field = field.strip()
    return field[1:-1] if len(field) >= 2 and field[0] == field[-1] and field[0] in "\"'" else field


class TextMatrix:
    def __init__(self, path: str, genes_as_rows: bool = False):
        if not os.path.exists(path):
            raise SclError(f"{path}: no such file; check the path.")
        self.path = path
        self.genes_as_rows = genes_as_rows
        self.matrix_name = "genes as rows" if genes_as_rows else "cells as rows"
        try:
            with self._open() as stream:
                header = stream.readline()
        except (OSError, EOFError, UnicodeDecodeError) as err:
            raise SclError(f"{path}: cannot be read as text ({err}); the file is truncated or corrupt, or gzipped without a .gz name.") from None
        if not header.strip():
            raise SclError(f"{path}: the file is empty; expected a header row of gene symbols.")
        self.sep = _separator(header, "," if ".csv" in path.lower() else "\t")
        names = [_unquote(f) for f in header.rstrip("\r\n").split(self.sep)]
        self.trailing_separator = len(names) > 2 and names[-1] == ""  # every line ends in one: a spreadsheet's export
        names = names[:-1] if self.trailing_separator else names
        self.cell_ids = None
        if genes_as_rows:
            self.cell_ids = np.array(names[1:], dtype=object)
            self._csr, self.var_names = self._read_gene_rows()
        else:
            self.var_names = np.array(names[1:], dtype=object)

    var_columns: dict = {}  # a text file's genes are its header alone

    def var_column(self, key: str) -> np.ndarray:
        raise SclError(f"{self.path}: a text file's genes are its header; choosing a gene column applies to .h5ad files.", "gene_column")

    def _open(self) -> io.TextIOBase:
        if self.path.lower().endswith(".gz"):
            return io.TextIOWrapper(gzip.open(self.path, "rb"), encoding="utf-8")
        return open(self.path, encoding="utf-8")

    def _parse(self, lines: list[str], first_line: int) -> tuple[np.ndarray, np.ndarray]:
        ids, rest = [], []
        for line in lines:
            head, _, tail = line.rstrip("\r\n").partition(self.sep)
            if self.trailing_separator:
                tail = tail.removesuffix(self.sep)
            if self.sep == ";":
                tail = tail.replace(",", ".")  # the locales that separate by ';' write decimal commas
            ids.append(_unquote(head))
            rest.append(tail)
        try:
            values = np.loadtxt(rest, delimiter=self.sep, dtype=np.float32, ndmin=2, quotechar='"')
        except ValueError as err:
            raise SclError(f"{self.path}: lines {first_line}-{first_line + len(lines) - 1} do not parse as numbers ({err}); every line needs an id and one number per column.") from None
        return np.array(ids, dtype=object), values

    def _lines(self, size: int):
        """Blocks of data lines from a fresh read of the file, after its header."""
        stream = self._open()
        stream.readline()
        line_no, lines = 2, []
        try:
            for line in stream:
                if line.strip():
                    lines.append(line)
                if len(lines) == size:
                    yield line_no, lines
                    line_no, lines = line_no + size, []
        except (OSError, EOFError, UnicodeDecodeError) as err:
            raise SclError(f"{self.path}: reading stopped after line {line_no} ({err}); the file is truncated or corrupt.") from None
        finally:
            stream.close()
        if lines:
            yield line_no, lines

    def _read_gene_rows(self) -> tuple[SparseRows, np.ndarray]:
        genes, data, rows, indptr = [], [], [], [0]
        for first, lines in self._lines(256):
            names, values = self._parse(lines, first)
            genes.extend(names)
            for row in values:
                nz = np.flatnonzero(row)
                data.append(row[nz])
                rows.append(nz)
                indptr.append(indptr[-1] + len(nz))
        n_cells = len(self.cell_ids)
        shape = (n_cells, len(genes))
        csr = csc_to_csr(np.concatenate(data or [np.zeros(0, np.float32)]), np.concatenate(rows or [np.zeros(0, np.int64)]), np.array(indptr), shape)
        return csr, np.array(genes, dtype=object)

    @property
    def n_cells(self) -> int | None:
        return None if self.cell_ids is None else len(self.cell_ids)

    def blocks(self, size: int):
        """(cell ids, values) per block of `size` cells."""
        if self.genes_as_rows:
            for start, stop in row_ranges(len(self.cell_ids), size):
                yield self.cell_ids[start:stop], SparseRows.of(self._csr.data, self._csr.indices, self._csr.indptr, start, stop)
            return
        for first, lines in self._lines(size):
            ids, values = self._parse(lines, first)
            if values.shape[1] != len(self.var_names):
                raise SclError(f"{self.path}: lines from {first} have {values.shape[1]} values but the header names {len(self.var_names)} genes; fix the file so every line matches the header.")
            yield ids, values

    def close(self) -> None:
        pass  # every read opens and closes its own stream
