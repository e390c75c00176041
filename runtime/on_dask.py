"""Annotation on a dask.distributed cluster: one task per range of cells, the results back in cell order into the one
Pipeline (its tally, voting, report and sink, as a local run).

The caller opens the input as every driver does: its first block judges the input kind, the genes are aligned, the
ids checked. Each task then reads its own cells on a worker (an .h5ad's rows, read there: h5py files cannot be shared
between processes; or one row chunk of a dask array, which dask computes there) and annotates them with that worker
process's Annotator, opened once and kept, keyed by the model's content digest: the model is never pickled into tasks.
What every task shares (model path, options, the judged input kind, gene names) is sent to each worker once.

A worker that dies mid-run loses its tasks; dask.distributed runs them again elsewhere (up to its
`distributed.scheduler.allowed-failures`, 3), so the output is whole and in order. An error in a task (a NaN naming
its cell, a model missing on a worker) stops the run as it stops a local one: the output is not written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np

from .errors import SclError
from .pipeline import in_submission_order

TASK_CELLS = 20_000  # cells per task of a file: tasks of seconds (about 4 s at 5,000 cells/s a core), few enough to schedule
_ANNOTATORS: dict = {}  # per worker process: (model path, digest, device) -> Annotator
_PIPELINES: OrderedDict = OrderedDict()  # per worker process: job key -> Pipeline (the last few runs)
_OPENING = threading.Lock()
_LOCAL = threading.local()  # per worker thread: the dense block buffer


def distributed_module():
    try:
        import distributed
    except ImportError:
        raise SclError("annotating on a dask cluster needs dask.distributed: pip install 'scl[dask]'.", "dask") from None
    return distributed


def active_client():
    """The caller's dask.distributed Client, if one is active; None otherwise (or without distributed)."""
    try:
        from distributed import get_client
    except ImportError:
        return None
    try:
        return get_client()
    except ValueError:  # no client
        return None


@contextlib.contextmanager
def connect(spec: str):
    """A Client for `--dask`: "local:N" starts a LocalCluster of N one-thread worker processes (closed after),
    anything else is a scheduler's address (tcp://host:8786)."""
    distributed = distributed_module()
    if spec.startswith("local:"):
        try:
            n = int(spec.removeprefix("local:"))
        except ValueError:
            n = 0
        if n < 1:
            raise SclError(f"--dask {spec!r}: write local:N with N >= 1 worker processes, or a scheduler address such as tcp://host:8786.")
        with distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                                      silence_logs=logging.CRITICAL) as cluster, distributed.Client(cluster) as client:
            yield client
        return
    try:
        client = distributed.Client(spec, timeout="20s")
    except (OSError, ValueError, TimeoutError) as err:
        raise SclError(f"--dask {spec!r}: no dask scheduler answered there ({err}); start one (dask scheduler) or use local:N.") from None
    with client:
        yield client


@dataclass
class DaskJob:
    """What every task of one run shares, sent once to each worker."""

    key: str
    model: str
    digest: str
    device: str
    options: object  # AnnotateOptions, the reference as a path
    read: object  # ReadOptions with the input kind judged by the caller
    genes: np.ndarray | None  # gene names of in-memory chunks (None: files, which hold their own)
    genes_shown: int


def make_job(annotator, options, source) -> DaskJob:
    from .reference import as_reference, model_digest

    reference = as_reference(options.reference)
    if reference is not None and reference.path is None:
        raise SclError("a reference built in memory cannot be sent to dask workers; save it (reference.save('atlas.sclref')) and pass its path.",
                       "reference")
    read = replace(source.options, input_kind=source.input_kind, check_kind=True, rows=None, cell_names=None)
    if not source.is_file:  # chunks travel without var: their genes go as the symbols the caller resolved
        read = replace(read, gene_column=None)
    worker_options = replace(options, reference=None if reference is None else os.path.abspath(reference.path), progress=False,
                             majority_voting=False, over_clustering=None)
    genes = None if source.is_file else np.asarray(source.gene_symbols, dtype=object)
    device = "cuda" if annotator.session.provider == "CUDAExecutionProvider" else "cpu"
    return DaskJob(uuid.uuid4().hex, os.path.abspath(annotator.session.path), model_digest(annotator), device, worker_options, read, genes,
                   source.alignment.matched)


def worker_pipeline(job: DaskJob):
    """This worker process's Pipeline for the job, over its Annotator (one per model, kept across runs)."""
    with _OPENING:  # dask's threaded scheduler runs tasks in threads of one process: one Annotator per model there too
        return _pipeline_for(job)


