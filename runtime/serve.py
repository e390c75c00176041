"""scl's HTTP service: the annotation model behind FastAPI, on the annotation core that scl-annotate and `import scl` use.

A request becomes a block of cells (sparse for gene maps, so a request costs what it holds, not cells x every gene
named), then goes through exactly the steps a file does: values checked, input kind judged (or taken as stated),
genes aligned, counts normalised on their nonzeros: the pipeline (pipeline.py) runs each request in a thread of its
own, into the RequestCells sink, and the normalised rows of concurrent requests are micro-batched into one run of
the shared onnxruntime session. Cells expressing fewer of
the model's genes than min_cell_genes are 'unassigned', in requests as in files (`genes_detected` says how many). A
gene map lists only the genes detected in its cell, so the files' rule on how many of the model's genes the input's
columns cover does not apply to requests.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from typing import Annotated, Callable, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator
from scipy import sparse

from .annotator import AnnotateOptions, Annotator
from .calls import json_value
from .errors import SclError
from .expression import ReadOptions
from .genes import ENSEMBL_ID
from .in_memory import MemoryMatrix
from .pipeline import Pipeline
from .reference import DEFAULT_K
from .session import Prediction

InputKind = Literal["auto", "counts", "lognorm"]
Number = Annotated[float, Strict()]  # a JSON number: "5" and true are refused, not coerced
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the model reads float32: 1e308 would become infinite


def _check_values(values, names) -> None:
    """Refuse the first value that is not a finite, non-negative float32, naming where it is."""
    for name, value in zip(names, values):
        if not math.isfinite(value) or value < 0 or value > FLOAT32_MAX:
            raise ValueError(f"{name} is {value!r}: values must be finite, non-negative and at most {FLOAT32_MAX:.3g} (float32)")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field ("alhpa") is refused, not dropped
    top_k: int = Field(3, ge=1, le=100)
    input_kind: InputKind = Field("auto", description="auto: judged from the values as for files (integers: counts)")
    alpha: float | None = Field(None, gt=0, lt=1, description="error rate for prediction sets and novelty (calibrated models), e.g. 0.05")
    k: int | None = Field(None, ge=1, le=1000, description="reference cells that vote (servers started with --reference); default 50")
    restrict_to: list[str] | None = Field(None, min_length=1, description="labels to call (the head renormalised over them; only their reference cells vote)")
    exclude: list[str] | None = Field(None, min_length=1, description="labels never to call")


class Cell(Options):
    expression: dict[str, Number] = Field(description="gene symbol -> raw count (or log1p(CP10k) with input_kind='lognorm')", min_length=1)

    @field_validator("expression")
    @classmethod
    def _check(cls, v):
        _check_values(v.values(), (f"expression[{gene!r}]" for gene in v))
        return v


class Batch(Options):
    """Either `cells` (one gene map per cell) or the columnar form: `genes` once and `values` per cell."""

    cells: list[dict[str, Number]] | None = None
    genes: list[str] | None = None
    values: list[list[Number]] | None = None
    cell_ids: list[str] | None = None

    @model_validator(mode="after")
    def _one_form(self):
        if (self.cells is None) == (self.genes is None):
            raise ValueError("give either 'cells' (a list of gene maps) or 'genes' with 'values'")
        if self.genes is not None:
            if self.values is None or any(len(row) != len(self.genes) for row in self.values):
                raise ValueError("'values' needs one row per cell with one number per entry of 'genes'")
            for i, row in enumerate(self.values):
                _check_values(row, (f"values[{i}][{j}] ({gene!r})" for j, gene in enumerate(self.genes)))
        else:
            for i, cell in enumerate(self.cells):
                _check_values(cell.values(), (f"cells[{i}][{gene!r}]" for gene in cell))
        n = len(self.cells if self.cells is not None else self.values)
        if self.cell_ids is not None and len(self.cell_ids) != n:
            raise ValueError(f"'cell_ids' has {len(self.cell_ids)} entries for {n} cells")
        return self


BLOCK = 256  # cells per model run within a request: a 10,000-cell request never becomes one 1.1 GB dense block


def _gene_maps_to_rows(cells: list[dict[str, float]], known) -> tuple[list[str], sparse.csr_matrix, np.ndarray]:
    """Gene maps as CSR rows over the genes they name that `known` accepts, and each cell's count of nonzero genes
    sent: memory grows with the model's genes in the request, not with every name a client invents."""
    column: dict[str, int] = {}
    indices, data, indptr, sent = [], [], [0], []
    for cell in cells:
        for gene, value in cell.items():
            if value and known(gene):
                indices.append(column.setdefault(gene, len(column)))
                data.append(value)
        indptr.append(len(data))
        sent.append(sum(1 for v in cell.values() if v))
    rows = sparse.csr_matrix((np.asarray(data, np.float32), np.asarray(indices, np.int64), np.asarray(indptr, np.int64)), shape=(len(cells), len(column)))
    return list(column), rows, np.asarray(sent)


