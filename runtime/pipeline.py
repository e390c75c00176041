"""One annotation run: its rules and columns derived once, the block loop, majority voting and the report.

scl-annotate (file_driver.py), `Annotator.annotate` (annotator.py) and scl-serve (serve.py) are drivers: each opens an
ExpressionSource, builds a Pipeline and hands `run` a sink, an object with

    write(block)                   each AnnotatedBlock, in cell order
    add_columns(columns, values)   columns computed over every cell (majority voting)
    close(report) / abort()        the run's RunReport at the end, or its failure
    output                         what the report names as the output (a path, or None)

The sinks are the CSV and h5ad writers (outputs.py), the in-memory result (result.ResultSink) and the server's JSON
(serve.RequestCells). A new output is a new sink; a new column is calls.py.

Blocks run in parallel one-thread onnxruntime runs (it releases the GIL): on 2 cores this measured 1.3-1.4x one
reader thread feeding one two-thread run, since a two-thread matmul stalls whenever the reader takes one of its
cores, while independent runs just share them. At most threads + 1 blocks are in memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from . import voting
from .calls import COLUMNS, REASON_CATEGORIES, VOTING_COLUMNS, CallRules, Calls, call_cells, columns_for, kept_labels, label_names, restricted
from .errors import SclError
from .expression import ExpressionSource
from .reference import as_reference
from .run_report import RunReport, head_genes_report, head_genes_warning, neighbours_report, novelty_report, prediction_set_report, unassigned_report
from .result import BlockCollector
from .session import ENCODER_ONLY, Prediction

log = logging.getLogger("scl")


@dataclass
class AnnotatedBlock:
    cell_ids: np.ndarray
    calls: Calls
    embedding: np.ndarray
    probabilities: np.ndarray


@dataclass
class RunTally:
    """What the report says about a run, counted block by block."""

    labels: Counter = field(default_factory=Counter)
    cells: int = 0
    novel: int = 0
    set_sizes: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)  # unassigned cells per reason (calls.REASONS)
    knn_labels: Counter = field(default_factory=Counter)  # with a reference
    knn_agree: int = 0
    knn_novel: int = 0

    def add(self, block: AnnotatedBlock, classes: list[str]) -> None:
        calls = block.calls
        self.cells += len(block.cell_ids)
        if "label" in calls:  # a head's calls
            self.labels.update(label_names(classes, calls["label"]))
            self.reasons.update(REASON_CATEGORIES[code] for code in calls["unassigned_reason"][calls["label"] < 0])
        self.novel += int(calls["novel"].sum()) if "novel" in calls else 0
        if "set_size" in calls:
            self.set_sizes.update(calls["set_size"].tolist())
        if "knn_label" in calls:
            self.knn_labels.update(calls["knn_label"].tolist())
            self.knn_agree += int(calls["knn_agrees"].sum()) if "knn_agrees" in calls else 0
            self.knn_novel += int(calls["knn_novel"].sum()) if "knn_novel" in calls else 0


def in_submission_order(futures, in_flight: int):
    """Each future's result in the order submitted, drawing from `futures` (a lazy iterable that submits as it goes)
    while fewer than `in_flight` are pending; those still pending are cancelled if the consumer stops early or one
    fails. Works for concurrent.futures (Pipeline.blocks) and dask.distributed futures (on_dask.py) alike."""
    pending = deque()
    try:
        for future in futures:
            pending.append(future)
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


class Pipeline:
    """The rules, columns and loop of one run over one source.

    Parameters
    ----------
    annotator
        The `Annotator` whose model calls the cells.
    options
        The run's `AnnotateOptions` (checked against the model here, once).
    genes_shown
        How many of the model's genes the input holds (what min_cell_genes scales with); None: all of them.
    predict
        Rows -> Prediction; default the annotator's own session (the server passes its micro-batcher).

    Examples
    --------
    >>> with annotator.open("big.h5ad") as source:
    ...     pipeline = Pipeline(annotator, AnnotateOptions(), source.alignment.matched)
    ...     for block in pipeline.blocks(source):
    ...         print(block.cell_ids[0], block.calls["label"][0])
    """

    def __init__(self, annotator, options, genes_shown: int | None = None, predict: Callable[[np.ndarray], Prediction] | None = None):
        self.annotator, self.options = annotator, options
        self.classes = annotator.classes
        self.rules: CallRules = annotator.rules(options, genes_shown)
        self.headless = annotator.session.encoder_only  # a base without a head: the reference's neighbours alone call cells
        self.columns = [c for c in COLUMNS if c.name == "genes_detected"] if self.headless else columns_for(self.rules)
        self.reference = as_reference(options.reference)
        if self.reference is not None:
            self.reference.check_model(annotator)
            self.columns += self.reference.columns(with_head=not self.headless)
            self.reference_kept = kept_labels(self.reference.labels, options.restrict_to, options.exclude, f"the reference {self.reference.path}")
        self.predict = predict or annotator.predict

    def annotate_block(self, source: ExpressionSource, ids, raw, buffer: np.ndarray | None = None) -> AnnotatedBlock:
        """One block as read: checked, aligned, normalised on its nonzeros (log1p CP10k), run and called."""
        pred = restricted(self.predict(source.dense(raw, normalise=True, buffer=buffer, cell_ids=ids)), self.rules.kept)
        if self.headless:
            calls = {"genes_detected": source.genes_detected(raw).astype(np.int32)}
        else:
            calls = call_cells(pred, self.annotator.session.centroids, self.rules, self.classes, source.genes_detected(raw))
        if self.reference is not None:
            head = None if self.headless else np.asarray(self.classes, dtype=object)[pred.probabilities.argmax(axis=1)]
            calls |= self.reference.calls(pred.embedding, self.options.k, self.rules.novelty_alpha, head, self.reference_kept)
        return AnnotatedBlock(ids, calls, pred.embedding, pred.probabilities)

    def blocks(self, source: ExpressionSource):
        """AnnotatedBlock per block of `source`, in order, annotated `annotator.workers` at a time."""
        local = threading.local()  # one dense buffer per worker, reused: fresh 30 MB arrays would page-fault each time

        def annotate(ids, raw):
            if not hasattr(local, "buffer"):
                local.buffer = source.block_buffer()
            return self.annotate_block(source, ids, raw, local.buffer)

        workers = self.annotator.workers
        with ThreadPoolExecutor(max_workers=workers) as pool:
            yield from in_submission_order((pool.submit(annotate, ids, raw) for ids, raw in source.raw_blocks()), workers + 1)

    def run(self, source: ExpressionSource, sink, clusters=None, desc: str = "scl", started: float | None = None, blocks=None) -> RunReport:
        """Every block of `source` into `sink`, then majority voting (when the options ask for it: over `clusters`,
        one id per cell, else an automatic over-clustering) and the report, which the sink receives on close.
        `blocks`: the AnnotatedBlocks made elsewhere, in cell order (a dask cluster's: on_dask.py); default
        self.blocks(source)."""
        started = time.perf_counter() if started is None else started
        if self.headless and self.reference is None:
            raise SclError(f"{self.annotator.session.path} {ENCODER_ONLY}: annotate with a "
                           "reference (scl-reference build), or train a head with scl-train and export the run.", "reference")
        options, tally = self.options, RunTally()
        warning = head_genes_warning(self.head_genes(source), source.path)
        if warning:
            log.warning(warning)
        own = BlockCollector(source.n_cells, on_disk=("embedding",)) if options.voting_wanted and getattr(sink, "collector", None) is None else None
        bar = tqdm(total=source.n_cells, desc=desc, unit="cells", disable=not options.progress, leave=False)
        try:
            for block in self.blocks(source) if blocks is None else blocks:
                sink.write(block)
                tally.add(block, self.classes)
                if own is not None:
                    own.add({"label": block.calls["label"]} | ({"embedding": block.embedding} if clusters is None else {}))
                bar.update(len(block.cell_ids))
            bar.close()
            votes = None
            if options.voting_wanted:
                kept = (own or sink.collector).arrays()
                votes = voting.vote(label_names(self.classes, kept["label"]), kept.get("embedding"), clusters, options.min_share)
                sink.add_columns(list(VOTING_COLUMNS), votes)
            report = self.report(source, tally, time.perf_counter() - started, sink.output, votes)
            sink.close(report)
        except BaseException:
            bar.close()
            sink.abort()
            raise
        finally:
            if own is not None:
                own.close()
        return report

    def head_genes(self, source: ExpressionSource) -> dict:
        return head_genes_report(self.annotator.session.meta.get("head_genes", []), source.alignment.missing_model_genes)

    def report(self, source: ExpressionSource, tally: RunTally, seconds: float, output: str | None, votes: dict | None) -> RunReport:
        """The run's summary, as scl-annotate's --report and uns['scl'] hold it."""
        annotator, options, rules = self.annotator, self.options, self.rules
        model = annotator.session.describe() | {"notes": annotator.session.notes, "parallel_blocks": annotator.workers}
        model.pop("classes")
        described = source.describe()
        described["genes"] |= self.head_genes(source)
        return RunReport(
            input=described, output=output,
            majority_voting=None if votes is None else voting.summary(votes, options.over_clustering, options.min_share),
            novelty=novelty_report(options, rules, tally.novel), unassigned=unassigned_report(rules, tally.reasons, source.alignment.matched),
            prediction_sets=prediction_set_report(rules, tally.set_sizes, len(self.classes)),
            restriction=({"restrict_to": list(options.restrict_to)} if options.restrict_to else {"exclude": list(options.exclude)} if options.exclude else None),
            neighbours=None if self.reference is None else neighbours_report(self.reference, options.k, rules.novelty_alpha, tally, self.headless),
            model=model, cells=tally.cells, labels=dict((tally.knn_labels if self.headless else tally.labels).most_common()), min_confidence=options.min_confidence,
            min_cell_genes=rules.min_cell_genes, seconds=round(seconds, 3),
            cells_per_second=round(tally.cells / seconds, 1) if seconds > 0 else None)
