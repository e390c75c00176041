"""Which fine-tuning recipe earns its place: scl-train's settings swept on bases that never saw the labels, scored on
cells no stage used, beside the frozen base (linear probe, k-NN), full fine-tuning and CellTypist.

    python benchmarks/recipe.py            # real size (28,231 genes, 1024-1024-128); about 80 minutes on 2 cores (the 4-lr grid)
    python benchmarks/recipe.py --smoke    # small networks and few cells: checks the benchmark runs (the tests)
    python benchmarks/recipe.py --settings pbmc_on_tissues --grid lr=1e-3,3e-3 schedule=cosine

Writes benchmarks/results/<machine>-recipe.json and .md. Bases are kept in --work and reused when rerun.

Settings (each a base, a user's labelled file, and new cells no stage sees):
- pbmc_on_tissues: a base pretrained on the brain cells and both pancreas files (SCimilarity's gene order): it never saw
  a PBMC, as the official weights never saw the user's labels. Fine-tuned on 2,100 sorted PBMCs (300 per population),
  scored on 700 others (100 per population), as benchmarks/calibration.py splits them.
- baron_to_seg, seg_to_baron: a base pretrained on the PBMCs and brain cells (never a pancreas cell), fine-tuned on one
  pancreas study (inDrop or Smart-seq2), scored on the other: another lab and technology.
- pbmc_same_file: the README's small-data recipe: the base is pretrained on the user's PBMC file and the brain cells
  (hold-out 0.2), so it saw the labels of most training cells; scored on the same 700 new cells.

Per setting, every recipe in the grid is a real scl-train run (validation and calibration split from the user's file,
early stopping on validation); the seed's recipe (lr 1e-4, 5 epochs, constant) is always run. The probe and k-NN are
fitted on the same training cells as LoRA; full fine-tuning trains every encoder weight at the best LoRA recipe's
schedule (lr 1e-4: at LoRA's rates it diverges); CellTypist 1.7.1 is trained on the whole user file, all genes and
its documented custom-model recipe (feature_selection=True, top_genes=300), use_SGD=True, seeded.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from scl.train.config import RECIPES

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
sys.path.insert(0, str(HERE))

SEED_RECIPE = RECIPES["seed"]  # what scl-train --recipe seed applies
GRID = {"lr": [1e-4, 3e-4, 1e-3, 3e-3], "schedule": ["constant", "cosine"], "epochs": [20]}
# further FinetuneConfig fields --grid may sweep, with their short names in the tables
MORE_KEYS = {"rank": "rank", "alpha": "alpha", "head_lr": "head lr", "triplet_weight": "triplet", "recon_weight": "recon",
             "lora_dropout": "dropout", "batch_size": "batch", "seed": "seed", "head_genes": "head genes", "head_c": "head C"}
FULL_FINETUNE_LR = 1e-4
MIN_GENES = 1000  # the pancreas files hold 2,000 genes (the default asks 5,000 of SCimilarity's 28,231)
SETTINGS = ("pbmc_on_tissues", "baron_to_seg", "seg_to_baron", "pbmc_same_file")


def recipes(grid: dict) -> list[dict]:
    rows = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return [SEED_RECIPE] + [r for r in rows if r != SEED_RECIPE]


def recipe_name(recipe: dict) -> str:
    if recipe == SEED_RECIPE:
        return "seed"
    more = "".join(f", {MORE_KEYS[k]} {v:g}" for k, v in recipe.items() if k in MORE_KEYS)
    return f"lr {recipe['lr']:g}, {recipe['schedule']}, max {recipe['epochs']}{more}"


def base(name: str, files: list[Path], holdout: float, work: Path, smoke: bool) -> Path:
    """A base pretrained with SCimilarity's recipe as README gives it; reused when --work already holds it."""
    from scl.train.config import PretrainConfig
    from scl.train.pretrain import pretrain

    out = work / "bases" / name
    if (out / "encoder.ckpt").is_file() or (out / "pretrain.json").is_file():
        return out
    size = dict(hidden_dim=[64, 64], latent_dim=16, epochs=2) if smoke else dict(epochs=15)
    pretrain(PretrainConfig(data=[str(f) for f in files], out=str(out), gene_order=str(SHARED / "scimilarity_gene_order.tsv"),
                            triplet_weight=0.5, holdout=holdout, min_genes=MIN_GENES, **size), progress=False)
    return out


