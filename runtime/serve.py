"""scl's HTTP service: the annotation model behind FastAPI, on the same code path as scl-annotate.

Requests are aligned with genes.align_genes/aligned_dense and normalised inside the ONNX graph, exactly
as files are; inference runs in a worker thread on one shared onnxruntime session, concurrent requests
micro-batched into one run.
"""

from __future__ import annotations

import asyncio
import math
from importlib.metadata import version
from typing import Literal

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field, field_validator, model_validator

from .errors import InputError
from .genes import align_genes, aligned_dense
from .labels import call_cells, label_names
from .normalize import check_values
from .session import AnnotationSession, Prediction

InputKind = Literal["counts", "lognorm"]


def _finite(values) -> None:
    bad = [v for v in values if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"values must be finite and non-negative (got {bad[0]})")


class Cell(BaseModel):
    expression: dict[str, float] = Field(description="gene symbol -> raw count (or log1p(CP10k) with input_kind='lognorm')", min_length=1)
    top_k: int = Field(3, ge=1, le=100)
    input_kind: InputKind = "counts"

    @field_validator("expression")
    @classmethod
    def _check(cls, v):
        _finite(v.values())
        return v


class Batch(BaseModel):
    """Either `cells` (one gene map per cell) or the columnar form: `genes` once and `values` per cell."""

    cells: list[dict[str, float]] | None = None
    genes: list[str] | None = None
    values: list[list[float]] | None = None
    cell_ids: list[str] | None = None
    top_k: int = Field(3, ge=1, le=100)
    input_kind: InputKind = "counts"

    @model_validator(mode="after")
    def _one_form(self):
        if (self.cells is None) == (self.genes is None):
            raise ValueError("give either 'cells' (a list of gene maps) or 'genes' with 'values'")
        if self.genes is not None:
            if self.values is None or any(len(row) != len(self.genes) for row in self.values):
                raise ValueError("'values' needs one row per cell with one number per entry of 'genes'")
            for row in self.values:
                _finite(row)
        else:
            for cell in self.cells:
                _finite(cell.values())
        n = len(self.cells if self.cells is not None else self.values)
        if self.cell_ids is not None and len(self.cell_ids) != n:
            raise ValueError(f"'cell_ids' has {len(self.cell_ids)} entries for {n} cells")
        return self


def _matrix(batch: Batch) -> tuple[list[str], np.ndarray]:
    if batch.genes is not None:
        return batch.genes, np.asarray(batch.values, dtype=np.float32).reshape(len(batch.values), len(batch.genes))
    genes = sorted({g for cell in batch.cells for g in cell})
    column = {g: i for i, g in enumerate(genes)}
    x = np.zeros((len(batch.cells), len(genes)), dtype=np.float32)
    for row, cell in enumerate(batch.cells):
        for gene, value in cell.items():
            x[row, column[gene]] = value
    return genes, x


class MicroBatcher:
    """Runs the cells of concurrent requests through onnxruntime together.

    One worker drains the queue: while a batch runs, new requests wait in the queue and the next run takes them all
    (up to max_cells). No timer, so a lone request is not delayed. Each single-cell run streams the whole first-layer
    weight matrix (~115 MB at SCimilarity's size), so batching is nearly free throughput under concurrency.
    """

    def __init__(self, session: AnnotationSession, max_cells: int = 2048):
        self.session = session
        self.max_cells = max_cells
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None

    async def predict(self, x: np.ndarray, is_lognorm: bool) -> Prediction:
        if self.worker is None or self.worker.done():
            self.queue = asyncio.Queue()
            self.worker = asyncio.get_running_loop().create_task(self._work())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((x, is_lognorm, future))
        return await future

    async def _work(self) -> None:
        while True:
            batch = [await self.queue.get()]
            cells = len(batch[0][0])
            while not self.queue.empty() and cells < self.max_cells:
                batch.append(self.queue.get_nowait())
                cells += len(batch[-1][0])
            for flag in (False, True):
                group = [item for item in batch if item[1] == flag and not item[2].done()]
                if group:
                    await self._run(group, flag)

    async def _run(self, group: list, is_lognorm: bool) -> None:
        try:
            pred = await run_in_threadpool(self.session.predict, np.concatenate([x for x, _, _ in group]), is_lognorm)
        except Exception as err:  # hand the error to every waiting request
            for _, _, future in group:
                if not future.done():
                    future.set_exception(err)
            return
        start = 0
        for x, _, future in group:
            stop = start + len(x)
            if not future.done():  # a request that timed out is no longer waiting
                future.set_result(Prediction(pred.probabilities[start:stop], pred.embedding[start:stop]))
            start = stop


