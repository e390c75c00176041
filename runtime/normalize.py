"""SCimilarity's normalisation (total counts to 1e4 per cell, then log1p) and the checks around it.

As in SCimilarity's tutorials, counts are aligned to the model's genes first and normalised after,
so the total is over the model's genes.
"""

from __future__ import annotations

import numpy as np

from .errors import SclError

TARGET_SUM = 1e4
INPUT_KINDS = ("auto", "counts", "lognorm")


def lognorm(x: np.ndarray) -> np.ndarray:
    """log1p(counts / total * 1e4) per row, in place on a float32 array; rows without counts stay 0."""
    totals = x.sum(axis=1, keepdims=True)
    np.divide(x, totals, out=x, where=totals > 0)
    x *= TARGET_SUM
    return np.log1p(x, out=x)


def _values(block) -> np.ndarray:
    return block if isinstance(block, np.ndarray) else block.data


def check_values(block, where: str, cell_ids=None) -> None:
    """Refuse NaN, inf and negative values, naming the first cell that holds one (where the ids are known)."""
    values = _values(block)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise SclError(f"{where}: {_cell(block, cell_ids, np.flatnonzero(~np.isfinite(values))[0])}holds NaN or infinite values; "
                       "replace them (e.g. with 0) or fix the upstream step that made them.")
    if values.size and values.min() < 0:
        raise SclError(
            f"{where}: {_cell(block, cell_ids, int(np.argmin(values)))}holds negative values (min {values.min():.3g}), so it is scaled, "
            "not counts; use raw counts (the layers/counts or raw/X matrix) or log1p-normalised values.", "matrix"
        )


def _cell(block, cell_ids, value_index: int) -> str:
    return "the matrix " if cell_ids is None else f"cell {str(cell_ids[_row_of(block, int(value_index))])!r} "


def _row_of(block, value_index: int) -> int:
    if isinstance(block, np.ndarray):
        return value_index // block.shape[1]
    return int(np.searchsorted(block.indptr, value_index, side="right") - 1)


def check_kind(block, kind: str, cell_ids, where: str) -> None:
    """Refuse a block whose values do not fit the kind judged on the first block, naming the first such cell:
    a matrix that mixes raw counts with normalised cells would otherwise be normalised wrongly without a word."""
    values = _values(block)
    if kind == "counts" and values.dtype.kind == "f" and values.size:
        off = np.flatnonzero(np.abs(values - np.rint(values)) > 1e-4)
        if off.size:
            cell = cell_ids[_row_of(block, int(off[0]))]
            raise SclError(f"{where}: cell {cell!r} holds non-integer values ({values[off[0]]:.4g}) but the first cells are raw "
                           "counts; the matrix mixes counts with normalised values: annotate each kind apart.", "input_kind")
    if kind == "lognorm":
        sums = _expm1_row_sums(block)
        bad = np.flatnonzero((sums > 0) & (np.abs(sums / TARGET_SUM - 1) >= 0.02))
        if bad.size:
            raise SclError(f"{where}: cell {cell_ids[bad[0]]!r} is not log1p(counts per 1e4) (expm1 row sum {sums[bad[0]]:.4g}) "
                           "but the first cells are; the matrix mixes kinds: annotate each kind apart.", "input_kind")


def _expm1_row_sums(block) -> np.ndarray:
    if isinstance(block, np.ndarray):
        return np.expm1(block.astype(np.float64)).sum(axis=1)
    rows = np.repeat(np.arange(block.n_rows), np.diff(block.indptr))
    return np.bincount(rows, weights=np.expm1(block.data.astype(np.float64)), minlength=block.n_rows)


def detect_input_kind(block, where: str) -> tuple[str, str]:
    """'counts' or 'lognorm' from a sample of rows, with the evidence as a sentence; refuses anything else."""
    values = _values(block)
    if values.size == 0 or np.allclose(values, np.round(values), rtol=0, atol=1e-4):
        return "counts", "all values are integers"
    sums = _expm1_row_sums(block)
    sums = sums[sums > 0]
    if sums.size and np.all(np.abs(sums / TARGET_SUM - 1) < 0.02):
        return "lognorm", f"values are non-integer and expm1 row sums are {np.median(sums):.0f} (log1p of counts per 1e4)"
    raise SclError(
        f"{where}: values are neither integer counts nor log1p(counts per 1e4) (median expm1 row sum "
        f"{np.median(sums) if sums.size else 0:.4g}); pass raw counts (the layers/counts or raw/X matrix), "
        "or say the input kind is lognorm if they are log-normalised to another total.", "matrix", "input_kind"
    )