def settings(work: Path, smoke: bool) -> dict[str, tuple[Path, Path, Path]]:
    """{name: (base, user file, new cells)}."""
    from calibration import split_user_and_new, subsample

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    user, new = split_user_and_new(SHARED / "pbmc_sorted_dev.h5ad", data, smoke, seed=0)
    brain, baron, seg = SHARED / "darmanis_brain_466.h5ad", SHARED / "pancreas_baron.h5ad", SHARED / "pancreas_seg.h5ad"
    if smoke:
        brain, baron, seg = (subsample(p, data / p.name, n) for p, n in ((brain, 10), (baron, 30), (seg, 20)))
    return {
        "pbmc_on_tissues": (lambda: base("tissues", [brain, baron, seg], 0.2, work, smoke), user, new),
        "baron_to_seg": (lambda: base("pbmc_brain", [SHARED / "pbmc_sorted_dev.h5ad", brain], 0.2, work, smoke), baron, seg),
        "seg_to_baron": (lambda: base("pbmc_brain", [SHARED / "pbmc_sorted_dev.h5ad", brain], 0.2, work, smoke), seg, baron),
        "pbmc_same_file": (lambda: base("pbmc_user", [user, brain], 0.2, work, smoke), user, new),
    }


def macro_f1(truth, predicted) -> float:
    from sklearn.metrics import f1_score

    return round(float(f1_score(truth, predicted, labels=np.unique(truth), average="macro")), 4)


def seconds_per_epoch(history: list[dict]) -> float:
    return round(float(np.median([row["train_seconds"] for row in history])), 2)


def lora_run(base_dir: Path, user: Path, new: Path, recipe: dict, out: Path, test, smoke: bool) -> dict:
    """One scl-train run as a user starts it; scored on the new cells with the merged encoder and head."""
    import torch

    from scl.train.config import FinetuneConfig
    from scl.train.data import embed
    from scl.train.finetune import finetune
    from scl.train.head import head_logits
    from scl.train.run_dir import load_run

    started = time.perf_counter()
    metrics = finetune(FinetuneConfig(base_model=str(base_dir), data=str(user), out=str(out), min_genes=MIN_GENES,
                                      **(recipe | ({"epochs": min(recipe["epochs"], 2)} if smoke else {}))), progress=False)
    seconds = time.perf_counter() - started
    run = load_run(out)
    logits = head_logits(run.head, embed(run.model.encoder, test.x, torch.device("cpu")), test.x)
    int8 = int8_agreement(out, new)
    shutil.rmtree(out)  # a merged model and adapters per run: gigabytes over a grid
    epochs = metrics["epochs"]
    return {"recipe": recipe, "macro_f1": macro_f1(test.labels, np.array(run.classes)[logits.argmax(1)]),
            "val_macro_f1": metrics["methods"]["lora"]["macro_f1"], "epochs_run": epochs["run"], "best_epoch": epochs["best"],
            "seconds_per_epoch": seconds_per_epoch(metrics["history"]), "seconds": round(seconds, 1),
            "drift": metrics["sanity_checks"]["adapted_mean_cosine_drift_from_base"], "probe_C": metrics["methods"]["base+linear"]["fit"]["C"],
            "head_max_row_norm": round(run.head.max_row_norm(), 1), "head_genes": len(run.head.gene_index), "int8_label_agreement": int8}


