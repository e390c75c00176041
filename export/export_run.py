"""A trained run (scl-train's folder) to one self-contained ONNX file, plus int8 and fp16 variants, each validated
against torch before it replaces anything: `export_run`, which scl-export (cli.py), the demo and the benchmarks call.
"""

from __future__ import annotations

import datetime
import os
from importlib.metadata import version
from pathlib import Path

import numpy as np

from scl.runtime.errors import SclError
from scl.runtime.expression import ExpressionSource, ReadOptions
from scl.runtime.integrity import file_sha256
from scl.runtime.model_metadata import FORMAT_VERSION, INPUT_COUNTS, INPUT_IS_LOGNORM
from scl.runtime.normalize import TARGET_SUM
from scl.runtime.places import Place, is_inside, refuse_clashes


def metadata_values(run, run_dir: Path) -> dict:
    m = run.metrics
    card = {
        "name": run_dir.name,
        "base_model": m["config"]["base_model"],
        "base_model_encoder_sha256": m.get("base_model_encoder_sha256"),
        "training_data": m["config"]["data"],
        "training_data_sha256": m["training_data_sha256"],
        "label_key": m["config"]["label_key"],
        "cells": m["cells"],
        "validation_metrics": {k: {s: v[s] for s in ("top1", "macro_f1", "balanced_accuracy")} for k, v in m["methods"].items()},
        "lora": {k: m["config"][k] for k in ("rank", "alpha", "epochs", "loss")},
        "head": m.get("head", {"reads": "the embedding"}),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "scl_version": version("scl"),
    }
    values = {
        "format_version": FORMAT_VERSION,
        "gene_order": run.model.gene_order,
        "classes": run.classes,
        "normalization": {"target_sum": TARGET_SUM, "log1p": True, "aligned_first": True},
        "input": {"name": INPUT_COUNTS, "kind": "raw counts aligned to gene_order (float32 [cells, genes])",
                  "lognorm_flag": INPUT_IS_LOGNORM, "lognorm_kind": "log1p(counts per 1e4); set the flag to 1"},
        "model_card": card,
        "centroids": np.round(run.centroids, 6).tolist(),
    }
    if len(run.head.gene_index):
        values["head_genes"] = [run.model.gene_order[i] for i in run.head.gene_index.tolist()]
    if run.calibration is not None:
        values["calibration"] = run.calibration.to_metadata()
    if run.novelty_limits is not None:
        novelty = m.get("novelty", {})
        values["novelty_limits"] = {"values": np.round(run.novelty_limits, 6).tolist(), "quantile": novelty.get("quantile"),
                                    "from": "the larger quantile of each class's training and held-out cells' cosine distances to its centroid"}
    return values


def base_metadata(model, folder: Path) -> dict:
    """The metadata of an encoder-only model: a base's gene order and where it came from; no classes."""
    card = {"name": folder.name, "base_model": str(folder), "base_model_encoder_sha256": file_sha256(str(folder / "encoder.ckpt")),
            "encoder_only": True, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "scl_version": version("scl")}
    return {"format_version": FORMAT_VERSION, "gene_order": model.gene_order, "classes": [], "encoder_only": True,
            "normalization": {"target_sum": TARGET_SUM, "log1p": True, "aligned_first": True},
            "input": {"name": INPUT_COUNTS, "kind": "raw counts aligned to gene_order (float32 [cells, genes])",
                      "lognorm_flag": INPUT_IS_LOGNORM, "lognorm_kind": "log1p(counts per 1e4); set the flag to 1"},
            "model_card": card, "centroids": []}


def is_base_folder(path: Path) -> bool:
    """A SCimilarity model folder (scl-pretrain's output, the official weights), not a scl-train run."""
    return (path / "encoder.ckpt").is_file() and not (path / "metrics.json").exists()


def validation_cells(run, sample_data: str | None, n: int, gene_order: list[str] | None = None) -> tuple[np.ndarray, str]:
    """Cells to compare each exported file with torch on: --sample-data, else the run's validation or training data,
    else random counts. `run` None: a base folder's export (`gene_order` given)."""
    from .onnx_file import random_counts

    config = run.metrics["config"] if run is not None else {}
    gene_order = gene_order or run.model.gene_order
    path = sample_data or config.get("val_data") or config.get("data")
    if path and os.path.exists(path):
        with ExpressionSource(path, gene_order, ReadOptions(min_genes=1)) as src:  # any overlap serves to compare torch and onnx
            blocks, total = [], 0
            for _, x in src.blocks(normalise=False):
                blocks.append(x)
                total += len(x)
                if total >= n:
                    break
        if src.input_kind == "counts":
            return np.vstack(blocks)[:n], path
    return random_counts(n, len(gene_order)), "random Poisson counts (no count data to sample)"


def fp32_failure(result: dict, run) -> str:
    text = (f"the fp32 export disagrees with torch beyond 1e-4 (probabilities {result['max_abs_diff_probabilities']:.1e}, "
            f"embedding {result['max_abs_diff_embedding']:.1e}, labels {100 * result['label_agreement']:.1f}% equal); nothing was written "
            "(a file already at --out is left as it was)")
    if "encoder_only" in result:
        return f"the fp32 export of the encoder disagrees with torch beyond 1e-4 (embedding {result['max_abs_diff_embedding']:.1e}); nothing was written."
    head_norm = run.head.max_row_norm()
    if result["max_abs_diff_embedding"] <= 1e-6 and head_norm > 1000:
        text += (f". The embeddings agree, but the head's weights are huge (row norm {head_norm:,.0f}) and magnify float32 rounding: "
                 "the base embedding is nearly collapsed; pretrain the base with a larger --triplet-weight (e.g. 0.5) or on more cells")
    return text + "."


