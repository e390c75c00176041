"""Benchmark inputs: a real-size model with random weights and a CSR .h5ad of count-like cells, written in blocks."""

from __future__ import annotations

import h5py
import numpy as np
import onnx
import torch

from scl.export.graph import AnnotationModel
from scl.export.onnx_file import convert_fp16, export_fp32, quantize_int8, save_with_metadata
from scl.runtime import model_metadata as meta
from scl.train.head import CellHead
from scl.train.model_dir import SCimilarityModel
from scl.train.nn import Decoder, Encoder

STR = h5py.string_dtype()
HEAD_GENES = 800
STEPS = np.array([3, 11, 13, 17, 19, 23, 29, 31])  # coprime with 28,231 = 7 * 37 * 109: no repeated gene in a cell


def random_model(genes: list[str], n_classes: int = 10, seed: int = 0, head_genes: int = HEAD_GENES) -> tuple[SCimilarityModel, CellHead]:
    """Random weights at SCimilarity's size, with a head on the embedding and `head_genes` marker genes (scl-train's
    default head reads about 80 per class: 580 genes for the demo's 7 classes)."""
    torch.manual_seed(seed)
    encoder, decoder = Encoder(len(genes)).eval(), Decoder(len(genes)).eval()
    markers = torch.randperm(len(genes))[:head_genes].sort().values
    head = CellHead(0.1 * torch.randn(n_classes, 128), torch.zeros(n_classes), markers, 0.1 * torch.randn(n_classes, len(markers)))
    return SCimilarityModel(encoder, decoder, genes, [f"type{i}" for i in range(n_classes)]), head


def write_onnx(model: SCimilarityModel, head, path) -> tuple:
    values = {"format_version": meta.FORMAT_VERSION, "gene_order": model.gene_order, "classes": model.labels,
              "normalization": {"target_sum": 1e4, "log1p": True, "aligned_first": True}, "input": {"name": "counts"},
              "model_card": {"name": "random weights for benchmarks"}, "centroids": np.eye(len(model.labels), 128).tolist()}
    module = AnnotationModel(model.encoder, head).eval()
    save_with_metadata(export_fp32(module, len(model.gene_order)), values, path)
    int8, fp16 = path.with_name(path.stem + ".int8.onnx"), path.with_name(path.stem + ".fp16.onnx")
    save_with_metadata(quantize_int8(path), values, int8)
    save_with_metadata(convert_fp16(onnx.load(str(path))), values, fp16)
    return path, int8, fp16


def cell_block(n: int, n_genes: int, detected: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """n cells with `detected` genes each (sorted indices) and geometric counts (mostly 1s, a tail of larger)."""
    offsets = rng.integers(0, n_genes, size=(n, 1))
    steps = rng.choice(STEPS, size=(n, 1))
    indices = np.sort((offsets + steps * np.arange(detected)) % n_genes, axis=1).astype(np.int32)
    data = rng.geometric(0.45, size=(n, detected)).astype(np.float32)
    return data.ravel(), indices.ravel()


def write_csr_h5ad(path, genes: list[str], n_cells: int, detected: int = 2500, block: int = 10000, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    nnz = n_cells * detected
    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        x = f.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, len(genes))})
        data = x.create_dataset("data", shape=(nnz,), dtype=np.float32)
        indices = x.create_dataset("indices", shape=(nnz,), dtype=np.int32)
        x.create_dataset("indptr", data=np.arange(n_cells + 1, dtype=np.int64) * detected)
        for start in range(0, n_cells, block):
            n = min(block, n_cells - start)
            d, i = cell_block(n, len(genes), detected, rng)
            data[start * detected : (start + n) * detected] = d
            indices[start * detected : (start + n) * detected] = i
        for name, index in (("obs", [f"cell{i}" for i in range(n_cells)]), ("var", genes)):
            group = f.create_group(name)
            group.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.2.0", "_index": "_index", "column-order": np.array([], dtype=STR)})
            group.create_dataset("_index", data=np.array(index, dtype=object), dtype=STR).attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
        for name in ("layers", "obsm", "obsp", "varm", "varp", "uns"):
            f.create_group(name).attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})


def labelled_h5ad(path, genes: list[str], n: int, seed: int, detected: int, labels: int, prefix: str | None = None) -> None:
    """write_csr_h5ad's cells with an obs cell_type of `labels` random labels (ids prefix + number; default ref<seed>_)."""
    import pandas as pd
    from anndata.io import write_elem

    write_csr_h5ad(path, genes, n, detected=detected, seed=seed)
    codes = np.random.default_rng(seed).integers(0, labels, n)
    names = np.array([f"label{i}" for i in range(labels)])
    prefix = f"ref{seed}_" if prefix is None else prefix
    obs = pd.DataFrame({"cell_type": pd.Categorical.from_codes(codes, names)}, index=[f"{prefix}{i}" for i in range(n)])
    with h5py.File(path, "r+") as f:
        del f["obs"]
        write_elem(f, "obs", obs)
