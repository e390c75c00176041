"""Which layers int8 should quantize: every matrix product (onnxruntime's default) or only the gene-wide first layer
(what scl-export does), side by side on the full demo's models.

    python benchmarks/int8_layers.py --seeds 3   # three full demos (about 4 minutes on 2 cores)
    python benchmarks/int8_layers.py --smoke     # one fast demo, for the tests

For each seed: `scl-demo --seed S` (pretrain, LoRA fine-tune, export), then its fp32 model is quantized both ways and
run on the demo's 210 held-out PBMCs: labels equal to fp32, largest embedding difference, size, and cells per second
relative to fp32 (the three sessions timed in turn, five rounds, medians). The head's largest row norm is shown as a
proxy for how close the classes sit in the embedding: the closer they sit, the steeper the head, and the fewer
rounding errors a cell near a class boundary can take. Writes
benchmarks/results/<machine>-int8-layers.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def quantize_every_layer(fp32: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)


def compare(paths: dict[str, Path], counts: np.ndarray, rounds: int) -> dict:
    import onnx
    import onnxruntime as ort

    from scl.runtime import model_metadata as meta

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    batch = np.concatenate([counts] * max(1, 2048 // len(counts)))

    def run(session, x):
        return session.run(list(meta.OUTPUTS), {meta.INPUT_COUNTS: x, meta.INPUT_IS_LOGNORM: np.array([0.0], np.float32)})

    outputs = {k: run(s, counts) for k, s in sessions.items()}
    seconds = {k: [] for k in sessions}
    for _ in range(rounds):  # in turn, so the machine's noise falls on every variant alike
        for k, s in sessions.items():
            start = time.perf_counter()
            for i in range(0, len(batch), 512):
                run(s, batch[i:i + 512])
            seconds[k].append(time.perf_counter() - start)
    probs32, emb32 = outputs["fp32"]
    return {k: {"label_agreement": float((p.argmax(1) == probs32.argmax(1)).mean()), "max_abs_diff_embedding": float(np.abs(e - emb32).max()),
                "max_abs_diff_probabilities": float(np.abs(p - probs32).max()), "megabytes": round(paths[k].stat().st_size / 1e6, 1),
                "int8_matrix_products": sum(n.op_type == "MatMulInteger" for n in onnx.load(str(paths[k])).graph.node),
                "speed_vs_fp32": round(float(np.median(seconds["fp32"]) / np.median(seconds[k])), 2)}
            for k, (p, e) in outputs.items()}


def one_seed(seed: int, fast: bool, tmp: Path, rounds: int) -> dict:
    import onnx

    from scl.export.export_run import validation_cells
    from scl.export.onnx_file import quantize_int8
    from scl.train.run_dir import load_run

    from calibration import cli

    demo = tmp / f"demo{seed}"
    cli("scl-demo", "--out", demo, "--seed", seed, *(["--fast"] if fast else []))
    run = load_run(demo / "run")
    counts, _ = validation_cells(run, None, 512)
    paths = {"fp32": demo / "model.onnx", "every layer": tmp / f"every{seed}.onnx", "gene layer (scl-export)": tmp / f"gene{seed}.onnx"}
    quantize_every_layer(paths["fp32"], paths["every layer"])
    onnx.save(quantize_int8(paths["fp32"]), str(paths["gene layer (scl-export)"]))
    head_norm = run.head.max_row_norm()
    return {"seed": seed, "cells": len(counts), "head_row_norm_max": round(head_norm, 1), "variants": compare(paths, counts, rounds)}


def markdown(r: dict) -> str:
    runs = r["runs"]
    size = "the fast" if r["smoke"] else "the full"
    lines = [f"int8 on {size} demo's models, {runs[0]['cells']} held-out PBMCs; {r['machine']}, "
             f"{r['date']}; `{r['command']}`.", "",
             "| seed | head row norm (max) | int8 quantizes | labels equal to fp32 | max emb diff | MB | speed vs fp32 |", "|---|---|---|---|---|---|---|"]
    for run in r["runs"]:
        for name, v in run["variants"].items():
            if name != "fp32":
                lines.append(f"| {run['seed']} | {run['head_row_norm_max']:,.0f} | {name} | {100 * v['label_agreement']:.1f}% | {v['max_abs_diff_embedding']:.1e} | "
                             f"{v['megabytes']} (fp32 {run['variants']['fp32']['megabytes']}) | {v['speed_vs_fp32']}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--smoke", action="store_true", help="one fast demo (small network), two timing rounds")
    args = parser.parse_args(argv)
    from run import machine_name, write_results

    seeds = range(1 if args.smoke else args.seeds)
    command = "python benchmarks/int8_layers.py " + ("--smoke" if args.smoke else f"--seeds {args.seeds}")
    with tempfile.TemporaryDirectory() as tmp:
        runs = [one_seed(s, args.smoke, Path(tmp), 2 if args.smoke else 5) for s in seeds]
    result = {"machine": machine_name(), "command": command, "date": datetime.date.today().isoformat(), "smoke": args.smoke, "runs": runs}
    write_results(result, Path(args.out), args.smoke, "int8-layers", markdown)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
