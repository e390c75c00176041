"""Accuracy on real cells, side by side: scl's torch model against its ONNX variants, and CellTypist.

The recipe of issue 3 (README, training): the sorted PBMCs split 80/20 by population with seed 0; a base
pretrained on the PBMC training cells and the brain cells (triplet weight 0.5); LoRA fine-tuned on the PBMC
training cells (lr 1e-3); exported as fp32, int8 and fp16. Every variant labels the same held-out cells.

CellTypist 1.7.1 is trained on the same training cells, normalised as it requires (counts per 1e4, log1p,
all genes of the file), and labels the same held-out cells. Its default logistic regression passes
multi_class='ovr', which scikit-learn 1.8 removed, so it runs its SGD logistic regression (use_SGD=True) with
the scikit-learn installed here.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def split_pbmc(pbmc: str, out: Path, seed: int = 0, cells: int | None = None) -> tuple[str, str]:
    import anndata as ad
    from sklearn.model_selection import train_test_split

    from scl.train.data import write_stratified_split

    adata = ad.read_h5ad(pbmc)
    if cells:  # smoke runs: a stratified subset
        adata = adata[np.sort(train_test_split(np.arange(adata.n_obs), train_size=cells, stratify=adata.obs["cell_type"], random_state=seed)[0])]
    return write_stratified_split(adata, (str(out / "pbmc_train.h5ad"), str(out / "pbmc_val.h5ad")), test_size=0.2, seed=seed)


def train_and_export(train: str, val: str, brain: str, gene_order: str, out: Path, smoke: bool) -> tuple[Path, dict]:
    """The issue-3 recipe; returns the run dir and {variant: onnx path}."""
    from scl.export.export_run import export_run
    from scl.train.config import FinetuneConfig, PretrainConfig
    from scl.train.finetune import finetune
    from scl.train.pretrain import pretrain

    size = dict(hidden_dim=[64, 64], latent_dim=16, epochs=1) if smoke else dict(epochs=15)
    pretrain(PretrainConfig(data=[train, brain], out=str(out / "base"), gene_order=gene_order, triplet_weight=0.5, **size), progress=False)
    finetune(FinetuneConfig(base_model=str(out / "base"), data=train, val_data=val, out=str(out / "run"), lr=1e-3, epochs=1 if smoke else 5), progress=False)
    export_run(out / "run", out / "model.onnx", quantize="int8", fp16=True)
    return out / "run", {name: out / f"model{suffix}.onnx" for name, suffix in (("fp32", ""), ("int8", ".int8"), ("fp16", ".fp16"))}


def onnx_parity(run_dir: Path, models: dict, val: str) -> dict:
    """Each variant against torch on the held-out cells: label agreement, largest embedding difference, macro-F1."""
    import anndata as ad
    from sklearn.metrics import f1_score

    from scl.export.graph import annotation_model
    from scl.export.validate import onnx_outputs, torch_outputs
    from scl.runtime.expression import ExpressionSource
    from scl.train.run_dir import load_run

    run = load_run(run_dir)
    with ExpressionSource(val, run.model.gene_order) as src:
        counts = np.vstack([x for _, x in src.blocks(normalise=False)])
    truth = ad.read_h5ad(val).obs["cell_type"].astype(str).to_numpy()
    classes = np.array(run.classes)
    t_probs, t_emb = torch_outputs(annotation_model(run), counts, False)
    rows = {"torch_fp32": {"label_agreement_with_torch": 1.0, "max_abs_diff_embedding": 0.0,
                           "macro_f1": f1_score(truth, classes[t_probs.argmax(1)], average="macro")}}
    for name, path in models.items():
        try:
            probs, emb = onnx_outputs(path, counts, False)
        except Exception as err:  # fp16 kernels this provider lacks
            rows[f"onnxruntime_{name}"] = {"skipped": str(err).splitlines()[0][:200]}
            continue
        rows[f"onnxruntime_{name}"] = {"label_agreement_with_torch": float((probs.argmax(1) == t_probs.argmax(1)).mean()),
                                       "max_abs_diff_embedding": float(np.abs(emb - t_emb).max()),
                                       "macro_f1": f1_score(truth, classes[probs.argmax(1)], average="macro")}
    return {"cells": len(counts), "provider": "CPUExecutionProvider", "variants": rows}


def novelty_shares(model: Path, files: dict[str, str]) -> dict:
    """Per file, the share of cells scl-annotate flags novel (novelty p <= 0.01; what --max-novelty auto unassigns)."""
    from scl.runtime.annotator import Annotator

    annotator = Annotator(model)
    shares = {}
    for name, path in files.items():
        novel = annotator.annotate(path, progress=False).calls["novel"]
        shares[name] = {"cells": len(novel), "share_novel": round(float(novel.mean()), 4)}
    return shares


def lognormalised(adata):
    import scanpy as sc

    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def celltypist_comparison(train: str, val: str, throughput_h5ad: str, throughput_cells: int) -> dict:
    """CellTypist trained and evaluated on the same cells; its annotation speed on the benchmark's synthetic cells."""
    import anndata as ad
    import celltypist
    import sklearn
    from sklearn.metrics import f1_score

    train_data = lognormalised(ad.read_h5ad(train))
    started = time.perf_counter()
    model = celltypist.train(train_data, labels="cell_type", use_SGD=True, feature_selection=False, n_jobs=-1, max_iter=1000,
                             random_state=0)  # passed on to scikit-learn's SGDClassifier: unseeded, macro-F1 moved 0.827-0.863 between runs
    train_seconds = time.perf_counter() - started
    val_data = lognormalised(ad.read_h5ad(val))
    predicted = celltypist.annotate(val_data, model=model).predicted_labels["predicted_labels"].astype(str)
    macro_f1 = f1_score(val_data.obs["cell_type"].astype(str), predicted, average="macro")

    cells = ad.read_h5ad(throughput_h5ad)[:throughput_cells].copy()
    started = time.perf_counter()
    celltypist.annotate(lognormalised(cells), model=model)  # what a user runs on an AnnData in memory: normalise, annotate
    rate = cells.n_obs / (time.perf_counter() - started)
    return {"version": celltypist.__version__, "scikit_learn": sklearn.__version__, "method": "SGD logistic regression (use_SGD=True, random_state=0), all genes",
            "features": int(len(model.features)), "macro_f1": macro_f1, "train_seconds": round(train_seconds, 2),
            "throughput_cells": cells.n_obs, "cells_per_second": round(rate, 1)}
