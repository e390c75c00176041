"""The training report for people: Markdown tables, confusion-matrix pictures, confused pairs as CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from scl.runtime.calls import NOVELTY_ALPHA
from scl.runtime.conformal import Calibration

from .epoch_choice import epoch_line

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


def calibration_lines(metrics: dict) -> list[str]:
    """What the calibration measured, one line each with what it means: scl-train prints them and report.md holds them."""
    cal = metrics["calibration"]
    fitted = cal["cross_fitted"]
    lines = [f"calibration: {cal['source']}, used for nothing else; temperature {cal['temperature']:.2f}"
             + ("; OPTIMISTIC: the base model was pretrained on these cells, so new cells will do worse than the numbers below" if cal["optimistic"] else "")]
    if not Calibration.group_is_enough(cal["cells"], NOVELTY_ALPHA):
        lines.append(f"only {cal['cells']} calibration cells: novelty p-values cannot reach scl-annotate's default {NOVELTY_ALPHA:g} "
                     f"(that takes {round(1 / NOVELTY_ALPHA) - 1}); annotate with --alpha {1 / (cal['cells'] + 1):.2g} or more, or calibrate on more cells")
    if not fitted.get("folds"):
        return lines + ["too few calibration cells of some type for cross-fitted measurements (fewer than 2): none reported"]
    lines.append(f"confidence: expected calibration error {fitted['ece_before']['ece']:.3f} before and {fitted['ece_after']['ece']:.3f} after "
                 "temperature scaling (0: a confidence of 0.9 is right 90% of the time)")
    shares = cal["novel_share"]
    for alpha, m in fitted["alphas"].items():
        a = float(alpha)
        lines.append(f"alpha {a:g}: prediction sets held the true type for {m['coverage']:.1%} of calibration cells (promised: at least {1 - a:.0%}; "
                     f"lowest type {m['lowest_class_coverage']:.1%}); mean set size {m['mean_set_size']:.2f}, single {m['single']:.0%}, "
                     f"empty {m['empty']:.1%}" + ("; DEGENERATE: most sets hold every type, so coverage says nothing" if m["degenerate"] else ""))
        other = f", forgetting data {shares['forgetting_data'][alpha]:.1%} (types not trained on: ideally all)" if "forgetting_data" in shares else ""
        lines.append(f"alpha {a:g}: flagged novel (novelty p <= {a:g}): calibration cells {m['novel_share']:.1%} (about {a:.0%} by construction), "
                     f"validation cells {shares['validation'][alpha]:.1%}{other}")
    return lines


def plot_reliability(fitted: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    for key, name in (("ece_before", "before"), ("ece_after", "after temperature scaling")):
        bins = fitted[key]["bins"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", label=f"{name} (ECE {fitted[key]['ece']:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability on {fitted['cells']} calibration cells (cross-fitted)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def calibration_section(run: Path, metrics: dict) -> list[str]:
    cal = metrics["calibration"]
    parts = ["\n## Calibration\n", "Calibration cells are used for nothing else: not for training, not for choosing the epoch. Every number "
             "below is cross-fitted (each fifth of them judged by a calibration fitted on the other four fifths).\n"]
    parts += [f"- {line}" for line in calibration_lines(metrics)]
    on_cal = cal["lora_on_calibration_cells"]
    parts.append(f"- accuracy on the calibration cells (calibration never changes a label; no stage trained on them): top-1 {on_cal['top1']:.4f}, "
                 f"macro-F1 {on_cal['macro_f1']:.4f}")
    parts += ["", _table(["class", "calibration cells"], [[c, n] for c, n in cal["cells_per_class"].items()])]
    if cal["cross_fitted"].get("folds"):
        plot_reliability(cal["cross_fitted"], run / "reliability.png")
        parts.append("\n![reliability diagram](reliability.png)")
    return parts


def _headline(metrics: dict) -> list[str]:
    """When the base saw the validation cells, their numbers flatter every method: lead with the calibration cells'."""
    if not metrics["validation"]["optimistic"]:
        return []
    cal = metrics["calibration"]
    scores = cal["lora_on_calibration_cells"]
    return [f"**On cells no stage saw** ({cal['source']}): LoRA macro-F1 {scores['macro_f1']:.3f}, top-1 {scores['top1']:.3f}, balanced accuracy "
            f"{scores['balanced_accuracy']:.3f}. The validation numbers below are OPTIMISTIC: the base model was pretrained on "
            f"{metrics['validation']['seen_by_base']:,} of the {metrics['validation']['cells']:,} validation cells.\n"]


METHODS = {"base+linear": "the frozen base's embedding, linear probe", "base+knn": "the frozen base's embedding, k nearest training cells",
           "genes": "the shipped head's marker genes alone, same fit (no encoder)", "lora-embedding": "the head LoRA trained on the fine-tuned embedding alone",
           "lora": "what scl-train ships: the fine-tuned encoder and its head"}


def head_section(metrics: dict) -> list[str]:
    head = metrics.get("head")
    if not head:
        return []
    if not head["genes"]:
        return [f"\n## The head\n\nReads {head['reads']}; trained {head['trained']}."]
    rows = [[c, ", ".join(g)] for c, g in head["strongest_genes"].items()]
    return [f"\n## The head\n\nReads {head['reads']}: {head['genes']:,} genes ({head['genes_per_class']} per class, CellTypist's feature "
            f"selection), unscaled log1p(CP10k); {head['trained']} (C {head['C']:g}, {head['seconds']} s). Largest row norm {head['max_row_norm']:,}. "
            "The genes with the largest weights per class:\n", _table(["class", "genes"], rows)]


def _processes(metrics: dict) -> str:
    processes = metrics.get("processes", {}).get("processes", 1)  # runs from before torchrun record none
    return f" on {processes} processes ({metrics['processes']['backend']}, torchrun)" if processes > 1 else ""


def write_report(run: Path, metrics: dict) -> None:
    methods = metrics["methods"]
    classes = metrics["classes"]
    parts = [f"# scl-train report\n\nBase model `{metrics['config']['base_model']}`, data `{metrics['config']['data']}` "
             f"({metrics['cells']['train']} training, {metrics['cells']['validation']} validation cells), device {metrics['device']}{_processes(metrics)}.\n"
             f"Trainable parameters: {metrics['parameters']['trainable']:,} of {metrics['parameters']['total']:,} "
             f"(LoRA {metrics['parameters']['lora']:,}, head {metrics['parameters']['head']:,}); {epoch_line(metrics['epochs'])}.\n",
             *_headline(metrics),
             f"## Validation\n\n{metrics['validation']['source']}.\n",
             _table(["method", "what it is", *SUMMARY], [[name, METHODS.get(name, ""), *(m.get(k, "") for k in SUMMARY)] for name, m in methods.items()])]
    parts += head_section(metrics)
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
    parts += calibration_section(run, metrics)
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
