"""scl-train with its cells in memory against `--stream` (cells left in the file, read a window at a time), at
growing reference sizes: peak RSS, training cells/s, and how fast the streamed loader reads on its own.

    python benchmarks/train_stream.py                         # 100k, 1M and 3M synthetic cells (20 minutes here; 12 GB of disk)
    python benchmarks/train_stream.py --smoke                 # 2,000 cells and a tiny base, for the tests

Writes benchmarks/results/<machine>-train-stream.json and .md. The base has SCimilarity's size (28,231 genes -> 1024
-> 1024 -> 128) with random weights; the cells are synthetic CSR counts (DETECTED genes each, 5 random labels: nothing to
learn, only to time). Every run is a whole scl-train: `--epochs 2 --epoch-cells 20000` (an epoch is 20,000
training cells, so a run's training time does not grow with the reference), 1% of the cells validate and 1% calibrate,
`--head-genes 0`. Training cells/s is the faster epoch's steps (metrics.json's history). Peak RSS is the scl-train
process's (wait4). The loader line reads the streamed order's windows alone (train/data.py read_batches, no training)
for LOADER_SECONDS, with the page cache dropped first where this process may (root), on the largest file.
The in-memory path is not run where it would need more than 80% of this machine's memory (IN_MEMORY_BYTES_A_CELL,
as measured at 1M cells).
"""

from __future__ import annotations

import argparse
import json
import os
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
DETECTED = 500
LABELS = 5
EPOCH_CELLS = 20_000
LOADER_SECONDS = 60
IN_MEMORY_BYTES_A_CELL = 15_500  # peak, measured at 1M cells of 500 genes: the blocks, their stack and each role's copy


def write_base(tmp: Path, smoke: bool) -> tuple[Path, list[str]]:
    import torch

    from scl.train.model_dir import SCimilarityModel, read_gene_order, save_model_dir
    from scl.train.nn import Decoder, Encoder

    genes = read_gene_order(str(REPO / "train" / "demo_data" / "scimilarity_gene_order.tsv"))
    hidden, latent = ([64, 32], 16) if smoke else ([1024, 1024], 128)
    torch.manual_seed(0)
    base = SCimilarityModel(Encoder(len(genes), latent, hidden).eval(), Decoder(len(genes), latent, list(reversed(hidden))).eval(), genes, ["any"])
    save_model_dir(tmp / "base", base)
    return tmp / "base", genes