def _matrix(batch: Batch, known):
    if batch.genes is not None:
        x = np.asarray(batch.values, dtype=np.float32).reshape(len(batch.values), len(batch.genes))
        return batch.genes, x, np.count_nonzero(x, axis=1)
    return _gene_maps_to_rows(batch.cells, known)


class MicroBatcher:
    """Runs the cells of concurrent requests through onnxruntime together.

    One worker drains the queue: while a batch runs, new requests wait in the queue and the next run takes them all
    (up to max_cells). No timer, so a lone request is not delayed. Each single-cell run streams the whole first-layer
    weight matrix (~115 MB at SCimilarity's size), so batching is nearly free throughput under concurrency.
    """

    def __init__(self, annotator: Annotator, max_cells: int = 2048):
        self.annotator = annotator
        self.max_cells = max_cells
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        # its own thread: the requests' pipelines wait on it from threads of theirs, which must not starve it of one
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scl-batch")

    async def predict(self, rows: np.ndarray) -> Prediction:
        if self.worker is None or self.worker.done():
            self.queue = asyncio.Queue()
            self.worker = asyncio.get_running_loop().create_task(self._work())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((rows, future))
        return await future

    def predict_from_thread(self, loop: asyncio.AbstractEventLoop) -> Callable[[np.ndarray], Prediction]:
        """`predict` for a pipeline running in a worker thread: its rows join the loop's micro-batches."""
        return lambda rows: asyncio.run_coroutine_threadsafe(self.predict(rows), loop).result()

    async def _work(self) -> None:
        while True:
            batch = [await self.queue.get()]
            cells = len(batch[0][0])
            while not self.queue.empty() and cells < self.max_cells:
                batch.append(self.queue.get_nowait())
                cells += len(batch[-1][0])
            group = [item for item in batch if not item[1].done()]
            if group:
                await self._run(group)

    async def _run(self, group: list) -> None:
        try:
            rows = np.concatenate([x for x, _ in group])
            pred = await asyncio.get_running_loop().run_in_executor(self.executor, self.annotator.predict, rows)
        except Exception as err:  # hand the error to every waiting request
            for _, future in group:
                if not future.done():
                    future.set_exception(err)
            return
        start = 0
        for x, future in group:
            stop = start + len(x)
            if not future.done():  # a request that timed out is no longer waiting
                future.set_result(Prediction(pred.probabilities[start:stop], pred.embedding[start:stop]))
            start = stop


class RequestCells:
    """The server's sink (pipeline.py): each cell as /predict answers it, with its top_k types and the genes sent."""

    output, collector = None, None

    def __init__(self, classes: list[str], columns, top_k: int, sent: np.ndarray, cell_ids, cancelled: threading.Event):
        self.classes, self.columns, self.k = classes, columns, min(top_k, len(classes))
        self.sent, self.cell_ids, self.cancelled = sent, cell_ids, cancelled
        self.cells: list[dict] = []

    def write(self, block) -> None:
        if self.cancelled.is_set():
            raise TimeoutError("the request timed out")  # nobody waits for the answer any more
        probabilities, start = block.probabilities, len(self.cells)
        order = np.argsort(-probabilities, axis=1)[:, :self.k]
        for i in range(len(probabilities)):
            cell = {"cell_id": self.cell_ids[start + i] if self.cell_ids else None}
            cell |= {c.name: json_value(c, block.calls[c.name][i], self.classes) for c in self.columns}
            cell["top"] = [{"label": self.classes[j], "probability": float(probabilities[i, j])} for j in order[i]]
            cell["genes_sent"] = int(self.sent[start + i])
            self.cells.append(cell)

    def add_columns(self, columns, values) -> None:
        raise NotImplementedError("requests have no majority voting")

    def close(self, report) -> None:
        pass

    def abort(self) -> None:
        pass


PATH_KEYS = ("path", "base_model", "training_data")  # in /model and its model card: local paths, shown as file names


