"""Labelled cells for training, read through the runtime's readers: held as sparse log1p(CP10k), or left in their
files and read when a step needs them (stream=True, file_rows.py)."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from scl.runtime.errors import SclError
from scl.runtime.expression import ExpressionSource, ReadOptions, open_matrix
from scl.runtime.genes import to_symbols

from .file_rows import FileRows, stack_rows

log = logging.getLogger("scl")
MISSING_LABELS = {"", "nan", "none", "na", "n/a", "<na>", "null"}  # what astype(str) and spreadsheets make of a missing label


@dataclass
class LabelledCells:
    x: sp.csr_matrix | FileRows  # aligned to the gene order, log1p(CP10k), float32; FileRows: still in the file
    labels: np.ndarray  # strings
    cell_ids: np.ndarray
    reading: list[dict]  # what each file's reader reported
    rows: np.ndarray  # each cell's position in its file's obs: how pretrain.json names the cells it held out

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, index) -> "LabelledCells":
        return LabelledCells(self.x[index], self.labels[index], self.cell_ids[index], self.reading, self.rows[index])

    @staticmethod
    def concat(parts: list["LabelledCells"]) -> "LabelledCells":
        return LabelledCells(stack_rows([p.x for p in parts]), np.concatenate([p.labels for p in parts]),
                             np.concatenate([p.cell_ids for p in parts]), [r for p in parts for r in p.reading], np.concatenate([p.rows for p in parts]))


def load_labelled(paths, gene_order, label_key: str, options: ReadOptions | None = None, stream: bool = False) -> LabelledCells:
    """The labelled cells of one or more .h5ad files (cells without a label left out, with a warning). stream: the
    cells stay in their files (x is a FileRows) and only labels, ids and rows are read now."""
    parts = []
    for path in [paths] if isinstance(paths, str) else paths:
        src = ExpressionSource(str(path), gene_order, options)
        try:
            parts.append(_labelled_file(src, label_key, stream))
        except BaseException:
            src.close()
            raise
        if not stream:  # streamed cells keep their file open (FileRows)
            src.close()
    return LabelledCells.concat(parts)


def _labelled_file(src: ExpressionSource, label_key: str, stream: bool) -> LabelledCells:
    path = src.path
    if not hasattr(src.matrix, "obs_column"):
        raise SclError(f"{path}: training needs an .h5ad with a label column in obs; text files carry no labels.")
    file_labels = src.matrix.obs_column(label_key)
    missing = np.array([label is None or label != label or str(label).strip().lower() in MISSING_LABELS for label in file_labels])
    if missing.all():
        raise SclError(f"{path}: obs[{label_key!r}] has no labels (every value is missing); choose the column with the cell types.")
    if missing.any():
        log.warning(f"{path}: {int(missing.sum()):,} of {len(missing):,} cells have no label in obs[{label_key!r}] "
                    f"(missing, or spelled like {sorted({str(v) for v in file_labels[missing]})[:3]}); they are left out")
    rows = np.flatnonzero(~missing)
    if stream:
        ids = np.concatenate(list(src.matrix.id_chunks()))[rows].astype(str)
        return LabelledCells(FileRows.of(src, rows), file_labels[rows].astype(str), ids, [src.describe()], rows)
    parts, ids, start = [], [], 0
    for block_ids, raw in src.raw_blocks():
        keep = ~missing[start : start + len(block_ids)]
        parts.append(src.sparse(raw, block_ids)[keep])
        ids.append(block_ids[keep])
        start += len(block_ids)
    return LabelledCells(sp.vstack(parts).tocsr(), file_labels[rows].astype(str), np.concatenate(ids).astype(str), [src.describe()], rows)


def refuse_changed_files(*cells: LabelledCells) -> None:
    """Before a run is written: one line if a file streamed cells came from was rewritten since it was opened."""
    for part in cells:
        if isinstance(part.x, FileRows):
            part.x.refuse_changed_files()


def gene_union(paths, options: ReadOptions | None = None) -> list[str]:
    """The sorted union of the files' gene symbols: a gene order for a model built from them."""
    genes: set[str] = set()
    for path in paths:
        matrix = open_matrix(str(path), options or ReadOptions())
        names = matrix.var_column(options.gene_column) if options and options.gene_column else matrix.var_names
        genes.update(map(str, to_symbols(names)[0]))
        matrix.close()
    return sorted(genes)


