"""Why pancreas transfer across technologies fails in benchmarks/recipe.py: the data, the genes, or the base?

The two pancreas files (Baron, inDrop; Segerstolpe, Smart-seq2) each hold 2,000 genes and share only some of them. This
fits a plain logistic regression (log1p of counts per 10,000) on one file and scores it on the other: on the genes both
files measure, and on the reference's genes with the query's missing ones read as zero (what a model trained on the
reference sees); CellTypist's 300-feature recipe on the shared genes beside it. With --base, it also embeds both files
with that base (the frozen encoder) and reports how far apart the two technologies land.

    python benchmarks/pancreas_genes.py                                       # about a minute
    python benchmarks/pancreas_genes.py --base /tmp/recipe_work/bases/pbmc_brain   # recipe.py's PBMC+brain base

Writes benchmarks/results/<machine>-pancreas-genes.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
sys.path.insert(0, str(HERE))
FILES = {"baron": SHARED / "pancreas_baron.h5ad", "seg": SHARED / "pancreas_seg.h5ad"}


def logistic_transfer(reference, query, genes) -> float:
    """Macro-F1 on `query` of a logistic regression fitted on `reference`, both read over `genes` (absent genes: 0)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    def matrix(adata):
        x = np.zeros((adata.n_obs, len(genes)), dtype=np.float32)
        column = {g: i for i, g in enumerate(adata.var_names)}
        have = [j for j, g in enumerate(genes) if g in column]
        x[:, have] = adata.X[:, [column[genes[j]] for j in have]].toarray()
        return x

    clf = LogisticRegression(max_iter=2000).fit(matrix(reference), reference.obs["cell_type"])
    truth = query.obs["cell_type"].astype(str).to_numpy()
    return round(float(f1_score(truth, clf.predict(matrix(query)), labels=np.unique(truth), average="macro")), 4)


def embedding_gap(base: Path) -> dict:
    """Mean cosine between cells of the same file and across the two files, frozen base embeddings."""
    import torch

    from recipe import MIN_GENES
    from scl.runtime.expression import ReadOptions
    from scl.train.data import embed, load_labelled
    from scl.train.model_dir import load_model_dir

    model = load_model_dir(base)
    z = {name: embed(model.encoder, load_labelled(str(path), model.gene_order, "cell_type", ReadOptions(min_genes=MIN_GENES)).x, torch.device("cpu"))
         for name, path in FILES.items()}
    mean_cos = lambda a, b: round(float((a @ b.T).mean()), 3)  # noqa: E731 (embeddings are unit length)
    return {"base": base.name, "within_baron": mean_cos(z["baron"], z["baron"]), "within_seg": mean_cos(z["seg"], z["seg"]),
            "across": mean_cos(z["baron"], z["seg"])}


def measure(base: Path | None) -> dict:
    import anndata as ad

    from accuracy import lognormalised
    from calibration import celltypist_transfer

    data = {name: lognormalised(ad.read_h5ad(path)) for name, path in FILES.items()}
    shared = sorted(set(data["baron"].var_names) & set(data["seg"].var_names))
    directions = {}
    with tempfile.TemporaryDirectory() as tmp:
        subsets = {name: Path(tmp) / f"{name}_shared.h5ad" for name in FILES}  # raw counts over the shared genes, for CellTypist to normalise itself
        for name, path in subsets.items():
            ad.read_h5ad(FILES[name])[:, shared].copy().write_h5ad(path)
        for ref, query in (("baron", "seg"), ("seg", "baron")):
            directions[f"{ref}_to_{query}"] = {
                "logistic_shared_genes": logistic_transfer(data[ref], data[query], shared),
                "logistic_reference_genes": logistic_transfer(data[ref], data[query], list(data[ref].var_names)),
                "celltypist_300_shared_genes": celltypist_transfer(subsets[ref], subsets[query], top_genes=300)["macro_f1"]}
            print(f"{ref} -> {query}: {directions[f'{ref}_to_{query}']}", flush=True)
    return {"genes": {name: int(a.n_vars) for name, a in data.items()} | {"shared": len(shared)}, "directions": directions,
            "embedding": embedding_gap(base) if base else None}


def markdown(r: dict) -> str:
    g = r["genes"]
    lines = [f"Machine {r['machine']}, {r['date']}; `{r['command']}`. Macro-F1 on the other file; Baron {g['baron']:,} genes, "
             f"Segerstolpe {g['seg']:,}, {g['shared']:,} in both.", "",
             "| direction | logistic, shared genes | logistic, reference's genes (missing read as 0) | CellTypist 300 features, shared genes |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {d['logistic_shared_genes']:.3f} | {d['logistic_reference_genes']:.3f} | {d['celltypist_300_shared_genes']:.3f} |"
              for name, d in r["directions"].items()]
    if e := r["embedding"]:
        lines += ["", f"Frozen base `{e['base']}`: mean cosine between cells within Baron {e['within_baron']}, within Segerstolpe "
                      f"{e['within_seg']}, across the two files {e['across']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from run import machine_name, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="a base model folder to embed both files with (frozen)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    if args.base and not (Path(args.base) / "gene_order.tsv").is_file():
        parser.error(f"--base {args.base}: not a model folder (no gene_order.tsv); give one such as recipe.py's --work/bases/pbmc_brain")
    results = {"machine": machine_name(), "date": datetime.date.today().isoformat(),
               "command": "python benchmarks/pancreas_genes.py" + (f" --base {args.base}" if args.base else ""),
               **measure(Path(args.base) if args.base else None)}
    print(write_results(results, Path(args.out), False, "pancreas-genes", markdown))
    return results


if __name__ == "__main__":
    main()
