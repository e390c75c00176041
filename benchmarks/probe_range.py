"""Does the probe's C range bind? The frozen-base linear probe (which also starts scl-train's head) picks C by
cross-validated log-loss among 0.001-10; on every setting of benchmarks/recipe.py it picked 10, the top. This fits the
same probe with C up to 1000 on the same training cells and scores both on the same new cells.

    python benchmarks/probe_range.py --work /tmp/recipe_work   # the bases recipe.py built there (built if missing)
    python benchmarks/probe_range.py --smoke                    # small bases: checks the script runs

Writes benchmarks/results/<machine>-probe-range.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

WIDE_CS = np.logspace(-3, 3, 13)


def measure(name: str, base_dir: Path, user: Path, new: Path) -> dict:
    import torch

    from recipe import MIN_GENES, macro_f1
    from scl.runtime.expression import ReadOptions
    from scl.train.config import FinetuneConfig
    from scl.train.data import embed, load_labelled
    from scl.train.evaluate import PROBE_CS, linear_probe
    from scl.train.model_dir import load_model_dir
    from scl.train.roles import training_cells

    cpu = torch.device("cpu")
    model = load_model_dir(base_dir)
    cells = training_cells(FinetuneConfig(base_model=str(base_dir), data=str(user), out="unused", min_genes=MIN_GENES), model)
    train, classes, y_train = cells.train, cells.classes, cells.y_train
    test = load_labelled(str(new), model.gene_order, "cell_type", ReadOptions(min_genes=MIN_GENES))
    z_train, z_test = embed(model.encoder, train.x, cpu), embed(model.encoder, test.x, cpu)
    rows = {}
    for label, cs in (("0.001-10 (scl's)", PROBE_CS), ("0.001-1000", WIDE_CS)):
        probe = linear_probe(z_train, y_train, z_test, len(classes), cs=cs)
        rows[label] = {"C": probe.fit["C"], "macro_f1": macro_f1(test.labels, np.array(classes)[probe.probabilities.argmax(1)]),
                       "head_max_row_norm": round(float(np.linalg.norm(probe.weight, axis=1).max()), 1)}
        print(f"{name}: C range {label}: C {probe.fit['C']:g}, macro-F1 {rows[label]['macro_f1']:.3f}", flush=True)
    return {"base": base_dir.name, "test_cells": len(test), "ranges": rows}


def markdown(r: dict) -> str:
    lines = [f"Machine {r['machine']}, {r['date']}; `{r['command']}`. Frozen-base probe, C by 5-fold log-loss; macro-F1 on cells no stage used.", "",
             "| setting | C range | C chosen | macro-F1 | head max row norm |", "|---|---|---|---|---|"]
    for name, s in r["settings"].items():
        lines += [f"| {name} | {label} | {v['C']:g} | {v['macro_f1']:.3f} | {v['head_max_row_norm']:,.0f} |" for label, v in s["ranges"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from recipe import SETTINGS, settings
    from run import machine_name, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="small bases and few cells: checks the script runs")
    parser.add_argument("--work", help="recipe.py's --work folder (bases reused; default: a temporary folder)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        found = {name: (make_base(), user, new) for name, (make_base, user, new) in settings(work, args.smoke).items()}
        results = {"machine": machine_name(), "date": datetime.date.today().isoformat(),
                   "command": "python benchmarks/probe_range.py" + (" --smoke" if args.smoke else f" --work {args.work}" if args.work else ""),
                   "settings": {name: measure(name, *found[name]) for name in SETTINGS}}
    print(write_results(results, Path(args.out), args.smoke, "probe-range", markdown))
    return results


if __name__ == "__main__":
    main()
