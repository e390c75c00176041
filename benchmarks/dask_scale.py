"""One file annotated on a dask.distributed cluster against plain scl-annotate, on this machine: cells/s of `--dask
local:2` and `local:1` beside the plain run on the same 1M-cell file, peak RSS per worker at 1M and 4M cells, and
what a task costs.

    python benchmarks/dask_scale.py            # 1,000,000 and 4,000,000 cells (about 30 min, 20 GB of temporary disk)
    python benchmarks/dask_scale.py --smoke    # tiny sizes, for the tests

Writes benchmarks/results/<machine>-dask.json and .md. Real-size model (28,231 genes -> 1024 -> 1024 -> 128, random
weights, int8); CSR .h5ad of synthetic cells (500 detected genes per cell, about the PBMC data's 540), CSV output.
Throughput: scl-annotate as users run it (plain, `--dask local:2`, `--dask local:1`; interleaved, best of the rounds),
cells/s from its report (reading, annotating and writing; the cluster's start is in the wall time). Memory: the same
run through `annotate_file(..., client=...)` on a LocalCluster of 2 one-thread worker processes, each worker's peak
RSS (getrusage) read when the run ends, and the caller's.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DETECTED = 500

MEMORY_CHILD = """
import json, logging, sys, time
from distributed import Client, LocalCluster
from scl.runtime.annotator import AnnotateOptions, Annotator
from scl.runtime.expression import ReadOptions
from scl.runtime.file_driver import annotate_file

def peak_mb():
    # VmHWM, this process's own peak: getrusage's ru_maxrss survives exec, so a process started by a large parent
    # reports the parent's peak (this benchmark's own 1.8 GB, from exporting the model)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

if __name__ == "__main__":
    model, h5ad, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
        t = time.perf_counter()
        report = annotate_file(h5ad, out, Annotator(model), ReadOptions(), AnnotateOptions(progress=False), client=client)
        seconds = time.perf_counter() - t
        workers_mb = sorted(client.run(peak_mb).values())
    print(json.dumps({"cells": report.cells, "seconds": round(seconds, 1), "worker_peak_rss_mb": [round(m, 1) for m in workers_mb],
                      "caller_peak_rss_mb": round(peak_mb(), 1)}))
"""


def side_by_side(h5ad: str, model: Path, tmp: Path, rounds: int) -> dict:
    """Plain scl-annotate and on LocalClusters of 2 and 1 workers, interleaved; the best of `rounds` per configuration."""
    from run import interleaved_best

    configs = {"plain scl-annotate": [], "--dask local:2": ["--dask", "local:2"], "--dask local:1": ["--dask", "local:1"]}
    return interleaved_best(h5ad, model, tmp, configs, rounds, "ratio_to_plain")


def worker_memory(model: Path, h5ad: str, tmp: Path, workers: int = 2) -> dict:
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(model), h5ad, str(tmp / "memory.csv"), str(workers)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the dask memory run failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def projection(r: dict) -> dict:
    """10^8 cells on N one-thread workers at the measured rate of one (local:1), if nothing else limits."""
    one = r["annotate"]["--dask local:1"]["cells_per_second"]
    return {"per_worker_cells_per_second": one, "hours_for_1e8_cells": {str(n): round(1e8 / (n * one) / 3600, 2) for n in (1, 10, 100, 1000)}}


def markdown(r: dict) -> str:
    lines = [f"Machine {r['machine']}, {r['date']}; `{r['command']}`. {r['cells']:,} cells x 28,231 genes (CSR, {DETECTED} detected per "
             f"cell), real-size model, random weights, int8; CSV output; best of {r['rounds']} interleaved rounds.", "",
             "| run | cells/s (report) | ratio to plain | wall s (process, with the cluster's start) | peak RSS MB (the largest process) |",
             "|---|---|---|---|---|"]
    for name, s in r["annotate"].items():
        lines.append(f"| {name} | {s['cells_per_second']:,.0f} | {s['ratio_to_plain']:.2f} | {s['wall_seconds']:,.1f} | {s['peak_rss_mb']:,.0f} |")
    again = f" (measured again by `{r['memory_command']}`, {r['memory_date']})" if r.get("memory_command") else ""
    lines += ["", f"Peak RSS on a LocalCluster of 2 one-thread workers (`annotate_file(..., client=...)`){again}:", "",
              "| cells | run s | each worker's peak RSS MB | the caller's peak RSS MB |", "|---|---|---|---|"]
    for m in r["memory"]:
        lines.append(f"| {m['cells']:,} | {m['seconds']:,.1f} | {' / '.join(f'{v:,.0f}' for v in m['worker_peak_rss_mb'])} | {m['caller_peak_rss_mb']:,.0f} |")
    p = r["projection"]
    hours = ", ".join(f"{int(n):,} workers {h:,} h" for n, h in p["hours_for_1e8_cells"].items())
    lines += ["", f"Projection for 10^8 cells at one worker's measured {p['per_worker_cells_per_second']:,.0f} cells/s, if nothing else "
              f"limited: {hours}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from run import machine_name, write_results
    from synthetic import random_model, write_csr_h5ad, write_onnx

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the benchmark runs")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--memory-only", action="store_true", help="measure the peak memory again, keeping the throughput rows of the "
                        "results file there")
    args = parser.parse_args(argv)
    cells, memory_sizes, rounds = (4_000, (4_000, 8_000), 1) if args.smoke else (1_000_000, (1_000_000, 4_000_000), 2)
    genes = [f"G{i}" for i in range(2_000 if args.smoke else 28_231)]
    results = {"machine": machine_name(), "date": time.strftime("%Y-%m-%d"), "cells": cells, "rounds": rounds,
               "command": "python benchmarks/dask_scale.py" + (" --smoke" if args.smoke else "")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_onnx(*random_model(genes), tmp / "model.onnx")[1]
        results["memory"], results["memory_date"] = [], time.strftime("%Y-%m-%d")
        for n in memory_sizes:
            h5ad = str(tmp / f"cells{n}.h5ad")
            print(f"writing {n:,} cells", flush=True)
            write_csr_h5ad(h5ad, genes, n, detected=DETECTED, seed=n)
            if n == cells and not args.memory_only:
                print("scl-annotate plain and on dask", flush=True)
                results["annotate"] = side_by_side(h5ad, model, tmp, rounds)
            print(f"worker memory at {n:,} cells", flush=True)
            results["memory"].append(worker_memory(model, h5ad, tmp))
            Path(h5ad).unlink()
    if args.memory_only:
        kept = json.loads((Path(args.out) / f"{results['machine']}-dask.json").read_text())
        results |= {k: kept[k] for k in ("annotate", "date", "command")}
        results["memory_command"] = "python benchmarks/dask_scale.py --memory-only"
    results["projection"] = projection(results)
    print(write_results(results, Path(args.out), args.smoke, "dask", markdown))
    return results


if __name__ == "__main__":
    logging.getLogger("distributed").setLevel(logging.ERROR)
    main()
