"""scl-serve: the same labels as scl-annotate, clear 4xx for bad payloads, a real uvicorn process on loopback."""

import asyncio
import json
import select
import socket
import subprocess
import time

import anndata as ad
import httpx
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from scl.runtime.annotator import Annotator
from scl.runtime.serve import create_app

from conftest import BIN, run


@pytest.fixture(scope="module")
def cells_and_labels(exported, small_data, tmp_path_factory):
    """Real PBMC cells (raw counts) and the labels scl-annotate gives them."""
    out = tmp_path_factory.mktemp("serve") / "calls.csv"
    code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", exported, "--output", out, "--quiet")
    assert code == 0, stderr
    adata = ad.read_h5ad(small_data / "val.h5ad")
    return adata, pd.read_csv(out)


@pytest.fixture(scope="module")
def client(exported):
    return TestClient(create_app(Annotator(exported, session_threads=0), max_cells=100, max_body_bytes=2 * 1024**2))


def columnar(adata, n):
    return {"genes": list(adata.var_names), "values": adata.X[:n].toarray().tolist(), "cell_ids": list(adata.obs_names[:n]), "top_k": 2}


def test_labels_equal_scl_annotate(client, cells_and_labels):
    adata, calls = cells_and_labels
    batch = client.post("/predict_batch", json=columnar(adata, 20)).json()["cells"]
    assert [c["label"] for c in batch] == list(calls["label"][:20])
    assert [c["cell_id"] for c in batch] == list(calls["cell_id"][:20])
    np.testing.assert_allclose([c["confidence"] for c in batch], calls["confidence"][:20], atol=1e-4)
    np.testing.assert_allclose([c["novelty"] for c in batch], calls["novelty"][:20], atol=1e-4)
    assert all(isinstance(c["novel"], bool) for c in batch)
    row = adata.X[0].toarray()[0]
    expression = {g: float(v) for g, v in zip(adata.var_names, row) if v}
    single = client.post("/predict", json={"expression": expression, "top_k": 3}).json()
    assert single["label"] == calls["label"][0] and len(single["top"]) == 3
    assert single["top"][0]["label"] == single["label"] and 0 < single["genes_detected"] <= single["genes_sent"] == len(expression)
    maps = client.post("/predict_batch", json={"cells": [expression]}).json()["cells"]
    assert maps[0]["label"] == single["label"]


def test_metadata_endpoints(client):
    assert client.get("/healthz").json() == {"status": "ok", "provider": "CPUExecutionProvider"}
    assert len(client.get("/classes").json()["classes"]) == 7
    model = client.get("/model").json()
    assert model["genes"] == 28231 and "onnxruntime" in model["versions"]
    assert "/predict_batch" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("payload, status, words", [
    ({"expression": {}}, 422, "expression"),
    ({"expression": {"CD19": -1}}, 422, "non-negative"),
    ({"expression": {"CD19": "many"}}, 422, "expression"),
    ({"top_k": 3}, 422, "expression"),
    ({"expression": {"CD19": 3}, "top_k": 0}, 422, "top_k"),
    ({"expression": {"NOT_A_GENE": 3}}, 422, "only 0 of the model's 28231 genes"),
    ({"expression": {"CD19": 3}, "input_kind": "tpm"}, 422, "input_kind"),
    ({"expression": {"CD19": "5"}}, 422, "valid number"),  # not coerced
    ({"expression": {"CD19": True}}, 422, "valid number"),
    ({"expression": {"CD19": 3}, "alhpa": 0.1}, 422, "alhpa"),  # a misspelt field is refused, not dropped
    ({"expression": {"CD19": 1e308}}, 422, "expression['CD19'] is 1e+308: values must be finite, non-negative and at most 3.4e+38"),
])
def test_bad_single_payloads(client, payload, status, words):
    response = client.post("/predict", json=payload)
    assert response.status_code == status and words in json.dumps(response.json()), response.json()


