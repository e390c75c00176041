"""scl-train on one process against `torchrun --nproc-per-node 2` (DistributedDataParallel, gloo) on this machine.

    python benchmarks/train_processes.py              # 20,000 synthetic cells, real-size base (about 10 min)
    python benchmarks/train_processes.py --smoke      # tiny, for the tests

Writes benchmarks/results/<machine>-train-processes.json and .md. The base has SCimilarity's size (28,231 genes ->
1024 -> 1024 -> 128) with random weights; the cells are synthetic (500 detected genes each, 5 labels). Training
throughput is the training cells over the seconds of an epoch's steps (metrics.json's history: no validation, probe
or calibration in it), the best epoch of the best of the interleaved rounds; wall time is the whole command, reading
and the once-only steps (probe, head, calibration) included. Peak RSS is the largest process's (getrusage of the
children: torchrun waits for its workers, so theirs count). torchrun gives each worker one thread; one process uses
torch's default (every core).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
BIN = Path(sys.executable).parent
DETECTED = 500
EPOCHS = 2


def write_inputs(tmp: Path, n_cells: int, smoke: bool) -> tuple[Path, Path]:
    """A random base at SCimilarity's size (smaller for --smoke) and a labelled CSR .h5ad of synthetic cells."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    import torch

    from scl.train.model_dir import SCimilarityModel, read_gene_order, save_model_dir
    from scl.train.nn import Decoder, Encoder
    from synthetic import cell_block

    genes = read_gene_order(str(REPO / "train" / "demo_data" / "scimilarity_gene_order.tsv"))
    hidden = [64, 32] if smoke else [1024, 1024]
    latent = 16 if smoke else 128
    torch.manual_seed(0)
    base = SCimilarityModel(Encoder(len(genes), latent, hidden).eval(), Decoder(len(genes), latent, list(reversed(hidden))).eval(), genes, ["any"])
    save_model_dir(tmp / "base", base)
    rng = np.random.default_rng(0)
    data, indices = cell_block(n_cells, len(genes), DETECTED, rng)
    x = sp.csr_matrix((data, indices, np.arange(n_cells + 1) * DETECTED), shape=(n_cells, len(genes)))
    obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice([f"type{i}" for i in range(5)], n_cells))}, index=[f"cell{i}" for i in range(n_cells)])
    ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(tmp / "cells.h5ad")
    return tmp / "base", tmp / "cells.h5ad"


def train_once(processes: int, base: Path, cells: Path, out: Path) -> dict:
    args = ["-m", "scl.train.finetune_cli", "--base-model", str(base), "--data", str(cells), "--out", str(out),
            "--epochs", str(EPOCHS), "--patience", str(EPOCHS), "--head-genes", "0", "--quiet"]
    command = [sys.executable, *args] if processes == 1 else [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(processes), *args]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    seconds = min(row["train_seconds"] for row in metrics["history"])
    return {"cells_per_s": round(metrics["cells"]["train"] / seconds, 1), "epoch_s": seconds, "wall_s": round(wall, 1),
            "train_cells": metrics["cells"]["train"], "lora_macro_f1": metrics["methods"]["lora"]["macro_f1"]}


def measure(n_cells: int, rounds: int, smoke: bool) -> dict:
    from run import machine_name

    rows: dict[str, list] = {"1 process (scl-train)": [], "2 processes (torchrun, gloo)": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, cells = write_inputs(tmp, n_cells, smoke)
        for r in range(rounds):
            for name, processes in (("1 process (scl-train)", 1), ("2 processes (torchrun, gloo)", 2)):
                print(f"round {r + 1}: {name}", flush=True)
                rows[name].append(train_once(processes, base, cells, tmp / f"run{r}-{processes}"))
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    best = {name: max(runs, key=lambda run: run["cells_per_s"]) for name, runs in rows.items()}
    one = best["1 process (scl-train)"]["cells_per_s"]
    for row in best.values():
        row["ratio_to_one"] = round(row["cells_per_s"] / one, 2)
    return {"machine": machine_name(), "date": str(date.today()), "cells": n_cells, "base": "28,231 -> 64 -> 32 -> 16" if smoke else "28,231 -> 1024 -> 1024 -> 128", "epochs": EPOCHS, "rounds": rounds,
            "command": "python benchmarks/train_processes.py" + (" --smoke" if smoke else ""), "runs": best, "all_runs": rows,
            "largest_process_peak_rss_mb": round(peak_mb, 1)}


def table(r: dict) -> str:
    lines = [f"Machine {r['machine']}, {r['date']}; `{r['command']}`. {r['cells']:,} synthetic cells ({DETECTED} detected genes, 5 labels; "
             f"{r['runs']['1 process (scl-train)']['train_cells']:,} train), base {r['base']} with random weights, {r['epochs']} epochs, "
             f"batch 64, best of {r['rounds']} interleaved rounds.", "",
             "| run | training cells/s (an epoch's steps) | ratio to 1 process | s per epoch | wall s (whole run) |", "|---|---|---|---|---|"]
    for name, row in r["runs"].items():
        lines.append(f"| {name} | {row['cells_per_s']:,.0f} | {row['ratio_to_one']:.2f} | {row['epoch_s']:.1f} | {row['wall_s']:.1f} |")
    lines += ["", f"Largest process's peak RSS over all runs: {r['largest_process_peak_rss_mb']:,.0f} MB."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from run import write_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    n_cells, rounds = (300, 1) if args.smoke else (args.cells, args.rounds)
    results = measure(n_cells, rounds, args.smoke)
    print(write_results(results, args.out, args.smoke, "train-processes", table))
    return results


if __name__ == "__main__":
    main()