def int8_agreement(run_dir: Path, new: Path) -> float | None:
    """scl-export's int8 model against torch on the new cells: the share of labels it keeps."""
    from calibration import cli

    model = run_dir.with_name(run_dir.name + ".onnx")  # beside the run: scl-export refuses to write into it
    try:
        cli("scl-export", run_dir, "--out", model, "--quantize", "int8", "--sample-data", new)
    except RuntimeError:  # scl-export has no --min-genes: the 2,000-gene pancreas files are refused as samples
        return None
    agreement = json.loads(Path(f"{model.with_suffix('')}.int8.onnx.validation.json").read_text())["label_agreement"]
    for path in model.parent.glob(model.stem + ".*"):
        path.unlink()
    return agreement


def frozen_and_full(base_dir: Path, user: Path, recipe: dict, test, smoke: bool) -> dict:
    """The frozen base's probe and k-NN, and full fine-tuning, on the training cells scl-train uses."""
    import torch

    from scl.train.config import FinetuneConfig
    from scl.train.data import embed
    from scl.train.evaluate import knn_classifier, linear_probe
    from scl.train.finetune import FullFinetuneClassifier, train_lora
    from scl.train.head import fit_head, head_logits, marker_genes
    from scl.train.model_dir import load_model_dir
    from scl.train.roles import training_cells

    cpu = torch.device("cpu")
    config = FinetuneConfig(base_model=str(base_dir), data=str(user), out="unused", min_genes=MIN_GENES,
                            **(recipe | {"lr": FULL_FINETUNE_LR} | ({"epochs": 2} if smoke else {})))
    model = load_model_dir(base_dir)
    cells = training_cells(config, model)
    train, val, classes, y_train = cells.train, cells.validation, cells.classes, cells.y_train
    z_train, z_test = embed(model.encoder, train.x, cpu), embed(model.encoder, test.x, cpu)
    probe = linear_probe(z_train, y_train, z_test, len(classes), config.seed)
    knn = knn_classifier(z_train, y_train, z_test, len(classes), config.knn_neighbors)
    names = np.array(classes)
    started = time.perf_counter()
    full, history, best = train_lora(model, cells, linear_probe(z_train, y_train, embed(model.encoder, val.x, cpu), len(classes)),
                                     config.loss, config, cpu, False, classifier=FullFinetuneClassifier)
    seconds = time.perf_counter() - started
    genes = marker_genes(train.x, y_train, FinetuneConfig.head_genes, config.seed)  # scl-train's default head, on other inputs
    genes_head = lambda z_fit, z_test: macro_f1(test.labels, names[head_logits(fit_head(z_fit, train.x, y_train, len(classes), genes, FinetuneConfig.head_c,
                                                                                          config.seed), z_test, test.x).argmax(1)])
    z_full = embed(full.encoder, test.x, cpu)
    return {"probe": {"macro_f1": macro_f1(test.labels, names[probe.probabilities.argmax(1)]), "C": probe.fit["C"]},
            "knn": {"macro_f1": macro_f1(test.labels, names[knn.argmax(1)]), "k": config.knn_neighbors},
            "genes_only": {"macro_f1": genes_head(np.zeros((len(train), 0), np.float32), np.zeros((len(test), 0), np.float32)), "genes": int(len(genes))},
            "frozen_with_genes": {"macro_f1": genes_head(z_train, z_test)},
            "full_finetune": {"macro_f1": macro_f1(test.labels, names[full.probabilities(z_full, cpu).argmax(1)]),
                              "with_genes_macro_f1": genes_head(embed(full.encoder, train.x, cpu), z_full),
                              "lr": FULL_FINETUNE_LR, "epochs_run": len(history), "best_epoch": best, "seconds": round(seconds, 1),
                              "seconds_per_epoch": seconds_per_epoch(history)}}


