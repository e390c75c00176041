"""scl-serve: the annotation model over HTTP (FastAPI + uvicorn; pip install 'scl[serve]')."""

from __future__ import annotations

import click

from .cli_errors import reports_input_errors
from .errors import SclError


@click.command(
    epilog="""Example:

\b
  scl-serve --model model.onnx --port 8000
  curl -s localhost:8000/predict -H 'content-type: application/json' \\
       -d '{"expression": {"CD19": 3, "MS4A1": 5, "CD79A": 4}, "top_k": 3}'

OpenAPI docs at http://127.0.0.1:8000/docs. Binds to 127.0.0.1 unless --host says otherwise."""
)
@click.option("--model", required=True, envvar="SCL_MODEL", type=click.Path(dir_okay=False), help="The .onnx from scl-export.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--threads", type=int, help="onnxruntime intra-op threads.")
@click.option("--max-cells", default=10000, show_default=True, help="Most cells in one request.")
@click.option("--max-body-mb", default=64, show_default=True, help="Largest request body.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds one request may run.")
@click.option("--cors-origin", multiple=True, help="Allow browser calls from this origin (repeat); none by default.")
@click.option("--no-micro-batching", is_flag=True, help="Run each request alone (concurrent requests are otherwise batched).")
@reports_input_errors
def main(model, host, port, device, threads, max_cells, max_body_mb, timeout, cors_origin, no_micro_batching):
    """Serve POST /predict, POST /predict_batch, GET /healthz, /classes, /model."""
    try:
        import uvicorn

        from .serve import create_app
    except ImportError:
        raise SclError("scl-serve needs FastAPI and uvicorn: pip install 'scl[serve]'.") from None
    from .annotator import Annotator

    annotator = Annotator(model, device, session_threads=threads or 0)  # one run at a time, every core (0: onnxruntime's default)
    app = create_app(annotator, max_cells, int(max_body_mb * 1024**2), timeout, tuple(cors_origin), micro_batching=not no_micro_batching)
    uvicorn.run(app, host=host, port=port, timeout_keep_alive=5, log_level="warning")
