"""From probabilities and embeddings to what users read, and the one declaration of the output columns.

Every output (CSV, h5ad, AnnData from Python, the server's JSON, `AnnotationResult.to_frame()`) is written from
COLUMNS: adding a column is one `Column` here plus its computation in `call_cells` (or `voting.py`).

Novelty is the cosine distance from a cell's embedding to its label's training centroid. A cell of a type the
model never saw still gets one of the known labels, often with confidence 1, but sits far from that centroid.
Calibrated models (scl-train keeps calibration cells no stage trained on) judge it as a conformal p-value against
the calibration cells of that label (conformal.py): `novel` is p <= alpha. Models exported before carry a distance
limit per class instead. Novel cells are labelled unassigned when asked (`max_novelty`). With an alpha, calibrated
models also give each cell a prediction set; a cell whose set is empty is unassigned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .conformal import SET_SEPARATOR, Calibration, set_names
from .errors import SclError
from .session import Prediction

UNASSIGNED = "unassigned"
NOVELTY_ALPHA = 0.01  # novel = novelty p <= this unless an alpha is given: the 99th percentile the older limits used


@dataclass(frozen=True)
class Column:
    """One per-cell output. CSV header and JSON key: `name`; AnnData obs column: f"{key_added}_{name}".

    Examples
    --------
    >>> [c.name for c in scl.COLUMNS]
    ['label', 'confidence', 'second_label', 'second_probability', 'novelty', 'novelty_p', 'genes_detected', 'novel', 'prediction_set', 'set_size', 'unassigned_reason']
    >>> Column("entropy", "float", "entropy of the probabilities")   # plus its computation in call_cells
    """

    name: str
    kind: str  # "label": class index (-1 unassigned), written as names; "reason": REASON_CATEGORIES index; "category", "set", "text": strings; "float"; "int"; "bool"
    doc: str


COLUMNS = (
    Column("label", "label", "predicted cell type, or 'unassigned' (below min_confidence or min_cell_genes, or novel with max_novelty)"),
    Column("confidence", "float", "probability of the predicted type"),
    Column("second_label", "label", "runner-up cell type"),
    Column("second_probability", "float", "probability of the runner-up"),
    Column("novelty", "float", "cosine distance from the cell's embedding to its label's training centroid"),
    Column("novelty_p", "float", "conformal p-value of the novelty among the label's calibration cells (calibrated models)"),
    Column("genes_detected", "int", "how many of the model's genes the cell expresses (nonzero)"),
    Column("novel", "bool", "unlike the calibration cells: novelty p <= alpha (calibrated models), else beyond the label's limit"),
    Column("prediction_set", "set", "the types that, at the given alpha, cannot be ruled out, most probable first ('|' between)"),
    Column("set_size", "int", "how many types the prediction set holds (0: unassigned)"),
    Column("unassigned_reason", "reason", "why the cell is unassigned (the first of: few_genes, low_confidence, novel, empty_set); '' if assigned"),
)
KNN_COLUMNS = (  # with a reference (reference.py): SCimilarity's vote over the k nearest reference cells
    Column("knn_label", "text", "the reference label with the most weight among the cell's k nearest reference cells (1/distance each)"),
    Column("knn_share", "float", "that label's share of the neighbours' weight"),
    Column("knn_second_label", "text", "the runner-up label among the neighbours ('' when they all agree)"),
    Column("knn_min_dist", "float", "cosine distance to the nearest reference cell"),
    Column("knn_novelty_p", "float", "conformal p-value of knn_min_dist among held-out reference cells of knn_label"),
    Column("knn_novel", "bool", "unlike the held-out reference cells: knn_novelty_p <= alpha (0.01 unless given)"),
    Column("knn_agrees", "bool", "the head's most probable type is knn_label"),
)
REASONS = {  # why a cell is unassigned, in the order they are judged, and the setting that changes it
    "few_genes": "min_cell_genes", "low_confidence": "min_confidence", "novel": "max_novelty", "empty_set": "alpha"}
REASON_CATEGORIES = ("", *REASONS)  # what the reason column's codes stand for; "": assigned
VOTING_COLUMNS = (
    Column("cluster", "category", "the over-clustering cluster the cell belongs to"),
    Column("majority_label", "category", "the most frequent label of the cell's cluster, or 'heterogeneous'"),
    Column("majority_share", "float", "share of the cell's cluster that carries the cluster's most frequent label"),
)
Calls = dict  # column name -> np.ndarray, one value per cell


def cosine_distance(embedding: np.ndarray, unit_centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return (1.0 - np.sum(embedding * unit_centroids[labels], axis=1)).astype(np.float32)


MIN_CELL_GENES_FLOOR = 20  # a cell with fewer measured genes than this is not called, however narrow its input


def default_min_cell_genes(genes_shown: int) -> int:
    """200 of SCimilarity's 28,231 genes (scanpy's usual min_genes), as the same share of the genes an input can show
    (the model's genes it holds), and never under MIN_CELL_GENES_FLOOR. Full-transcriptome cells measured 236 (PBMC,
    early 10x) to 640 (brain) at the least; a highly-variable-gene subset shows far fewer of the model's genes (PBMC
    cells on 481 of them: median 188), and held to 200 most such cells would be unassigned for the input's width, not
    for being empty."""
    return max(MIN_CELL_GENES_FLOOR, math.ceil(200 * genes_shown / 28231))


@dataclass
class CallRules:
    """How probabilities and embeddings become calls: what Annotator derives from the model and the user's options."""

    min_confidence: float = 0.0
    novelty_limits: np.ndarray | None = None  # per-class distance limits (older models, or one number for all)
    calibration: Calibration | None = None
    novelty_alpha: float = NOVELTY_ALPHA
    set_alpha: float | None = None  # prediction sets at this level; None: no sets
    unassign_novel: bool = False
    min_cell_genes: int = 0
    kept: np.ndarray | None = None  # bool per class: the classes restrict_to / exclude leave (None: all)