def measure_setting(name: str, base_dir: Path, user: Path, new: Path, grid: dict, work: Path, smoke: bool) -> dict:
    from calibration import celltypist_transfer

    from scl.runtime.expression import ReadOptions
    from scl.train.data import load_labelled
    from scl.train.model_dir import load_model_dir

    test = load_labelled(str(new), load_model_dir(base_dir).gene_order, "cell_type", ReadOptions(min_genes=MIN_GENES))
    rows = {}
    for recipe in recipes(grid):
        rows[recipe_name(recipe)] = lora_run(base_dir, user, new, recipe, work / "runs" / name / recipe_name(recipe).replace(", ", "_").replace(" ", ""), test, smoke)
        print(f"{name}: {recipe_name(recipe)}: macro-F1 {rows[recipe_name(recipe)]['macro_f1']:.3f}", flush=True)
    best = max((r for r in rows.values() if r["recipe"] != SEED_RECIPE), key=lambda r: r["val_macro_f1"])
    others = frozen_and_full(base_dir, user, best["recipe"], test, smoke)
    celltypist = {"all_genes": celltypist_transfer(user, new), "300_features": celltypist_transfer(user, new, top_genes=300)}
    for seed in sorted({r.get("seed", 0) for r in recipes(grid)} - {0}):  # a swept seed reaches CellTypist's SGD too
        celltypist[f"300_features, seed {seed}"] = celltypist_transfer(user, new, top_genes=300, seed=seed)
    return {"base": base_dir.name, "user_file": user.name, "new_cells": new.name, "test_cells": len(test), "lora": rows, **others, "celltypist": celltypist}


def default_choice(results: dict) -> dict:
    """The recipe with the best mean rank across the label-blind settings (ties: mean macro-F1), and each one's scores."""
    blind = [s for s, r in results.items() if s != "pbmc_same_file"]
    names = [n for n in next(iter(results.values()))["lora"] if n != "seed"]
    ranks = {n: [] for n in names}
    for s in blind:
        order = sorted(names, key=lambda n: -results[s]["lora"][n]["macro_f1"])
        for n in names:
            ranks[n].append(order.index(n) + 1)
    mean_f1 = {n: float(np.mean([results[s]["lora"][n]["macro_f1"] for s in blind])) for n in names}
    chosen = min(names, key=lambda n: (np.mean(ranks[n]), -mean_f1[n]))
    return {"chosen": chosen, "mean_rank": {n: float(np.mean(r)) for n, r in ranks.items()}, "mean_macro_f1": mean_f1, "settings": blind}


def pct(share) -> str:
    return "" if share is None else f"{100 * share:.1f}%"


