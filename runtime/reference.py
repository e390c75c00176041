"""A labelled reference: cells embedded by one model, searchable by cosine distance, that annotate new cells by their
nearest neighbours (SCimilarity's CellAnnotation) and answer "which reference cells look like these?" (CellQuery).

A reference is a folder (`*.sclref`) written whole or not at all:

    reference.json   the card: model digest, label key, labels and their cells, files read (SHA-256), index settings,
                     the SHA-256 of the two files below (checked on load), the held-out cells' distances
    cells.h5         per indexed cell: id, label code, file code, the obs columns kept
    embedding.npy    (exact index) or index.hnsw (hnswlib graph)

Novelty by neighbours: a share of the reference's cells (chosen by a hash of the cell id, so the same cells whatever
the files' order) is kept out of the index; their distance to the nearest indexed cell, by label, is what a query
cell's `knn_min_dist` is judged against (a conformal p-value, as the head's novelty is judged against its
calibration cells).
"""

from __future__ import annotations

import datetime
import json
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from . import integrity
from .atomic import atomic_folder
from .bounds import Bounds, check_setting
from .calls import KNN_COLUMNS, NOVELTY_ALPHA
from .conformal import Calibration
from .errors import SclError
from .neighbours import KINDS, HnswIndex, build_index

FORMAT = 1
CARD, CELLS = "reference.json", "cells.h5"
HOLDOUT_SHARE, HOLDOUT_MAX = 0.05, 5000  # cells kept out of the index to judge novelty: 5%, at most 5,000
HOLDOUT_BOUNDS = Bounds(0, 1, high_open=True, words="a share in [0, 1)")
DEFAULT_K = 50  # SCimilarity's CellAnnotation default
WEIGHTINGS = ("distance", "uniform")  # each neighbour adds 1/distance (SCimilarity's vote) or 1 to its label
DEFAULT_WEIGHTING = "distance"
DEFAULT_SCIMILARITY_EF = 100  # ... and its search breadth (get_predictions_knn's ef)
STR = h5py.string_dtype()


def model_digest(annotator) -> str:
    """What a reference is tied to: the model's content digest (its weights and metadata)."""
    meta = annotator.session.meta
    return str(meta.get(integrity.KEY) or meta.get("weights_sha256"))


def held_out(cell_ids: np.ndarray, share: float) -> np.ndarray:
    """bool per cell: kept out of the index. By a hash of the id, so the choice does not depend on the files' order."""
    hashes = np.fromiter((zlib.crc32(str(i).encode()) for i in cell_ids), dtype=np.uint64, count=len(cell_ids))
    return hashes < np.uint64(share * 2**32)


@dataclass
class ReferenceCells:
    """Per reference cell, in index order: id, label code, file code and the obs columns kept."""

    ids: np.ndarray
    labels: np.ndarray
    files: np.ndarray
    obs: dict[str, np.ndarray]

    def subset(self, rows) -> ReferenceCells:
        return ReferenceCells(self.ids[rows], self.labels[rows], self.files[rows], {k: v[rows] for k, v in self.obs.items()})


