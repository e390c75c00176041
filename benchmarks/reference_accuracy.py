"""The head, the neighbours and both, on bases that never saw the labels: macro-F1 on cells no stage used.

    python benchmarks/reference_accuracy.py            # real size; bases and runs kept in --work
    python benchmarks/reference_accuracy.py --smoke    # small networks and few cells (the tests)

Writes benchmarks/results/<machine>-reference.json and .md. The settings are recipe.py's (the user's labelled file is
also the reference; the new cells are another split, or another study and technology):
- pbmc_on_tissues: a base pretrained on brain and pancreas cells (never a PBMC), fine-tuned on 2,100 sorted PBMCs.
- baron_to_seg, seg_to_baron: a base pretrained on PBMCs and brain cells (never a pancreas cell), fine-tuned on one
  pancreas study, scored on the other.
- pbmc_same_file: the README's small-data recipe (the base saw the user's cells).

Per setting: scl-train at its defaults, scl-export of the run and of the base itself (encoder only), a reference of
the user's file built with each model, then the new cells annotated through the Python API as users would:
- head: the fine-tuned head's most probable type;
- neighbours (fine-tuned / base encoder): knn_label at k 10, 50 (the default) and 100, each neighbour's vote weighted
  by 1/distance (SCimilarity's vote, the default) and uniformly;
- head + neighbours: the head's label where they agree, else the one more confident (confidence against knn_share);
- the head's accuracy on the cells where it and the neighbours agree (knn_agrees), and where they do not;
- recall@50 of the HNSW graph (scl's index above 10,000 cells) against exact search, on these real embeddings.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

KS = (10, 50, 100)
SETTINGS = ("pbmc_on_tissues", "baron_to_seg", "seg_to_baron", "pbmc_same_file")


def labels_of(path: Path) -> np.ndarray:
    import anndata as ad

    return ad.read_h5ad(path, backed="r").obs["cell_type"].astype(str).to_numpy()


def hnsw_recall(reference, embedding: np.ndarray, k: int = 50) -> float:
    """recall@k of the HNSW graph scl builds above EXACT_UP_TO cells, against exact search, on these real embeddings."""
    from scl.runtime.neighbours import ExactIndex, HnswIndex

    vectors = reference.index.vectors()
    exact, _ = ExactIndex(vectors).search(embedding, k)
    graph, _ = HnswIndex.build(vectors, threads=2).search(embedding, k)
    return round(float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(exact, graph)])), 4)


def measure_setting(name: str, base_dir: Path, user: Path, new: Path, work: Path, smoke: bool) -> dict:
    from recipe import MIN_GENES, macro_f1

    import scl
    from scl.export.export_run import export_run
    from scl.runtime.expression import ReadOptions
    from scl.train.config import FinetuneConfig
    from scl.train.finetune import finetune

    out = work / "runs" / name
    run_dir = out / "run"
    if not (run_dir / "metrics.json").is_file():
        finetune(FinetuneConfig(base_model=str(base_dir), data=str(user), out=str(run_dir), min_genes=MIN_GENES, **({"epochs": 2} if smoke else {})),
                 progress=False)
    export_run(run_dir, out / "model.onnx")
    export_run(base_dir, out / "base.onnx")
    truth, read = labels_of(new), ReadOptions(min_genes=MIN_GENES)
    row = {"base": base_dir.name, "user_file": user.name, "new_cells": new.name, "test_cells": len(truth)}
    for which in ("model", "base"):
        annotator = scl.Annotator(out / f"{which}.onnx")
        started = time.perf_counter()
        reference = scl.Reference.build(str(user), annotator, progress=False, read=read)
        row[f"{which}_reference_build_seconds"] = round(time.perf_counter() - started, 2)
        embedding = annotator.embed(str(new), min_genes=MIN_GENES, progress=False)
        row[f"{which}_hnsw_recall_at_50"] = hnsw_recall(reference, embedding)
        for k in KS:
            row[f"neighbours_{which}_k{k}"] = macro_f1(truth, reference.calls(embedding, k)["knn_label"].astype(str))
            row[f"neighbours_{which}_k{k}_uniform"] = macro_f1(truth, reference.calls(embedding, k, weighting="uniform")["knn_label"].astype(str))
        if which == "model":
            result = annotator.annotate(str(new), min_genes=MIN_GENES, reference=reference, progress=False)
            head = np.asarray(annotator.classes, dtype=object)[result.probabilities.argmax(axis=1)]
            knn, share = result.calls["knn_label"], result.calls["knn_share"]
            confidence = result.probabilities.max(axis=1)
            both = np.where((head == knn) | (confidence >= share), head, knn)
            row |= {"head": macro_f1(truth, head.astype(str)), "head_and_neighbours": macro_f1(truth, both.astype(str)),
                    "agreement": round(float((head == knn).mean()), 4),
                    "head_accuracy_where_agreeing": round(float((head == truth)[head == knn].mean()), 4) if (head == knn).any() else None,
                    "head_accuracy_where_disagreeing": round(float((head == truth)[head != knn].mean()), 4) if (head != knn).any() else None}
    print(f"{name}: head {row['head']:.3f}, neighbours {row['neighbours_model_k50']:.3f}, both {row['head_and_neighbours']:.3f}, "
          f"base neighbours {row['neighbours_base_k50']:.3f}", flush=True)
    return row


def share(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown(r: dict) -> str:
    lines = [f"Machine {r['machine']}, {r['date']}; `{r['command']}`. Macro-F1 on cells no stage used; the reference is the user's "
             "labelled file, embedded by each model; neighbours at k 50, weighted by 1/distance.", "",
             "| setting | test cells | head (scl-train defaults) | neighbours, fine-tuned encoder | head + neighbours | "
             "neighbours, base encoder (no training) | head and neighbours agree | head's accuracy where they agree / disagree | "
             "HNSW recall@50, fine-tuned / base |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in r["settings"].items():
        lines.append(f"| {name} | {s['test_cells']:,} | {s['head']:.3f} | {s['neighbours_model_k50']:.3f} | {s['head_and_neighbours']:.3f} | "
                     f"{s['neighbours_base_k50']:.3f} | {100 * s['agreement']:.1f}% | {share(s['head_accuracy_where_agreeing'])} / {share(s['head_accuracy_where_disagreeing'])} | {s['model_hnsw_recall_at_50']:.4f} / {s['base_hnsw_recall_at_50']:.4f} |")
    lines += ["", "Neighbours by k and vote weighting (1/distance, uniform):", "",
              "| setting | encoder | " + " | ".join(f"k {k} 1/d | k {k} uniform" for k in KS) + " |", "|---|---|" + "---|" * (2 * len(KS))]
    for name, s in r["settings"].items():
        for which, title in (("model", "fine-tuned"), ("base", "base")):
            cells = " | ".join(f"{s[f'neighbours_{which}_k{k}']:.3f} | {s[f'neighbours_{which}_k{k}_uniform']:.3f}" for k in KS)
            lines.append(f"| {name} | {title} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from recipe import settings
    from run import machine_name, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="small networks and few cells: checks the benchmark runs")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of " + ", ".join(SETTINGS))
    parser.add_argument("--work", help="folder for bases and runs, reused when rerun (default: a temporary folder)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    results = {"machine": machine_name(), "date": time.strftime("%Y-%m-%d"), "settings": {},
               "command": "python benchmarks/reference_accuracy.py" + (" --smoke" if args.smoke else "")}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        chosen = settings(work, args.smoke)
        for name in args.settings.split(","):
            make_base, user, new = chosen[name]
            results["settings"][name] = measure_setting(name, make_base(), user, new, work, args.smoke)
    print(write_results(results, Path(args.out), args.smoke, "reference", markdown))
    return results


if __name__ == "__main__":
    main()
