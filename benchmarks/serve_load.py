"""A bounded load test of scl-serve on loopback: requests/s and latency at 1 and 16 concurrent clients.

    python benchmarks/serve_load.py            # real-size random model, 400 requests per level (about a minute)
    python benchmarks/serve_load.py --smoke    # 20 requests per level, for the tests

Each request is POST /predict with one cell of ~2,500 detected genes. Traffic goes to 127.0.0.1 only; the number of
requests is fixed, so the test stops by itself. Then one hostile request: a /predict_batch of 2,000 cells with 200
distinct random gene names each (400,000 names the model does not know), with the server's peak RSS before and after
and /healthz timed while it runs. Last, slow clients (1,000 connections sending a byte a second): when the read
deadline cuts them, and what /healthz answers meanwhile. Writes benchmarks/results/<machine>-serve.json and .md.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, server: subprocess.Popen) -> None:
    for _ in range(300):
        if server.poll() is not None:
            raise RuntimeError(f"scl-serve exited: {server.stderr.read()}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("scl-serve did not answer within 30 s")


def load(base: str, payloads: list[dict], clients: int) -> dict:
    def one(payload) -> float:
        t = time.perf_counter()
        r = client.post(f"{base}/predict", json=payload)
        r.raise_for_status()
        return time.perf_counter() - t

    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=clients)) as client:
        one(payloads[0])  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            latencies = np.array(list(pool.map(one, payloads)))
        elapsed = time.perf_counter() - start
    return {"clients": clients, "requests": len(payloads), "requests_per_second": round(len(payloads) / elapsed, 1),
            "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1), "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 1)}


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def unknown_genes_request(base: str, pid: int, cells: int, rng) -> dict:
    """One request naming `cells` x 200 genes the model does not know; the server's peak RSS and /healthz meanwhile."""
    payload = {"cells": [{f"FAKE{rng.integers(1 << 40)}": 1.0 for _ in range(200)} | {"CD3E": 2.0} for _ in range(cells)]}
    before = peak_rss_mb(pid)
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(1) as pool:
        started = time.perf_counter()
        pending = pool.submit(client.post, f"{base}/predict_batch", json=payload)
        health = []
        while not pending.done():
            t = time.perf_counter()
            client.get(f"{base}/healthz")
            health.append(time.perf_counter() - t)
            time.sleep(0.05)
        status = pending.result().status_code
        seconds = time.perf_counter() - started
    return {"cells": cells, "distinct_genes": cells * 200 + 1, "status": status, "seconds": round(seconds, 2),
            "peak_rss_mb_before": round(before, 1), "peak_rss_mb_after": round(peak_rss_mb(pid), 1),
            "healthz_max_ms": round(max(health, default=0) * 1000, 1)}


def slow_clients(base: str, port: int, connections: int, read_timeout: float) -> dict:
    """`connections` clients each sending a request line a byte a second; when the server cut them, /healthz meanwhile."""
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    for s in socks:
        s.setblocking(False)
    line = b"GET /healthz HTTP/1.1\r\n" * 100
    cut_after, health = [], []  # health: (seconds since start, status, seconds it took)
    start = time.perf_counter()
    for second in range(int(read_timeout) + 15):
        if not socks and second > read_timeout + 4:
            break
        tick = time.perf_counter()
        for s in socks:
            try:
                s.send(line[second:second + 1])
            except OSError:
                pass
        try:
            status = httpx.get(f"{base}/healthz", timeout=5).status_code
        except httpx.TransportError:
            status = 0
        health.append((tick - start, status, time.perf_counter() - tick))
        while (left := 1 - (time.perf_counter() - tick)) > 0:  # the rest of the second: note each cut as it happens
            if not socks:
                time.sleep(left)
                break
            for s in select.select(socks, [], [], left)[0]:  # readable: the server answered (408) or closed
                cut_after.append(time.perf_counter() - start)
                socks.remove(s)
                s.close()
    for s in socks:
        s.close()
    during = [status for t, status, _ in health if t < read_timeout - 1]
    after = [status for t, status, _ in health if t > read_timeout + 2]
    return {"connections": connections, "read_timeout_s": read_timeout, "still_open_at_end": len(socks),
            "cut_after_s_min": round(min(cut_after, default=float("nan")), 1), "cut_after_s_max": round(max(cut_after, default=float("nan")), 1),
            "healthz_status_during": sorted(set(during)), "healthz_status_after": sorted(set(after)),
            "healthz_max_ms": round(max((took for *_, took in health), default=0) * 1000, 1)}


