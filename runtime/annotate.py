"""Annotate one input file into one output file, streaming blocks of cells through the model.

The next block is read and aligned in a second thread while the current one runs in onnxruntime
(which releases the GIL), so reading costs little on top of inference.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .atomic import atomic_path
from .errors import InputError
from .expression import ExpressionFile, ReadOptions
from .labels import call_cells, label_names
from .outputs import CsvOutput, H5adOutput
from .session import AnnotationSession
from .text_matrix import is_text_matrix


@dataclass
class AnnotateOptions:
    min_confidence: float = 0.0
    probabilities: bool = False
    progress: bool = True


def prefetched(iterator):
    """Yield the items of `iterator`, producing the next one in a worker thread meanwhile."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(next, iterator, None)
        while (item := future.result()) is not None:
            future = pool.submit(next, iterator, None)
            yield item


def check_output_path(input_path: str, output: str) -> None:
    out = Path(output)
    if out.exists() and os.path.samefile(input_path, out):
        raise InputError(f"{output}: the output would overwrite the input; choose another --output.")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: the output folder does not exist; create it or choose another --output.")
    if not os.access(out.parent, os.W_OK):
        raise InputError(f"{out.parent}: the output folder is not writable; choose another --output.")
    if not output.endswith((".csv", ".h5ad")):
        raise InputError(f"{output}: the output must end in .csv or .h5ad.")


def annotate_file(input_path: str, output: str, session: AnnotationSession, read: ReadOptions, options: AnnotateOptions) -> dict:
    check_output_path(input_path, output)
    started = time.perf_counter()
    with ExpressionFile(input_path, session.gene_order, read) as source, atomic_path(output, suffix=Path(output).suffix) as tmp:
        if output.endswith(".h5ad"):
            writer = H5adOutput(tmp, None if is_text_matrix(input_path) else input_path, session.classes, session.centroids.shape[1], options.probabilities)
        else:
            writer = CsvOutput(tmp, session.classes, options.probabilities)
        counts, n = Counter(), 0
        lognorm = source.input_kind == "lognorm"
        bar = tqdm(total=source.n_cells, desc=Path(input_path).name, unit="cells", disable=not options.progress, leave=False)
        for ids, x in prefetched(source.blocks(normalise=False, reuse_buffers=True)):
            pred = session.predict(x, is_lognorm=lognorm)
            calls = call_cells(pred, session.centroids, options.min_confidence)
            writer.write(ids, calls, pred.embedding, pred.probabilities)
            counts.update(label_names(session.classes, calls.label))
            n += len(ids)
            bar.update(len(ids))
        bar.close()
        seconds = time.perf_counter() - started
        report = {
            "input": source.describe(),
            "output": output,
            "model": session.describe() | {"notes": session.notes},
            "cells": n,
            "labels": dict(counts.most_common()),
            "min_confidence": options.min_confidence,
            "seconds": round(seconds, 3),
            "cells_per_second": round(n / seconds, 1) if seconds > 0 else None,
        }
        report["model"].pop("classes")
        writer.close(report)
    return report