def without_paths(described: dict) -> dict:
    """/model without the server's file system: paths become file names (the digests identify the files)."""
    out = dict(described)
    out["model_card"] = dict(out.get("model_card") or {})
    for where in (out, out["model_card"]):
        for key in PATH_KEYS:
            if isinstance(where.get(key), str):
                where[key] = os.path.basename(where[key].rstrip("/"))
    return out


def create_app(annotator: Annotator, max_cells: int = 10000, max_body_bytes: int = 64 * 1024**2,
               timeout_s: float = 60.0, cors_origins: tuple[str, ...] = (), micro_batching: bool = True, show_paths: bool = False,
               reference=None) -> FastAPI:
    app = FastAPI(title="scl annotation service", version=version("scl"), max_body_size=max_body_bytes,
                  description="Cell-type annotation with an scl ONNX model. Raw counts or log1p(CP10k), judged from the values.")
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"], allow_headers=["*"])

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind and kind != "application/json" and not kind.endswith("+json"):  # FastAPI does not read such a body as JSON
            return JSONResponse(status_code=415, content={"detail": f"the body is sent as {kind}; send JSON with the header "
                                                                    "Content-Type: application/json"})
        # FastAPI's own reply echoes the input, which fails to serialise when it holds NaN or Infinity (a 500)
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": detail})

    batcher = MicroBatcher(annotator)
    requests = ThreadPoolExecutor(max_workers=32, thread_name_prefix="scl-request")  # each request's pipeline runs in one of these
    session = annotator.session

    def known(gene: str) -> bool:
        """A name that can reach a model gene: a symbol (exact or ignoring case) or an Ensembl ID (mapped later)."""
        return session.gene_order.find(gene)[0] is not None or bool(ENSEMBL_ID.match(gene))

    def answer(genes, x, sent, request: Options, cell_ids, predict, cancelled: threading.Event) -> list[dict]:
        """The request through the pipeline, as a file goes: values checked, input kind judged, genes aligned."""
        ids = cell_ids or [str(i) for i in range(x.shape[0])]
        if request.k is not None and reference is None:
            raise SclError("'k' asks for a vote of reference cells, and this server has none (scl-serve --reference).")
        options = AnnotateOptions(progress=False, alpha=request.alpha, reference=reference, k=request.k or DEFAULT_K,
                                  restrict_to=request.restrict_to, exclude=request.exclude)
        pipeline = Pipeline(annotator, options, predict=predict)  # bad alpha: 422 first
        read = ReadOptions(input_kind=request.input_kind, min_genes=1, batch_size=BLOCK)
        with annotator.open(MemoryMatrix(x, genes, ids, name="request"), read=read) as source:
            sink = RequestCells(session.classes, pipeline.columns, request.top_k, sent, cell_ids, cancelled)
            pipeline.run(source, sink)
        return sink.cells

    async def run(genes, x, sent, request: Options, cell_ids=None) -> list[dict]:
        if x.shape[0] > max_cells:
            raise HTTPException(413, f"{x.shape[0]} cells in one request; the limit is {max_cells} (scl-serve --max-cells)")
        loop, cancelled = asyncio.get_running_loop(), threading.Event()
        predict = batcher.predict_from_thread(loop) if micro_batching else None
        try:
            return await asyncio.wait_for(loop.run_in_executor(requests, answer, genes, x, sent, request, cell_ids, predict, cancelled), timeout_s)
        except SclError as err:
            raise HTTPException(422, err.message) from None  # the settings it names are the CLI's and Python's, not the request's
        except asyncio.TimeoutError:
            cancelled.set()  # its pipeline stops at the next block
            raise HTTPException(504, f"inference took longer than {timeout_s} s; send fewer cells per request") from None

    @app.post("/predict", summary="Annotate one cell")
    async def predict(cell: Cell) -> dict:
        genes, x, sent = _gene_maps_to_rows([cell.expression], known)
        return (await run(genes, x, sent, cell))[0]

    @app.post("/predict_batch", summary="Annotate many cells (gene maps or columnar)")
    async def predict_batch(batch: Batch) -> dict:
        genes, x, sent = _matrix(batch, known)
        return {"cells": await run(genes, x, sent, batch, batch.cell_ids)}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "provider": session.provider}

    @app.get("/classes")
    async def classes() -> dict:
        return {"classes": session.classes}

    @app.get("/model")
    async def model() -> dict:
        import onnxruntime

        described = annotator.describe() | {"versions": {"scl": version("scl"), "onnxruntime": onnxruntime.__version__}}
        return described if show_paths else without_paths(described)

    return app