def call_cells(pred: Prediction, unit_centroids: np.ndarray, rules: CallRules | None = None, classes: list[str] | None = None,
               genes_detected: np.ndarray | None = None) -> Calls:
    """The COLUMNS for a block of cells: 'novelty_p' for calibrated models, 'novel' where there are limits or a
    calibration, 'prediction_set' and 'set_size' with a set alpha (names need `classes`)."""
    rules = rules or CallRules()
    probs = pred.probabilities
    kept = np.ones(probs.shape[1], dtype=bool) if rules.kept is None else rules.kept
    order = np.argsort(-np.where(kept, probs, -1.0), axis=1, kind="stable")  # ties go to the earlier class
    best = order[:, 0]
    second = order[:, 1] if kept.sum() > 1 else best
    rows = np.arange(len(probs))
    confidence = probs[rows, best]
    novelty = cosine_distance(pred.embedding, unit_centroids, best)
    if genes_detected is None:
        genes_detected = np.full(len(best), -1, dtype=np.int32)  # not counted (callers that pass rows already aligned)
    calls = {"label": best, "confidence": confidence, "second_label": second, "second_probability": probs[rows, second],
             "novelty": novelty, "genes_detected": genes_detected.astype(np.int32)}
    novel = np.zeros(len(best), dtype=bool)
    if rules.novelty_limits is not None:
        novel = novelty > rules.novelty_limits[best]
        calls["novel"] = novel
    if rules.calibration is not None:
        calls["novelty_p"] = rules.calibration.novelty_p(novelty, best)
        if rules.novelty_limits is None:
            novel = calls["novelty_p"] <= rules.novelty_alpha
            calls["novel"] = novel
    failed = {"few_genes": (genes_detected < rules.min_cell_genes) & (genes_detected >= 0),
              "low_confidence": confidence < rules.min_confidence, "novel": novel & rules.unassign_novel}
    if rules.calibration is not None and rules.set_alpha is not None:
        in_set = rules.calibration.prediction_sets(probs, rules.set_alpha) & kept
        calls["prediction_set"] = set_names(in_set, probs, classes)
        calls["set_size"] = in_set.sum(axis=1).astype(np.int32)
        failed["empty_set"] = calls["set_size"] == 0
    reason = np.zeros(len(best), dtype=np.int8)
    for name in reversed(list(failed)):  # the first reason judged is the one given
        reason[failed[name]] = REASON_CATEGORIES.index(name)
    calls["label"] = np.where(reason == 0, best, -1)
    calls["unassigned_reason"] = reason
    return calls


