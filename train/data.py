"""Labelled cells for training, read through the runtime's readers and held as sparse log1p(CP10k)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from scl.runtime.errors import SclError
from scl.runtime.expression import ExpressionSource, ReadOptions, open_matrix
from scl.runtime.genes import to_symbols

log = logging.getLogger("scl")
MISSING_LABELS = {"", "nan", "none", "na", "n/a", "<na>", "null"}  # what astype(str) and spreadsheets make of a missing label


@dataclass
class LabelledCells:
    x: sp.csr_matrix  # aligned to the gene order, log1p(CP10k), float32
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
        return LabelledCells(sp.vstack([p.x for p in parts]).tocsr(), np.concatenate([p.labels for p in parts]),
                             np.concatenate([p.cell_ids for p in parts]), [r for p in parts for r in p.reading], np.concatenate([p.rows for p in parts]))


def load_labelled(paths, gene_order, label_key: str, options: ReadOptions | None = None) -> LabelledCells:
    parts, labels, ids, reading, rows = [], [], [], [], []
    for path in [paths] if isinstance(paths, str) else paths:
        with ExpressionSource(str(path), gene_order, options) as src:
            if not hasattr(src.matrix, "obs_column"):
                raise SclError(f"{path}: training needs an .h5ad with a label column in obs; text files carry no labels.")
            file_labels = src.matrix.obs_column(label_key)
            missing = np.array([label is None or label != label or str(label).strip().lower() in MISSING_LABELS for label in file_labels])
            if missing.all():
                raise SclError(f"{path}: obs[{label_key!r}] has no labels (every value is missing); choose the column with the cell types.")
            if missing.any():
                log.warning(f"{path}: {int(missing.sum()):,} of {len(missing):,} cells have no label in obs[{label_key!r}] "
                            f"(missing, or spelled like {sorted({str(v) for v in file_labels[missing]})[:3]}); they are left out")
            labels.append(file_labels[~missing].astype(str))
            rows.append(np.flatnonzero(~missing))
            start = 0
            for block_ids, x in src.blocks():
                keep = ~missing[start : start + len(block_ids)]
                parts.append(sp.csr_matrix(x[keep]))
                ids.append(block_ids[keep])
                start += len(block_ids)
            reading.append(src.describe())
    return LabelledCells(sp.vstack(parts).tocsr(), np.concatenate(labels), np.concatenate(ids).astype(str), reading, np.concatenate(rows))


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


def batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True):
    order = torch.randperm(n, generator=generator).numpy()
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


EVAL_BATCH = 512


def dense(x: sp.csr_matrix, index, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(x[index].toarray()).to(device)


@torch.no_grad()
def embed(encoder: torch.nn.Module, x: sp.csr_matrix, device: torch.device) -> np.ndarray:
    """The encoder's embedding of every row of x, in batches of EVAL_BATCH cells."""
    encoder.eval()
    parts = [encoder(dense(x, slice(i, i + EVAL_BATCH), device)).float().cpu() for i in range(0, x.shape[0], EVAL_BATCH)]
    return torch.cat(parts).numpy()


def write_stratified_split(adata, paths: tuple[str, str], test_size: float, seed: int, label_key: str = "cell_type") -> tuple[str, str]:
    """Split an AnnData by label (stratified), writing the training and held-out cells as two h5ad files."""
    from sklearn.model_selection import train_test_split

    train, held_out = train_test_split(np.arange(adata.n_obs), test_size=test_size, stratify=adata.obs[label_key], random_state=seed)
    for path, index in zip(paths, (train, held_out)):
        adata[np.sort(index)].copy().write_h5ad(path)
    return paths
