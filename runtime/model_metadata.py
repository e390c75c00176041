"""The metadata an scl ONNX file carries (onnx metadata_props, JSON values), shared by export and runtime."""

from __future__ import annotations

import json

from .errors import ModelError

FORMAT_VERSION = 1
INPUT_COUNTS = "counts"  # float32 [cells, genes]: values aligned to scl.gene_order
INPUT_IS_LOGNORM = "input_is_lognorm"  # float32 [1]: 1 skips the in-graph normalisation
OUTPUTS = ("probabilities", "embedding")
KEYS = ("format_version", "gene_order", "classes", "normalization", "input", "model_card", "weights_sha256", "centroids")
OPTIONAL_KEYS = ("novelty_limits",)  # {"values": [per class], "quantile": q, "from": "..."}; absent in models exported before it


def encode(values: dict) -> dict[str, str]:
    return {f"scl.{k}": json.dumps(values[k]) for k in KEYS} | {f"scl.{k}": json.dumps(values[k]) for k in OPTIONAL_KEYS if k in values}


def decode(props: dict[str, str], source: str) -> dict:
    missing = [k for k in KEYS if f"scl.{k}" not in props]
    if missing:
        raise ModelError(f"{source}: an ONNX model without scl metadata ({', '.join(missing)} missing); export it with scl-export.")
    meta = {k: json.loads(props[f"scl.{k}"]) for k in KEYS + OPTIONAL_KEYS if f"scl.{k}" in props}
    if meta["format_version"] > FORMAT_VERSION:
        raise ModelError(f"{source}: model format {meta['format_version']} is newer than this scl reads ({FORMAT_VERSION}); upgrade scl.")
    return meta
