"""What scl-train writes into RUN_DIR, and how scl-export reads it back.

    model/          the merged encoder and the base decoder, SCimilarity format (label_ints = classes)
    adapter/        the LoRA adapter in peft's format (adapter_config.json, adapter_model.safetensors)
    head.pt         {"weight", "bias", "gene_index", "gene_weight", "centroids"}: the classifier (train/head.py CellHead:
                    on the embedding and marker genes; runs from before it hold no gene_*) and per-class embedding
                    centroids (runs from before calibration also hold "novelty_limits")
    calibration.json  temperature and conformal scores of the calibration cells (runtime/conformal.py Calibration)
    classes.json    class names in the head's order
    metrics.json    everything measured (config, history, sanity checks, metrics per method, forgetting)
    report.md       the same for people, with confusion_<method>.png and confused_pairs_<method>.csv
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scl.runtime.conformal import Calibration
from scl.runtime.errors import SclError

from .head import CellHead
from .model_dir import SCimilarityModel, load_model_dir, save_model_dir


@dataclass
class TrainedRun:
    model: SCimilarityModel
    head: CellHead
    centroids: np.ndarray
    classes: list[str]
    metrics: dict
    novelty_limits: np.ndarray | None = None  # only in runs written before calibration (and after limits were stored)
    calibration: Calibration | None = None  # None in runs written before calibration


def write_run(path: Path, model: SCimilarityModel, head: CellHead, centroids: np.ndarray, calibration: Calibration, metrics: dict) -> None:
    from .report import write_report

    save_model_dir(path / "model", model)
    state = head.state() | {"centroids": torch.from_numpy(np.asarray(centroids, dtype=np.float32))}
    torch.save(state, path / "head.pt")
    (path / "calibration.json").write_text(json.dumps(calibration.to_metadata()) + "\n")
    (path / "classes.json").write_text(json.dumps(model.labels, indent=1) + "\n")
    write_report(path, metrics)
    (path / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")  # last: its presence marks a finished run


def load_run(path) -> TrainedRun:
    path = Path(path)
    for name in ("metrics.json", "head.pt", "classes.json"):
        if not (path / name).is_file():
            raise SclError(f"{path}: {name} missing; give the RUN_DIR of a finished scl-train run.")
    model = load_model_dir(path / "model")
    try:
        state = torch.load(path / "head.pt", map_location="cpu", weights_only=True)
        head = CellHead.from_state(state)
        state["centroids"]
    except Exception as err:  # torch raises many kinds for a file that is not its checkpoint
        raise SclError(f"{path / 'head.pt'}: not the head scl-train writes ({type(err).__name__}); train again or copy the run again.") from None
    try:
        classes = json.loads((path / "classes.json").read_text())
    except ValueError:
        raise SclError(f"{path / 'classes.json'}: not valid JSON; train again or copy the run again.") from None
    if len(classes) != head.n_classes or head.latent_dim != model.latent_dim:
        raise SclError(f"{path}: head.pt ({head.latent_dim} -> {head.n_classes}) does not fit the model or classes.json.")
    if len(head.gene_index) and not 0 <= int(head.gene_index.min()) <= int(head.gene_index.max()) < len(model.gene_order):
        raise SclError(f"{path}: head.pt reads genes outside the model's {len(model.gene_order):,}; train again or copy the run again.")
    limits = state["novelty_limits"].numpy() if "novelty_limits" in state else None
    metrics = json.loads((path / "metrics.json").read_text())
    return TrainedRun(model, head, state["centroids"].numpy(), classes, metrics, limits, read_calibration(path, len(classes), metrics))


def read_calibration(path: Path, n_classes: int, metrics: dict) -> Calibration | None:
    """The run's calibration; None only for runs trained before scl calibrated (their metrics.json records none)."""
    file = path / "calibration.json"
    if not file.is_file():
        if "calibration" in metrics:
            raise SclError(f"{file} is missing, though metrics.json records a calibration: the run is incomplete; "
                           "copy the whole run folder again (or train again). Without it the model would lose prediction sets and novelty p-values.")
        return None
    try:
        calibration = Calibration.from_metadata(json.loads(file.read_text()))
    except (ValueError, KeyError, TypeError):
        raise SclError(f"{file}: not the calibration scl-train writes; train again or copy the run again.") from None
    if len(calibration.class_scores) != n_classes or len(calibration.class_distances) != n_classes:
        raise SclError(f"{file}: calibrates {len(calibration.class_scores)} classes but the run has {n_classes}; train again.")
    return calibration