def refuse_tiny_classes(labels: np.ndarray, where: str, minimum: int = 2) -> None:
    names, counts = np.unique(labels, return_counts=True)
    if len(names) < 2:
        raise SclError(f"{where}: every labelled cell is {str(names[0])!r}; a classifier needs at least two cell types (is the label column right?).")
    small = [f"{str(n)!r} ({c})" for n, c in zip(names, counts) if c < minimum]
    if small:
        raise SclError(
            f"{where}: class {', '.join(small)} has fewer than {minimum} cells, too few to split and to form triplets; "
            "remove or merge it before training."
        )


def stratified_holdout(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """bool mask: `share` of each label's cells (rounded; at least one left out of it where there are two or more)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        cells = np.flatnonzero(labels == label)
        n = min(int(round(share * len(cells))), len(cells) - 1)
        held[rng.permutation(cells)[:max(n, 0)]] = True
    return held


STREAM_BLOCK = 64  # consecutive cells read together when streaming (benchmarks/row_reads.py: 16/64/256 read 10k/14k/16k cells/s cold)
WINDOW = 4096  # cells read at once and shuffled among themselves; a batch draws from up to WINDOW / block places in the files


class BatchOrder:
    """Batches of cell indices (0..n-1), endless: each pass over the cells a new shuffle, its last partial batch
    dropped. block > 1 (streaming): a pass shuffles blocks of `block` consecutive cells, then the cells within each
    window of WINDOW cells, so the files are read a block at a time while a batch still mixes cells from many places
    (scDataset's block sampling)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, block: int = 1):
        self.n, self.batch_size, self.generator, self.block = n, min(batch_size, n), generator, block
        self._batches = self._endless()

    def take(self, steps: int):
        """The next `steps` batches."""
        return itertools.islice(self._batches, steps)

    def _endless(self):
        n, size = self.n, self.batch_size
        while True:
            order = torch.randperm(n, generator=self.generator).numpy() if self.block == 1 else block_shuffled(n, self.block, self.generator)
            yield from (order[start : start + size] for start in range(0, n - n % size, size))


def block_shuffled(n: int, block: int, generator: torch.Generator) -> np.ndarray:
    starts = torch.randperm(-(-n // block), generator=generator).numpy() * block
    order = np.concatenate([np.arange(s, min(s + block, n)) for s in starts])
    for start in range(0, n, WINDOW):
        window = order[start : start + WINDOW]
        window[:] = window[torch.randperm(len(window), generator=generator).numpy()]
    return order


def stream_block(x) -> int:
    """How many consecutive cells a batch order keeps together: STREAM_BLOCK for cells read from files, else 1."""
    return STREAM_BLOCK if isinstance(x, FileRows) else 1


def steps_per_epoch(n: int, batch_size: int, epoch_cells: int | None) -> int:
    """Training steps between validations: every cell once, or `epoch_cells` cells (large references)."""
    return max(min(epoch_cells or n, n) // min(batch_size, n), 1)


def read_batches(x, order: BatchOrder, steps: int, share, device: torch.device):
    """(this process's share of each batch, its cells as a dense tensor) for the next `steps` batches of `order`. The
    batches of about WINDOW cells are read together, so a streamed file is read once per window, in blocks."""
    batches = order.take(steps)
    while group := [share(b) for b in itertools.islice(batches, max(WINDOW // order.batch_size, 1))]:
        wanted = np.unique(np.concatenate(group))
        held = x[wanted].tocsr()
        for index in group:
            yield index, torch.from_numpy(held[np.searchsorted(wanted, index)].toarray()).to(device)


EVAL_BATCH = 512


def dense(x: sp.csr_matrix, index, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(x[index].toarray()).to(device)


@torch.no_grad()
def embed(encoder: torch.nn.Module, x: sp.csr_matrix, device: torch.device) -> np.ndarray:
    """The encoder's embedding of every row of x, in batches of EVAL_BATCH cells (no rows: an empty [0, latent])."""
    encoder.eval()
    parts = [encoder(dense(x, slice(i, i + EVAL_BATCH), device)).float().cpu() for i in range(0, max(x.shape[0], 1), EVAL_BATCH)]
    return torch.cat(parts).numpy()


def write_stratified_split(adata, paths: tuple[str, str], test_size: float, seed: int, label_key: str = "cell_type") -> tuple[str, str]:
    """Split an AnnData by label (stratified), writing the training and held-out cells as two h5ad files."""
    from sklearn.model_selection import train_test_split

    train, held_out = train_test_split(np.arange(adata.n_obs), test_size=test_size, stratify=adata.obs[label_key], random_state=seed)
    for path, index in zip(paths, (train, held_out)):
        adata[np.sort(index)].copy().write_h5ad(path)
    return paths
