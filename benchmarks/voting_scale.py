"""Majority voting's automatic over-clustering at atlas size: the clustering step, and scl-annotate --majority-voting.

    python benchmarks/voting_scale.py            # 1,000,000 and 4,000,000 cells; about 40 minutes on 2 cores
    python benchmarks/voting_scale.py --smoke    # tiny sizes, for the tests

Writes benchmarks/results/<machine>-voting.json and .md.

1. The clustering step alone (runtime/voting.py over_cluster), on a synthetic clustered embedding (unit vectors
   around 100 random directions, as many cells as the file): the centres fitted on every cell (what scl did before;
   FIT_CELLS raised above the cell count) against fitted on a sample of voting.FIT_CELLS cells, then every cell
   assigned. Seconds, peak memory of the step (a child process per run), and purity: the share of cells whose cluster's
   most common generating direction is their own (what majority voting needs: clusters that do not mix types).
2. scl-annotate on a CSR .h5ad of synthetic cells (500 detected genes per cell; real-size model, random weights, int8;
   CSV output), with and without --majority-voting: wall seconds, and the peak of the process's anonymous memory
   (RssAnon, polled every 0.1 s: the embedding voting clusters sits in a temporary file, whose pages the kernel may
   drop, and which getrusage's peak RSS would count as memory).
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DETECTED = 500
DIRECTIONS = 100

CLUSTER_CHILD = """
import json, sys, time
from pathlib import Path
import numpy as np
import scl.runtime.voting as voting

n, whole = int(sys.argv[1]), sys.argv[2] == "whole"
rng = np.random.default_rng(0)
centres = rng.standard_normal((%d, 128)).astype(np.float32)
group = rng.integers(0, len(centres), n)
z = np.empty((n, 128), np.float32)
for i in range(0, n, 100_000):
    block = centres[group[i : i + 100_000]] + 0.3 * rng.standard_normal((len(group[i : i + 100_000]), 128)).astype(np.float32)
    z[i : i + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
def peak_mb():  # VmHWM: this program's own peak (getrusage's would include what its parent held before exec)
    return int(next(l.split()[1] for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))) / 1024
before = peak_mb()
if whole:
    voting.FIT_CELLS = n
t = time.perf_counter()
clusters = voting.over_cluster(z)
seconds = time.perf_counter() - t
codes = np.unique(clusters, return_inverse=True)[1]
table = np.zeros((codes.max() + 1, len(centres)), dtype=np.int64)
np.add.at(table, (codes, group), 1)
print(json.dumps({"seconds": round(seconds, 1), "purity": round(float(table.max(axis=1).sum() / n), 4), "clusters": int(codes.max() + 1),
                  "peak_rss_mb": round(peak_mb(), 1), "rss_before_mb": round(before, 1)}))
""" % DIRECTIONS


def clustering_step(n: int, whole: bool) -> dict:
    done = subprocess.run([sys.executable, "-c", CLUSTER_CHILD, str(n), "whole" if whole else "sample"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the clustering step failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def anonymous_peak(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RssAnon MB) of a command, polled from /proc every 0.1 s."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:"))))
        except (OSError, StopIteration):
            pass
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"scl-annotate failed in the benchmark: {proc.stderr.read()[-2000:]}")
    return round(time.perf_counter() - started, 1), round(peak / 1024, 1)


def annotate(h5ad: Path, model: Path, out: Path, voting: bool) -> dict:
    out.unlink(missing_ok=True)
    cmd = [str(Path(sys.executable).parent / "scl-annotate"), str(h5ad), "--model", str(model), "--output", str(out), "--quiet",
           "--report", str(out.with_suffix(".json"))] + (["--majority-voting"] if voting else [])
    wall, peak = anonymous_peak(cmd)
    report = json.loads(out.with_suffix(".json").read_text())
    return {"wall_seconds": wall, "peak_anonymous_mb": peak, "cells_per_second": report["cells_per_second"],
            "clusters": (report.get("majority_voting") or {}).get("clusters")}


def measure(sizes: list[int], tmp: Path) -> dict:
    from synthetic import random_model, write_csr_h5ad, write_onnx

    import scl.runtime.voting as voting

    genes = [line.strip() for line in open(HERE.parent / "train" / "demo_data" / "scimilarity_gene_order.tsv")]
    model = write_onnx(*random_model(genes), tmp / "model.onnx")[1]
    results = {"fit_cells": voting.FIT_CELLS, "step": {}, "annotate": {}}
    for n in sizes:
        results["step"][n] = {"every cell": clustering_step(n, True), "a sample": clustering_step(n, False)}
        print(f"{n:,} cells, the clustering step: {results['step'][n]}", flush=True)
        path = tmp / f"cells{n}.h5ad"
        write_csr_h5ad(str(path), genes, n, detected=DETECTED, seed=n)
        results["annotate"][n] = {"without voting": annotate(path, model, tmp / "plain.csv", False),
                                  "--majority-voting": annotate(path, model, tmp / "voted.csv", True)}
        print(f"{n:,} cells, scl-annotate: {results['annotate'][n]}", flush=True)
        path.unlink()
    return results


def markdown(r: dict) -> str:
    lines = [f"Machine {r['machine']}, {r['date']}; `{r['command']}`. Centres fitted on at most {r['fit_cells']:,} cells (voting.FIT_CELLS).", "",
             f"**The clustering step** (over_cluster on a synthetic embedding around {DIRECTIONS} directions; one process per run):", "",
             "| cells | centres fitted on | seconds | peak RSS MB (with the embedding, in memory here) | clusters | purity |", "|---|---|---|---|---|---|"]
    for n, runs in r["step"].items():
        for how, v in runs.items():
            lines.append(f"| {int(n):,} | {how} | {v['seconds']} | {v['peak_rss_mb']:,.0f} | {v['clusters']:,} | {v['purity']:.4f} |")
    lines += ["", "**scl-annotate** (CSR .h5ad, 500 detected genes per cell, real-size model with random weights, int8, CSV output):", "",
              "| cells | run | wall s | cells/s (report) | peak anonymous memory MB | clusters |", "|---|---|---|---|---|---|"]
    for n, runs in r["annotate"].items():
        for how, v in runs.items():
            lines.append(f"| {int(n):,} | {how} | {v['wall_seconds']} | {v['cells_per_second']:,.0f} | {v['peak_anonymous_mb']:,.0f} | {v['clusters'] or ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from run import machine_name, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the benchmark runs")
    parser.add_argument("--sizes", default="1000000,4000000", help="cells, comma-separated")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    sizes = [3000] if args.smoke else [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        results = {"machine": machine_name(), "date": datetime.date.today().isoformat(),
                   "command": "python benchmarks/voting_scale.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()}
        results |= measure(sizes, Path(tmp))
    print(write_results(results, Path(args.out), args.smoke, "voting", markdown))
    return results


if __name__ == "__main__":
    main()
