"""Which cells scl-train trains on, chooses its epoch on, and calibrates on: three roles that never share a cell.

Calibration cells must be new to every stage, the base model included: cells the base was pretrained on sit closer
to their class in its embedding than new cells do, so limits and thresholds set on them are too tight for new data
(measured: --max-novelty auto flagged a quarter of new cells of known types instead of about 1%). scl-pretrain records
per file which cells it held out (pretrain.json); scl-train recognises the file by its SHA-256 and calibrates on
those. A base with no pretrain.json (the official SCimilarity weights) never saw the user's cells.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from scl.runtime.errors import SclError
from scl.runtime.integrity import file_sha256

from scl.runtime.expression import ReadOptions

from .config import FinetuneConfig
from .distributed import Processes
from .head import FIT_CELLS_PER_CLASS, stratified_sample
from .data import LabelledCells, load_labelled, log, refuse_tiny_classes, stratified_holdout


@dataclass
class CalibrationSplit:
    rest: LabelledCells  # for training (and validation, unless `validation` holds it)
    calibration: LabelledCells  # for calibration only
    source: str  # where the calibration cells came from, in words
    optimistic: bool  # the base model was pretrained on the calibration cells
    validation: LabelledCells | None = None  # cells the base held out, for validation; None: --val-data or a split of `rest`


@dataclass
class TrainingCells:
    """scl-train's cells in their three roles, disjoint: training, validation (picks the epoch) and calibration (no
    stage fits to them), with the classes (those of the training cells, sorted) and each role's labels as indices.

    Examples
    --------
    >>> cells = training_cells(FinetuneConfig(base_model="base", data="train.h5ad"), load_model_dir("base"))
    >>> len(cells.train), cells.classes[:2], cells.y_val[:3]
    """

    train: LabelledCells
    validation: LabelledCells
    calibration: LabelledCells
    classes: list[str]
    calibration_source: str  # where the calibration cells came from, in words
    optimistic: bool  # the base model was pretrained on the calibration cells
    validation_summary: dict  # where the validation cells came from and how many the base saw
    seed: int = 0

    def _indices(self, cells: LabelledCells) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[c] for c in cells.labels], dtype=int)

    @cached_property
    def y_train(self) -> np.ndarray:
        return self._indices(self.train)

    @cached_property
    def y_val(self) -> np.ndarray:
        return self._indices(self.validation)

    @cached_property
    def y_cal(self) -> np.ndarray:
        return self._indices(self.calibration)

    @cached_property
    def fit_rows(self) -> np.ndarray:
        """The training cells the probe, the k-NN baseline, the shipped head and the centroids are fitted on: all of
        them up to FIT_CELLS_PER_CLASS of a class, else a stratified sample (their embeddings stay small)."""
        return stratified_sample(self.y_train, FIT_CELLS_PER_CLASS, self.seed)


def training_cells(config: FinetuneConfig, base, processes: Processes = Processes()) -> TrainingCells:
    """The cells of --data (and --val-data, --calibration-data) in their roles, each refusal in one line. Under
    torchrun the processes share the pass that keys the cells."""
    options = ReadOptions(min_genes=config.min_genes)
    cells = load_labelled(config.data, base.gene_order, config.label_key, options, config.stream)
    refuse_tiny_classes(cells.labels, config.data)
    held = split_calibration(cells, config, base.gene_order, options, processes)
    if not len(held.calibration):
        raise SclError(f"{config.calibration_data or config.data}: no cells left to calibrate on (too few cells of each type to hold "
                       "any out); give --calibration-data or more cells.")
    refuse_tiny_classes(held.rest.labels, f"{config.data} without its calibration cells")
    train, val = split_validation(held, config, base.gene_order, options)
    summary = validation_summary(config, val, held)
    refuse_shared_cells([("training", train, config.data), ("validation", val, config.val_data or config.data),
                         ("calibration", held.calibration, config.calibration_data or config.data)], processes)
    classes = sorted(np.unique(train.labels))
    for cells_of, what, path in ((val, "validation", config.val_data or config.data), (held.calibration, "calibration", config.calibration_data or config.data)):
        unknown = sorted(map(str, set(cells_of.labels) - set(classes)))
        if unknown:
            raise SclError(f"{path}: {what} labels {unknown} never occur in the training data; drop those cells or add training cells.")
    uncalibrated = sorted(set(classes) - set(held.calibration.labels))
    if uncalibrated:
        log.warning(f"warning: no calibration cells of {', '.join(map(repr, uncalibrated))}: their prediction sets and novelty use all calibration cells pooled")
    absent = sorted(set(classes) - set(val.labels))
    if absent:
        log.warning(f"warning: the validation cells include no {', '.join(repr(str(c)) for c in absent)}: macro-F1 (which picks the best epoch) "
                    f"is over the {len(classes) - len(absent)} classes they hold; add validation cells of every class to judge all of them")
    return TrainingCells(train, val, held.calibration, classes, held.source, held.optimistic, summary, config.seed)


def split_validation(held: CalibrationSplit, config: FinetuneConfig, gene_order, options) -> tuple[LabelledCells, LabelledCells]:
    """Training and validation cells: --val-data, else the base's held-out cells calibration left, else a split."""
    from sklearn.model_selection import train_test_split

    cells = held.rest
    if held.validation is not None:
        return cells, held.validation
    if config.val_data:
        return cells, load_labelled(config.val_data, gene_order, config.label_key, options, config.stream)
    train_idx, val_idx = train_test_split(
        np.arange(len(cells)), test_size=config.val_fraction, stratify=cells.labels, random_state=config.seed
    )
    return cells.subset(np.sort(train_idx)), cells.subset(np.sort(val_idx))