def _pipeline_for(job: DaskJob):
    from .annotator import Annotator
    from .pipeline import Pipeline
    from .reference import model_digest

    if job.key not in _PIPELINES:
        at = (job.model, job.digest, job.device)
        if at not in _ANNOTATORS:
            annotator = Annotator(job.model, device=job.device, threads=1)
            if model_digest(annotator) != job.digest:
                raise SclError(f"{job.model} on this dask worker is not the caller's model (its digest differs); give every worker the same file.", "model")
            _ANNOTATORS[at] = annotator
        _PIPELINES[job.key] = Pipeline(_ANNOTATORS[at], job.options, job.genes_shown)
        while len(_PIPELINES) > 4:
            _PIPELINES.popitem(last=False)
    return _PIPELINES[job.key]


def annotate_cells(job: DaskJob, data, start: int, stop: int, cell_ids=None):
    """A task: cells start..stop-1 of a file (`data` its path) or one chunk of a dask array (`data` the chunk, with its
    `cell_ids`), annotated block by block on this worker; one AnnotatedBlock."""
    from .expression import ExpressionSource
    from .in_memory import MemoryMatrix

    pipeline = worker_pipeline(job)
    genes = pipeline.annotator.session.gene_order
    if isinstance(data, str):
        source = ExpressionSource(data, genes, replace(job.read, rows=(start, stop)))
    else:
        source = ExpressionSource(MemoryMatrix(data, job.genes, cell_ids, name="dask chunk"), genes, job.read)
    with source:
        buffer = _block_buffer(source)
        return joined([pipeline.annotate_block(source, ids, raw, buffer) for ids, raw in source.raw_blocks()])


def _block_buffer(source):
    """This worker thread's dense block buffer, kept across tasks: a fresh 29 MB array per block of 256 cells
    page-faults in every time (measured: 6 s of system time over 200,000 cells on two workers)."""
    wanted = source.options.batch_size * source.alignment.n_model_genes
    if getattr(_LOCAL, "buffer", None) is None or len(_LOCAL.buffer) != wanted:
        _LOCAL.buffer = source.block_buffer()
    return _LOCAL.buffer


def joined(blocks: list):
    from .pipeline import AnnotatedBlock

    if len(blocks) == 1:
        return blocks[0]
    return AnnotatedBlock(np.concatenate([b.cell_ids for b in blocks]), {name: np.concatenate([b.calls[name] for b in blocks]) for name in blocks[0].calls},
                          np.concatenate([b.embedding for b in blocks]), np.concatenate([b.probabilities for b in blocks]))


def in_flight(client) -> int:
    """Tasks kept in flight: twice the cluster's threads, so that every worker has the next task queued."""
    return max(2, 2 * sum(client.nthreads().values()))


def file_blocks(client, annotator, source, options, task_cells: int | None = None):
    """The AnnotatedBlocks of an .h5ad / zarr file, each range of `task_cells` cells read and annotated on a worker."""
    from .h5ad import H5adFile, row_ranges

    if not isinstance(source.matrix, H5adFile):
        raise SclError(f"{source.path}: dask workers read .h5ad files and anndata zarr stores by row ranges; convert this file to .h5ad first.", "dask")
    if source.matrix.matrix.format == "csc_matrix":
        raise SclError(f"{source.path}: {source.matrix_name} is stored by genes (CSC), which every worker would have to read whole; "
                       "save it as CSR once (adata.X = adata.X.tocsr(); adata.write_h5ad(...)).", "dask")
    job = client.scatter(make_job(annotator, options, source), broadcast=True)
    path = os.path.abspath(source.path)
    batch = source.options.batch_size  # tasks start on block boundaries: int8's per-block input scale then sees the plain run's blocks
    ranges = row_ranges(source.n_cells, max(batch, round((task_cells or TASK_CELLS) / batch) * batch))
    return in_submission_order((client.submit(annotate_cells, job, path, a, b, pure=False) for a, b in ranges), in_flight(client))


def array_blocks(client, annotator, source, options):
    """The AnnotatedBlocks of an in-memory source over a dask array, one task per row chunk, computed on the cluster."""
    job = client.scatter(make_job(annotator, options, source), broadcast=True)
    x, ids = source.matrix.x, source.cell_ids
    bounds = np.cumsum((0,) + x.chunks[0])

    def submit(i):
        a, b = int(bounds[i]), int(bounds[i + 1])
        return client.submit(annotate_cells, job, client.compute(x.blocks[i]), a, b, ids[a:b], pure=False)

    return in_submission_order((submit(i) for i in range(x.numblocks[0])), in_flight(client))