def kept_labels(labels: list[str], restrict_to, exclude, whose: str) -> np.ndarray | None:
    """bool per label: those `restrict_to` names (or all but those `exclude` names); None when neither is given. A name
    that is not one of `labels` is refused in one line that lists them."""
    if restrict_to is None and exclude is None:
        return None
    option, names = ("restrict_to", restrict_to) if restrict_to is not None else ("exclude", exclude)
    unknown = [n for n in names if n not in set(labels)]
    if unknown:
        raise SclError(f"{option}: {unknown[0]!r} is not a label of {whose}; its labels: {', '.join(labels)}.", option)
    kept = np.isin(np.asarray(labels, dtype=object), list(names))
    kept = kept if option == "restrict_to" else ~kept
    if not kept.any():
        raise SclError(f"exclude: every label of {whose} is excluded; leave at least one.", "exclude")
    return kept


def restricted(pred: Prediction, kept: np.ndarray | None) -> Prediction:
    """The probabilities renormalised over the kept classes (excluded ones 0); a cell with no weight on any kept class
    gets them all equally."""
    if kept is None:
        return pred
    probs = np.where(kept, pred.probabilities, 0.0)
    total = probs.sum(axis=1, keepdims=True)
    probs = np.where(total > 0, probs / np.where(total > 0, total, 1.0), kept / kept.sum())
    return Prediction(probs.astype(np.float32), pred.embedding)


def columns_for(rules: CallRules) -> list[Column]:
    """The COLUMNS call_cells gives under `rules`, in their order: what a run declares before its first block."""
    calibrated = rules.calibration is not None
    sets = calibrated and rules.set_alpha is not None
    given = {"novelty_p": calibrated, "novel": calibrated or rules.novelty_limits is not None, "prediction_set": sets, "set_size": sets}
    return [c for c in COLUMNS if given.get(c.name, True)]


ALL_COLUMNS = COLUMNS + KNN_COLUMNS + VOTING_COLUMNS


def present(calls: Calls, columns=ALL_COLUMNS) -> list[Column]:
    return [c for c in columns if c.name in calls]


def label_names(classes: list[str], index: np.ndarray) -> np.ndarray:
    names = np.array(list(classes) + [UNASSIGNED], dtype=object)
    return names[index]  # -1 picks UNASSIGNED


def as_values(column: Column, values: np.ndarray, classes: list[str]) -> np.ndarray:
    """A column's values as users read them: names for labels and reasons, the stored values otherwise."""
    if column.kind == "reason":
        return np.array(REASON_CATEGORIES, dtype=object)[values]
    return label_names(classes, values) if column.kind == "label" else values


def json_value(column: Column, value, classes: list[str]):
    if column.kind == "label":
        return classes[value] if value >= 0 else UNASSIGNED
    if column.kind == "reason":
        return REASON_CATEGORIES[value]
    if column.kind == "float":
        return float(value)
    if column.kind == "int":
        return int(value)
    if column.kind == "bool":
        return bool(value)
    if column.kind == "set":
        return [name for name in str(value).split(SET_SEPARATOR) if name]
    return str(value)