def create_app(session: AnnotationSession, max_cells: int = 10000, max_body_bytes: int = 64 * 1024**2,
               timeout_s: float = 60.0, cors_origins: tuple[str, ...] = (), micro_batching: bool = True) -> FastAPI:
    app = FastAPI(title="scl annotation service", version=version("scl"), max_body_size=max_body_bytes,
                  description="Cell-type annotation with an scl ONNX model. Raw counts by default; input_kind='lognorm' for log1p(CP10k).")
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"], allow_headers=["*"])

    batcher = MicroBatcher(session)

    def align(genes: list[str], x: np.ndarray, input_kind: str):
        alignment = align_genes(genes, session.gene_order, min_overlap=1, sum_duplicates=input_kind == "counts", source="request")
        check_values(x, "request")
        return alignment, aligned_dense(x, alignment)

    def describe(pred: Prediction, alignment, x: np.ndarray, top_k: int, cell_ids) -> list[dict]:
        calls = call_cells(pred, session.centroids, novelty_limits=session.novelty_limits)
        known_limits = session.novelty_limits is not None
        labels = label_names(session.classes, calls.label)
        k = min(top_k, len(session.classes))
        order = np.argsort(-pred.probabilities, axis=1)[:, :k]
        matched = (alignment.model_index >= 0)
        results = []
        for i in range(len(x)):
            results.append({
                "cell_id": cell_ids[i] if cell_ids else None,
                "label": labels[i],
                "confidence": float(calls.confidence[i]),
                "top": [{"label": session.classes[j], "probability": float(pred.probabilities[i, j])} for j in order[i]],
                "novelty": float(calls.novelty[i]),
                "novel": bool(calls.novel[i]) if known_limits else None,  # beyond its label's novelty limit
                "genes_matched": int(np.count_nonzero(matched & (x[i] != 0))),
                "genes_sent": int(np.count_nonzero(x[i])),
            })
        return results

    async def annotate(genes, x, input_kind, top_k, cell_ids):
        alignment, aligned = await run_in_threadpool(align, genes, x, input_kind)
        if micro_batching:
            pred = await batcher.predict(aligned, input_kind == "lognorm")
        else:
            pred = await run_in_threadpool(session.predict, aligned, input_kind == "lognorm")
        return describe(pred, alignment, x, top_k, cell_ids)

    async def run(genes, x, input_kind, top_k, cell_ids=None) -> list[dict]:
        if len(x) > max_cells:
            raise HTTPException(413, f"{len(x)} cells in one request; the limit is {max_cells} (scl-serve --max-cells)")
        try:
            return await asyncio.wait_for(annotate(genes, x, input_kind, top_k, cell_ids), timeout_s)
        except InputError as err:
            raise HTTPException(422, str(err)) from None
        except asyncio.TimeoutError:
            raise HTTPException(504, f"inference took longer than {timeout_s} s; send fewer cells per request") from None

    @app.post("/predict", summary="Annotate one cell")
    async def predict(cell: Cell) -> dict:
        genes = list(cell.expression)
        x = np.asarray([list(cell.expression.values())], dtype=np.float32)
        return (await run(genes, x, cell.input_kind, cell.top_k))[0]

    @app.post("/predict_batch", summary="Annotate many cells (gene maps or columnar)")
    async def predict_batch(batch: Batch) -> dict:
        genes, x = _matrix(batch)
        return {"cells": await run(genes, x, batch.input_kind, batch.top_k, batch.cell_ids)}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "provider": session.provider}

    @app.get("/classes")
    async def classes() -> dict:
        return {"classes": session.classes}

    @app.get("/model")
    async def model() -> dict:
        import onnxruntime

        return session.describe() | {"notes": session.notes, "versions": {"scl": version("scl"), "onnxruntime": onnxruntime.__version__}}

    return app