def markdown(r: dict) -> str:
    lines = [f"scl-serve on {r['machine']}, {r['model']}, one cell (~2,500 genes) per POST /predict; "
             f"{r['date']}; `{r['command']}`.", "", "| micro-batching | clients | requests | requests/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
    lines += [f"| {'on' if level['micro_batching'] else 'off'} | {level['clients']} | {level['requests']} | {level['requests_per_second']} | {level['p50_ms']} | {level['p99_ms']} |" for level in r["levels"]]
    u = r["unknown_genes"]
    lines += ["", f"One request of {u['cells']:,} cells naming {u['distinct_genes']:,} distinct genes the model does not know: HTTP {u['status']} "
              f"in {u['seconds']} s; server peak RSS {u['peak_rss_mb_before']:,.0f} -> {u['peak_rss_mb_after']:,.0f} MB; "
              f"/healthz at most {u['healthz_max_ms']} ms meanwhile."]
    c = r["slow_clients"]
    lines += ["", f"{c['connections']:,} slow clients sending a request line a byte a second, `--read-timeout {c['read_timeout_s']:g}`: "
              f"cut (408, closed) after {c['cut_after_s_min']}-{c['cut_after_s_max']} s, {c['still_open_at_end']} still open at the end; "
              f"/healthz answered {c['healthz_status_during']} while they held the connections (--max-connections 64) and "
              f"{c['healthz_status_after']} after, at most {c['healthz_max_ms']} ms."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--gene-order", default=str(HERE.parents[1] / "shared/data/scimilarity_gene_order.tsv"))
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests = 20
    from run import machine_name, write_results
    from synthetic import cell_block, random_model, write_onnx

    read_timeout = 3.0 if args.smoke else 30.0  # 30: scl-serve's default
    genes = Path(args.gene_order).read_text().split()
    rng = np.random.default_rng(0)
    payloads = []
    for _ in range(args.requests):
        data, indices = cell_block(1, len(genes), 2500, rng)
        payloads.append({"expression": {genes[i]: float(v) for i, v in zip(indices, data)}, "top_k": 3})
    results = {"machine": machine_name(), "command": "python benchmarks/serve_load.py" + (" --smoke" if args.smoke else ""),
               "date": time.strftime("%Y-%m-%d"), "model": "real size (28,231 genes), random weights, fp32", "levels": []}
    with tempfile.TemporaryDirectory() as tmp:
        model, head = random_model(genes)
        fp32, *_ = write_onnx(model, head, Path(tmp) / "model.onnx")
        for batching in (True, False):
            port = free_port()
            cmd = [str(Path(sys.executable).parent / "scl-serve"), "--model", str(fp32), "--port", str(port), "--read-timeout", str(read_timeout)]
            server = subprocess.Popen(cmd + ([] if batching else ["--no-micro-batching"]), stderr=subprocess.PIPE, text=True)
            try:
                base = f"http://127.0.0.1:{port}"
                wait_ready(base, server)
                results["levels"] += [load(base, payloads, clients) | {"micro_batching": batching} for clients in (1, 16)]
                if batching:
                    results["unknown_genes"] = unknown_genes_request(base, server.pid, 200 if args.smoke else 2000, rng)
                    results["slow_clients"] = slow_clients(base, port, 50 if args.smoke else 1000, read_timeout)
            finally:
                server.terminate()
                server.wait(timeout=10)
    print(write_results(results, Path(args.out), args.smoke, "serve", markdown))
    return results


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
