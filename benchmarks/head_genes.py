"""What scl-train's head should read: the fine-tuned embedding, marker genes, or both; how many genes, how regularised.

    python benchmarks/head_genes.py --work /tmp/recipe_work       # reuses recipe.py's bases; about 40 minutes on 2 cores
    python benchmarks/head_genes.py --smoke                       # small networks and few cells (the tests)

Per setting of benchmarks/recipe.py (its bases, user files and new cells no stage used): one scl-train run at the
defaults (kept in --work and reused), then on its training cells (the roles scl-train uses) the head's logistic
regression (train/head.py fit_head) on
- the fine-tuned embedding and marker genes (what scl-train ships),
- the marker genes alone (no encoder at all),
- the frozen base's embedding and marker genes (no fine-tuning),
for marker genes per class in PER_CLASS and inverse regularisation C in CS, plus C chosen by the validation cells'
log-loss. Scored by macro-F1 on the new cells. The default (genes per class, C) is the pair with the best mean rank
over the settings where the base never saw the labels. Writes benchmarks/results/<machine>-head-genes.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PER_CLASS = (50, 100, 300)
CS = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
FEATURES = ("fine-tuned embedding + genes", "genes only", "frozen embedding + genes")


def predictions(head, z, x) -> np.ndarray:
    import torch

    with torch.no_grad():
        return head(torch.from_numpy(z), torch.from_numpy(x.toarray())).numpy()


def measure(name: str, work: Path, smoke: bool) -> dict:
    import torch

    import recipe
    from scl.runtime.expression import ReadOptions
    from scl.train.config import FinetuneConfig
    from scl.train.data import embed, load_labelled
    from scl.train.epoch_choice import log_loss
    from scl.train.finetune import finetune
    from scl.train.head import fit_head, marker_genes
    from scl.train.model_dir import load_model_dir
    from scl.train.roles import training_cells
    from scl.train.run_dir import load_run
    from scipy.special import softmax

    base_of, user, new = recipe.settings(work, smoke)[name]
    base_dir = base_of()
    out = work / "runs" / name / "defaults_kept"
    config = FinetuneConfig(base_model=str(base_dir), data=str(user), out=str(out), min_genes=recipe.MIN_GENES, **({"epochs": 2} if smoke else {}))
    if not (out / "metrics.json").exists():
        finetune(config, progress=False)
    run, base, cpu = load_run(out), load_model_dir(base_dir), torch.device("cpu")
    cells = training_cells(config, base)
    test = load_labelled(str(new), run.model.gene_order, "cell_type", ReadOptions(min_genes=recipe.MIN_GENES))
    roles = (cells.train, cells.validation, test)
    tuned = [embed(run.model.encoder, c.x, cpu) for c in roles]
    frozen = [embed(base.encoder, c.x, cpu) for c in roles]
    nothing = [np.zeros((len(c), 0), dtype=np.float32) for c in roles]
    classes = np.array(cells.classes)
    rows, chosen, seconds = {f: {} for f in FEATURES}, {f: {} for f in FEATURES}, {}
    for per_class in PER_CLASS:
        started = time.perf_counter()
        genes = marker_genes(cells.train.x, cells.y_train, per_class, config.seed)
        seconds[per_class] = {"selection": round(time.perf_counter() - started, 1), "genes": int(len(genes))}
        for feature, z in zip(FEATURES, (tuned, nothing, frozen)):
            scores = {}
            for c in CS:
                head = fit_head(z[0], cells.train.x, cells.y_train, len(classes), genes, c, config.seed)
                val_loss = log_loss(softmax(predictions(head, z[1], cells.validation.x), axis=1), cells.y_val)
                scores[c] = (recipe.macro_f1(test.labels, classes[predictions(head, z[2], test.x).argmax(1)]), val_loss)
            rows[feature][per_class] = {f"{c:g}": s[0] for c, s in scores.items()}
            best = min(scores, key=lambda c: scores[c][1])
            chosen[feature][per_class] = {"C": best, "macro_f1": scores[best][0]}
            print(f"{name}: {feature}, {per_class} genes per class: {rows[feature][per_class]}; by validation C {best:g}", flush=True)
    no_genes = np.zeros(0, dtype=np.int64)
    alone = {f"{c:g}": recipe.macro_f1(test.labels, classes[predictions(fit_head(tuned[0], cells.train.x, cells.y_train, len(classes), no_genes, c,
                                                                               config.seed), tuned[2], test.x).argmax(1)]) for c in CS}
    return {"base": base_dir.name, "train_cells": len(cells.train), "test_cells": len(test), "selection": seconds,
            "embedding_only": alone, "macro_f1": rows, "validation_choice": chosen}


def default_choice(settings: dict) -> dict:
    """The (genes per class, C) of the shipped features with the best mean rank over the label-blind settings."""
    blind = [s for s in settings if s != "pbmc_same_file"]
    pairs = [(g, c) for g in PER_CLASS for c in CS]
    score = lambda s, g, c: settings[s]["macro_f1"][FEATURES[0]][g][f"{c:g}"]
    ranks = {p: [] for p in pairs}
    for s in blind:
        order = sorted(pairs, key=lambda p: -score(s, *p))
        for p in pairs:
            ranks[p].append(order.index(p) + 1)
    mean = {p: float(np.mean([score(s, *p) for s in blind])) for p in pairs}
    best = min(pairs, key=lambda p: (np.mean(ranks[p]), -mean[p]))
    return {"genes_per_class": best[0], "C": best[1], "settings": blind,
            "table": [{"genes_per_class": g, "C": c, "mean_rank": float(np.mean(ranks[(g, c)])), "mean_macro_f1": round(mean[(g, c)], 4)}
                      for g, c in sorted(pairs, key=lambda p: np.mean(ranks[p]))]}


def markdown(r: dict) -> str:
    lines = [f"Machine {r['machine']}, {r['date']}; `{r['command']}`. Macro-F1 on cells no stage used (recipe.py's splits); "
             "every head is train/head.py's logistic regression on scl-train's training cells.", ""]
    for name, s in r["settings"].items():
        lines += [f"### {name} (base {s['base']}; {s['train_cells']:,} training cells, {s['test_cells']:,} new cells)", "",
                  "| head reads | genes per class (genes) | " + " | ".join(f"C {c:g}" for c in CS) + " | C by validation log-loss |",
                  "|---|---|" + "---|" * len(CS) + "---|"]
        lines.append("| fine-tuned embedding only | | " + " | ".join(f"{s['embedding_only'][f'{c:g}']:.3f}" for c in CS) + " | |")
        for feature in FEATURES:
            for g in PER_CLASS:
                row, pick = s["macro_f1"][feature][g], s["validation_choice"][feature][g]
                lines.append(f"| {feature} | {g} ({s['selection'][g]['genes']:,}) | " + " | ".join(f"{row[f'{c:g}']:.3f}" for c in CS)
                             + f" | {pick['macro_f1']:.3f} (C {pick['C']:g}) |")
        lines.append("")
    if "choice" in r:
        c = r["choice"]
        lines += [f"Default chosen: **{c['genes_per_class']} genes per class, C {c['C']:g}** (best mean rank of the fine-tuned embedding + "
                  f"genes head over {', '.join(c['settings'])}).", "", "| genes per class | C | mean rank | mean macro-F1 |", "|---|---|---|---|"]
        lines += [f"| {t['genes_per_class']} | {t['C']:g} | {t['mean_rank']:.2f} | {t['mean_macro_f1']:.3f} |" for t in c["table"][:8]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    import recipe
    from run import machine_name, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="recipe.py's --work folder (bases and the runs at the defaults are built there when absent)")
    parser.add_argument("--settings", default=",".join(recipe.SETTINGS))
    parser.add_argument("--smoke", action="store_true", help="small networks and few cells: checks the benchmark runs")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    results = {"machine": machine_name(), "date": datetime.date.today().isoformat(),
               "command": "python benchmarks/head_genes.py " + " ".join(argv if argv is not None else sys.argv[1:]), "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings.split(","):
            results["settings"][name] = measure(name, Path(args.work or tmp), args.smoke)
    if any(s != "pbmc_same_file" for s in results["settings"]):
        results["choice"] = default_choice(results["settings"])
    print(write_results(results, Path(args.out), args.smoke, "head-genes", markdown))
    return results


if __name__ == "__main__":
    main()