def _labelled_cells(item, source, label_key: str, keep_obs: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The label and kept obs columns of one input's cells, in the source's order."""
    obs = getattr(item, "obs", None)

    def column(key: str) -> np.ndarray:
        if obs is not None:
            if key not in obs.columns:
                raise SclError(f"{source.path}: obs has no column {key!r}; choose one of: {', '.join(sorted(map(str, obs.columns)))}.")
            return obs[key].to_numpy()
        if not hasattr(source.matrix, "obs_column"):
            raise SclError(f"{source.path}: a reference needs labelled cells, from an .h5ad or .zarr file (obs) or an AnnData.")
        return source.matrix.obs_column(key)

    return column(label_key), {key: np.asarray(column(key)).astype(str) for key in keep_obs}


class Reference:
    """Labelled cells embedded by one model, with a nearest-neighbour index.

    Examples
    --------
    >>> annotator = scl.Annotator("model.onnx")
    >>> ref = scl.Reference.build(["atlas1.h5ad", "atlas2.h5ad"], annotator, label_key="cell_type", keep_obs=["study"])
    >>> ref.save("atlas.sclref")
    >>> result = annotator.annotate(adata, reference=ref)
    >>> result.to_frame()[["label", "knn_label", "knn_share", "knn_min_dist"]].head()
    >>> hits = ref.search(result.embedding[:5], k=10)
    """

    def __init__(self, card: dict, cells: ReferenceCells, index, path: str | None = None):
        self.card, self.cells, self.index, self.path = card, cells, index, path
        self.labels: list[str] = card["labels"]
        holdout = card["holdout"]
        self.novelty = (Calibration([np.empty(0)] * len(self.labels), [np.sort(np.asarray(d, np.float64)) for d in holdout["distances_by_label"]])
                        if holdout["cells"] else None)

    def __len__(self) -> int:
        return len(self.cells.ids)

    def __repr__(self) -> str:
        return f"Reference({self.path or 'not saved'}: {len(self):,} cells, {len(self.labels)} labels, {self.index.kind} index)"

    @classmethod
    def build(cls, data, annotator, label_key: str = "cell_type", keep_obs=(), index: str = "auto", holdout: float = HOLDOUT_SHARE,
              progress: bool = True, read=None) -> Reference:
        """Embed labelled cells (paths of .h5ad/.zarr files, AnnData objects, or a list of them) with `annotator`'s model.

        Parameters
        ----------
        data
            One input or a list: each cell's label is obs[label_key]; cells without one are left out.
        annotator
            The `Annotator` whose embedding the reference is in; queries must use the same model.
        keep_obs
            obs columns to keep per cell (study, donor, ...): search hits report them.
        index
            "auto" (exact search up to 10,000 cells, else an HNSW graph), "exact" or "hnsw" (needs scl[reference]).
        holdout
            Share of cells kept out of the index to judge novelty by neighbours (at most 5,000 cells).
        """
        check_setting("holdout", holdout, HOLDOUT_BOUNDS, HOLDOUT_SHARE)
        items = list(data) if isinstance(data, (list, tuple)) else [data]
        keep_obs = [keep_obs] if isinstance(keep_obs, str) else list(keep_obs)
        parts = [_embedded_cells(item, annotator, label_key, keep_obs, read, f"reference {i + 1}/{len(items)}", progress) for i, item in enumerate(items)]
        file_cards = [card for _, card in parts]
        embeddings, ids, labels, kept = ([p[0][key] for p in parts] for key in ("embedding", "ids", "labels", "obs"))
        ids_all = np.concatenate(ids)
        if not len(ids_all):
            raise SclError(f"no labelled cells in {', '.join(c['path'] for c in file_cards)} (obs[{label_key!r}] is empty everywhere).")
        files = np.concatenate([np.full(len(i), number, dtype=np.int32) for number, i in enumerate(ids)])
        names, codes = np.unique(np.concatenate(labels), return_inverse=True)
        cells = ReferenceCells(ids_all, codes.astype(np.int32), files, {k: np.concatenate([obs[k] for obs in kept]) for k in keep_obs})
        embedding = np.concatenate(embeddings)
        share = min(holdout, HOLDOUT_MAX / len(cells.ids))
        out = held_out(cells.ids, share) if len(cells.ids) > 1 else np.zeros(1, bool)
        idx = build_index(embedding[~out], index, annotator.workers)
        distances = idx.search(embedding[out], 1)[1][:, 0] if out.any() else np.empty(0)
        by_label = [np.sort(distances[cells.labels[out] == k]).round(7).tolist() for k in range(len(names))]
        indexed = cells.subset(~out)
        card = {
            "format": FORMAT, "model": {"path": annotator.session.path, "digest": model_digest(annotator), "latent": int(embedding.shape[1])},
            "label_key": label_key, "labels": names.tolist(), "cells": int(len(indexed.ids)),
            "cells_per_label": dict(Counter(np.asarray(names)[indexed.labels].tolist()).most_common()), "keep_obs": keep_obs, "files": file_cards,
            "index": {}, "holdout": {"share": round(float(share), 6), "cells": int(out.sum()), "distances_by_label": by_label},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "scl_version": version("scl"),
        }
        return cls(card, indexed, idx)

    @classmethod
    def from_scimilarity(cls, model_dir, annotator) -> Reference:
        """SCimilarity's shipped reference: `annotation/labelled_kNN.bin` (an hnswlib cosine index of the base's
        embeddings) and `reference_labels.tsv` (label, and study, per indexed cell) in its model folder. `annotator`
        must be that folder's encoder exported as it is (scl-export MODEL_DIR): the index is in its embedding."""
        folder = Path(model_dir)
        index_file, labels_file = folder / "annotation" / "labelled_kNN.bin", folder / "annotation" / "reference_labels.tsv"
        for needed in (index_file, labels_file, folder / "encoder.ckpt"):
            if not needed.is_file():
                raise SclError(f"{needed}: missing; SCimilarity's model folder holds annotation/labelled_kNN.bin, annotation/reference_labels.tsv and encoder.ckpt.")
        card = annotator.session.meta.get("model_card", {})
        if card.get("base_model_encoder_sha256") != integrity.file_sha256(str(folder / "encoder.ckpt")) or not annotator.session.encoder_only:
            raise SclError(f"{annotator.session.path} is not {folder}'s own encoder, whose embedding the index holds: export the folder itself "
                           f"(scl-export {folder} --out base.onnx) and import with that model.", "model")
        rows = [line.rstrip("\n").split("\t") for line in labels_file.read_text().splitlines() if line.strip()]
        names, codes = np.unique([r[0] for r in rows], return_inverse=True)
        studies = np.array([r[1] if len(r) > 1 else "" for r in rows], dtype=str)
        index = HnswIndex.load(str(index_file.parent), {"ef": DEFAULT_SCIMILARITY_EF}, len(rows), annotator.session.latent, file=index_file.name)
        cells = ReferenceCells(np.arange(len(rows)).astype(str), codes.astype(np.int32), np.zeros(len(rows), np.int32),
                               {"study": studies} if studies.any() else {})
        card = {
            "format": FORMAT, "model": {"path": annotator.session.path, "digest": model_digest(annotator), "latent": annotator.session.latent},
            "label_key": "reference_labels.tsv", "labels": names.tolist(), "cells": len(rows),
            "cells_per_label": dict(Counter(names[codes].tolist()).most_common()), "keep_obs": list(cells.obs),
            "files": [{"path": str(p), "sha256": integrity.file_sha256(str(p)), "cells": len(rows), "labelled": len(rows)} for p in (index_file, labels_file)],
            "imported_from": "SCimilarity's annotation reference", "index": {},
            "holdout": {"share": 0.0, "cells": 0, "distances_by_label": [[] for _ in names]},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "scl_version": version("scl"),
        }
        return cls(card, cells, index)

    def save(self, path, overwrite: bool = False) -> str:
        """Write the reference folder (`*.sclref`) whole, or leave what was there."""
        path = Path(path)
        check_out(path, overwrite)
        with atomic_folder(path) as tmp:
            card = dict(self.card, index=self.index.save(tmp))
            with h5py.File(os.path.join(tmp, CELLS), "w") as f:
                f.create_dataset("ids", data=self.cells.ids.astype(object), dtype=STR)
                f.create_dataset("labels", data=self.cells.labels)
                f.create_dataset("files", data=self.cells.files)
                for key, values in self.cells.obs.items():
                    f.create_dataset(f"obs/{key}", data=values.astype(object), dtype=STR)
            card["sha256"] = {name: integrity.file_sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
            Path(tmp, CARD).write_text(json.dumps(card, indent=1))
        self.card, self.path = card, str(path)
        return str(path)

    @classmethod
    def load(cls, path) -> Reference:
        """A reference folder as `save` wrote it; its files are checked against the SHA-256 its card holds."""
        path = str(path)
        card_path = os.path.join(path, CARD)
        if not os.path.isfile(card_path):
            raise SclError(f"{path}: not a reference (no {CARD}); build one with scl-reference build.", "reference")
        try:
            card = json.loads(Path(card_path).read_text())
            expected = dict(card["sha256"])
            int(card["format"]), list(card["labels"]), dict(card["index"])
        except (ValueError, KeyError, TypeError) as err:
            raise SclError(f"{card_path}: the reference card is damaged ({err}); build the reference again.", "reference") from None
        if card["format"] > FORMAT:
            raise SclError(f"{path}: reference format {card['format']} is newer than this scl reads ({FORMAT}); upgrade scl.", "reference")
        for name, digest in expected.items():
            file = os.path.join(path, name)
            if not os.path.isfile(file) or integrity.file_sha256(file) != digest:
                raise SclError(f"{file}: missing, or changed since the reference was built (SHA-256 differs); build the reference again.", "reference")
        with h5py.File(os.path.join(path, CELLS), "r") as f:
            cells = ReferenceCells(f["ids"].asstr()[()], f["labels"][()], f["files"][()], {k: f[f"obs/{k}"].asstr()[()] for k in card["keep_obs"]})
        kind = card["index"]["kind"]
        if kind not in KINDS:
            raise SclError(f"{path}: unknown index kind {kind!r}; build the reference again with this scl.", "reference")
        index = KINDS[kind].load(path, card["index"], len(cells.ids), card["model"]["latent"])
        return cls(card, cells, index, path)

    def check_model(self, annotator) -> None:
        """A reference answers only in the embedding it was built in."""
        if model_digest(annotator) != self.card["model"]["digest"]:
            raise SclError(f"{self.path or 'the reference'} was built with {self.card['model']['path']}, not {annotator.session.path} (their content "
                           "digests differ; an int8 or fp16 variant is another model too): annotate with that model, or build the reference "
                           "again with this one.", "reference")

    def search(self, embedding: np.ndarray, k: int = DEFAULT_K, labels_kept: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest reference cells of each embedded cell: (rows into `cells` [n, k], cosine distances [n, k]);
        `labels_kept` (bool per label): only cells of those labels."""
        allowed = None if labels_kept is None else np.asarray(labels_kept)[self.cells.labels]
        return self.index.search(np.atleast_2d(embedding), k, allowed)

    def hits(self, embedding: np.ndarray, k: int = DEFAULT_K, query_ids=None, groups=None) -> dict[str, np.ndarray]:
        """The k nearest reference cells of each query cell, or of each group's centroid (`groups`: one id per cell),
        as columns: query, rank, cell_id, distance, label and the kept obs columns (pandas.DataFrame(hits) makes a table)."""
        embedding = np.atleast_2d(embedding)
        names = np.arange(len(embedding)).astype(str) if query_ids is None else np.asarray(query_ids, dtype=str)
        if groups is not None:
            groups = np.asarray(groups, dtype=object)
            if len(groups) != len(embedding):
                raise SclError(f"groups: {len(groups):,} ids for {len(embedding):,} cells; give one group per cell.")
            names = np.array(sorted({str(g) for g in groups if g is not None and g == g}), dtype=str)
            keys = np.asarray([str(g) for g in groups])
            centroids = np.stack([embedding[keys == g].mean(axis=0) for g in names])
            embedding = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        rows, distances = self.search(embedding, k)
        hit = rows.ravel()
        table = {"query": np.repeat(names, rows.shape[1]), "rank": np.tile(np.arange(1, rows.shape[1] + 1), len(rows)),
                 "cell_id": self.cells.ids[hit], "distance": distances.ravel().round(6), "label": np.asarray(self.labels, dtype=object)[self.cells.labels[hit]]}
        return table | {key: values[hit] for key, values in self.cells.obs.items()}

    def columns(self, with_head: bool = True) -> list:
        """The calls.KNN_COLUMNS this reference gives: the novelty ones need held-out cells, knn_agrees a head."""
        given = {"knn_novelty_p": self.novelty is not None, "knn_novel": self.novelty is not None, "knn_agrees": with_head}
        return [c for c in KNN_COLUMNS if given.get(c.name, True)]

    def calls(self, embedding: np.ndarray, k: int = DEFAULT_K, alpha: float = NOVELTY_ALPHA, head_labels: np.ndarray | None = None,
              labels_kept: np.ndarray | None = None, weighting: str = DEFAULT_WEIGHTING) -> dict[str, np.ndarray]:
        """The KNN_COLUMNS of embedded cells: SCimilarity's vote, where each of the k nearest reference cells adds
        1/distance to its label (`weighting="uniform"`: 1). `head_labels`: the head's most probable type per cell
        (names), for knn_agrees; `labels_kept` (bool per label): only cells of those labels vote."""
        if weighting not in WEIGHTINGS:
            raise SclError(f"weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}.")
        rows, distances = self.search(embedding, k, labels_kept)
        n, n_labels = len(rows), len(self.labels)
        weights = 1.0 / np.maximum(distances, 1e-6) if weighting == "distance" else np.ones_like(distances)
        slot = np.repeat(np.arange(n), rows.shape[1]) * n_labels + self.cells.labels[rows].ravel()  # (cell, label) of each neighbour
        scores = np.bincount(slot, weights.ravel(), minlength=n * n_labels).reshape(n, n_labels)
        first = np.full(n * n_labels, rows.shape[1], dtype=np.int64)  # ties go to the label of the nearer cell, as Counter.most_common
        np.minimum.at(first, slot, np.tile(np.arange(rows.shape[1]), n))
        order = np.lexsort((first.reshape(n, n_labels), -scores), axis=1)
        best, second = order[:, 0], order[:, 1] if n_labels > 1 else order[:, 0]
        at = np.arange(n)
        names = np.array(self.labels + [""], dtype=object)
        has_second = (scores[at, second] > 0) & (second != best)
        calls = {"knn_label": names[best], "knn_share": (scores[at, best] / scores.sum(axis=1)).astype(np.float32),
                 "knn_second_label": names[np.where(has_second, second, n_labels)], "knn_min_dist": distances[:, 0].astype(np.float32)}
        if self.novelty is not None:
            calls["knn_novelty_p"] = self.novelty.novelty_p(calls["knn_min_dist"], best)
            calls["knn_novel"] = calls["knn_novelty_p"] <= alpha
        if head_labels is not None:
            calls["knn_agrees"] = np.asarray(head_labels, dtype=object) == calls["knn_label"]
        return calls

    def describe(self) -> dict:
        """What a run's report says of the reference."""
        return {"path": self.path, "cells": len(self), "labels": len(self.labels), "index": self.card["index"] or {"kind": self.index.kind},
                "held_out_cells": self.card["holdout"]["cells"], "model": self.card["model"]["path"]}


def check_out(path, overwrite: bool) -> None:
    """Where a reference may be written: nowhere taken unless overwrite, and never over a folder that is not one."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise SclError(f"{path} exists; choose another --out or add --overwrite.", "out")
    if path.exists() and not (path / CARD).exists():
        raise SclError(f"{path} is not a reference folder; scl will not replace it.", "out")


def _embedded_cells(item, annotator, label_key: str, keep_obs: list[str], read, desc: str, progress: bool) -> tuple[dict, dict]:
    """One input's labelled cells, embedded block by block: their embedding, ids, labels and kept obs columns, and the
    input's card."""
    from .annotator import AnnotateOptions
    from .pipeline import Pipeline

    with annotator.open(item, read=read) as source:
        label, obs = _labelled_cells(item, source, label_key, keep_obs)
        has_label = ~_missing(label)
        pipeline = Pipeline(annotator, AnnotateOptions(progress=False), source.alignment.matched)
        embedding = np.empty((len(label), annotator.session.latent), dtype=np.float32)
        ids, start = [], 0
        with tqdm(total=source.n_cells, desc=desc, unit="cells", disable=not progress, leave=False) as bar:
            for block in pipeline.blocks(source):
                embedding[start:start + len(block.cell_ids)] = block.embedding
                ids.append(np.asarray(block.cell_ids, dtype=str))
                start += len(block.cell_ids)
                bar.update(len(block.cell_ids))
        cells = {"embedding": embedding[has_label], "ids": np.concatenate(ids)[has_label], "labels": np.asarray(label, dtype=object)[has_label].astype(str),
                 "obs": {key: values[has_label] for key, values in obs.items()}}
        return cells, _file_card(item, source, int(has_label.sum()))


def _missing(values) -> np.ndarray:
    from .voting import missing

    return missing(np.asarray(values, dtype=object))


def _file_card(item, source, labelled: int) -> dict:
    if isinstance(item, (str, os.PathLike)):
        return {"path": str(item), "sha256": integrity.file_sha256(str(item)) if os.path.isfile(item) else None, "cells": source.n_cells, "labelled": labelled}
    return {"path": "AnnData in memory", "sha256": None, "cells": source.n_cells, "labelled": labelled}


def as_reference(reference) -> Reference | None:
    """A Reference, or one loaded from its folder's path; None stays None."""
    if reference is None or isinstance(reference, Reference):
        return reference
    return Reference.load(reference)
