"""Which approximate-nearest-neighbour library scl's references use: hnswlib, faiss-cpu and usearch side by side on
this machine, against exact search (numpy), at 100k and 1M reference cells.

    python benchmarks/ann_libraries.py                 # 100,000 and 1,000,000 cells
    python benchmarks/ann_libraries.py --smoke         # 2,000 cells, hnswlib alone (the tests)

The candidates come with the bench extra (faiss-cpu, usearch; hnswlib is scl[reference]). Writes
benchmarks/results/<machine>-ann.json and .md.

The embedding is synthetic at SCimilarity's size (128 dimensions, L2-normalised) and clustered as cells are: 200
"cell types", each a direction on the sphere, cells scattered about it (cosine ~0.8 to their centre), so that many
neighbours sit at nearly the same distance, which is what makes recall@50 hard. Queries are new cells from the same
types. Every library builds an HNSW graph with the same settings (M 32, ef_construction 200, cosine / inner product on
unit vectors, 2 threads) in a process of its own; peak RSS is the growth beyond the vectors themselves. Recall@50 is
the share of the exact 50 nearest (numpy, float32) each search returns, at several ef (search breadth).
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
DIM, TYPES, K, M, EF_CONSTRUCTION, THREADS = 128, 200, 50, 32, 200, 2
EFS = (64, 128, 256)

CHILD = """
import json, os, sys, time
import numpy as np

def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

library, ref_path, query_path, truth_path = sys.argv[1:5]
M, EFC, K, THREADS, EFS = int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8]), int(sys.argv[9]), [int(e) for e in sys.argv[10].split(",")]
ref, queries, truth = np.load(ref_path), np.load(query_path), np.load(truth_path)
n, dim = ref.shape
before = status_mb("VmRSS")
t = time.perf_counter()
if library == "hnswlib":
    import hnswlib
    index = hnswlib.Index(space="cosine", dim=dim)
    index.init_index(max_elements=n, M=M, ef_construction=EFC)
    index.add_items(ref, np.arange(n), num_threads=THREADS)
    def search(ef):
        index.set_ef(ef)
        return index.knn_query(queries, k=K, num_threads=THREADS)[0]
    def save(path):
        index.save_index(path)
elif library == "faiss":
    import faiss
    faiss.omp_set_num_threads(THREADS)
    index = faiss.IndexHNSWFlat(dim, M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EFC
    index.add(ref)
    def search(ef):
        index.hnsw.efSearch = ef
        return index.search(queries, K)[1]
    def save(path):
        faiss.write_index(index, path)
elif library == "usearch":
    from usearch.index import Index
    index = Index(ndim=dim, metric="cos", dtype="f32", connectivity=M, expansion_add=EFC)
    index.add(np.arange(n), ref, threads=THREADS)
    def search(ef):
        index.expansion_search = ef
        return index.search(queries, K, threads=THREADS).keys
    def save(path):
        index.save(path)
build = time.perf_counter() - t
rows = []
for ef in EFS:
    search(ef)  # warm
    t = time.perf_counter()
    found = np.asarray(search(ef))
    seconds = time.perf_counter() - t
    recall = np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(found, truth)])
    rows.append({"ef": ef, "recall_at_50": round(float(recall), 4), "query_cells_per_second": round(len(queries) / seconds, 1)})
path = ref_path + "." + library
save(path)
print(json.dumps({"library": library, "cells": n, "build_seconds": round(build, 1), "peak_growth_mb": round(status_mb("VmHWM") - before, 1),
                  "index_mb": round(os.path.getsize(path) / 1024**2, 1), "searches": rows}))