def summary(r: dict) -> list[str]:
    """One row per setting: the chosen recipe beside the seed's and every anchor."""
    chosen = r["choice"]["chosen"]
    lines = [f"Per setting (the defaults: {chosen}):", "",
             "| setting | frozen probe | frozen k-NN | LoRA, defaults | epochs run (best), s/epoch | LoRA, seed's recipe | full fine-tuning | "
             "marker genes alone | CellTypist, all genes | CellTypist, 300 per class |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in r["settings"].items():
        d, seed = s["lora"][chosen], s["lora"]["seed"]
        genes = f"{s['genes_only']['macro_f1']:.3f}" if "genes_only" in s else ""
        lines.append(f"| {name} | {s['probe']['macro_f1']:.3f} | {s['knn']['macro_f1']:.3f} | **{d['macro_f1']:.3f}** | {d['epochs_run']} ({d['best_epoch']}), "
                     f"{d['seconds_per_epoch']} | {seed['macro_f1']:.3f} | {s['full_finetune']['macro_f1']:.3f} | {genes} | "
                     f"{s['celltypist']['all_genes']['macro_f1']:.3f} | {s['celltypist']['300_features']['macro_f1']:.3f} |")
    return lines + [""]


def markdown(r: dict) -> str:
    lines = [f"Machine {r['machine']}, {r['date']}; `{r['command']}`. Macro-F1 on cells no stage used.", ""]
    if "choice" in r:
        lines += summary(r)
    for name, s in r["settings"].items():
        lines += [f"### {name} (base {s['base']}; trained on {s['user_file']}, scored on {s['test_cells']} cells of {s['new_cells']})", "",
                  "| method | macro-F1 | epochs run (best) | s/epoch | head's largest row norm | int8 keeps labels |", "|---|---|---|---|---|---|",
                  f"| frozen base, linear probe (C {s['probe']['C']:.3g}) | {s['probe']['macro_f1']:.3f} | | | | |",
                  f"| frozen base, k-NN (k {s['knn']['k']}) | {s['knn']['macro_f1']:.3f} | | | | |"]
        for n, row in s["lora"].items():
            lines.append(f"| LoRA, {n} | {row['macro_f1']:.3f} | {row['epochs_run']} ({row['best_epoch']}) | {row['seconds_per_epoch']} | "
                         f"{row.get('head_max_row_norm', '')} | {pct(row.get('int8_label_agreement'))} |")
        f = s["full_finetune"]
        lines += [f"| full fine-tuning (lr {f['lr']:g}, best LoRA schedule), its embedding head | {f['macro_f1']:.3f} | {f['epochs_run']} ({f['best_epoch']}) | {f['seconds_per_epoch']} | | |"]
        if "genes_only" in s:
            lines += [f"| full fine-tuning, head on its embedding + the default marker genes | {f['with_genes_macro_f1']:.3f} | | | | |",
                      f"| frozen base, head on its embedding + the default marker genes | {s['frozen_with_genes']['macro_f1']:.3f} | | | | |",
                      f"| the default marker genes alone ({s['genes_only']['genes']:,} genes; no encoder) | {s['genes_only']['macro_f1']:.3f} | | | | |"]
        lines += [
                  f"| CellTypist, all genes | {s['celltypist']['all_genes']['macro_f1']:.3f} | | | | |",
                  f"| CellTypist, 300 features per class | {s['celltypist']['300_features']['macro_f1']:.3f} | | | | |"]
        lines += [f"| CellTypist, 300 features per class, {k.split(', ')[1]} | {v['macro_f1']:.3f} | | | | |" for k, v in s["celltypist"].items() if ", seed" in k]
        lines.append("")
    if "choice" in r:
        c = r["choice"]
        lines += [f"Default chosen: **{c['chosen']}** (best mean rank over {', '.join(c['settings'])}).", "",
                  "| recipe | mean rank | mean macro-F1 |", "|---|---|---|"]
        lines += [f"| {n} | {c['mean_rank'][n]:.2f} | {c['mean_macro_f1'][n]:.3f} |" for n in sorted(c["mean_rank"], key=c["mean_rank"].get)]
    return "\n".join(lines) + "\n"


def parse_grid(items: list[str]) -> dict:
    from scl.train.config import FinetuneConfig

    grid = dict(GRID)
    for item in items:
        key, _, values = item.partition("=")
        if key not in GRID and key not in MORE_KEYS:
            raise SystemExit(f"--grid {item!r}: the keys are {', '.join([*GRID, *MORE_KEYS])}")
        kind = type(getattr(FinetuneConfig("base", "data"), key))
        grid[key] = [kind(v) for v in values.split(",")]
    return grid


def main(argv=None) -> dict:
    from run import machine_name, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="small networks and few cells: checks the benchmark runs")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of " + ", ".join(SETTINGS))
    parser.add_argument("--grid", nargs="*", default=[], help="KEY=V1,V2 replacing the default grid's values (lr, schedule, epochs) or sweeping another setting (rank, alpha, head_lr, triplet_weight, recon_weight, lora_dropout, batch_size, seed)")
    parser.add_argument("--work", help="folder for bases and runs, reused when rerun (default: a temporary folder)")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for <machine>-recipe.json and .md")
    args = parser.parse_args(argv)
    grid = parse_grid(args.grid)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        found = settings(work, args.smoke)
        results = {"machine": machine_name(), "date": datetime.date.today().isoformat(),
                   "command": "python benchmarks/recipe.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
                   "grid": grid, "seed_recipe": SEED_RECIPE, "settings": {}}
        for name in args.settings.split(","):
            base_of, user, new = found[name]
            results["settings"][name] = measure_setting(name, base_of(), user, new, grid, work, args.smoke)
    if any(s != "pbmc_same_file" for s in results["settings"]):
        results["choice"] = default_choice(results["settings"])
    print(write_results(results, Path(args.out), args.smoke, "recipe", markdown))
    return results


if __name__ == "__main__":
    main()
