"""The classification head scl-train ships: a logistic regression on the fine-tuned embedding and on the
log-normalised expression of marker genes, fitted once LoRA training has chosen its epoch.

    logits = W_z · embedding + W_g · log1p(CP10k)[marker genes] + b

The marker genes are CellTypist's feature selection (a logistic regression on every gene, scaled per gene; per
class the genes with the largest |coefficient|; their union). The genes enter the head unscaled: per-gene scaling
fitted on one technology transfers badly to another (benchmarks/head_genes.py measured both). Which genes, how many
per class and how strongly the fit is regularised were chosen by benchmarks/head_genes.py on bases that never saw
the labels; `head_genes=0` gives the embedding-only head.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.linear_model import LogisticRegression

# Fits (the head, the marker genes, and in roles.py the probe, k-NN baseline and centroids) on at most this many cells
# of each class (a stratified sample): a bound on time and memory for large references, not a setting chosen for
# accuracy (the files measured hold at most 960 cells of a class).
FIT_CELLS_PER_CLASS = 5000
LOGIT_BLOCK = 4096  # cells whose marker genes head_logits reads at once


class CellHead(torch.nn.Module):
    """Linear in the embedding and in the log-normalised expression of `gene_index` (indices into the model's gene
    order); with no genes, a plain linear head on the embedding."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, gene_index: torch.Tensor | None = None, gene_weight: torch.Tensor | None = None):
        super().__init__()
        n_classes = weight.shape[0]
        gene_index = torch.zeros(0, dtype=torch.long) if gene_index is None else gene_index.long()
        gene_weight = torch.zeros(n_classes, 0) if gene_weight is None else gene_weight
        if bias.shape != (n_classes,) or gene_weight.shape != (n_classes, len(gene_index)):
            raise ValueError(f"head shapes disagree: weight {tuple(weight.shape)}, bias {tuple(bias.shape)}, "
                             f"{len(gene_index)} genes, gene weight {tuple(gene_weight.shape)}")
        self.weight = torch.nn.Parameter(weight.detach().clone().float())
        self.bias = torch.nn.Parameter(bias.detach().clone().float())
        self.gene_weight = torch.nn.Parameter(gene_weight.detach().clone().float())
        self.register_buffer("gene_index", gene_index.clone())

    @property
    def n_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, embedding: torch.Tensor, lognorm: torch.Tensor | None = None) -> torch.Tensor:
        logits = embedding @ self.weight.T + self.bias
        if len(self.gene_index):
            logits = logits + lognorm.index_select(1, self.gene_index) @ self.gene_weight.T  # one ONNX Gather of those columns
        return logits

    def scaled(self, factor: float) -> "CellHead":
        """The same head with every logit multiplied by `factor` (a calibration temperature folds in as 1 / T)."""
        return CellHead(self.weight * factor, self.bias * factor, self.gene_index, self.gene_weight * factor).eval()

    def state(self) -> dict:
        """What head.pt stores (run_dir.py)."""
        return {"weight": self.weight.detach().clone(), "bias": self.bias.detach().clone(),
                "gene_index": self.gene_index.clone(), "gene_weight": self.gene_weight.detach().clone()}

    @staticmethod
    def from_state(state: dict) -> "CellHead":
        return CellHead(state["weight"], state["bias"], state.get("gene_index"), state.get("gene_weight")).eval()

    def max_row_norm(self) -> float:
        return float(torch.cat([self.weight, self.gene_weight], dim=1).detach().norm(dim=1).max())


def stratified_sample(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted row indices: every cell of a class with at most `per_class`, else `per_class` of them at random."""
    rng = np.random.default_rng(seed)
    parts = [rows if len(rows) <= per_class else rng.choice(rows, per_class, replace=False)
             for rows in (np.flatnonzero(y == c) for c in np.unique(y))]
    return np.sort(np.concatenate(parts))


def marker_genes(x: sp.csr_matrix, y: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """CellTypist's feature selection: a logistic regression on every gene (scaled to unit variance, uncentred so x
    stays sparse), then per class the `per_class` genes with the largest |coefficient|; their union, sorted."""
    rows = stratified_sample(y, FIT_CELLS_PER_CLASS, seed)
    x, y = x[rows].tocsr(), y[rows]  # cells still in their files (FileRows) are read here
    std = np.sqrt(np.asarray(x.power(2).mean(axis=0)).ravel() - np.asarray(x.mean(axis=0)).ravel() ** 2)
    scale = np.where(std > 0, 1 / np.where(std > 0, std, 1), 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs's iteration notice: the ranking of coefficients settles long before
        fit = LogisticRegression(C=1.0, max_iter=1000).fit(x @ sp.diags(scale), y)
    coef = np.abs(fit.coef_)
    if coef.shape[0] == 1:  # two classes: one row of coefficients serves both
        coef = np.vstack([coef, coef])
    top = np.argsort(-coef, axis=1, kind="stable")[:, :per_class]
    return np.unique(top.ravel())


def head_features(z: np.ndarray, x: sp.csr_matrix, genes: np.ndarray) -> sp.csr_matrix:
    """[embedding, marker genes' log1p] as one sparse matrix: dense, 50 classes of 5,000 cells and 5,000 genes would
    take 10 GB."""
    return sp.hstack([sp.csr_matrix(z), x[:, genes]], format="csr")


def fit_head(z: np.ndarray, x: sp.csr_matrix, y: np.ndarray, n_classes: int, genes: np.ndarray, c: float, seed: int = 0) -> CellHead:
    """The logistic regression of the head on embedding and marker genes (unscaled), as a CellHead over all classes."""
    rows = stratified_sample(y, FIT_CELLS_PER_CLASS, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        fit = LogisticRegression(C=c, max_iter=5000).fit(head_features(z[rows], x[rows].tocsr(), genes), y[rows])
    coef, intercept = fit.coef_, fit.intercept_
    if coef.shape[0] == 1:  # two classes: the sigmoid as a two-way softmax
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    assert len(fit.classes_) == n_classes, "the classes are those of the training cells"
    latent = z.shape[1]
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return CellHead(as_tensor(coef[:, :latent]), as_tensor(intercept), torch.from_numpy(genes.astype(np.int64)), as_tensor(coef[:, latent:]))


def head_logits(head: CellHead, z: np.ndarray, x) -> np.ndarray:
    """The head's logits for cells held as embeddings and log1p(CP10k) rows (sparse, or FileRows read a block at a
    time; only the marker columns are used)."""
    weight, bias, gene_weight = (p.detach().numpy().astype(np.float64) for p in (head.weight, head.bias, head.gene_weight))
    logits = z @ weight.T + bias
    genes = head.gene_index.numpy()
    if len(genes):
        for i in range(0, len(z), LOGIT_BLOCK):
            logits[i : i + LOGIT_BLOCK] += np.asarray(x[i : i + LOGIT_BLOCK].tocsr()[:, genes] @ gene_weight.T)
    return logits


def lora_trained_head(linear: torch.nn.Linear) -> CellHead:
    """The head LoRA trained with the encoder, on the embedding alone (what ships with head_genes=0)."""
    return CellHead(linear.weight.cpu(), linear.bias.cpu()).eval()
