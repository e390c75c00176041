"""scl-serve: the annotation model over HTTP (FastAPI + uvicorn; pip install 'scl[serve]')."""

from __future__ import annotations

import click

from .cli_errors import reports_input_errors
from .errors import SclError
from .session import ENCODER_ONLY


@click.command(
    epilog="""Example:

\b
  scl-serve --model demo_out/model.onnx --port 8000
  curl -s localhost:8000/predict_batch -H 'content-type: application/json' --data @cells.json

cells.json: {"cells": [{"CD19": 3, "MS4A1": 5, ...every gene detected in the cell...}], "top_k": 3}
or columnar {"genes": [...], "values": [[...]], "cell_ids": [...]}. OpenAPI docs at
http://127.0.0.1:8000/docs. Binds to 127.0.0.1 unless --host says otherwise. Clocks:
--read-timeout from a request's first byte to its last (408, connection closed; also a
connection that sends nothing), --timeout from the parsed request to its answer (504),
--keep-alive between requests on one connection."""
)
@click.option("--model", required=True, envvar="SCL_MODEL", type=click.Path(dir_okay=False), help="The .onnx from scl-export.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--threads", type=int, help="onnxruntime intra-op threads.")
@click.option("--max-cells", default=10000, type=click.IntRange(min=1), show_default=True, help="Most cells in one request.")
@click.option("--max-body-mb", default=64, type=click.FloatRange(min=0, min_open=True), show_default=True, help="Largest request body.")
@click.option("--timeout", default=60.0, type=click.FloatRange(min=0, min_open=True), show_default=True, help="Seconds from a parsed request to its answer (504 beyond).")
@click.option("--read-timeout", default=30.0, type=click.FloatRange(min=0, min_open=True), show_default=True,
              help="Seconds to receive one request, headers and body (408 beyond); raise it for large bodies on slow links.")
@click.option("--cors-origin", multiple=True, help="Allow browser calls from this origin (repeat); none by default.")
@click.option("--no-micro-batching", is_flag=True, help="Run each request alone (concurrent requests are otherwise batched).")
@click.option("--max-connections", default=64, type=click.IntRange(min=1), show_default=True, help="Connections and requests at once; beyond it clients get 503.")
@click.option("--keep-alive", default=5.0, type=click.FloatRange(min=0, min_open=True), show_default=True, help="Seconds an idle connection stays open between requests.")
@click.option("--access-log", is_flag=True, help="Log every request (method, path, status) to stderr.")
@click.option("--reference", type=click.Path(exists=True, file_okay=False), help="A reference folder (scl-reference build) made with "
              "this model: every answer also gives the vote of the k nearest reference cells (knn_label, ...).")
@click.option("--show-paths", is_flag=True, help="GET /model shows the model's and its training data's full paths (default: file names).")
@reports_input_errors
def main(model, host, port, device, threads, max_cells, max_body_mb, timeout, read_timeout, cors_origin, no_micro_batching, max_connections, keep_alive,
         access_log, reference, show_paths):
    """Serve POST /predict, POST /predict_batch, GET /healthz, /classes, /model."""
    try:
        import uvicorn

        from .read_deadline import read_deadline_protocol
        from .serve import create_app
    except ImportError:
        raise SclError("scl-serve needs FastAPI and uvicorn: pip install 'scl[serve]'.") from None
    from .annotator import Annotator

    from .reference import Reference

    annotator = Annotator(model, device, session_threads=threads or 0)  # one run at a time, every core (0: onnxruntime's default)
    ref = None
    if annotator.session.encoder_only and not reference:
        raise SclError(f"{model} {ENCODER_ONLY}: serve it with --reference REF "
                       "(scl-reference build), or train a head with scl-train and export the run.", "reference")
    if reference:
        ref = Reference.load(reference)
        ref.check_model(annotator)
    app = create_app(annotator, max_cells, int(max_body_mb * 1024**2), timeout, tuple(cors_origin), micro_batching=not no_micro_batching,
                     show_paths=show_paths, reference=ref)
    click.echo(f"scl-serve: {model} ({len(annotator.classes)} classes, {len(annotator.gene_order):,} genes) on {annotator.session.provider}; "
               f"http://{host}:{port} (docs at /docs); Ctrl-C stops it", err=True)
    uvicorn.run(app, host=host, port=port, http=read_deadline_protocol(read_timeout), timeout_keep_alive=keep_alive,
                limit_concurrency=max_connections,
                log_level="info" if access_log else "warning", access_log=access_log)
