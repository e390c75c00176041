"""Calls a user can trust on new data: prediction-set coverage, set size and novelty on cells no stage used, and
transfer across technologies beside CellTypist.

    python benchmarks/calibration.py --seeds 3  # about 25 minutes on 2 cores; needs ../shared/data
    python benchmarks/calibration.py --smoke    # small networks and few cells, for the tests

Writes benchmarks/results/<machine>-calibration.json and .md.

PBMC (the user's recipe, on cells no stage used): the 2,800 sorted PBMCs are split by population into the user's file
(300 per population) and 700 new cells (100 per population) that no stage sees, as the 700 cells kept aside by the data's
provider would be. `scl-pretrain --data user.h5ad --data brain.h5ad` (default hold-out 0.2, triplet weight 0.5, 15
epochs, SCimilarity's gene order), `scl-train --data user.h5ad` (its defaults), `scl-export`; then the new cells
and the 466 brain cells are annotated at each alpha, once per seed (the split, pretraining and fine-tuning all take it:
coverage on 700 cells moves by a point or two with the cells drawn, so one split alone proves little). The same again
with `--holdout 0` (first seed): the base then saw every cell.

Pancreas (another lab, another technology): a base pretrained and fine-tuned on one file (its own 2,000 genes), the
other file annotated; both directions. CellTypist 1.7.1 (SGD logistic regression, all genes, seeded) is trained on the
same reference and labels the same query. Coverage there is a measurement, not a promise: the query cells are not
exchangeable with the calibration cells.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
BIN = Path(sys.executable).parent
ALPHAS = (0.05, 0.1)
sys.path.insert(0, str(HERE))


def cli(*args) -> str:
    """Run one of scl's commands; its stderr (warnings) on success, an exception otherwise."""
    out = subprocess.run([str(BIN / args[0]), *map(str, args[1:])], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{args[0]} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out.stderr


def split_user_and_new(pbmc: Path, out: Path, smoke: bool, seed: int) -> tuple[Path, Path]:
    import anndata as ad

    adata = ad.read_h5ad(pbmc)
    rng = np.random.default_rng(seed)
    per_user, per_new = (60, 30) if smoke else (300, 100)
    user, new = [], []
    for label in adata.obs["cell_type"].cat.categories:
        cells = rng.permutation(np.flatnonzero(adata.obs["cell_type"] == label))
        user += list(cells[:per_user])
        new += list(cells[per_user:per_user + per_new])
    paths = out / "user.h5ad", out / "new_cells.h5ad"
    for path, index in zip(paths, (user, new)):
        adata[np.sort(index)].copy().write_h5ad(path)
    return paths


def size_options(smoke: bool) -> list[str]:
    return ["--hidden", "64,32", "--latent", "16", "--epochs", "2"] if smoke else ["--epochs", "15"]


def build(reference: Path, others: list[Path], gene_order: Path | None, holdout: float, out: Path, smoke: bool, seed: int = 0) -> dict:
    """scl-pretrain, scl-train, scl-export as a user runs them; returns the model, warnings and scl-train's metrics."""
    order = ["--gene-order", gene_order] if gene_order else []
    data = [arg for path in [reference, *others] for arg in ("--data", path)]
    started = time.perf_counter()
    cli("scl-pretrain", *data, *order, "--triplet-weight", "0.5", "--holdout", holdout, "--out", out / "base", "--seed", seed, *size_options(smoke))
    forgetting = ["--forgetting-data", others[0]] if others else []
    warnings = cli("scl-train", "--base-model", out / "base", "--data", reference, *forgetting, "--out", out / "run",
                   *(["--epochs", 1] if smoke else []), "--seed", seed, "--quiet")
    cli("scl-export", out / "run", "--out", out / "model.onnx", "--sample-cells", 64 if smoke else 512)
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    return {"model": out / "model.onnx", "seconds": round(time.perf_counter() - started, 1), "calibration": metrics["calibration"],
            "optimistic_warning": "calibration is optimistic" in warnings.replace("\n", " "),
            "validation_macro_f1": metrics["methods"]["lora"]["macro_f1"]}


def measure(model: Path, path: Path, label_key: str = "cell_type") -> dict:
    """Labels, prediction sets and novelty of one file's cells, against their true labels."""
    import anndata as ad
    from sklearn.metrics import accuracy_score, f1_score

    import scl

    truth = ad.read_h5ad(path, backed="r").obs[label_key].astype(str).to_numpy()
    annotator = scl.Annotator(model)
    known = np.isin(truth, annotator.classes)
    out = {"cells": int(len(truth)), "cells_of_known_types": int(known.sum()), "alphas": {}}
    for alpha in ALPHAS:
        result = annotator.annotate(str(path), alpha=alpha, max_novelty="auto", progress=False)
        if "accuracy" not in out and known.any():
            best = np.array(annotator.classes)[result.probabilities.argmax(axis=1)]
            out["accuracy"] = round(float(accuracy_score(truth[known], best[known])), 4)
            out["macro_f1"] = round(float(f1_score(truth[known], best[known], labels=np.unique(truth[known]), average="macro")), 4)
        sets = [s.split("|") if s else [] for s in result.calls["prediction_set"]]
        covered = np.array([t in s for t, s in zip(truth, sets)])
        sizes = result.calls["set_size"]
        labels = result.predicted_labels.astype(str)
        assigned = labels != "unassigned"
        out["alphas"][str(alpha)] = {
            "coverage": round(float(covered[known].mean()), 4) if known.any() else None,
            "mean_set_size": round(float(sizes[known].mean()), 3) if known.any() else None,
            "empty_sets": round(float(np.mean(sizes == 0)), 4),
            "novel": round(float(result.calls["novel"].mean()), 4),
            "unassigned": round(float(1 - assigned.mean()), 4),
            "accuracy_of_assigned": round(float(np.mean(labels[assigned & known] == truth[assigned & known])), 4) if (assigned & known).any() else None,
        }
    return out


def celltypist_transfer(reference: Path, query: Path, top_genes: int | None = None, seed: int = 0) -> dict:
    """CellTypist trained on `reference`, scored on `query`: all genes, or its custom-model recipe (feature_selection: the
    top_genes genes with the largest coefficients per class, then a second fit)."""
    import anndata as ad
    import celltypist
    from sklearn.metrics import accuracy_score, f1_score

    from accuracy import lognormalised

    model = celltypist.train(lognormalised(ad.read_h5ad(reference)), labels="cell_type", use_SGD=True, feature_selection=top_genes is not None,
                             top_genes=top_genes or 300, n_jobs=-1, max_iter=1000, random_state=seed)
    q = lognormalised(ad.read_h5ad(query))
    predicted = celltypist.annotate(q, model=model).predicted_labels["predicted_labels"].astype(str).to_numpy()
    truth = q.obs["cell_type"].astype(str).to_numpy()
    return {"version": celltypist.__version__, "features": int(len(model.features)), "accuracy": round(float(accuracy_score(truth, predicted)), 4),
            "macro_f1": round(float(f1_score(truth, predicted, labels=np.unique(truth), average="macro")), 4)}


def subsample(path: Path, out: Path, per_type: int) -> Path:
    import anndata as ad

    adata = ad.read_h5ad(path)
    rng = np.random.default_rng(0)
    pick = [i for c in adata.obs["cell_type"].unique() for i in rng.permutation(np.flatnonzero(adata.obs["cell_type"] == c))[:per_type]]
    adata[np.sort(pick)].copy().write_h5ad(out)
    return out


def run(smoke: bool, seeds: int) -> dict:
    from run import machine_name

    results = {"machine": machine_name(), "date": datetime.date.today().isoformat(),
               "command": "python benchmarks/calibration.py" + (" --smoke" if smoke else f" --seeds {seeds}"), "pbmc": {}, "pancreas": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        brain = SHARED / "darmanis_brain_466.h5ad"
        if smoke:
            brain = subsample(brain, tmp / "brain.h5ad", 10)
        for seed, holdout in [(s, 0.2) for s in range(seeds)] + [(0, 0.0)]:
            out = tmp / f"pbmc_seed{seed}_holdout_{holdout}"
            out.mkdir()
            user, new = split_user_and_new(SHARED / "pbmc_sorted_dev.h5ad", out, smoke, seed)
            built = build(user, [brain], SHARED / "scimilarity_gene_order.tsv", holdout, out, smoke, seed)
            results["pbmc"][f"seed {seed}, hold-out {holdout:.0%}"] = {**{k: v for k, v in built.items() if k != "model"}, "seed": seed, "holdout": holdout,
                                                                     "new_cells": measure(built["model"], new), "brain": measure(built["model"], brain)}
        pancreas = {"baron": SHARED / "pancreas_baron.h5ad", "segerstolpe": SHARED / "pancreas_seg.h5ad"}
        if smoke:
            pancreas = {k: subsample(v, tmp / f"{k}.h5ad", 20) for k, v in pancreas.items()}
        for ref, query in (("baron", "segerstolpe"), ("segerstolpe", "baron")):
            built = build(pancreas[ref], [], None, 0.2, tmp / f"{ref}_to_{query}", smoke)
            results["pancreas"][f"{ref} -> {query}"] = {**{k: v for k, v in built.items() if k != "model"},
                                                        "scl": measure(built["model"], pancreas[query]), "celltypist": celltypist_transfer(pancreas[ref], pancreas[query])}
    return results


def pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def markdown(r: dict) -> str:
    lines = [f"Machine {r['machine']}, {r['date']}; `{r['command']}`.", "",
             "**On new cells no stage used** (700 sorted PBMCs, 100 per population; the base pretrained on the user's 2,100 PBMCs and the "
             "brain cells, scl-train on the same PBMC file; fp32). Coverage: share of cells whose prediction set holds their true type. "
             "Novel: share flagged novel (novelty p <= alpha). Cross-fitted: what scl-train's report predicted from the calibration cells.", "",
             "| seed | base hold-out | scl-train warned | alpha | coverage (promised) | mean set size | empty sets | novel | unassigned with --max-novelty auto | brain cells novel | cross-fitted coverage | cross-fitted novel |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in r["pbmc"].values():
        for alpha, m in p["new_cells"]["alphas"].items():
            fitted = p["calibration"]["cross_fitted"].get("alphas", {}).get(alpha, {})
            lines.append(f"| {p['seed']} | {p['holdout']:.0%} | {'yes' if p['optimistic_warning'] else 'no'} | {alpha} | {pct(m['coverage'])} ({1 - float(alpha):.0%}) | "
                         f"{m['mean_set_size']:.2f} | {pct(m['empty_sets'])} | {pct(m['novel'])} | {pct(m['unassigned'])} | "
                         f"{pct(p['brain']['alphas'][alpha]['novel'])} | {pct(fitted.get('coverage'))} | {pct(fitted.get('novel_share'))} |")
    held = [p for p in r["pbmc"].values() if p["holdout"] > 0]
    for alpha in map(str, ALPHAS):
        cov = [p["new_cells"]["alphas"][alpha]["coverage"] for p in held]
        novel = [p["new_cells"]["alphas"][alpha]["novel"] for p in held]
        size = [p["new_cells"]["alphas"][alpha]["mean_set_size"] for p in held]
        lines.append(f"\nWith the default hold-out, alpha {alpha} over {len(held)} seed(s): coverage {100 * np.mean(cov):.1f}% "
                     f"(promised {100 * (1 - float(alpha)):.0f}%; sd {100 * np.std(cov):.1f}), novel {100 * np.mean(novel):.1f}% (sd {100 * np.std(novel):.1f}), "
                     f"mean set size {np.mean(size):.2f}.")
    lines += ["", "Labels on the new cells: " + "; ".join(f"{name}: accuracy {p['new_cells']['accuracy']:.3f}, macro-F1 "
                                                         f"{p['new_cells']['macro_f1']:.3f}, calibrated on {p['calibration']['cells']} cells "
                                                         f"(temperature {p['calibration']['temperature']:.2f})" for name, p in r["pbmc"].items()) + ".", "",
              "**Across technologies** (pancreas: Baron et al., inDrop, 2,812 cells; Segerstolpe et al., Smart-seq2, 702 cells; each model built "
              "from its reference file alone, default hold-out for calibration). Coverage here is a measurement, not a promise: the query "
              "comes from another lab and technology, so it is not exchangeable with the calibration cells.", "",
              "| reference -> query | scl macro-F1 | scl accuracy | CellTypist macro-F1 | CellTypist accuracy | alpha | coverage | mean set size | empty sets | novel | accuracy of the cells left assigned |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in r["pancreas"].items():
        s, c = p["scl"], p["celltypist"]
        for alpha, m in s["alphas"].items():
            lines.append(f"| {name} | {s['macro_f1']:.3f} | {s['accuracy']:.3f} | {c['macro_f1']:.3f} | {c['accuracy']:.3f} | {alpha} | {pct(m['coverage'])} | "
                         f"{m['mean_set_size']:.2f} | {pct(m['empty_sets'])} | {pct(m['novel'])} | {pct(m['accuracy_of_assigned'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="small networks and few cells: checks the benchmark runs (about a minute)")
    parser.add_argument("--seeds", type=int, default=1, help="PBMC splits (and training seeds) with the default hold-out")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for <machine>-calibration.json and .md")
    args = parser.parse_args()
    from run import write_results

    results = run(args.smoke, args.seeds)
    print(write_results(results, Path(args.out), args.smoke, "calibration", markdown))


if __name__ == "__main__":
    main()