def test_bad_batches_and_limits(client):
    cases = [
        ({"cells": [{"CD19": 1}], "genes": ["CD19"], "values": [[1]]}, 422, "either 'cells'"),
        ({"genes": ["CD19", "CD3E"], "values": [[1]]}, 422, "one row per cell"),
        ({"cells": [{"CD19": 1}], "cell_ids": ["a", "b"]}, 422, "'cell_ids' has 2 entries for 1 cells"),
        ({"cells": [{"CD19": 1}] * 101}, 413, "limit is 100"),
        ({"cells": [{"CD19": 1}] * 100}, 200, "cells"),  # exactly at --max-cells
    ]
    for payload, status, words in cases:
        response = client.post("/predict_batch", json=payload)
        assert response.status_code == status and words in json.dumps(response.json()), response.json()
    big = client.post("/predict_batch", content=b"{" + b" " * (3 * 1024**2) + b"}", headers={"content-type": "application/json"})
    assert big.status_code == 413
    broken = client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 422
    plain = client.post("/predict", content=b'{"expression": {"CD19": 3}}', headers={"content-type": "text/plain"})
    assert plain.status_code == 415 and "send JSON with the header Content-Type: application/json" in plain.json()["detail"]
    for payload, words in (({"genes": ["CD19", "CD3E"], "values": [[1, 2], [3, 1e39]]}, "values[1][1] ('CD3E') is 1e+39"),
                           ({"cells": [{"CD19": 1}, {"CD3E": -2}]}, "cells[1]['CD3E'] is -2"),
                           ({"cells": [{"CD19": 1}], "top_k": 2, "cell_id": ["a"]}, "cell_id")):
        response = client.post("/predict_batch", json=payload)
        assert response.status_code == 422 and words in json.dumps(response.json()), response.json()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(exported, *flags) -> tuple[subprocess.Popen, int]:
    """A real scl-serve on a free loopback port, answering /healthz."""
    port = free_port()
    server = subprocess.Popen([BIN / "scl-serve", "--model", exported, "--port", str(port), *flags], stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    return server, port


def test_real_uvicorn_process_on_loopback(exported, cells_and_labels):
    adata, calls = cells_and_labels
    server, port = start_server(exported)
    try:
        base = f"http://127.0.0.1:{port}"
        response = httpx.post(f"{base}/predict_batch", json=columnar(adata, 70), timeout=30)
        assert response.status_code == 200
        assert [c["label"] for c in response.json()["cells"]] == list(calls["label"])
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_cells_of_an_unknown_type_are_flagged_novel(client, small_data):
    brain = ad.read_h5ad(small_data / "brain.h5ad")
    cells = client.post("/predict_batch", json=columnar(brain, 10) | {"alpha": 0.1}).json()["cells"]
    assert sum(c["novel"] for c in cells) >= 9  # scl-train measured nearly all brain cells novel at 0.1
    assert all(isinstance(c["prediction_set"], list) and len(c["prediction_set"]) == c["set_size"] for c in cells)
    refused = client.post("/predict_batch", json=columnar(brain, 2) | {"alpha": 1.5})
    assert refused.status_code == 422 and "alpha" in refused.text


def test_a_cell_with_a_few_genes_is_unassigned_as_in_files_and_odd_values_are_refused(client):
    few = client.post("/predict", json={"expression": {"CD19": 3, "MS4A1": 5, "CD79A": 4}}).json()
    assert few["label"] == "unassigned" and few["genes_detected"] == 3  # below 200 of the model's 28,231 genes
    nan = client.post("/predict", content=b'{"expression": {"CD3E": NaN, "CD4": 1}}', headers={"content-type": "application/json"})
    assert nan.status_code == 422 and "finite" in nan.text
    inf = client.post("/predict_batch", content=b'{"genes": ["CD3E"], "values": [[Infinity]]}', headers={"content-type": "application/json"})
    assert inf.status_code == 422 and "finite" in inf.text
    half = client.post("/predict", json={"expression": {"CD3E": 3.5, "CD4": 1}})
    assert half.status_code == 422 and "neither integer counts nor log1p" in half.text and "(see" not in half.text
    model = client.get("/model").json()
    assert "/" not in model["path"] and "/" not in model["model_card"]["training_data"] and len(model["weights_sha256"]) == 64


def test_idle_connections_beyond_the_limit_get_503_and_the_server_says_where_it_is(exported):
    server, port = start_server(exported, "--max-connections", "2")
    idle = []
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(2):  # slow clients: connected, a partial request line, nothing more
            conn = socket.create_connection(("127.0.0.1", port))
            conn.sendall(b"GET /healthz HTTP/1.1\r\n")
            idle.append(conn)
        time.sleep(0.3)
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 503
    finally:
        for conn in idle:
            conn.close()
        server.terminate()
        server.wait(timeout=10)
    first = server.stderr.readline()
    assert f"http://127.0.0.1:{port}" in first and "7 classes" in first and "CPUExecutionProvider" in first


def read_reply(conn: socket.socket, wait: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took."""
    conn.settimeout(wait)
    start, got = time.monotonic(), b""
    while chunk := conn.recv(4096):
        got += chunk
    return got, time.monotonic() - start


def test_slow_clients_get_408_and_their_connections_back_but_slow_answers_are_not_cut():
    """The read deadline counts receiving a request only: from its first byte (or the connection) to its body's last."""
    import threading

    import uvicorn

    from scl.runtime.read_deadline import read_deadline_protocol

    async def slow_app(scope, receive, send):  # answers 1.5 s after the body, longer than the 0.8 s read deadline
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await asyncio.sleep(1.5)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(slow_app, port=port, http=read_deadline_protocol(0.8), timeout_keep_alive=5, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        silent = socket.create_connection(("127.0.0.1", port))
        headers = socket.create_connection(("127.0.0.1", port))
        headers.sendall(b"POST / HTTP/1.1\r\nhost: x\r\n")
        body = socket.create_connection(("127.0.0.1", port))
        body.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n12345")
        for conn in (silent, headers, body):
            reply, took = read_reply(conn, 5)
            assert reply.startswith(b"HTTP/1.1 408") and b"--read-timeout" in reply and took < 2, (reply, took)
            conn.close()

        good = socket.create_connection(("127.0.0.1", port))
        for _ in range(2):  # keep-alive: the second request's clock starts at its first byte, not at the first request
            good.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nab")
            time.sleep(0.4)
            good.sendall(b"cd")
            good.settimeout(5)
            assert good.recv(4096).startswith(b"HTTP/1.1 200")  # answered after 1.5 s: the app's time is not read time
            time.sleep(0.5)
        good.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_scl_serve_cuts_a_client_sending_a_byte_at_a_time(exported):
    server, port = start_server(exported, "--read-timeout", "1", "--max-connections", "4")
    try:
        drip = socket.create_connection(("127.0.0.1", port))
        start = time.monotonic()
        for byte in b"GET /healthz HTTP/1.1\r\n" * 4:  # stops sending once the server has answered
            drip.sendall(bytes([byte]))
            if select.select([drip], [], [], 0.2)[0]:
                break
        reply, _ = read_reply(drip, 5)
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 3
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        refused = subprocess.run([BIN / "scl-serve", "--model", exported, "--read-timeout", "0"], capture_output=True, text=True)
        assert refused.returncode == 2 and "--read-timeout" in refused.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_request_past_its_timeout_gets_504_and_stops_while_the_server_goes_on(exported, cells_and_labels):
    """A timed-out request is answered 504 at once; its pipeline stops at its next block instead of running on to the
    end (it would otherwise hold a worker thread), and the next request is answered normally."""
    adata, calls = cells_and_labels
    annotator = Annotator(exported, session_threads=0)
    blocks = []
    predict = annotator.predict

    def slow_predict(rows):  # each block takes 0.3 s, so a 2,048-cell request (8 blocks) would take 2.4 s
        blocks.append(len(rows))
        time.sleep(0.3)
        return predict(rows)

    annotator.predict = slow_predict
    slow = TestClient(create_app(annotator, max_cells=5000, max_body_bytes=64 * 1024**2, timeout_s=0.5, micro_batching=False))
    genes = np.asarray((adata.X[:16] > 0).sum(axis=0)).ravel().argsort()[-500:]  # the 500 genes most often detected: a small body
    many = {"genes": list(adata.var_names[genes]), "values": adata.X[:16][:, genes].toarray().tolist() * 128}
    started = time.perf_counter()
    reply = slow.post("/predict_batch", json=many)
    assert reply.status_code == 504 and "--timeout" not in reply.text and "fewer cells" in reply.json()["detail"]
    assert time.perf_counter() - started < 2.0
    time.sleep(1.0)
    assert len(blocks) < 8, blocks  # the cancelled request stopped early
    annotator.predict = predict
    assert slow.post("/predict_batch", json=columnar(adata, 3)).json()["cells"][0]["label"] == calls["label"][0]
