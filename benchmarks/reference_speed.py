"""Annotation against a reference, end to end: scl-annotate's cells/s with the head alone and with --reference at
100,000 and 1,000,000 reference cells, side by side in one run; what a reference costs to build, store and hold.

    python benchmarks/reference_speed.py            # 20,000 query cells; references of 100k and 1M cells (about 25 min)
    python benchmarks/reference_speed.py --smoke    # tiny sizes, for the tests

Writes benchmarks/results/<machine>-reference-speed.json and .md. Real-size model (28,231 genes -> 1024 -> 1024 ->
128, random weights, int8, 10 classes). Each reference is built by `scl.Reference.build` from .h5ad files of 100,000
synthetic cells each (500 detected genes, 30 labels drawn at random), streamed through the model, in a process of its
own (peak RSS is that process's). Query: 20,000 cells (2,500 detected) from an .h5ad, annotated by scl-annotate in its
own process, the configurations interleaved, three rounds, best of each. The embedding of random cells by random
weights is not a cell atlas's: read the ratios, not the absolute search cost, and see ann_libraries.py for recall.
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
LABELS, FILE_CELLS, DETECTED, K = 30, 100_000, 500, 50

BUILD_CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import scl
model, out, paths = sys.argv[2], sys.argv[3], sys.argv[4:]
t = time.perf_counter()
reference = scl.Reference.build(paths, scl.Annotator(model), progress=False)
built = time.perf_counter() - t
reference.save(out)
print(json.dumps({"build_seconds": round(built, 1), "save_seconds": round(time.perf_counter() - t - built, 1),
                  "index": reference.card["index"] or {"kind": reference.index.kind}, "cells": len(reference),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def build_reference(model: Path, genes: list[str], cells: int, tmp: Path) -> dict:
    """A reference of `cells` cells built and saved in a child process; the .h5ad inputs are removed after."""
    from synthetic import labelled_h5ad

    per_file = min(cells, FILE_CELLS)
    paths = []
    for number in range(0, cells, per_file):
        paths.append(tmp / f"ref{cells}_{number}.h5ad")
        labelled_h5ad(paths[-1], genes, min(per_file, cells - number), seed=cells + number, detected=DETECTED, labels=LABELS)
    out = tmp / f"ref{cells}.sclref"
    done = subprocess.run([sys.executable, "-c", BUILD_CHILD, str(HERE), str(model), str(out), *map(str, paths)], capture_output=True, text=True)
    for path in paths:
        path.unlink()
    if done.returncode:
        raise SystemExit(f"Reference.build failed in the benchmark: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result | {"path": str(out), "size_mb": round(sum(f.stat().st_size for f in out.iterdir()) / 2**20, 1)}


def side_by_side(h5ad: str, model: Path, references: dict[int, dict], tmp: Path, rounds: int) -> dict:
    """scl-annotate with the head alone and with each reference, interleaved; the best of `rounds` per configuration."""
    from run import interleaved_best

    configs = {"head": []} | {f"head + reference of {n:,} cells": ["--reference", r["path"], "-k", str(K)] for n, r in references.items()}
    return interleaved_best(h5ad, model, tmp, configs, rounds, "ratio_to_head")


def markdown(r: dict) -> str:
    lines = [f"Machine {r['machine']}, {r['date']}; `{r['command']}`. Query: {r['query_cells']:,} cells from an .h5ad "
             f"(2,500 detected per cell); real-size model, random weights, int8; k {K}; best of {r['rounds']} interleaved rounds.", "",
             "| scl-annotate | cells/s (report) | ratio to the head alone | wall s (process) | peak RSS MB |", "|---|---|---|---|---|"]
    for name, s in r["annotate"].items():
        lines.append(f"| {name} | {s['cells_per_second']:,.0f} | {s['ratio_to_head']:.2f} | {s['wall_seconds']:.1f} | {s['peak_rss_mb']:,.0f} |")
    lines += ["", "Building each reference (`scl.Reference.build` over files of 100,000 cells, then `save`; its own process):", "",
              "| reference cells | indexed (the rest held out for novelty) | index | build s | save s | folder MB | peak RSS MB |",
              "|---|---|---|---|---|---|---|"]
    for n, s in r["references"].items():
        lines.append(f"| {int(n):,} | {s['cells']:,} | {s['index'].get('kind')} | {s['build_seconds']:,.1f} | {s['save_seconds']:.1f} | {s['size_mb']:,.0f} | {s['peak_rss_mb']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from run import machine_name, write_results
    from synthetic import random_model, write_csr_h5ad, write_onnx

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the benchmark runs")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    sizes, query, rounds = ((3_000, 12_000), 2_000, 1) if args.smoke else ((100_000, 1_000_000), 20_000, 3)
    genes = [f"G{i}" for i in range(2_000 if args.smoke else 28_231)]
    results = {"machine": machine_name(), "date": time.strftime("%Y-%m-%d"), "query_cells": query, "rounds": rounds,
               "command": "python benchmarks/reference_speed.py" + (" --smoke" if args.smoke else "")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_onnx(*random_model(genes), tmp / "model.onnx")[1]
        results["references"] = {}
        for n in sizes:
            print(f"building a reference of {n:,} cells", flush=True)
            results["references"][str(n)] = build_reference(model, genes, n, tmp)
        h5ad = str(tmp / "query.h5ad")
        write_csr_h5ad(h5ad, genes, query, seed=1)
        results["annotate"] = side_by_side(h5ad, model, {n: results["references"][str(n)] for n in sizes}, tmp, rounds)
    print(write_results(results, Path(args.out), args.smoke, "reference-speed", markdown))
    return results


if __name__ == "__main__":
    main()
