"""What LoRA saves against full fine-tuning of the encoder: trainable parameters, seconds per epoch, peak memory.

Both train the same way (scl.train.finetune.train_lora: CE + triplet + reconstruction, the same head start,
batches and seed); LoRA at lr 1e-3 as in the README's recipe, full fine-tuning at 1e-4 (1e-3 on every weight
of a 30M-parameter encoder is far too large for Adam). Each method runs in a process of its own; the peak RSS
is reset after the data and the base model are read (Linux's clear_refs), so it is the training's peak.

    python benchmarks/training_cost.py --base-model base --data pbmc_train.h5ad --val-data pbmc_val.h5ad
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

METHODS = {"lora": 1e-3, "full": 1e-4}


def status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux 4.0+), so the peak is training's, not reading's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(method: str, base_model: str, data: str, val_data: str, epochs: int) -> dict:
    """Runs in the child process."""
    import numpy as np
    import torch

    from scl.train.config import FinetuneConfig
    from scl.train.device import resolve_device
    from scl.train.evaluate import linear_probe
    from scl.train.finetune import FullFinetuneClassifier, LoraClassifier, embed, train_lora
    from scl.train.model_dir import load_model_dir
    from scl.train.roles import training_cells

    config = FinetuneConfig(base_model=base_model, data=data, val_data=val_data, lr=METHODS[method], epochs=epochs)
    device = resolve_device(config.device)
    base = load_model_dir(base_model)
    cells = training_cells(config, base)
    train, val = cells.train, cells.validation
    probe = linear_probe(embed(base.encoder.to(device), train.x, device), cells.y_train, embed(base.encoder, val.x, device), len(cells.classes), config.seed)
    before = status_mb("VmRSS")
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    classifier = LoraClassifier if method == "lora" else FullFinetuneClassifier
    model, history, _ = train_lora(base, cells, probe, config.loss, config, device, False, classifier=classifier)
    counts = model.parameter_counts()
    result = {"method": method, "lr": config.lr, "epochs": epochs, "device": str(device), "cells": len(train),
              "trainable_parameters": counts["trainable"], "total_parameters": counts["total"],
              "seconds_per_epoch": round(float(np.median([row["train_seconds"] for row in history])), 2),
              "rss_before_training_mb": round(before, 1), "peak_rss_mb": round(status_mb("VmHWM"), 1),
              "best_val_macro_f1": max(row["val_macro_f1"] for row in history)}
    if device.type == "cuda":
        result["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 1024**2, 1)
    return result


def compare(base_model: str, data: str, val_data: str, epochs: int) -> dict:
    rows = {}
    for method in METHODS:
        cmd = [sys.executable, __file__, "--method", method, "--base-model", base_model, "--data", data, "--val-data", val_data, "--epochs", str(epochs)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"training_cost {method} failed:\n{done.stderr[-2000:]}")
        rows[method] = json.loads(done.stdout.strip().splitlines()[-1])
    lora, full = rows["lora"], rows["full"]
    return {"methods": rows, "lora_vs_full": {
        "trainable_parameters": round(lora["trainable_parameters"] / full["trainable_parameters"], 4),
        "seconds_per_epoch": round(lora["seconds_per_epoch"] / full["seconds_per_epoch"], 3),
        "peak_rss": round(lora["peak_rss_mb"] / full["peak_rss_mb"], 3),
        "training_rss_growth": round((lora["peak_rss_mb"] - lora["rss_before_training_mb"]) / max(full["peak_rss_mb"] - full["rss_before_training_mb"], 1e-9), 3)}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--val-data", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--method", choices=list(METHODS), help="measure one method in this process (what compare() runs)")
    args = parser.parse_args(argv)
    if args.method:
        print(json.dumps(measure(args.method, args.base_model, args.data, args.val_data, args.epochs)))
    else:
        print(json.dumps(compare(args.base_model, args.data, args.val_data, args.epochs), indent=1))


if __name__ == "__main__":
    main()
