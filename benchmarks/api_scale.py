"""The Python API at scale: its throughput beside scl-annotate's on the same cells, its memory on a million-cell
in-memory CSR, and majority voting's time and memory at 100k and 1M cells.

    python benchmarks/api_scale.py           # 50,000 cells side by side; 100,000 and 1,000,000 in memory (about 5 min)
    python benchmarks/api_scale.py --smoke   # tiny sizes, for the tests

Writes benchmarks/results/<machine>-api.json and .md. Real-size model (28,231 genes -> 1024 -> 1024 -> 128, random
weights, 10 classes). Side by side: the same CSR cells (2,500 detected per cell) annotated by scl-annotate from the
.h5ad file and by `Annotator.annotate` from a scipy CSR already in memory, each the best of three runs, fp32 and int8.
Scale: each size in a process of its own, the CSR built in place (500 detected genes per cell, about the PBMC data's
540: 1M cells at 2,500 would need 20 GB), then peak RSS is reset (Linux clear_refs) so that what is reported is the
growth beyond the matrix itself: annotating (int8) and then voting (MiniBatchKMeans over-clustering + majority vote).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SCALE_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[4])
import numpy as np, scipy.sparse as sp
from synthetic import cell_block
from training_cost import reset_peak_rss, status_mb
import scl

model, n, detected = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
annotator = scl.Annotator(model)
genes = annotator.gene_order
rng = np.random.default_rng(n)
data, indices = np.empty(n * detected, np.float32), np.empty(n * detected, np.int32)
for start in range(0, n, 20000):
    m = min(20000, n - start)
    data[start * detected:(start + m) * detected], indices[start * detected:(start + m) * detected] = cell_block(m, len(genes), detected, rng)
x = sp.csr_matrix((data, indices, np.arange(n + 1, dtype=np.int64) * detected), shape=(n, len(genes)))
matrix_mb = (x.data.nbytes + x.indices.nbytes + x.indptr.nbytes) / 1024**2
reset_peak_rss()
before = status_mb("VmRSS")
t = time.perf_counter()
result = annotator.annotate(x, genes=genes, progress=False)
annotate_s = time.perf_counter() - t
annotate_peak = status_mb("VmHWM") - before
reset_peak_rss()
before_votes = status_mb("VmRSS")
t = time.perf_counter()
result.add_votes(None)
vote_s = time.perf_counter() - t
print(json.dumps({"cells": n, "detected_genes_per_cell": detected, "matrix_mb": round(matrix_mb, 1),
                  "annotate_seconds": round(annotate_s, 1), "annotate_cells_per_second": round(n / annotate_s, 1),
                  "annotate_peak_growth_mb": round(annotate_peak, 1),
                  "results_mb": round((result.embedding.nbytes + result.probabilities.nbytes + sum(v.nbytes for v in result.calls.values())) / 1024**2, 1),
                  "voting_seconds": round(vote_s, 1), "voting_peak_growth_mb": round(status_mb("VmHWM") - before_votes, 1),
                  "clusters": int(len(set(result.calls["cluster"])))}))
"""


def api_rate(model: Path, h5ad: str, runs: int) -> float:
    """Annotator.annotate on the file's CSR, already in memory: cells/s, the best of `runs` (reading not timed)."""
    import h5py
    import scipy.sparse as sp

    import scl

    with h5py.File(h5ad) as f:
        x = sp.csr_matrix((f["X/data"][()], f["X/indices"][()], f["X/indptr"][()]), shape=tuple(f["X"].attrs["shape"]))
        genes = f["var/_index"].asstr()[()]
    annotator = scl.Annotator(model)
    best = 0.0
    for _ in range(runs):
        t = time.perf_counter()
        annotator.annotate(x, genes=genes, progress=False)
        best = max(best, x.shape[0] / (time.perf_counter() - t))
    return best


def side_by_side(genes: list[str], cells: int, tmp: Path, runs: int) -> dict:
    from run import annotate_rate
    from synthetic import random_model, write_csr_h5ad, write_onnx

    model, head = random_model(genes)
    fp32, int8, _ = write_onnx(model, head, tmp / "model.onnx")
    h5ad = str(tmp / "cells.h5ad")
    write_csr_h5ad(h5ad, genes, cells)
    rows = {}
    for name, path in (("fp32", fp32), ("int8", int8)):
        cli, api = annotate_rate(h5ad, path, tmp, runs=runs), api_rate(path, h5ad, runs)
        rows[name] = {"scl_annotate_file_cells_per_second": round(cli, 1), "api_in_memory_cells_per_second": round(api, 1), "api_vs_cli": round(api / cli, 3)}
    return {"cells": cells, "detected_genes_per_cell": 2500, "variants": rows}


def scale(model: Path, sizes: list[int], detected: int) -> list[dict]:
    out = []
    for n in sizes:
        done = subprocess.run([sys.executable, "-c", SCALE_CHILD, str(model), str(n), str(detected), str(HERE)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def markdown(r: dict) -> str:
    lines = [f"Machine {r['machine']} ({r['cores']} cores), {r['date']}; `{r['command']}`.", "",
             f"**The Python API beside scl-annotate** on the same {r['side_by_side']['cells']:,} cells (28,231 genes, CSR, 2,500 detected "
             "per cell; real-size model, random weights; best of three runs each):", "",
             "| model | scl-annotate from the .h5ad, cells/s | `Annotator.annotate` on the CSR in memory, cells/s | API / CLI |", "|---|---|---|---|"]
    for name, v in r["side_by_side"]["variants"].items():
        lines.append(f"| {name} | {v['scl_annotate_file_cells_per_second']:,.0f} | {v['api_in_memory_cells_per_second']:,.0f} | {v['api_vs_cli']:.2f} |")
    lines += ["", "**At scale**, in memory (scipy CSR, 500 detected genes per cell; int8 model; each size in its own process; growth is peak RSS "
              "beyond the process with the matrix already built):", "",
              "| cells | matrix MB | annotate s | cells/s | peak growth annotating MB | of which results MB | majority voting s (clusters) | peak growth voting MB |",
              "|---|---|---|---|---|---|---|---|"]
    for s in r["scale"]:
        lines.append(f"| {s['cells']:,} | {s['matrix_mb']:,.0f} | {s['annotate_seconds']:,.1f} | {s['annotate_cells_per_second']:,.0f} | "
                     f"{s['annotate_peak_growth_mb']:,.0f} | {s['results_mb']:,.0f} | {s['voting_seconds']:,.1f} ({s['clusters']:,}) | {s['voting_peak_growth_mb']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from run import machine_name, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=50000, help="cells side by side")
    parser.add_argument("--scale", default="100000,1000000", help="in-memory sizes")
    parser.add_argument("--data", default=str(HERE.parents[1] / "shared/data"))
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.cells, args.scale = 300, "500,1000"
    genes = (Path(args.data) / "scimilarity_gene_order.tsv").read_text().split()
    results = {"machine": machine_name(), "cores": len(__import__("os").sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d"),
               "command": "python benchmarks/api_scale.py" + (" --smoke" if args.smoke else "")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results["side_by_side"] = side_by_side(genes, args.cells, tmp, runs=1 if args.smoke else 3)
        results["scale"] = scale(tmp / "model.int8.onnx", [int(v) for v in args.scale.split(",")], detected=500)
    print(write_results(results, Path(args.out), args.smoke, "api", markdown))
    return results


if __name__ == "__main__":
    main()
