"""The metadata an scl ONNX file carries (onnx metadata_props, JSON values), shared by export and runtime.

decode() refuses metadata that is missing, not JSON, of the wrong type or inconsistent with itself or with the graph
(a class list one shorter than the outputs, centroids of another width), naming the file and the key in one line.
"""

from __future__ import annotations

import json

from .errors import ModelError

FORMAT_VERSION = 2  # 2: the content digest covers the whole graph (integrity.py)
INPUT_COUNTS = "counts"  # float32 [cells, genes]: values aligned to scl.gene_order
INPUT_IS_LOGNORM = "input_is_lognorm"  # float32 [1]: 1 skips the in-graph normalisation
OUTPUTS = ("probabilities", "embedding")
ENCODER_OUTPUTS = ("embedding",)  # an encoder-only model (a base without a head): no classes, no centroids
KEYS = ("format_version", "gene_order", "classes", "normalization", "input", "model_card", "weights_sha256", "centroids")
# absent in models exported before them: novelty_limits {"values": [per class], "quantile": q, "from": "..."} (models
# exported before calibration); content_sha256 (integrity.py); calibration (conformal.Calibration.to_metadata)
# encoder_only: true for a base model exported without a head (classes and centroids empty)
# head_genes: the marker genes the head reads beside the embedding (models whose head reads the embedding alone: none)
OPTIONAL_KEYS = ("novelty_limits", "content_sha256", "calibration", "encoder_only", "head_genes")


def encode(values: dict) -> dict[str, str]:
    return {f"scl.{k}": json.dumps(values[k]) for k in KEYS} | {f"scl.{k}": json.dumps(values[k]) for k in OPTIONAL_KEYS if k in values}


def parse(props: dict[str, str], source: str) -> dict:
    """Every scl.* entry as its JSON value."""
    out = {}
    for key, text in props.items():
        if key.startswith("scl."):
            try:
                out[key[4:]] = json.loads(text)
            except ValueError:
                raise ModelError(f"{source}: metadata {key} is not valid JSON; export the model again.") from None
    return out


def decode(props: dict[str, str], source: str, genes: int | None = None, classes: int | None = None, latent: int | None = None) -> dict:
    """The metadata, checked; `genes`, `classes` and `latent` are the graph's input and output widths where known."""
    missing = [k for k in KEYS if f"scl.{k}" not in props]
    if missing:
        raise ModelError(f"{source}: an ONNX model without scl metadata ({', '.join(missing)} missing); export it with scl-export.")
    meta = parse(props, source)
    if not isinstance(meta["format_version"], int):
        raise ModelError(f"{source}: metadata scl.format_version is {meta['format_version']!r}, not a number; export the model again.")
    if meta["format_version"] > FORMAT_VERSION:
        raise ModelError(f"{source}: model format {meta['format_version']} is newer than this scl reads ({FORMAT_VERSION}); upgrade scl.")
    _check(meta, source, genes, classes, latent)
    return meta


def _check(meta: dict, source: str, genes: int | None, classes: int | None, latent: int | None) -> None:
    def refuse(key: str, problem: str):
        raise ModelError(f"{source}: metadata scl.{key} {problem}; export the model again from its run.")

    headless = meta.get("encoder_only") is True
    for key in ("gene_order", "classes"):
        values = meta[key]
        if not isinstance(values, list) or not (values or (headless and key == "classes")) or not all(isinstance(v, str) for v in values):
            refuse(key, "is not a list of names")
        if len(set(values)) != len(values):
            refuse(key, "names one entry twice")
    if genes is not None and len(meta["gene_order"]) != genes:
        refuse("gene_order", f"lists {len(meta['gene_order'])} genes but the graph reads {genes}")
    n = len(meta["classes"])
    if classes is not None and n != classes:
        refuse("classes", f"lists {n} classes but the graph outputs {classes} probabilities")
    centroids = meta["centroids"]
    if headless and centroids == [] and n == 0:
        return
    if not isinstance(centroids, list) or len(centroids) != n or not centroids or not all(isinstance(c, list) and c and len(c) == len(centroids[0]) for c in centroids):
        refuse("centroids", f"is not {n} vectors of one width (one per class)")
    if latent is not None and len(centroids[0]) != latent:
        refuse("centroids", f"are {len(centroids[0])} wide but the embedding has {latent} dimensions")
    limits = meta.get("novelty_limits")
    if limits is not None and (not isinstance(limits, dict) or not isinstance(limits.get("values"), list) or len(limits["values"]) != n):
        refuse("novelty_limits", f"does not hold one limit per class ({n})")
    calibration = meta.get("calibration")
    if calibration is not None:
        per_class = [calibration.get(k) if isinstance(calibration, dict) else None for k in ("class_scores", "class_distances")]
        if not all(isinstance(v, list) and len(v) == n and all(isinstance(c, list) for c in v) for v in per_class):
            refuse("calibration", f"does not hold calibration scores and distances for each of the {n} classes")
        if not isinstance(calibration.get("temperature"), (int, float)) or not calibration["temperature"] > 0:
            refuse("calibration", "has no positive temperature")
