"""The training report for people: Markdown tables, confusion-matrix pictures, confused pairs as CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

SUMMARY = ("top1", "top3", "macro_f1", "balanced_accuracy", "classes_with_a_correct_prediction", "batch_hard_triplet", "reconstruction_mse")


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows])


def plot_confusion(cm: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(classes), 0.8 + 0.6 * len(classes)))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(cm):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run: Path, metrics: dict) -> None:
    methods = metrics["methods"]
    classes = metrics["classes"]
    parts = [f"# scl-train report\n\nBase model `{metrics['config']['base_model']}`, data `{metrics['config']['data']}` "
             f"({metrics['cells']['train']} training, {metrics['cells']['validation']} validation cells), device {metrics['device']}.\n"
             f"Trainable parameters: {metrics['parameters']['trainable']:,} of {metrics['parameters']['total']:,} "
             f"(LoRA {metrics['parameters']['lora']:,}, head {metrics['parameters']['head']:,}); best epoch {metrics['best_epoch']}.\n",
             "## Validation\n", _table(["method", *SUMMARY], [[name, *(m.get(k, "") for k in SUMMARY)] for name, m in methods.items()])]
    parts += ["\n## Per class (F1)\n", _table(["class", *methods], [[c, *(m["per_class"][c]["f1"] for m in methods.values())] for c in classes])]
    checks = metrics["sanity_checks"]
    parts += ["\n## Sanity checks\n", _table(["check", "value"], [[k, v] for k, v in checks.items()])]
    if "ablation" in metrics:
        cols = ["macro_f1", "top1", "balanced_accuracy", "batch_hard_triplet", "reconstruction_mse", "best_epoch"]
        parts += ["\n## Ablation (same seed)\n", _table(["loss", *cols], [[k, *(r[c] for c in cols)] for k, r in metrics["ablation"].items()])]
    if "forgetting" in metrics:
        f = metrics["forgetting"]
        parts += [f"\n## Forgetting, on `{f['data']}` ({f['cells']} cells, not trained on)\n",
                  _table(["measure", "base", "fine-tuned"], [["k-NN label transfer accuracy", f["knn_transfer_accuracy_base"], f["knn_transfer_accuracy_finetuned"]],
                                                           ["mean cosine drift", 0.0, f["mean_cosine_drift"]]])]
    novelty = metrics["novelty"]
    rows = [["training cells", novelty["training_share_beyond"]], ["held-out cells of the trained types", novelty["validation_share_beyond"]]]
    if "forgetting_data_share_beyond" in novelty:
        rows.append([f"cells of `{metrics['forgetting']['data']}` (types not trained on)", novelty["forgetting_data_share_beyond"]])
    parts += [f"\n## Novelty limits\n\nPer class, the larger {novelty['quantile']:.0%} quantile of its training and its held-out cells' cosine distance "
              "to the class centroid (scl-annotate counts cells beyond it; --max-novelty auto labels them unassigned). Share of cells beyond "
              "their predicted class's limit (a few percent for the trained types, by construction; nearly all for types never trained on):\n",
              _table(["cells", "share beyond"], rows), "", _table(["class", "limit"], [[c, v] for c, v in novelty["limits"].items()])]
    parts += ["\n## Training history\n", _table(list(metrics["history"][0]), [list(r.values()) for r in metrics["history"]])]
    parts.append("\n## Confusion matrices\n")
    cfg = metrics["config"]
    judged_on = Path(cfg.get("val_data") or cfg["data"]).name + ("" if cfg.get("val_data") else " (held-out split)")
    for name, m in methods.items():
        slug = name.replace("+", "_")
        title = f"{name}: {judged_on}, {metrics['cells']['validation']} cells, macro-F1 {m['macro_f1']:.3f}"
        plot_confusion(m["confusion_matrix"], classes, title, run / f"confusion_{slug}.png")
        with open(run / f"confused_pairs_{slug}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["true", "predicted", "cells"])
            writer.writeheader()
            writer.writerows(m["top_confused_pairs"])
        parts.append(f"![{name}](confusion_{slug}.png)")
    (run / "report.md").write_text("\n".join(parts) + "\n")
