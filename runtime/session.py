"""An scl ONNX model in an onnxruntime session: provider choice, metadata, prediction on aligned counts."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from . import integrity
from . import model_metadata as meta
from .conformal import Calibration
from .errors import ModelError, SclError
from .genes import GeneIndex

ENCODER_ONLY = "gives embeddings only (a base model exported without a head)"  # how every refusal of such a model opens
CUDA_UNUSABLE = "CUDA is not usable here (onnxruntime-gpu could not load its CUDA libraries, such as libcublasLt); running on the CPU."


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise SclError("onnxruntime is not installed: pip install 'scl[cpu]' (or 'scl[gpu]' for CUDA, never both).") from None
    return onnxruntime


@dataclass
class Prediction:
    probabilities: np.ndarray  # [cells, classes]
    embedding: np.ndarray  # [cells, latent], L2-normalised


class AnnotationSession:
    """One onnxruntime session for an scl model; thread-safe to run from several threads."""

    def __init__(self, path: str, device: str = "auto", threads: int | None = None):
        if not os.path.isfile(path):
            raise ModelError(f"{path}: no such model file; give the .onnx that scl-export wrote.", "model")
        self.path = path
        self.notes: list[str] = []
        data = self._read()  # verified, then handed to onnxruntime: the bytes checked are the bytes run
        self._verify(data)
        self.session = self._open(device, threads, data)
        del data
        self.provider = self.session.get_providers()[0]
        self.meta = self._metadata()
        self.gene_order = GeneIndex(self.meta["gene_order"])  # aligned against for every file and request
        self.classes: list[str] = self.meta["classes"]
        self.encoder_only = self.meta.get("encoder_only") is True  # a base without a head: embeddings only
        self.outputs = meta.ENCODER_OUTPUTS if self.encoder_only else meta.OUTPUTS
        self.latent = next(o.shape[-1] for o in self.session.get_outputs() if o.name == "embedding")  # the embedding's width
        self.centroids = np.asarray(self.meta["centroids"], dtype=np.float32)
        if len(self.centroids):  # none in an encoder-only model
            self.centroids /= np.linalg.norm(self.centroids, axis=1, keepdims=True)
        limits = self.meta.get("novelty_limits")  # None in models exported before scl stored them
        self.novelty_limits = np.asarray(limits["values"], dtype=np.float32) if limits else None
        calibration = self.meta.get("calibration")  # None in models exported before scl kept calibration cells
        self.calibration = Calibration.from_metadata(calibration) if calibration else None

    def _metadata(self) -> dict:
        """The model's metadata, checked against the graph and, where it carries one, against its content digest."""
        props = self.session.get_modelmeta().custom_metadata_map
        width = {o.name: o.shape[-1] for o in self.session.get_outputs()} | {i.name: i.shape[-1] for i in self.session.get_inputs()}
        static = {k: v if isinstance(v, int) else None for k, v in width.items()}
        return meta.decode(props, self.path, genes=static.get(meta.INPUT_COUNTS), classes=static.get(meta.OUTPUTS[0]), latent=static.get(meta.OUTPUTS[1]))

    def _read(self) -> bytes:
        try:
            with open(self.path, "rb") as fh:
                return fh.read()
        except OSError as err:
            raise ModelError(f"{self.path}: cannot read the model ({err.strerror}); check the path and its permissions.", "model") from None

    def _verify(self, data: bytes) -> None:
        """The content digest recomputed from the model's bytes. Files that are not ONNX, or carry no scl metadata, are
        left to onnxruntime and decode() to refuse in their words."""
        try:
            props = integrity.metadata_props(data)
        except ValueError:
            return
        values = meta.parse(props, self.path)
        version = values.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or "gene_order" not in values:
            return
        if integrity.KEY not in values and version >= integrity.WHOLE_MODEL_FROM:
            raise ModelError(f"{self.path}: the model's content digest (scl.content_sha256) is missing, though its format ({version}) "
                             "always carries one: the file was changed after export; export it again from its run.")
        if integrity.KEY not in values:
            self.notes.append(f"{os.path.basename(self.path)} was exported before scl stored a content digest: its weights and metadata are not verified.")
        elif self._digest(data, values) != values[integrity.KEY]:
            meta.decode(props, self.path)  # metadata broken in a way it can name (a wrong type, names twice) says so first
            raise ModelError(f"{self.path}: the model's weights or metadata differ from what scl-export wrote (content digest mismatch: "
                             "changed or damaged after export); export it again from its run.")

    @staticmethod
    def _digest(data: bytes, values: dict) -> str | None:
        try:
            return integrity.digest_of(data, values)
        except ValueError:
            return None  # unreadable beyond its metadata: a mismatch

    def _open(self, device: str, threads: int | None, data: bytes):
        ort = _onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        if device not in ("auto", "cpu", "cuda"):
            raise SclError(f"device {device!r}: choose auto, cuda or cpu.", "device")
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise SclError("device cuda: this onnxruntime has no CUDA provider; install scl[gpu] (onnxruntime-gpu) in an environment without onnxruntime.", "device")
        if device != "cpu" and "CUDAExecutionProvider" in available:
            # onnxruntime-gpu lists CUDA even when its libraries cannot load; judge by what the session got,
            # with the provider's own error lines silenced in favour of one sentence.
            ort.set_default_logger_severity(4)
            options.log_severity_level = 4
            session = self._create(ort, options, ["CUDAExecutionProvider", "CPUExecutionProvider"], data)
            ort.set_default_logger_severity(2)
            options.log_severity_level = 2
            if "CUDAExecutionProvider" in session.get_providers():
                return session
            if device == "cuda":
                raise SclError(f"device cuda: {CUDA_UNUSABLE.split(';')[0]}; install the CUDA and cuDNN versions this onnxruntime-gpu build requires (onnxruntime.ai, CUDA provider requirements) or use the CPU.", "device")
            self.notes.append(CUDA_UNUSABLE)
            return session
        return self._create(ort, options, ["CPUExecutionProvider"], data)

    def _create(self, ort, options, providers, data: bytes):
        try:
            return ort.InferenceSession(data, options, providers=providers)
        except Exception as err:  # onnxruntime raises its own types for bad files
            first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise ModelError(f"{self.path}: not a loadable ONNX model ({first}); export it again with scl-export.") from None

    def predict(self, x: np.ndarray, is_lognorm: bool = False) -> Prediction:
        feed = {meta.INPUT_COUNTS: np.ascontiguousarray(x, dtype=np.float32), meta.INPUT_IS_LOGNORM: np.array([float(is_lognorm)], dtype=np.float32)}
        out = self.session.run(list(self.outputs), feed)
        if self.encoder_only:
            return Prediction(np.zeros((len(x), 0), dtype=np.float32), out[0])
        return Prediction(*out)

    def describe(self) -> dict:
        card = self.meta["model_card"]
        return {"path": self.path, "provider": self.provider, "classes": self.classes, "genes": len(self.gene_order),
                "format_version": self.meta["format_version"], "weights_sha256": self.meta["weights_sha256"], "model_card": card,
                "novelty_limits": self.meta.get("novelty_limits"), "calibration": self.calibration_summary()}

    def calibration_summary(self) -> dict | None:
        """What /model and reports say of the calibration: not the stored scores."""
        c = self.calibration
        return None if c is None else {"cells": c.cells, "temperature": c.temperature, "optimistic": c.optimistic, "from": c.source,
                                       "cells_per_class": dict(zip(self.classes, (len(s) for s in c.class_scores)))}