def base_never_saw(base_model: str, path: str, cells: LabelledCells) -> np.ndarray | None:
    """True for the cells of `path` the base model was not pretrained on; None where the base keeps no record of
    this file (official weights, or a file it was not built from)."""
    record = Path(base_model) / "pretrain.json"
    if not record.is_file():
        return None
    summary = json.loads(record.read_text())
    if "held_out" not in summary:  # built before scl recorded its hold-out: it trained on every cell of its files
        same_name = any(Path(p).name == Path(path).name for p in summary.get("config", {}).get("data", []))
        return np.zeros(len(cells), dtype=bool) if same_name else None
    digest = file_sha256(path)
    for entry in summary["held_out"]["files"]:
        if entry["sha256"] == digest:
            return np.isin(cells.rows, entry["held_out_rows"])
    return None


KEY_BLOCK = 4096  # cells read at once by cell_keys


def cell_keys(cells: LabelledCells, processes: Processes = Processes()) -> np.ndarray:
    """One 64-bit key per cell from its obs name and its expression: the same cell in any file that holds it, while
    cells that only share a name (10x barcodes repeat across samples) differ by their counts. Reads every cell once,
    a block at a time (under torchrun each process its part), which also checks the values of streamed cells before training."""
    weights = np.random.default_rng(0).standard_normal(cells.x.shape[1])

    def products(start: int, stop: int) -> np.ndarray:
        return np.concatenate([np.zeros(0)] + [cells.x[i : min(i + KEY_BLOCK, stop)].tocsr() @ weights for i in range(start, stop, KEY_BLOCK)])

    fingerprint = np.ascontiguousarray(processes.split_work(len(cells), products), dtype=np.float64).view(np.uint64)
    names = np.fromiter((zlib.crc32(str(c).encode()) for c in cells.cell_ids), dtype=np.uint64, count=len(cells))
    return fingerprint ^ (names * np.uint64(0x9E3779B97F4A7C15))  # spread the 32-bit name hash over 64 bits


def refuse_shared_cells(roles: list[tuple[str, LabelledCells, str]], processes: Processes = Processes()) -> None:
    """Training, validation and calibration cells (role, cells, where from) must be disjoint: a cell in two roles
    would be judged on what it was fitted to."""
    keys = [cell_keys(cells, processes) for _, cells, _ in roles]
    for i in range(len(roles)):
        for j in range(i + 1, len(roles)):
            shared, at, _ = np.intersect1d(keys[i], keys[j], return_indices=True)
            if len(shared):
                (a, cells, path_a), (b, _, path_b) = roles[i], roles[j]
                raise SclError(f"the {a} cells ({path_a}) and the {b} cells ({path_b}) share {len(shared):,} cells (e.g. "
                               f"{str(cells.cell_ids[at[0]])!r}): each cell may serve one role; give files without common cells, or "
                               "leave --val-data and --calibration-data out to split --data.")


def unknown_to_base(base_model: str, name: str) -> str:
    """What can be said of a file the base keeps no record of."""
    if (Path(base_model) / "pretrain.json").is_file():
        return f"{name} is not among the files the base model's pretrain.json records, so whether the base saw them is unknown"
    return "the base model keeps no pretrain.json, so whether it saw them is unknown (the official weights never saw the user's cells)"


def optimistic_warning(path: str) -> str:
    return (f"warning: the base model was pretrained on every cell of {Path(path).name} (its pretrain.json holds none of them out), so the "
            "calibration cells are not new to it and its calibration is optimistic: on new cells expect prediction sets to cover less and "
            "more cells to be flagged novel than promised; pretrain with --holdout 0.2 or give --calibration-data with cells the base never saw.")


