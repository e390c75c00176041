"""The CUDA paths on a GPU machine, in under 5 minutes: training with bf16 autocast, export, fp16 validation, annotation.

    bash benchmarks/gpu_check.sh          # on the GPU machine (installs scl from the checkout, offline)
    python benchmarks/gpu_check.py        # where scl is installed already

On the demo's real cells shipped in train/demo_data (840 sorted PBMCs, 144 brain cells): scl-pretrain at SCimilarity's
size (28,231 -> 1024 -> 1024 -> 128) on CUDA for a few hundred steps, scl-train on CUDA (in memory and --stream), timed
as training cells/s;
the same scl-train on the CPU for the ratio; scl-export fp32 and fp16 (fp16 validated on CUDA when onnxruntime has the
CUDA provider); scl-annotate with the CUDA provider against the CPU's result (labels agreeing, largest probability
difference) and cells/s of each. What could not run (no CUDA provider in this onnxruntime build) is recorded as such.
Writes benchmarks/results/<machine>-gpu.json and .md (or $OUT/ when set: the device tool brings those back).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "train" / "demo_data"
sys.path.insert(0, str(HERE))


def scl(*args) -> tuple[float, str]:
    """Run an scl command as `python -m`; (seconds, stdout). Any failure stops the check with its stderr."""
    modules = {"scl-pretrain": "scl.train.pretrain_cli", "scl-train": "scl.train.finetune_cli", "scl-export": "scl.export.cli",
               "scl-annotate": "scl.runtime.annotate_cli"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", modules[args[0]], *map(str, args[1:])], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{args[0]} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout


def train_rate(run_dir: Path) -> float:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return round(metrics["cells"]["train"] / min(row["train_seconds"] for row in metrics["history"]), 1)


def main() -> dict:
    import onnxruntime as ort
    import pandas as pd
    import torch

    from run import machine_name, write_results

    if not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA GPU here: run this on a GPU machine.")
    results = {"machine": machine_name(), "date": str(date.today()), "command": "bash benchmarks/gpu_check.sh", "gpu": torch.cuda.get_device_name(0),
               "torch": torch.__version__, "onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    pbmc, brain, genes = DEMO / "pbmc_demo.h5ad", DEMO / "brain_demo.h5ad", DEMO / "scimilarity_gene_order.tsv"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seconds, _ = scl("scl-pretrain", "--data", pbmc, "--data", brain, "--gene-order", genes, "--out", tmp / "base", "--epochs", "20",
                         "--batch-size", "64", "--triplet-weight", "0.5", "--device", "cuda")
        steps = 20 * (int(0.8 * (840 + 144)) // 64)
        results["pretrain_cuda"] = {"seconds": round(seconds, 1), "steps": steps, "bf16_autocast": True}
        for name, device, extra in (("cuda", "cuda", ()), ("cuda_stream", "cuda", ("--stream",)), ("cpu", "cpu", ())):
            seconds, _ = scl("scl-train", "--base-model", tmp / "base", "--data", pbmc, "--out", tmp / f"run-{name}", "--epochs", "3",
                             "--patience", "3", "--device", device, "--quiet", *extra)
            results[f"train_{name}"] = {"seconds": round(seconds, 1), "training_cells_per_s": train_rate(tmp / f"run-{name}")}
        results["train_cuda"]["ratio_to_cpu"] = round(results["train_cuda"]["training_cells_per_s"] / results["train_cpu"]["training_cells_per_s"], 2)
        seconds, stdout = scl("scl-export", tmp / "run-cuda", "--out", tmp / "model.onnx", "--fp16")
        results["export"] = {"seconds": round(seconds, 1), "report": stdout.strip().splitlines()[-4:]}
        results["annotate"] = annotate_both(tmp, pbmc, "CUDAExecutionProvider" in ort.get_available_providers(), pd)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else HERE / "results"
    print(write_results(results, out, False, "gpu", table))
    return results


def annotate_both(tmp: Path, cells: Path, has_cuda_provider: bool, pd) -> dict:
    """scl-annotate on the CPU and, where onnxruntime has the CUDA provider, on CUDA (fp32 and fp16 models)."""
    rows = {}
    runs = [("fp32", "cpu", tmp / "model.onnx")]
    if has_cuda_provider:
        runs += [("fp32", "cuda", tmp / "model.onnx"), ("fp16", "cuda", tmp / "model.fp16.onnx")]
    for variant, device, model in runs:
        out = tmp / f"calls-{variant}-{device}.csv"
        scl("scl-annotate", cells, "--model", model, "--device", device, "--output", out, "--probabilities", "--report", out.with_suffix(".json"))
        report = json.loads(out.with_suffix(".json").read_text())
        rows[f"{variant} {device}"] = {"cells_per_s": report.get("cells_per_second"), "calls": pd.read_csv(out, index_col=0)}
    cpu = rows["fp32 cpu"]["calls"]
    summary = {}
    for name, row in rows.items():
        calls = row.pop("calls")
        probability = [c for c in calls.columns if c.startswith("p_")]
        summary[name] = {"cells_per_s": row["cells_per_s"], "labels_as_cpu": float((calls["label"] == cpu["label"]).mean()),
                         "max_probability_difference": float((calls[probability] - cpu[probability]).abs().to_numpy().max()) if probability else None}
    if not has_cuda_provider:
        summary["cuda"] = "not run: this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
    return summary


def table(r: dict) -> str:
    lines = [f"Machine {r['machine']} ({r['gpu']}), {r['date']}; `{r['command']}`. torch {r['torch']}, onnxruntime {r['onnxruntime']}.", "",
             f"- scl-pretrain on CUDA (bf16 autocast), SCimilarity's size, {r['pretrain_cuda']['steps']} steps: {r['pretrain_cuda']['seconds']} s",
             f"- scl-train training cells/s: CUDA {r['train_cuda']['training_cells_per_s']:,}, CPU {r['train_cpu']['training_cells_per_s']:,} "
             f"(ratio {r['train_cuda']['ratio_to_cpu']}); CUDA with --stream {r['train_cuda_stream']['training_cells_per_s']:,}", f"- scl-export fp32 + fp16: {r['export']['seconds']} s; {' '.join(r['export']['report'])}", "",
             "| annotation | cells/s | labels as the CPU's | largest probability difference |", "|---|---|---|---|"]
    for name, row in r["annotate"].items():
        if isinstance(row, str):
            lines.append(f"| {name} | {row} | | |")
        else:
            lines.append(f"| {name} | {row['cells_per_s']} | {row['labels_as_cpu']:.4f} | {row['max_probability_difference']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