os.remove(path)
"""


def clustered_cells(n: int, centres: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        x = centres[rng.integers(len(centres), size=stop - start)] + rng.normal(scale=0.75 / np.sqrt(DIM), size=(stop - start, DIM))
        out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_neighbours(ref: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """The exact k nearest by cosine (numpy) and the query cells/s it ran at."""
    t = time.perf_counter()
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 256):
        scores = queries[start:start + 256] @ ref.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        out[start:start + 256] = top
    return out, len(queries) / (time.perf_counter() - t)


def installed_mb(package: str) -> float | None:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(package)
    except PackageNotFoundError:
        return None
    return round(sum(Path(dist.locate_file(f)).stat().st_size for f in dist.files if Path(dist.locate_file(f)).exists()) / 1024**2, 1)


def one_size(n: int, queries: int, tmp: Path, libraries: list[str]) -> dict:
    centres = clustered_cells(TYPES, np.random.default_rng(99).normal(size=(TYPES, DIM)).astype(np.float32), 1) * 3
    ref, query = clustered_cells(n, centres, 2), clustered_cells(queries, centres, 3)
    truth, exact_rate = exact_neighbours(ref, query, K)
    paths = [str(tmp / f"{name}.npy") for name in ("ref", "query", "truth")]
    for path, array in zip(paths, (ref, query, truth)):
        np.save(path, array)
    del ref
    rows = {"cells": n, "queries": queries, "exact_numpy": {"query_cells_per_second": round(exact_rate, 1)}, "libraries": []}
    print(f"  exact (numpy) at {n:,} cells: {exact_rate:,.0f} query cells/s", flush=True)
    for library in libraries:
        print(f"  {library} at {n:,} cells", flush=True)
        done = subprocess.run([sys.executable, "-c", CHILD, library, *paths, str(HERE), str(M), str(EF_CONSTRUCTION), str(K), str(THREADS),
                               ",".join(map(str, EFS))], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{library} failed: {done.stderr.strip()[-2000:]}")
        rows["libraries"].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def table(results: dict) -> str:
    lines = [f"Machine {results['machine']}, {results['date']}; `{results['command']}`.", "",
             f"Synthetic clustered embedding ({DIM} dims, {TYPES} types), HNSW M {M}, ef_construction {EF_CONSTRUCTION}, "
             f"{THREADS} threads; recall@{K} against exact numpy search.", "",
             "| reference cells | library | build s | peak growth MB | index MB | ef | recall@50 | query cells/s |", "|---|---|---|---|---|---|---|---|"]
    for size in results["sizes"]:
        lines.append(f"| {size['cells']:,} | exact (numpy) | 0 | - | {size['cells'] * DIM * 4 / 1024**2:.0f} | - | 1.0000 | {size['exact_numpy']['query_cells_per_second']:,.0f} |")
        for lib in size["libraries"]:
            for s in lib["searches"]:
                lines.append(f"| {size['cells']:,} | {lib['library']} | {lib['build_seconds']} | {lib['peak_growth_mb']:,.0f} | {lib['index_mb']:,.0f} | "
                             f"{s['ef']} | {s['recall_at_50']:.4f} | {s['query_cells_per_second']:,.0f} |")
    lines += ["", "| library | version | installed MB (with its own dependencies, not numpy) |", "|---|---|---|"]
    for name, info in results["installs"].items():
        lines.append(f"| {name} | {info['version']} | {info['mb']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from importlib.metadata import version

    from run import machine_name, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="reference cells, comma-separated")
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--libraries", default="hnswlib,faiss,usearch")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--smoke", action="store_true", help="2,000 cells, 200 queries, hnswlib alone")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.queries, args.libraries = "2000", 200, "hnswlib"
    libraries = args.libraries.split(",")
    dists = {"hnswlib": ["hnswlib"], "faiss": ["faiss-cpu"], "usearch": ["usearch", "numkong"]}
    installs = {lib: {"version": version(dists[lib][0]), "mb": round(sum(installed_mb(d) or 0 for d in dists[lib]), 1)} for lib in libraries}
    results = {"machine": machine_name(), "date": time.strftime("%Y-%m-%d"), "installs": installs, "sizes": [],
               "command": "python benchmarks/ann_libraries.py" + (" --smoke" if args.smoke else "")}
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, args.sizes.split(",")):
            results["sizes"].append(one_size(n, args.queries, Path(tmp), libraries))
    print(write_results(results, Path(args.out), args.smoke, "ann", table))
    return results


if __name__ == "__main__":
    main()