def split_calibration(cells: LabelledCells, config: FinetuneConfig, gene_order, options, processes: Processes = Processes()) -> CalibrationSplit:
    """The calibration cells, from --calibration-data or from `cells`, and the cells left for training and validation;
    without --val-data, the cells of --data the base held out and calibration does not take validate."""
    held = _calibration(cells, config, gene_order, options)
    if config.calibration_data:  # before validation is taken from --data, so the overlap is named as the user made it
        refuse_shared_cells([("training", cells, config.data), ("calibration", held.calibration, config.calibration_data)], processes)
    if config.calibration_data and not config.val_data:
        unseen = base_never_saw(config.base_model, config.data, held.rest)
        if unseen is not None and unseen.any():
            held.rest, held.validation = held.rest.subset(~unseen), held.rest.subset(unseen)
    return held


def validation_summary(config: FinetuneConfig, val: LabelledCells, held: CalibrationSplit) -> dict:
    """Where the validation cells came from and how many the base was pretrained on; one warning line when it was
    on any: macro-F1 on cells the base has seen saturates (1.000 for the probe, k-NN and LoRA alike) and picks no epoch."""
    path = config.val_data or config.data
    name = Path(path).name
    if held.validation is not None:
        source = f"{len(val):,} cells of {name} the base model held out (pretrain.json; the others calibrate)"
    elif config.val_data:
        source = f"{len(val):,} cells of {name} (--val-data)"
    else:
        source = f"{len(val):,} cells of {name} ({config.val_fraction:.0%} per type)"
    unseen = base_never_saw(config.base_model, path, val)
    seen = None if unseen is None else int((~unseen).sum())
    if seen:
        log.warning(f"warning: the base model was pretrained on {seen:,} of the {len(val):,} validation cells, so validation (which picks "
                    "the epoch) is optimistic; report.md leads with the calibration cells' scores. Pretrain with --holdout 0.2 (scl-train "
                    "then validates on held-out cells) or give --val-data with cells the base never saw.")
    return {"source": source, "cells": len(val), "seen_by_base": seen, "optimistic": bool(seen)}


def _calibration(cells: LabelledCells, config: FinetuneConfig, gene_order, options) -> CalibrationSplit:
    if config.calibration_data:
        calibration = load_labelled(config.calibration_data, gene_order, config.label_key, options, config.stream)
        unseen = base_never_saw(config.base_model, config.calibration_data, calibration)
        name = Path(config.calibration_data).name
        if unseen is None:
            return CalibrationSplit(cells, calibration, f"{len(calibration):,} cells of {name} (--calibration-data); "
                                    + unknown_to_base(config.base_model, name), False)
        if unseen.all():
            return CalibrationSplit(cells, calibration, f"{len(calibration):,} cells of {name} (--calibration-data), all held out by the base", False)
        if unseen.any():
            log.warning(f"the base model was pretrained on {int((~unseen).sum()):,} of the cells of {name}: calibrating on the other {int(unseen.sum()):,}")
            return CalibrationSplit(cells, calibration.subset(unseen), f"the {int(unseen.sum()):,} cells of {name} (--calibration-data) the base held out", False)
        log.warning(optimistic_warning(config.calibration_data))
        return CalibrationSplit(cells, calibration, f"{len(calibration):,} cells of {name} (--calibration-data), all in the base's training data", True)
    name = Path(config.data).name
    unseen = base_never_saw(config.base_model, config.data, cells)
    if unseen is not None and unseen.any():
        if config.val_data:
            return CalibrationSplit(cells.subset(~unseen), cells.subset(unseen), f"the {int(unseen.sum()):,} cells of {name} the base model held out (pretrain.json)", False)
        unseen_cells = cells.subset(unseen)  # half validate (per type), half calibrate: both on cells the base never saw
        to_val = stratified_holdout(unseen_cells.labels, 0.5, config.seed)
        return CalibrationSplit(cells.subset(~unseen), unseen_cells.subset(~to_val), f"{int((~to_val).sum()):,} of the {int(unseen.sum()):,} cells of "
                                f"{name} the base model held out (pretrain.json; the others validate)", False, validation=unseen_cells.subset(to_val))
    held = stratified_holdout(cells.labels, config.calibration_fraction, config.seed)
    if unseen is None:
        return CalibrationSplit(cells.subset(~held), cells.subset(held), f"{int(held.sum()):,} cells of {name} ({config.calibration_fraction:.0%} per type); "
                                + unknown_to_base(config.base_model, name), False)
    log.warning(optimistic_warning(config.data))
    return CalibrationSplit(cells.subset(~held), cells.subset(held), f"{int(held.sum()):,} cells of {name} ({config.calibration_fraction:.0%} per type), all in the base's training data", True)
