"""Every exported file checks itself against the torch model on sample cells; the result sits beside it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from scl.runtime import model_metadata as meta
from scl.runtime.atomic import atomic_path
from scl.runtime.normalize import lognorm

from .graph import AnnotationModel, EncoderModel

FP32_TOLERANCE = 1e-4
INT8_AGREEMENT_WARNING = 0.95  # an int8 file that changes more labels than this warns, in its report and on stderr


def torch_outputs(module: AnnotationModel | EncoderModel, counts: np.ndarray, is_lognorm: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """(probabilities, embedding); probabilities None for an encoder-only model."""
    with torch.no_grad():
        out = module(torch.from_numpy(counts), torch.tensor([float(is_lognorm)]))
    return (out[0].numpy(), out[1].numpy()) if isinstance(out, tuple) else (None, out.numpy())


def validation_providers(variant: str) -> list[str]:
    """fp16 is for CUDA; onnxruntime's CPU provider may lack fp16 kernels."""
    if variant == "fp16" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_outputs(path: Path, counts: np.ndarray, is_lognorm: bool, providers=("CPUExecutionProvider",)) -> tuple[np.ndarray | None, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=list(providers))
    feed = {meta.INPUT_COUNTS: counts, meta.INPUT_IS_LOGNORM: np.array([float(is_lognorm)], dtype=np.float32)}
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(names, feed)))
    return out.get("probabilities"), out["embedding"]


def nearest_other(embedding: np.ndarray) -> np.ndarray:
    """Each sample cell's nearest other sample cell: what a reference search sees of an embedding."""
    scores = embedding @ embedding.T
    np.fill_diagonal(scores, -np.inf)
    return scores.argmax(axis=1)


def compare(path: Path, variant: str, module: AnnotationModel | EncoderModel, counts: np.ndarray, sample: str) -> dict:
    providers = validation_providers(variant)
    t_probs, t_emb = torch_outputs(module, counts, False)
    try:
        o_probs, o_emb = onnx_outputs(path, counts, False, providers)
    except Exception as err:  # onnxruntime's NOT_IMPLEMENTED for a kernel this provider lacks
        return {"variant": variant, "sample": sample, "cells": len(counts), "providers": providers, "validated": False,
                "reason": str(err).splitlines()[0][:300], "passed": variant != "fp32"}
    lognormed = lognorm(counts.astype(np.float32, copy=True))
    o_probs_ln, o_emb_ln = onnx_outputs(path, lognormed, True, providers)
    result = {"variant": variant, "sample": sample, "cells": len(counts), "providers": providers, "validated": True,
              "max_abs_diff_embedding": float(np.abs(t_emb - o_emb).max()),
              "neighbour_agreement": float((nearest_other(t_emb) == nearest_other(o_emb)).mean()) if len(counts) > 1 else 1.0}
    if t_probs is None:
        result |= {"encoder_only": True, "lognorm_input_max_abs_diff": float(np.abs(o_emb_ln - o_emb).max())}
        result["passed"] = variant != "fp32" or result["max_abs_diff_embedding"] <= FP32_TOLERANCE
        return result
    result |= {"max_abs_diff_probabilities": float(np.abs(t_probs - o_probs).max()),
               "label_agreement": float((t_probs.argmax(1) == o_probs.argmax(1)).mean()),
               "lognorm_input_max_abs_diff": float(np.abs(o_probs_ln - o_probs).max())}
    result["passed"] = variant != "fp32" or (
        result["max_abs_diff_probabilities"] <= FP32_TOLERANCE and result["max_abs_diff_embedding"] <= FP32_TOLERANCE and result["label_agreement"] == 1.0
    )
    if variant == "int8" and result["label_agreement"] < INT8_AGREEMENT_WARNING:
        result["warning"] = f"the int8 model changes {100 * (1 - result['label_agreement']):.1f}% of labels on these cells; prefer the fp32 model"
    return result


def write_report(path: Path, result: dict) -> None:
    """<model>.validation.json beside the model, written once the model is in place."""
    with atomic_path(f"{path}.validation.json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1) + "\n")
