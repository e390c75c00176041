"""How fast training could read its cells from an .h5ad instead of memory: cells/s of row reads in the orders a
streamed loader would use, beside scl-train's training rate (for issue 25's streamed cells; nothing streams yet).

    python benchmarks/row_reads.py            # 100,000 cells x 28,231 genes, 2,500 detected each (a 2 GB file)
    python benchmarks/row_reads.py --smoke

Writes benchmarks/results/<machine>-row-reads.json and .md. Each order reads through runtime/h5ad.py (`rows`,
`rows_at`) and makes the dense float32 rows a training step takes. Orders: sequential blocks of 256 (an embedding
pass); batches of 64 cells drawn at random over the whole file (what a shuffled loader asks for); block shuffling
(scDataset's scheme: contiguous blocks of B cells at random places, 4,096 cells fetched at once, then shuffled in memory).
The page cache is dropped before each order where this process may (root; not with --smoke); otherwise the file is warm
and the table says so.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
FETCH = 4096


def drop_page_cache() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def rate(matrix, batches, n_genes: int, seconds: float) -> float:
    """Cells/s reading `batches` (arrays of positions, or (start, stop)) to dense float32 for up to `seconds`."""
    cells, started = 0, time.perf_counter()
    for batch in batches:
        rows = matrix.rows(*batch) if isinstance(batch, tuple) else matrix.rows_at(batch)
        dense = rows.to_scipy(n_genes).toarray().astype(np.float32, copy=False)
        cells += dense.shape[0]
        if time.perf_counter() - started > seconds:
            break
    return cells / (time.perf_counter() - started)


def shuffled_blocks(n: int, block: int, rng):
    """Endless fetches: FETCH cells (or half the file) as contiguous blocks of `block` cells at random places."""
    fetch = min(FETCH, n // 2)
    while True:
        starts = rng.choice(n // block, fetch // block, replace=False) * block
        yield (starts[:, None] + np.arange(block)).ravel()


def random_batches(n: int, rng):
    while True:
        yield np.sort(rng.choice(n, 64, replace=False))


def orders(n: int, rng):
    yield "sequential blocks of 256", ((s, min(s + 256, n)) for s in range(0, n, 256))
    yield "random batches of 64 over the file", random_batches(n, rng)
    for block in (16, 64, 256):
        yield f"block shuffling, blocks of {block}", shuffled_blocks(n, block, rng)


def main(argv=None) -> dict:
    from run import machine_name, write_results
    from synthetic import write_csr_h5ad

    from scl.runtime.h5ad import H5adFile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each order reads")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    n_cells, n_genes, detected = (3_000, 2_000, 100) if args.smoke else (100_000, 28_231, 2_500)
    seconds = 1.0 if args.smoke else args.seconds
    rng = np.random.default_rng(0)
    results = {"machine": machine_name(), "date": str(date.today()), "command": "python benchmarks/row_reads.py" + (" --smoke" if args.smoke else ""),
               "cells": n_cells, "genes": n_genes, "detected": detected, "orders": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cells.h5ad"
        write_csr_h5ad(path, [f"G{i}" for i in range(n_genes)], n_cells, detected=detected)
        results["file_mb"] = round(path.stat().st_size / 1e6)
        for name, batches in orders(n_cells, rng):
            cold = not args.smoke and drop_page_cache()  # the smoke run (in the tests) leaves the machine's cache alone
            matrix = H5adFile(str(path))
            results["orders"][name] = {"cells_per_s": round(rate(matrix.matrix, batches, n_genes, seconds)), "page_cache_dropped": cold}
            matrix.close()
            print(name, results["orders"][name], flush=True)
    print(write_results(results, args.out, args.smoke, "row-reads", table))
    return results


def table(r: dict) -> str:
    lines = [f"Machine {r['machine']}, {r['date']}; `{r['command']}`. {r['cells']:,} cells x {r['genes']:,} genes, CSR .h5ad of "
             f"{r['file_mb']:,} MB, {r['detected']:,} detected genes per cell; read through runtime/h5ad.py to dense float32.", "",
             "| order | cells/s | page cache dropped first |", "|---|---|---|"]
    lines += [f"| {name} | {o['cells_per_s']:,} | {'yes' if o['page_cache_dropped'] else 'no (warm)'} |" for name, o in r["orders"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