def variant_path(out: Path, variant: str) -> Path:
    return out if variant == "fp32" else out.with_name(f"{out.stem}.{variant}.onnx")


def check_out_places(out: Path, run_dir: Path, sample_data: str | None) -> None:
    """--out and the files named after it must not land in the run or on the cells read."""
    if out.suffix != ".onnx":
        raise SclError(f"{out}: --out must end in .onnx (the variants and validation reports are named after it).", "out")
    if is_inside(str(out), str(run_dir)):
        raise SclError(f"{out}: --out is inside the run folder {run_dir}, whose files scl-export reads; write the model elsewhere.", "out")
    writes = [Place(str(variant_path(out, v)), f"the {v} model") for v in ("fp32", "int8", "fp16")]
    writes += [Place(f"{w.path}.validation.json", f"{w.role}'s validation report") for w in list(writes)]
    refuse_clashes([Place(sample_data, "the sample data", "sample_data")] if sample_data else [], writes)


def export_run(run_dir, out, quantize: str = "none", fp16: bool = False, sample_data: str | None = None, sample_cells: int = 512) -> list[dict]:
    """Export `run_dir` to `out` (.onnx) and the asked-for variants; one validation result per file written.

    Parameters
    ----------
    run_dir
        A finished scl-train run folder; or a base model folder (SCimilarity's format: scl-pretrain's output or the
        official weights), exported encoder-only: embeddings, for annotation by a reference's nearest cells.
    out
        The fp32 .onnx to write; the variants are named after it (model.int8.onnx, model.fp16.onnx), each with its
        <file>.validation.json beside it.
    quantize
        "int8" also writes the dynamic int8 variant (for CPUs); "none" does not.
    fp16
        Also write the fp16 variant (for CUDA GPUs).
    sample_data, sample_cells
        Cells to validate on (default: the run's validation or training data) and how many.

    Examples
    --------
    >>> results = export_run("demo_out/run", "model.onnx", quantize="int8")
    >>> [(r["variant"], r["label_agreement"]) for r in results]
    """
    try:
        import onnx
        import onnxruntime  # noqa: F401  (validation runs every exported file)
    except ImportError as err:
        raise SclError(f"scl-export needs {err.name}: pip install 'scl[train,cpu]' (or [train,gpu]).") from None
    from scl.runtime.atomic import atomic_path
    from scl.train.run_dir import load_run

    from . import onnx_file
    from scl.train.model_dir import load_model_dir

    from .graph import EncoderModel, annotation_model
    from .validate import compare, write_report

    out = Path(out)
    check_out_places(out, Path(run_dir), sample_data)
    if not out.parent.is_dir():
        raise SclError(f"{out.parent}: no such directory for --out; create it first.")
    if not os.access(out.parent, os.W_OK):  # before minutes of export work, not after
        raise SclError(f"{out.parent}: the folder for --out is not writable; choose another.")
    if is_base_folder(Path(run_dir)):
        run, base = None, load_model_dir(run_dir)
        module, values = EncoderModel(base.encoder), base_metadata(base, Path(run_dir))
        counts, sample = validation_cells(None, sample_data, sample_cells, base.gene_order)
    else:
        run = load_run(run_dir)
        base, module, values = run.model, annotation_model(run), metadata_values(run, Path(run_dir))
        counts, sample = validation_cells(run, sample_data, sample_cells)
    variants = [("fp32", True, lambda: onnx_file.export_fp32(module, len(base.gene_order))),
                ("int8", quantize == "int8", lambda: onnx_file.quantize_int8(out)),
                ("fp16", fp16, lambda: onnx_file.convert_fp16(onnx.load(str(out))))]
    results = []
    for name, wanted, make in variants:
        if not wanted:
            continue
        path = variant_path(out, name)
        with atomic_path(path, suffix=".onnx") as tmp:  # a file that fails validation never replaces the one there
            onnx_file.save_unchecked(make(), values, tmp)
            result = compare(Path(tmp), name, module, counts, sample)
            if not result["passed"]:
                raise SclError(fp32_failure(result, run))
        write_report(path, result)
        results.append(result | {"path": str(path)})
    return results


def summary_line(result: dict) -> str:
    """One exported file for people: variant, size and how it agreed with torch."""
    path, size = result["path"], os.path.getsize(result["path"]) / 1e6
    if not result["validated"]:
        return f"{path}: {result['variant']}, {size:.1f} MB; not validated here ({', '.join(result['providers'])}: {result['reason']})"
    if "encoder_only" in result:
        return (f"{path}: {result['variant']} encoder only (embeddings), {size:.1f} MB; vs torch on {result['cells']} cells: "
                f"nearest sample cell the same for {100 * result['neighbour_agreement']:.2f}%, max |d embedding| {result['max_abs_diff_embedding']:.2e}")
    return (f"{path}: {result['variant']}, {size:.1f} MB; vs torch on {result['cells']} cells: "
            f"labels agree {100 * result['label_agreement']:.2f}%, max |d prob| {result['max_abs_diff_probabilities']:.2e}, "
            f"max |d embedding| {result['max_abs_diff_embedding']:.2e}")