def train_once(base: Path, cells: Path, out: Path, stream: bool, smoke: bool) -> dict:
    epoch_cells = 200 if smoke else EPOCH_CELLS
    command = [sys.executable, "-m", "scl.train.finetune_cli", "--base-model", str(base), "--data", str(cells), "--out", str(out),
               "--epochs", "2", "--patience", "2", "--epoch-cells", str(epoch_cells), "--val-fraction", "0.01",
               "--calibration-fraction", "0.01", "--head-genes", "0", "--quiet"] + (["--stream"] if stream else [])
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONWARNINGS": "ignore"})
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if child.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    best = min(metrics["history"], key=lambda row: row["train_seconds"])
    return {"cells_per_s": round(best["cells_a_process"] / best["train_seconds"], 1), "wall_s": round(wall, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "train_cells": metrics["cells"]["train"]}


def loader_rate(base: Path, cells: Path, seconds: float) -> dict:
    """Cells/s of the streamed order's reads alone (read_batches on one process), page cache dropped where allowed."""
    import torch

    from row_reads import drop_page_cache
    from scl.runtime.expression import ReadOptions
    from scl.train.data import STREAM_BLOCK, BatchOrder, load_labelled, read_batches
    from scl.train.model_dir import load_model_dir

    data = load_labelled(str(cells), load_model_dir(str(base)).gene_order, "cell_type", ReadOptions(), stream=True)
    cold = drop_page_cache()
    order = BatchOrder(len(data), 64, torch.Generator().manual_seed(0), STREAM_BLOCK)
    n, started = 0, time.perf_counter()
    for index, _ in read_batches(data.x, order, len(data) // 64, lambda b: b, torch.device("cpu")):
        n += len(index)
        if time.perf_counter() - started > seconds:
            break
    data.x.close()
    return {"cells_per_s": round(n / (time.perf_counter() - started), 1), "page_cache": "dropped" if cold else "warm", "cells_read": n}


def measure(sizes: list[int], smoke: bool) -> dict:
    from run import machine_name
    from synthetic import labelled_h5ad

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("SCL_BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        base, genes = write_base(tmp, smoke)
        for n in sizes:
            cells = tmp / f"cells{n}.h5ad"
            print(f"{n:,} cells: writing", flush=True)
            labelled_h5ad(cells, genes, n, seed=n, detected=DETECTED, labels=LABELS, prefix="cell")
            row = {"cells": n, "file_gb": round(cells.stat().st_size / 1e9, 2)}
            for name, stream in (("in memory", False), ("streamed", True)):
                if not stream and n * IN_MEMORY_BYTES_A_CELL > 0.8 * memory:
                    row[name] = {"not_run": f"needs about {n * IN_MEMORY_BYTES_A_CELL / 1e9:.0f} GB"}
                    continue
                print(f"{n:,} cells: scl-train {name}", flush=True)
                row[name] = train_once(base, cells, tmp / f"run{n}-{name.replace(' ', '-')}", stream, smoke)
            if n == max(sizes):
                print(f"{n:,} cells: loader alone", flush=True)
                row["loader"] = loader_rate(base, cells, 2 if smoke else LOADER_SECONDS)
            rows.append(row)
            cells.unlink()
    return {"machine": machine_name(), "date": str(date.today()), "detected_genes": DETECTED, "epoch_cells": 200 if smoke else EPOCH_CELLS,
            "base": "28,231 -> 64 -> 32 -> 16" if smoke else "28,231 -> 1024 -> 1024 -> 128",
            "command": "python benchmarks/train_stream.py" + (" --smoke" if smoke else ""), "rows": rows}


def cell(run: dict, key: str, fmt: str) -> str:
    return run["not_run"] if "not_run" in run else format(run[key], fmt)


def table(r: dict) -> str:
    lines = [f"Machine {r['machine']}, {r['date']}; `{r['command']}`. Synthetic CSR cells ({r['detected_genes']} detected genes, 5 labels), "
             f"base {r['base']} (random weights); each run a whole scl-train with epochs of {r['epoch_cells']:,} training cells (2 epochs), "
             "1% validation, 1% calibration, --head-genes 0.", "",
             "| cells | file GB | in memory: peak RSS MB | streamed: peak RSS MB | in memory: training cells/s | streamed: training cells/s | "
             "streamed / in memory | in memory: wall s | streamed: wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        mem, streamed = row["in memory"], row["streamed"]
        ratio = "" if "not_run" in mem else f"{streamed['cells_per_s'] / mem['cells_per_s']:.2f}"
        lines.append(f"| {row['cells']:,} | {row['file_gb']} | {cell(mem, 'peak_rss_mb', ',.0f')} | {streamed['peak_rss_mb']:,.0f} | "
                     f"{cell(mem, 'cells_per_s', ',.0f')} | {streamed['cells_per_s']:,.0f} | {ratio} | {cell(mem, 'wall_s', ',.0f')} | {streamed['wall_s']:,.0f} |")
    loader = next(row for row in r["rows"] if "loader" in row)
    lines += ["", f"The streamed loader alone (train/data.py read_batches, blocks of 64, windows of 4,096 cells, one process) read "
              f"{loader['loader']['cells_per_s']:,.0f} cells/s from the {loader['cells']:,}-cell file (page cache {loader['loader']['page_cache']})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from run import write_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", help="cell counts, comma-separated (default 100000,1000000,3000000; 2000 with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="a tiny base and epochs of 200 cells (for the tests)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    sizes = args.sizes or ("2000" if args.smoke else "100000,1000000,3000000")
    results = measure([int(s) for s in sizes.split(",")], args.smoke)
    print(write_results(results, args.out, args.smoke, "train-stream", table))
    return results


if __name__ == "__main__":
    main()
