"""Inputs that hold few of the model's genes: how many cells min_cell_genes unassigns, held to 200 or scaled to the
genes the input holds (the default), and what that does to macro-F1.

    python benchmarks/shallow_inputs.py MODEL.onnx     # about a minute on 2 cores
    python benchmarks/shallow_inputs.py demo_out/model.onnx

The sorted PBMCs (../shared/data/pbmc_sorted_dev.h5ad, 2,800 labelled cells) on all their genes, on their 1,767 and
500 most variable genes (variance of log1p CP10k, as users' highly-variable-gene subsets), and on 2,000 random genes.
Unassigned cells count as wrong in macro-F1. Writes benchmarks/results/<machine>-shallow.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PBMC = HERE.parent.parent / "shared" / "data" / "pbmc_sorted_dev.h5ad"


def gene_subsets(adata) -> dict[str, np.ndarray]:
    x = adata.X.tocsr().astype(np.float64)
    scaled = x.multiply(1e4 / np.asarray(x.sum(1))).tocsr()
    scaled.data = np.log1p(scaled.data)
    mean = np.asarray(scaled.mean(0)).ravel()
    variance = np.asarray(scaled.multiply(scaled).mean(0)).ravel() - mean**2
    by_variance = np.argsort(-variance)
    return {"all genes": np.arange(adata.n_vars), "1,767 most variable": by_variance[:1767], "500 most variable": by_variance[:500],
            "2,000 random": np.random.default_rng(0).choice(adata.n_vars, 2000, replace=False)}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an .onnx from scl-export")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    import anndata as ad
    from run import machine_name
    from sklearn.metrics import f1_score

    import scl

    warnings.simplefilter("ignore")
    annotator, adata = scl.Annotator(args.model), ad.read_h5ad(PBMC)
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    rows = []
    for name, genes in gene_subsets(adata).items():
        subset = adata[:, np.sort(genes)].copy()
        for rule in (200, None):
            result = annotator.annotate(subset, min_cell_genes=rule, min_genes=100, progress=False)
            labels, detected = result.predicted_labels, result.calls["genes_detected"]
            rows.append({"genes": name, "model_genes_held": result.report["input"]["genes"]["matched"],
                         "min_cell_genes": result.report["min_cell_genes"], "rule": "200" if rule else "scaled (default)",
                         "median_genes_detected": float(np.median(detected)), "unassigned": round(float(np.mean(labels == "unassigned")), 3),
                         "macro_f1": round(float(f1_score(truth, labels, average="macro", labels=sorted(set(truth)))), 3)})
            print(rows[-1], flush=True)
    results = {"machine": machine_name(), "date": datetime.date.today().isoformat(), "model": args.model,
               "command": "python benchmarks/shallow_inputs.py " + args.model, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{results['machine']}-shallow.json").write_text(json.dumps(results, indent=1))
    lines = [f"Machine {results['machine']}, {results['date']}; `{results['command']}`.", "",
             "| genes | model genes held | rule | min_cell_genes | median genes detected | unassigned | macro-F1 |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['genes']} | {r['model_genes_held']:,} | {r['rule']} | {r['min_cell_genes']} | {r['median_genes_detected']:.0f} | "
              f"{r['unassigned']:.1%} | {r['macro_f1']:.3f} |" for r in rows]
    (out / f"{results['machine']}-shallow.md").write_text("\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
